"""Taylor pruning of PVT v2 (timm's pvt_v2_*, spatial reduction or the linear variant): the split attention is the
same function with one query per token and the reduced tokens as keys, planted zero Q/K, V and FFN channels
(through the depthwise conv) go first and change nothing, a dead stage-width channel (through the reduction conv
and the next patch embedding) goes first, the MAC counter agrees with fvcore before and after pruning, and a
pruned model reports its own widths."""
import pytest
import timm
import torch

from analysis import taylor_prune as tpr
from analysis.taylor_prune.builders.pvt import SpatialReductionAttention
from tests.test_taylor_prune import (assert_dead_widths_go_first,
                                     assert_mac_counter_matches_fvcore_before_and_after_pruning,
                                     assert_planted_go_first_and_change_nothing,
                                     assert_pruned_to_target_with_its_own_widths, batches, fvcore_macs,
                                     prepare_keeping_the_function)
from tests.test_taylor_prune_swinv2 import randomize_

VARIANTS = {"sr": False, "linear": True}


def tiny_pvt(variant):
    """32 px: stage 0 at 8x8 tokens (keys: 4x4 after a stride-2 reduction, or the linear variant's 7x7 pool), stage
    1 at 4x4 (sr_ratio 1: keys are the tokens; linear: 7x7 again); widths 16/32, heads 2/4 (8 dims per head)."""
    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", depths=(1, 2), embed_dims=(16, 32), num_heads=(2, 4), sr_ratios=(2, 1),
                              mlp_ratios=(2, 2), num_classes=3, linear=VARIANTS[variant])
    return randomize_(model)


@pytest.mark.parametrize("variant", VARIANTS)
def test_prepare_keeps_the_function_and_keys_are_the_reduced_tokens(variant):
    model, x = tiny_pvt(variant), torch.randn(2, 3, 32, 32)
    groups = prepare_keeping_the_function(model, x)
    assert all(isinstance(b.attn, SpatialReductionAttention) for s in model.stages for b in s.blocks)
    assert [(g.block, g.channels) for g in groups if g.kind == "width"] == [("stages.0", 16), ("stages.1", 32)]
    tpr.measure_positions(model, groups, x)
    keys = (49, 49) if variant == "linear" else (16, 16)
    assert [(g.tokens, g.keys) for g in groups if g.kind == "qk"] == [(64, keys[0]), (16, keys[1]), (16, keys[1])]


@pytest.mark.parametrize("variant", VARIANTS)
def test_planted_zero_channels_are_pruned_first_and_change_nothing(variant):
    model = tiny_pvt(variant)
    qk, v, ffn = tpr.prepare(model)[:3]  # stages.0.blocks.0: 2 heads of 8 dims, keys from the reduced stream
    attn, mlp = model.stages[0].blocks[0].attn, model.stages[0].blocks[0].mlp
    with torch.no_grad():
        for h in range(2):  # one Q/K dim in every head: q . k loses nothing
            for layer in (attn.q, attn.k):
                layer.weight[h * 8 + 3] = 0
                layer.bias[h * 8 + 3] = 0
            attn.v.weight[h * 8 + 5] = 0
            attn.v.bias[h * 8 + 5] = 0
        for layer in (mlp.fc1, mlp.dwconv):  # a dead hidden channel: zero in, zero through the depthwise conv
            layer.weight[[3, 7]] = 0
            layer.bias[[3, 7]] = 0
    scale = attn.scale
    assert_planted_go_first_and_change_nothing(model, torch.randn(4, 3, 32, 32), batches(size=32),
                                               [(qk, [3, 11]), (v, [5, 13]), (ffn, [3, 7])])
    assert (attn.q.out_features, attn.k.out_features, attn.v.out_features, attn.proj.in_features) == (14,) * 4
    assert mlp.fc1.out_features == mlp.fc2.in_features == 30 and attn.scale == scale
    assert mlp.dwconv.weight.shape == (30, 1, 3, 3) and mlp.dwconv.groups == 30


@pytest.mark.parametrize("variant", VARIANTS)
def test_planted_dead_stage_width_channel_goes_first_and_the_pruned_model_runs(variant):
    """A stage channel written by nothing and read by nothing (the reduction conv's row and column among them) ranks
    first; LayerNorm statistics change when it goes, so only the ranking, the shapes and the MACs are checked after
    pruning."""
    model = tiny_pvt(variant)
    widths = [g for g in tpr.prepare(model) if g.kind == "width"]
    assert_dead_widths_go_first(model, widths, [5, 30], batches(size=32))
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 3) and sum(tpr.count_macs(model, x[:1]).values()) == fvcore_macs(model, 32)
    sr = model.stages[0].blocks[0].attn.sr
    assert sr.in_channels == sr.out_channels == model.stages[1].downsample.proj.in_channels == 15
    assert [f["num_chs"] for f in model.feature_info] == [15, 31] and model.num_features == model.head.in_features == 31


@pytest.mark.parametrize("variant", VARIANTS)
def test_mac_counter_agrees_with_fvcore_before_and_after_pruning(variant):
    assert_mac_counter_matches_fvcore_before_and_after_pruning(tiny_pvt(variant), 32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_pruned_model_runs_and_reports_its_own_widths(variant):
    model = tiny_pvt(variant)
    assert_pruned_to_target_with_its_own_widths(model, lambda: [b for stage in model.stages for b in stage.blocks], 32,
                                                lambda b: b.mlp.dwconv.out_channels, stages=2)
