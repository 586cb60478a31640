"""Each claim the report judges, on small planted result tables: the verdict when the results agree with the paper,
disagree and are mixed, and the exact sentence of one case each."""
import pandas as pd
import pytest

from analysis import head_similarity, mhsa_ratio, op_profile
from analysis.taylor_prune import claims as pruning
from experiments import benchmark, family
from evit.claims import Claim, names, tally


def verdicts(claims: list[Claim]) -> list[str]:
    return [claim.verdict for claim in claims]


def test_names_and_tallies_read_as_prose():
    assert [names([]), names(["a"]), names(["a", "b"]), names(["a", "b", "c"])] == ["none", "a", "a and b",
                                                                                    "a, b and c"]
    assert tally(dict(a=True, b=True)) == "in 2 of 2 models: a and b"
    assert tally(dict(a=True, b=False, c=False)) == "in 1 of 3 models: a (not b and c)"
    assert tally(dict(a=False, b=False)) == "in none of 2 models (a and b)"
    assert tally(dict(a=True)) == "in 1 of 1 model: a"
    claim = Claim("the sky is blue.", "confirmed", "it was blue at noon.", {"blue": 1.0})
    assert claim.markdown() == "Claim: the sky is blue. **confirmed**: it was blue at noon."


# --- op profile (Fig. 2) -----------------------------------------------------------------------------------------

def shares(deit: float, swin: float) -> pd.DataFrame:
    return pd.DataFrame(dict(model=["deit_tiny", "swin_tiny", "evit_m0"], device="cpu", setting="eager",
                             **{"memory-bound": [deit, swin, 0.9]}))


@pytest.mark.parametrize("deit, swin, verdict", [(0.3, 0.5, "confirmed"), (0.1, 0.2, "refuted"),
                                                 (0.1, 0.5, "refuted")])
def test_memory_bound_claim(deit, swin, verdict):
    assert verdicts(op_profile.claims(shares(deit, swin))) == [verdict]


def test_memory_bound_claim_sentence_and_numbers():
    (claim,) = op_profile.claims(shares(0.289, 0.486))
    assert claim.evidence == ("the share of runtime in memory-bound op calls is 29% for deit_tiny (cpu) and 49% for "
                              "swin_tiny (cpu) (large: at least 25%).")
    assert claim.numbers == {"deit_tiny (cpu) memory-bound share": 0.289, "swin_tiny (cpu) memory-bound share": 0.486}
    assert op_profile.claims(shares(0.3, 0.5).iloc[[0, 2]]) == []  # without both baselines, no claim


def test_memory_bound_share_sums_the_memory_bound_time_per_model():
    classes = pd.DataFrame(dict(model="m", device="cpu", setting="eager", op_class=["matmul", "softmax"],
                                share=[0.75, 0.25], self_time_ms=[3.0, 1.0], memory_bound_time_ms=[1.0, 1.0]))
    table = op_profile.memory_bound_shares(classes)
    assert table[["matmul", "softmax", "memory-bound"]].iloc[0].tolist() == [0.75, 0.25, 0.5]


# --- head similarity (Fig. 4) ------------------------------------------------------------------------------------

def heads(model: str, first: float, last: float, baseline: float, weights: str = "proxy") -> pd.DataFrame:
    """Two heads per block in three blocks, the centred similarity rising from `first` to `last`."""
    blocks = [first, (first + last) / 2, last]
    return pd.DataFrame([dict(model=model, weights=weights, block=b, head=h, max_cos_raw=0.9, max_cos_centred=value,
                              baseline_raw_mean=0.99, baseline_centred_mean=baseline)
                         for b, value in enumerate(blocks) for h in range(2)])


def test_head_claims_agreeing():
    df = pd.concat([heads("deit_proxy", 0.2, 0.4, 0.1), heads("swin_proxy", 0.1, 0.9, 0.2),
                    heads("evit_m0_proxy", 0.3, 0.1, 0.3), heads("deit_proxy", 0.9, 0.1, 0.9, weights="random")])
    alike, diverse = head_similarity.claims(df)
    assert verdicts([alike, diverse]) == ["confirmed", "confirmed"]
    assert alike.evidence == ("the last attention block's centred similarity is above the first's in 2 of 2 models: "
                              "deit_proxy and swin_proxy.")
    assert diverse.evidence == ("training changes the centred similarity by +0.200 for deit_proxy, +0.300 for "
                                "swin_proxy and -0.100 for evit_m0_proxy relative to each model's random init (one "
                                "training run each; confirmed means every MHSA model's heads grew alike and every CGA "
                                "model's grew apart).")
    assert alike.numbers["swin_proxy centred head similarity, last attention block"] == pytest.approx(0.9)
    assert diverse.numbers["evit_m0_proxy centred head similarity, change from random init"] == pytest.approx(-0.1)


