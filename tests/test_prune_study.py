"""experiments.prune_study and its peer runner (experiments.peer_pruning): the MAC target bisected to the latency
target's measured latency (a planted slow group makes the two rankings differ), the bisection on a planted
knob -> latency law, torch-pruning's pruned ViT and Swin hitting a MAC target and running with equal heads, its
Taylor ranking taking planted dead channels first with the output unchanged, Swin's widths cut through PatchMerging,
the verdicts on planted summaries, a resumed study that prunes and trains nothing, and bad flags as one line."""
import copy
import math
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from timm.layers.attention import Attention
from timm.models.swin_transformer import PatchMerging, WindowAttention

from analysis import taylor_prune as tpr
from experiments import peer_pruning, prune_study
from evit import launch
from evit.claims import CONFIRMED, INCONCLUSIVE, REFUTED
from evit.models import create_model
from tests.test_taylor_prune import batches, tiny_swin, tiny_vit
from tests.test_taylor_prune_latency import quick, with_a_slow_ffn
from tests.test_train import one_line_error


@pytest.mark.timing
def test_mac_target_is_bisected_to_the_latency_targets_measured_latency():
    """The slow FFN of block 0 costs most of the latency and as many MACs as block 1's: the latency target takes
    its channels, the MAC target (ranking by importance alone) takes the fast FFN's too; bisected, the MAC target
    lands at the latency target's latency, timed afresh against it."""
    torch.set_num_threads(1)
    by_latency = tpr.prune_to_target(with_a_slow_ffn(), batches(), steps=1, prune_width=False, target_latency=0.7,
                                  latency=quick())
    images = quick().images(batches())
    found = prune_study.match_latency(
        lambda x: tpr.prune_to_target(with_a_slow_ffn(), batches(), target_macs=x, steps=1, prune_width=False),
        by_latency.model, quick(calls=60), images, probes=8)
    by_macs = found.result
    assert by_latency.summary["latency_kept"] < 0.85  # pruned indeed
    # The fast FFN saves next to nothing: the latency target leaves it nearly whole (Q/K dims, near free at random
    # initialization, may go too).
    assert by_latency.blocks.ffn_kept[1] >= 0.9 > by_latency.blocks.ffn_kept[0]
    # The MAC target takes channels the latency target leaves, which save MACs but no time.
    assert by_macs.blocks.ffn_kept[1] < by_latency.blocks.ffn_kept[1]
    probes = [float(p.split(":")[0]) for p in found.probes.split()]
    assert 1 < len(probes) <= 8 and round(found.knob, 4) in probes and by_macs.summary["target_macs"] == found.knob
    ratio = quick(calls=100).measure(by_latency.model, by_macs.model, images)[2]
    assert ratio == pytest.approx(1, abs=prune_study.LATENCY_MATCH)


# --- the bisection, on a planted law ------------------------------------------------------------------------------

@dataclass
class Knobbed:
    """A stand-in for a pruned model: the knob it was pruned at."""
    knob: float


@dataclass
class Pruning:
    model: Knobbed


class PlantedTimer:
    """A timer whose latency is a planted law of the knob a model was pruned at (no timing)."""

    def __init__(self, law):
        self.law, self.calls = law, 0

    def measure(self, reference, model, images):
        self.calls += 1
        return self.law(reference.knob), self.law(model.knob), self.law(model.knob) / self.law(reference.knob)


LAWS = [(lambda x: 0.2 + 0.8 * x ** 2, 0.37),   # convex, as MAC-targeted
        (lambda x: math.exp(3 * x), 0.81),       # steep near full width
        (lambda x: 1 + x, 0.05)]                 # flat, anchor near the edge


