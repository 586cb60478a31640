"""experiments.prune_study: the MAC target bisected to the latency target's measured latency (a planted slow group
makes the two rankings differ), the verdicts on planted summaries, a resumed study that prunes and trains nothing,
and bad flags as one line."""
import pandas as pd
import pytest
import torch

from analysis import taylor_prune as tpr
from experiments import launch, prune_study
from experiments.claims import CONFIRMED, INCONCLUSIVE, REFUTED
from tests.test_taylor_prune import batches
from tests.test_taylor_prune_latency import quick, with_a_slow_ffn
from tests.test_train import one_line_error


@pytest.mark.timing
def test_mac_target_is_bisected_to_the_latency_targets_measured_latency():
    """The slow FFN of block 0 costs most of the latency and as many MACs as block 1's: the latency target takes
    only its channels, the MAC target (ranking by importance alone) takes channels everywhere; bisected, the MAC
    target lands at the latency target's latency, timed afresh against it."""
    torch.set_num_threads(1)
    model = with_a_slow_ffn()
    by_latency = tpr.taylor_prune(with_a_slow_ffn(), batches(), steps=1, prune_width=False, target_latency=0.7,
                                  latency=quick())
    by_macs = prune_study.prune_macs_to_latency(model, batches(), by_latency.model, quick(calls=60), probes=8,
                                                steps=1, prune_width=False)
    assert by_latency.summary["latency_kept"] < 0.85  # pruned indeed
    assert by_latency.blocks.ffn_kept[0] < 1 and by_latency.blocks.ffn_kept[1] == 1
    assert (by_latency.blocks[["qk_kept", "v_kept"]] == 1).all(axis=None)
    # The MAC target takes channels the latency target leaves, which save MACs but no time.
    assert min(by_macs.blocks.ffn_kept[1], *by_macs.blocks.qk_kept, *by_macs.blocks.v_kept) < 1
    assert by_macs.summary["macs_kept"] < by_latency.summary["macs_kept"] - 0.1
    probes = [float(p.split(":")[0]) for p in by_macs.summary["latency_probes"].split()]
    assert 1 < len(probes) <= 8 and round(by_macs.summary["target_macs"], 4) in probes
    ratio = quick(calls=100).measure(by_latency.model, by_macs.model, quick().images(batches()))[2]
    assert ratio == pytest.approx(1, abs=prune_study.LATENCY_MATCH)


def summary(latency_acc, latency_std, macs_acc, macs_std, macs_latency=1.02, seeds=3):
    """A planted summary: the MAC-targeted model at `macs_latency` of the latency-targeted one's latency."""
    return pd.DataFrame([dict(model="m", method=method, acc_mean=acc, acc_std=std, seeds=seeds, acc_pruned=50.0,
                              acc_unpruned=90.0, latency_kept=0.6 * matched, latency_vs_latency_target=matched,
                              macs_kept=0.3)
                         for method, acc, std, matched in (("macs", macs_acc, macs_std, macs_latency),
                                                           ("latency", latency_acc, latency_std, 1.0))])


@pytest.mark.parametrize("table, verdict", [
    (summary(80, 1, 70, 2), CONFIRMED),              # a gap of 10 beyond 1 + 2
    (summary(70, 1, 80, 2), REFUTED),                # the same gap reversed
    (summary(80, 3, 76, 2), INCONCLUSIVE),           # a gap of 4 within 3 + 2
    (summary(80, 1, 70, 2, macs_latency=1.1), INCONCLUSIVE),  # 10% apart: not at equal latency
    (summary(80, float("nan"), 70, float("nan"), seeds=1), INCONCLUSIVE),  # one seed: no spread to judge by
])
def test_claim_verdicts_on_planted_summaries(table, verdict):
    (claim,) = prune_study.claims(table)
    assert claim.verdict == verdict and "(m)" in claim.claim
    assert claim.numbers["m accuracy, latency target"] == table.acc_mean[1]
    apart = abs(table.latency_vs_latency_target[0] - 1) > prune_study.LATENCY_MATCH
    assert ("not at equal latency" in claim.evidence) == apart


def test_a_model_with_one_method_only_has_no_claim():
    assert prune_study.claims(summary(80, 1, 70, 2).iloc[:1]) == []


TINY = ["--models", "deit_proxy", "--weights", "random", "--data", "digits", "--seeds", "0,1", "--target-latency",
        "0.8", "--steps", "1", "--batches", "1", "--batch", "8", "--latency-batch", "2", "--timing-calls", "20",
        "--probes", "2", "--finetune-images", "32", "--val-images", "32", "--batch-size", "32"]


def test_a_second_run_prunes_and_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EVIT_CACHE", str(tmp_path / "zoo"))
    monkeypatch.setattr(prune_study, "latency_model", lambda s: quick(calls=10, cache_dir=tmp_path / "zoo" / "latency"))
    out = tmp_path / "out"
    first = prune_study.main([*TINY, "--out", str(out)])
    assert len(first) == 4 and set(first.method) == {"macs", "latency"} and set(first.seed) == {0, 1}
    assert first.latency_kept.between(0, 1.5).all() and (first.macs_kept < 1).all()
    assert (first[first.method == "latency"].latency_vs_latency_target == 1).all()
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.seeds) == [2, 2] and (out / "prune_study.png").stat().st_size > 0
    (folder,) = (out / "pruned").glob("deit_proxy-*")
    assert sorted(p.name.split("-")[0] for p in folder.glob("*.pth")) == ["latency", "macs"]
    assert all(len(pd.read_csv(folder / f"{m}.csv")) == 4 for m in ("macs", "latency"))  # each one's block table

    monkeypatch.setattr(launch, "train", lambda *a, **k: pytest.fail("a finished fine-tune must not train again"))
    monkeypatch.setattr(prune_study.tpr, "taylor_prune", lambda *a, **k: pytest.fail("pruned again"))
    again = prune_study.main([*TINY, "--out", str(out)])
    columns = ["model", "method", "seed", "acc_finetuned", "acc_pruned", "macs_kept", "run"]
    pd.testing.assert_frame_equal(again[columns], first[columns])


@pytest.mark.parametrize("flags, message", [
    (["--target-latency", "1.5"], "--target-latency must lie in (0, 1), got 1.5"),
    (["--models", "deit_proxy,nope"], "unknown model 'nope'"),
    (["--seeds", "0,0"], "the seeds distinct"),
    (["--finetune-images", "64"], "--finetune-images (64) must hold at least one --batch-size (128) batch"),
    (["--weights", "/nowhere.pth"], "--weights must be one of proxy, quick-proxy, pretrained, random, auto"),
])
def test_bad_flags_are_one_line_and_exit_2(flags, message, capsys, monkeypatch):
    monkeypatch.setattr(prune_study, "measure_model", lambda *a: pytest.fail("ran past its checks"))
    assert message in one_line_error(capsys, flags, prune_study.main)