@pytest.mark.parametrize("df", [
    pd.concat([heads("deit_proxy", 0.4, 0.2, 0.9), heads("swin_proxy", 0.9, 0.1, 0.9),  # disagreeing
               heads("evit_m0_proxy", 0.3, 0.1, 0.0)]),
    pd.concat([heads("deit_proxy", 0.2, 0.4, 0.1), heads("swin_proxy", 0.9, 0.1, 0.1),  # mixed
               heads("evit_m0_proxy", 0.3, 0.1, 0.0)])], ids=["disagreeing", "mixed"])
def test_head_claims_disagreeing_or_mixed_are_inconclusive(df):
    assert verdicts(head_similarity.claims(df)) == ["inconclusive", "inconclusive"]


def test_head_claims_need_trained_models_of_each_attention():
    assert head_similarity.claims(heads("deit_tiny", 0.1, 0.2, 0.1, weights="random")) == []
    assert [c.claim for c in head_similarity.claims(heads("deit_proxy", 0.1, 0.2, 0.1))] == [
        "heads of trained MHSA models are similar, most in the last blocks."]


# --- MHSA proportion (Fig. 3) ------------------------------------------------------------------------------------

def study(band: tuple[float, float], more: tuple[float, float]) -> pd.DataFrame:
    """A summary with one share in the paper's band (25%) and one above it (100%): (accuracy, std) each."""
    return pd.DataFrame(dict(family="deit", share=[0.25, 1.0], actual_share=[0.25, 1.0],
                             val_acc_mean=[band[0], more[0]], val_acc_std=[band[1], more[1]], seeds=3))


@pytest.mark.parametrize("band, more, verdict", [((80, 1), (70, 1), "confirmed"), ((70, 1), (80, 1), "refuted"),
                                                 ((80, 3), (78, 3), "inconclusive")])
def test_attention_share_claim(band, more, verdict):
    assert verdicts(mhsa_ratio.claims(study(band, more))) == [verdict]


def test_attention_share_claim_sentence():
    (claim,) = mhsa_ratio.claims(study((54.867, 1.877), (57.467, 1.201)))
    assert claim.markdown() == ("Claim: attention in 20-40% of the blocks beats more attention (deit family). "
                                "**inconclusive**: 54.87 ± 1.88 at 25% attention vs 57.47 ± 1.20 at 100% (validation "
                                "accuracy, mean ± std over 3 seeds).")
    assert claim.numbers == {"deit accuracy, best at 20-40% attention": 54.867,
                             "deit accuracy, best above 50% attention": 57.467}
    assert mhsa_ratio.claims(study((80, 1), (70, 1)).iloc[[1]]) == []  # no share in the band, no claim


# --- Taylor pruning (Fig. 5) -------------------------------------------------------------------------------------

def pruned(model: str, qk: float, v: float, early: float, late: float, v_follows_width: bool = False) -> pd.DataFrame:
    """Three blocks: Q/K and V kept as given in the early block; FFN and width kept `early` then `late`."""
    kept = [early, (early + late) / 2, late]
    return pd.DataFrame(dict(model=model, block=range(3), qk_kept=[qk, *kept[1:]], v_kept=[v, *kept[1:]],
                             ffn_kept=kept, width_kept=kept, v_ratio=1.0,
                             v_ratio_before=1.0 if v_follows_width else 1.2))


def test_kept_fractions_by_thirds():
    table = pruning.kept_by_thirds(pruned("a", 0.3, 0.5, 0.9, 0.1))
    assert table.to_dict("list") == dict(model=["a"] * 4, group=["qk", "v", "ffn", "width"],
                                         early=[0.3, 0.5, 0.9, 0.9], middle=[0.5] * 4, late=[0.1] * 4)


def test_pruning_claims_agreeing():
    v_wider, early_wider = pruning.claims(pd.concat([pruned("deit", 0.3, 0.6, 0.9, 0.2),
                                                     pruned("swin", 0.4, 0.5, 0.8, 0.3)]))
    assert verdicts([v_wider, early_wider]) == ["confirmed", "confirmed"]
    assert v_wider.evidence == ("the early blocks keep a larger fraction of V than of Q/K in 2 of 2 models: deit and "
                                "swin.")
    assert early_wider.markdown() == (
        "Claim: early blocks keep more channels than late ones. **confirmed**: the early third of the blocks keeps a "
        "larger mean fraction of channels than the late third in 2 of 2 models: deit and swin.")
    assert v_wider.numbers == {"deit Q/K kept, early blocks": 0.3, "deit V kept, early blocks": 0.6,
                               "swin Q/K kept, early blocks": 0.4, "swin V kept, early blocks": 0.5}