@pytest.mark.parametrize("law, anchor", LAWS)
@pytest.mark.parametrize("start", [0.5, 0.9])
def test_bisection_lands_on_a_planted_knob_to_latency_law(law, anchor, start):
    """Each probe is 'pruned' at the search's knob and timed against the anchor by the planted law: the match lands
    within the tolerance of the anchor's latency, at the knob where the law says so, in fewer probes than halving
    the bracket would take; the first probe is at the guess, each later one inside the bracket the earlier ones
    left around the anchor's knob, shrinking it; the probes are recorded in order and each was timed once."""
    timer = PlantedTimer(law)
    found = prune_study.match_latency(lambda x: Pruning(Knobbed(x)), Knobbed(anchor), timer, None, probes=12,
                                      start=start)
    assert abs(found.ratio - 1) <= prune_study.LATENCY_TOLERANCE
    assert found.ratio == law(found.knob) / law(anchor) and found.result.model.knob == found.knob
    tried = [tuple(map(float, p.split(":"))) for p in found.probes.split()]
    assert tried[0][0] == start and len(tried) == timer.calls and tried[-1][0] == pytest.approx(found.knob, abs=1e-4)
    halvings = math.ceil(math.log2(1 / (2 * prune_study.LATENCY_TOLERANCE * anchor)))  # a generous bound
    assert len(tried) <= max(halvings, 4)
    low, high = 0.0, 1.0
    for knob, ratio in tried:
        assert low < knob < high
        low, high = (knob, high) if law(knob) < law(anchor) else (low, knob)
        assert low <= anchor <= high


def test_the_search_stops_at_the_knobs_resolution_on_a_noisy_staircase():
    """A latency target's knob moves the MACs in noisy jumps (each step stops within LATENCY_TOLERANCE of its
    goal, and one timing decides whether it tops up once more): no knob is within the tolerance, and once the
    bracket is narrower than the knob's resolution the search stops with the closest probe rather than spending
    every probe redrawing the noise."""
    draws = iter([0.06, -0.06, 0.065, -0.065, 0.062, -0.062] * 4)
    law = lambda x: 1 + 4 * (round(x / 0.03) * 0.03 - 0.6) + next(draws)  # noqa: E731  (1 near x = 0.6)
    found = prune_study.match_latency(lambda x: Pruning(Knobbed(x)), Knobbed(None), StaircaseTimer(law), None,
                                      probes=10, start=0.55, resolution=prune_study.KNOB_RESOLUTION["latency"])
    tried = [tuple(map(float, p.split(":"))) for p in found.probes.split()]
    assert abs(found.ratio - 1) == pytest.approx(min(abs(r - 1) for _, r in tried), abs=1e-3)  # probes: 3 decimals
    low, high, widths = 0.0, 1.0, []
    for knob, ratio in tried:
        assert low < knob < high
        low, high = (knob, high) if ratio < 1 else (low, knob)
        widths.append(high - low)
    assert widths[-1] < prune_study.KNOB_RESOLUTION["latency"] <= min(widths[:-1]) and len(tried) < 10


class StaircaseTimer:
    def __init__(self, law):
        self.law = law

    def measure(self, reference, model, images):
        return 1.0, self.law(model.knob), self.law(model.knob)


# --- torch-pruning's own Taylor pruning -------------------------------------------------------------------------

def small_vit():
    torch.manual_seed(0)
    return create_model("deit_proxy").eval()  # random weights: 28 px, width 96, 4 blocks of 3 heads


def assert_heads_equal_and_timm_attributes_set(model):
    for attn in (m for m in model.modules() if isinstance(m, (Attention, WindowAttention))):
        dims = attn.qkv.out_features // 3
        assert attn.qkv.out_features == 3 * dims and dims % attn.num_heads == 0
        assert attn.proj.in_features == dims and attn.scale == (dims // attn.num_heads) ** -0.5
        if isinstance(attn, Attention):
            assert attn.head_dim * attn.num_heads == attn.attn_dim == dims


@pytest.mark.parametrize("make, size, method", [(small_vit, 28, "tp_global"), (small_vit, 28, "tp_isomorphic"),
                                                (tiny_swin, 32, "tp_global")])
def test_torch_pruning_hits_the_mac_target_and_the_pruned_model_runs(make, size, method):
    """torch-pruning's pruning ratio bisected to 0.6 of the MACs (counted as ours are) lands within 1% on either
    side; the pruned model is timm's, runs, keeps its heads equal with timm's attributes set, and its knob is the
    ratio the bisection found."""
    model = make()
    data = batches(2, size, 10)
    goal = 0.6 * prune_study.model_macs(model, data[0][0])
    found = prune_study.match_macs(prune_study.prune_at(method, model, data, None, steps=2), goal, data[0][0],
                                   probes=10)
    pruned = found.result.model
    assert abs(prune_study.model_macs(pruned, data[0][0]) / goal - 1) <= prune_study.MAC_TOLERANCE
    assert found.result.summary["pruning_ratio"] == 1 - found.knob
    assert found.result.summary["setting"] == prune_study.PEERS[method]
    assert type(pruned) is type(model) and pruned(torch.randn(2, 3, size, size)).shape == (2, 10)
    assert_heads_equal_and_timm_attributes_set(pruned)
    table = found.result.blocks
    assert list(table.qk_dim) == [b.attn.qkv.out_features // 3 for b in pruned.modules() if hasattr(b, "mlp")]
    assert (table[["qk_kept", "ffn_kept", "width_kept"]] < 1).any(axis=None)
    assert not any("forward" in vars(m) for m in pruned.modules())  # timm's own forward, nothing patched left


def zero_rows_(layer, rows):
    with torch.no_grad():
        layer.weight[rows] = 0
        if layer.bias is not None:
            layer.bias[rows] = 0


def test_torch_pruning_global_takes_planted_dead_units_first_and_keeps_the_function():
    """FFN channels 1, 5 and 7 of block 0 and head dim 2 of block 1 (in every head, Q, K and V) carry nothing:
    their rows and the columns reading them are zero (block 1's Q and K scaled up, so that its softmax is sharp
    and a change of temperature shows). Global Taylor pruning of exactly 4 of the 72 units (width 12,
    per block 6 head dims and 24 FFN channels) removes them and nothing else, and the output stays the same: the
    softmax keeps its temperature although timm's SDPA takes the scale from the pruned head dim."""
    model = tiny_vit(num_classes=10)
    heads, head_dim = model.blocks[1].attn.num_heads, model.blocks[1].attn.head_dim
    zero_rows_(model.blocks[0].mlp.fc1, [1, 5, 7])
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[:2 * heads * head_dim] *= 30  # Q and K: a softmax far from uniform
        model.blocks[0].mlp.fc2.weight[:, [1, 5, 7]] = 0
        dead = [h * head_dim + 2 for h in range(heads)]
        zero_rows_(model.blocks[1].attn.qkv, [part * heads * head_dim + d for part in range(3) for d in dead])
        model.blocks[1].attn.proj.weight[:, dead] = 0
    original = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    units = 12 + 2 * (head_dim + 24)
    peer_pruning.tp_prune(model, batches(2, 16, 10), pruning_ratio=3.5 / units, steps=1)
    kept_ffn = [c for c in range(24) if c not in (1, 5, 7)]
    torch.testing.assert_close(model.blocks[0].mlp.fc1.weight, original.blocks[0].mlp.fc1.weight[kept_ffn])
    kept_dims = [h * head_dim + d for h in range(heads) for d in range(head_dim) if d != 2]
    torch.testing.assert_close(model.blocks[1].attn.proj.weight, original.blocks[1].attn.proj.weight[:, kept_dims])
    assert model.blocks[1].attn.head_dim == head_dim - 1 and model.embed_dim == 12 == model.cls_token.shape[-1]
    assert model.blocks[0].attn.qkv.out_features == 3 * heads * head_dim and model.blocks[1].mlp.fc1.out_features == 24
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)


def test_torch_pruning_cuts_swin_widths_through_patch_merging():
    """The merge runs the same function while torch-pruning traces it; afterwards stage 0's kept channels c are
    kept at c, C+c, 2C+c and 3C+c of the merge's norm (timm's 2x2 concatenation), and timm's forward is back."""
    model = tiny_swin()
    merge = model.layers[1].downsample
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        with peer_pruning.traceable_mergings(model):
            assert "forward" in vars(merge)
            torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    assert "forward" not in vars(merge)
    original = copy.deepcopy(model)
    peer_pruning.tp_prune(model, batches(2, 32, 10), pruning_ratio=0.3, steps=1)
    rows = original.patch_embed.proj.weight.flatten(1)
    kept = [next(i for i in range(len(rows)) if torch.equal(rows[i], row))
            for row in model.patch_embed.proj.weight.flatten(1)]
    width = len(rows)
    assert isinstance(merge, PatchMerging) and 0 < len(kept) < width
    cut = [k * width + c for k in range(4) for c in kept]
    torch.testing.assert_close(merge.norm.weight, original.layers[1].downsample.norm.weight[cut])
    assert model(x).shape == (2, 10)


def test_torch_pruning_refuses_models_it_is_not_prepared_for():
    with pytest.raises(peer_pruning.UnsupportedModelError, match="timm ViT/DeiT and Swin v1"):
        peer_pruning.check_supported(create_model("evit_m0_proxy"))


# --- verdicts and the summary -----------------------------------------------------------------------------------

def summary(latency=(80, 1), macs=(70, 2), tp_global=(75, 1), tp_isomorphic=(60, 1), macs_latency=1.02,
            tp_macs=1.005, seeds=3, points=prune_study.POINTS):
    """A planted summary: per point every method's (mean, std); at equal latency the MAC-targeted model at
    `macs_latency` of the latency-targeted one's latency, at equal MACs torch-pruning's models at `tp_macs` of our
    MAC target's MACs; the MAC target's accuracy is `macs` at both points."""
    accuracy = dict(latency=latency, macs=macs, tp_global=tp_global, tp_isomorphic=tp_isomorphic)
    rows = []
    for point in points:
        for method, (acc, std) in accuracy.items():
            matched = dict(equal_latency=dict(macs=macs_latency),
                           equal_macs=dict(tp_global=tp_macs, tp_isomorphic=tp_macs))[point].get(method, 1.0)
            rows.append(dict(model="m", point=point, method=method, acc_mean=acc, acc_std=std, seeds=seeds,
                             acc_pruned=50.0, acc_unpruned=90.0, latency_kept=0.6, macs_kept=0.5 * matched,
                             latency_vs_anchor=matched if point == "equal_latency" else 0.9,
                             macs_vs_anchor=matched if point == "equal_macs" else 0.7))
    return pd.DataFrame(rows)


def verdict(table, which):
    (claim,) = [c for c in prune_study.claims(table) if which in c.claim]
    return claim


@pytest.mark.parametrize("table, expected", [
    (summary((80, 1), (70, 2)), CONFIRMED),              # a gap of 10 beyond 1 + 2
    (summary((70, 1), (80, 2)), REFUTED),                # the same gap reversed
    (summary((80, 3), (76, 2)), INCONCLUSIVE),           # a gap of 4 within 3 + 2
    (summary((80, 1), (70, 2), macs_latency=1.1), INCONCLUSIVE),  # 10% apart: not at equal latency
    (summary((80, float("nan")), (70, float("nan")), seeds=1), INCONCLUSIVE),  # one seed: no spread to judge by
])
def test_latency_claim_verdicts_on_planted_summaries(table, expected):
    claim = verdict(table, "latency-aware")
    assert claim.verdict == expected and "(m)" in claim.claim
    at_latency = table[table.point == "equal_latency"].set_index("method")
    assert claim.numbers["m accuracy, latency target"] == at_latency.acc_mean["latency"]
    assert claim.numbers["m accuracy, MAC target at equal latency"] == at_latency.acc_mean["macs"]
    apart = abs(at_latency.latency_vs_anchor["macs"] - 1) > prune_study.LATENCY_MATCH
    assert ("not at equal latency" in claim.evidence) == apart


@pytest.mark.parametrize("ours, tp_global, tp_isomorphic, tp_macs, seeds, expected", [
    ((80, 1), (82, 1), (60, 1), 1.0, 3, CONFIRMED),     # 2 below the better peer: exactly the stds' sum, at least
    ((80, 1), (82.5, 1), (60, 1), 1.0, 3, REFUTED),     # 2.5 below: beyond 1 + 1
    ((80, 1), (60, 1), (82.5, 1), 1.0, 3, REFUTED),     # the isomorphic setting is the better peer here
    ((85, 1), (80, 1), (79, 1), 1.0, 3, CONFIRMED),     # ours ahead
    ((80, 1), (90, 1), (60, 1), 1.03, 3, INCONCLUSIVE),  # the peer keeps 3% more MACs: not at equal MACs
    ((80, 1), (90, 1), (60, 1), 0.985, 3, REFUTED),     # 1.5% fewer: equal MACs within 2%
    ((80, float("nan")), (90, float("nan")), (60, float("nan")), 1.0, 1, INCONCLUSIVE),  # one seed
])
def test_peer_claim_verdicts_on_planted_summaries(ours, tp_global, tp_isomorphic, tp_macs, seeds, expected):
    claim = verdict(summary(macs=ours, tp_global=tp_global, tp_isomorphic=tp_isomorphic, tp_macs=tp_macs,
                            seeds=seeds), "torch-pruning's accuracy at equal MACs")
    best = max(tp_global, tp_isomorphic)
    assert claim.verdict == expected and "(m)" in claim.claim
    assert claim.numbers == {"m accuracy, ours at equal MACs": ours[0],
                             "m accuracy, torch-pruning's best at equal MACs": best[0],
                             "m MACs of torch-pruning's best over ours": tp_macs}
    better = "torch-pruning, global" if tp_global >= tp_isomorphic else "torch-pruning, isomorphic"
    assert f"with {better} (torch-pruning's better setting" in claim.evidence
    assert ("not at equal MACs" in claim.evidence) == (abs(tp_macs - 1) > prune_study.MAC_MATCH)


def test_claims_need_their_rows():
    table = summary()
    ours_only = table[~table.method.isin(list(prune_study.PEERS))]
    assert [c.claim.split(" ")[0] for c in prune_study.claims(ours_only)] == ["latency-aware"]
    assert [c.claim.split(" ")[0] for c in prune_study.claims(table[table.point == "equal_macs"])] == ["our"]


def test_summary_has_a_row_per_model_point_and_method_with_its_spread():
    runs = pd.DataFrame([dict(model="m", point=point, method=method, seed=seed, acc_finetuned=70.0 + seed + i,
                              **{c: 0.5 for c in ("acc_unpruned", "acc_pruned", "macs_kept", "macs_vs_anchor",
                                                  "latency_kept", "latency_vs_anchor", "latency_ms", "unpruned_ms",
                                                  "params_kept", "target_macs", "target_latency", "pruning_ratio")})
                         for i, (point, method) in enumerate((p, m) for p in prune_study.POINTS
                                                             for m in prune_study.METHODS)
                         for seed in (0, 2)])
    table = prune_study.summarize(runs)
    assert list(table[["point", "method"]].itertuples(index=False, name=None)) == [
        (p, m) for p in prune_study.POINTS for m in prune_study.METHODS]
    assert (table.acc_mean == 71.0 + pd.Series(range(8))).all() and (table.seeds == 2).all()
    assert table.acc_std.tolist() == pytest.approx([math.sqrt(2)] * 8)
    assert {"macs_kept", "macs_vs_anchor", "latency_kept", "latency_vs_anchor", "acc_pruned", "pruning_ratio",
            "target_macs", "target_latency"} <= set(table)


# --- the study end to end ---------------------------------------------------------------------------------------

TINY = ["--models", "deit_proxy", "--weights", "random", "--data", "digits", "--seeds", "0,1", "--target-latency",
        "0.8", "--steps", "1", "--batches", "1", "--batch", "8", "--latency-batch", "2", "--timing-calls", "20",
        "--probes", "2", "--finetune-images", "32", "--val-images", "32", "--batch-size", "32"]


def test_a_second_run_prunes_and_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EVIT_CACHE", str(tmp_path / "zoo"))
    monkeypatch.setattr(prune_study, "latency_model", lambda s: quick(calls=10, cache_dir=tmp_path / "zoo" / "latency"))
    out = tmp_path / "out"
    first = prune_study.main([*TINY, "--out", str(out)])
    cells = {(p, m) for p in prune_study.POINTS for m in prune_study.METHODS}
    assert len(first) == 16 and set(zip(first.point, first.method)) == cells and set(first.seed) == {0, 1}
    assert first.latency_kept.between(0, 1.5).all() and (first.macs_kept <= 1).all()
    anchors = first[[prune_study.ANCHORS[p] == m for p, m in zip(first.point, first.method)]]
    assert (anchors.latency_vs_anchor == 1).all() and (anchors.macs_vs_anchor == 1).all()
    peers = first[first.method.isin(list(prune_study.PEERS))]
    assert peers.pruning_ratio.between(0, 1).all() and peers.target_macs.isna().all()
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.seeds) == [2] * 8 and (out / "prune_study.png").stat().st_size > 0
    (folder,) = (out / "pruned").glob("deit_proxy-*")
    assert {tuple(p.name.split("-")[:2]) for p in folder.glob("*.pth")} == cells
    assert all(len(pd.read_csv(folder / f"{p}-{m}.csv")) == 4 for p, m in cells)  # each one's block table

    monkeypatch.setattr(launch, "train", lambda *a, **k: pytest.fail("a finished fine-tune must not train again"))
    monkeypatch.setattr(prune_study.tpr, "prune_to_target", lambda *a, **k: pytest.fail("pruned again"))
    monkeypatch.setattr(prune_study.peer_pruning, "tp_prune", lambda *a, **k: pytest.fail("pruned again"))
    again = prune_study.main([*TINY, "--out", str(out)])
    columns = ["model", "point", "method", "seed", "acc_finetuned", "acc_pruned", "macs_kept", "run"]
    pd.testing.assert_frame_equal(again[columns], first[columns])