def test_pruning_claims_disagreeing_and_mixed():
    disagreeing = pd.concat([pruned("deit", 0.6, 0.3, 0.2, 0.9), pruned("swin", 0.5, 0.4, 0.3, 0.8)])
    assert verdicts(pruning.claims(disagreeing)) == ["refuted", "refuted"]
    mixed = pd.concat([pruned("deit", 0.3, 0.6, 0.9, 0.2), pruned("swin", 0.5, 0.4, 0.3, 0.8)])
    assert verdicts(pruning.claims(mixed)) == ["inconclusive", "inconclusive"]
    assert pruning.claims(mixed)[0].evidence == ("the early blocks keep a larger fraction of V than of Q/K in 1 of 2 "
                                                 "models: deit (not swin).")


def test_a_model_whose_v_follows_the_width_gives_no_evidence_on_v():
    with_cga = pd.concat([pruned("deit", 0.6, 0.3, 0.9, 0.2), pruned("evit", 0.3, 0.6, 0.9, 0.2, True)])
    v_wider, _ = pruning.claims(with_cga)
    assert v_wider.evidence == ("the early blocks keep a larger fraction of V than of Q/K in none of 1 model (deit); "
                                "evit left out (V follows the stage width there).")
    assert [c.claim for c in pruning.claims(pruned("evit", 0.3, 0.6, 0.9, 0.2, True))] == [
        "early blocks keep more channels than late ones."]


# --- the presets and the family (Fig. 1) -------------------------------------------------------------------------

def presets(flops_pct: tuple[float, ...], params: tuple[float, ...]) -> pd.DataFrame:
    return pd.DataFrame(dict(model=[f"evit_m{i}" for i in range(len(params))], flops_fused_vs_paper_pct=flops_pct,
                             params_fused_m=params, paper_params_m=[2.3] * len(params)))


@pytest.mark.parametrize("flops_pct, params, verdict", [((0.25, -0.1), (2.33, 2.28), "confirmed"),
                                                        ((3.0, -2.0), (2.6, 2.0), "refuted"),
                                                        ((0.25, -0.1), (2.33, 2.6), "refuted")])
def test_presets_claim(flops_pct, params, verdict):
    assert verdicts(family.presets_claims(presets(flops_pct, params))) == [verdict]


def test_presets_claim_sentence():
    (claim,) = family.presets_claims(presets((0.25, -0.1), (2.33, 2.28)))
    assert claim.markdown() == ("Claim: the presets have the paper's params and FLOPs. **confirmed**: with BN folded, "
                                "every preset's fvcore FLOPs are within 0.25% of the paper's and its params within "
                                "0.03 M (the paper gives them to 0.1 M).")


def trained(accuracy: list[float]) -> pd.DataFrame:
    return pd.DataFrame(dict(model=[f"evit_m{i}" for i in range(len(accuracy))] + ["x_allocation"],
                             val_acc=accuracy + [99.0], throughput_cpu=[400.0 - 50 * i for i in range(len(accuracy))]
                             + [1000.0]))


@pytest.mark.parametrize("accuracy, verdict", [([70, 75, 80, 85], "confirmed"), ([85, 80, 75, 70], "inconclusive"),
                                               ([80, 70, 85, 75], "inconclusive")])
def test_family_claim(accuracy, verdict):
    assert verdicts(family.claims(trained(accuracy))) == [verdict]


def test_family_claim_sentence():
    (claim,) = family.claims(trained([70, 75, 80, 85]))
    assert claim.evidence == ("the Spearman rank correlation of accuracy with throughput is -1.00 (a trade-off: -0.6 "
                              "or below); one seed and a short budget on upsampled 28 px images favour models that "
                              "converge fast, so this is a weak test.")
    assert family.claims(trained([70])) == []  # one preset: nothing to rank


# --- the fast path -----------------------------------------------------------------------------------------------

def fast_path(ratios: list[float], batch: int = 16) -> pd.DataFrame:
    rows = [dict(model=f"evit_m{i}", variant=variant, batch=batch, ratio_vs_timm_eager=ratio)
            for i, r in enumerate(ratios) for variant, ratio in (("timm eager", 1.0), (benchmark.DEPLOY_VARIANT, r))]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("ratios, verdict", [([2.0, 1.6], "met"), ([1.2, 1.1], "not met"), ([2.0, 1.2], "not met")])
def test_fast_path_target(ratios, verdict):
    assert verdicts(benchmark.fast_path_claims(fast_path(ratios), "cpu")) == [verdict]


def test_fast_path_target_sentence_and_where_it_applies():
    (claim,) = benchmark.fast_path_claims(fast_path([1.904, 2.691]), "cpu")
    assert claim.markdown() == ("Claim: evit.deploy reaches 1.5x timm eager's throughput on every preset (cpu, batch "
                                "16). **met**: evit.deploy's throughput over timm eager's is 1.90x at the lowest and "
                                "2.69x at the highest, over 2 preset(s).")
    assert verdicts(benchmark.fast_path_claims(fast_path([1.4], batch=2048), "cuda_h100")) == ["met"]  # 1.3x on GPUs
    assert benchmark.fast_path_claims(fast_path([2.0], batch=1), "cpu") == []  # the target is set at the main batch