@pytest.mark.parametrize("flags, message", [
    (["--target-latency", "1.5"], "--target-latency must lie in (0, 1), got 1.5"),
    (["--target-macs", "0"], "--target-macs must lie in (0, 1), got 0"),
    (["--models", "deit_proxy,nope"], "unknown model 'nope'"),
    (["--seeds", "0,0"], "the seeds distinct"),
    (["--methods", "macs,tp_global"], "--methods must name distinct methods of macs, latency, tp_global, "
                                      "tp_isomorphic, macs and latency included (the anchors); got macs,tp_global"),
    (["--methods", "macs,latency,nope"], "got macs,latency,nope"),
    (["--models", "evit_m0_proxy"], "torch-pruning's runner prunes timm ViT/DeiT and Swin v1 models; got "
                                    "EfficientViT"),
    (["--finetune-images", "64"], "--finetune-images (64) must hold at least one --batch-size (128) batch"),
    (["--weights", "/nowhere.pth"], "--weights must be one of proxy, quick-proxy, pretrained, random, auto"),
])
def test_bad_flags_are_one_line_and_exit_2(flags, message, capsys, monkeypatch):
    monkeypatch.setattr(prune_study, "measure_model", lambda *a: pytest.fail("ran past its checks"))
    assert message in one_line_error(capsys, flags, prune_study.main)
