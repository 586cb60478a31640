"""Taylor pruning of Twins (timm's twins_svt_*: locally grouped attention in padded windows alternating with global
sub-sampled attention; twins_pcpvt_*: global sub-sampled attention only): the split attentions are the same
function with the padded windows' or the reduced tokens as keys, planted zero Q/K, V and FFN channels go first and
change nothing, a dead stage-width channel (through the reduction conv, the position encoding conv and the next
patch embedding) goes first, the MAC counter agrees with fvcore before and after pruning, and a pruned model reports
its own widths."""
import pytest
import timm
import torch

from analysis import taylor_prune as tpr
from analysis.taylor_prune.builders.pvt import SpatialReductionAttention
from analysis.taylor_prune.builders.twins import LocallyGroupedAttention
from tests.test_taylor_prune import (assert_dead_widths_go_first,
                                     assert_mac_counter_matches_fvcore_before_and_after_pruning,
                                     assert_planted_go_first_and_change_nothing,
                                     assert_pruned_to_target_with_its_own_widths, batches, fvcore_macs,
                                     prepare_keeping_the_function)
from tests.test_taylor_prune_swinv2 import randomize_

VARIANTS = {"svt": dict(wss=(3, 3)), "pcpvt": {}}


def tiny_twins(variant):
    """32 px: stage 0 at 8x8 tokens, stage 1 at 4x4; widths 16/32, heads 2/4 (8 dims per head), two blocks each.
    SVT: block 0 of a stage attends in 3x3 windows (the grid padded to 9x9, then 6x6), block 1 globally to the
    stride-2 reduced 4x4 tokens (stage 0) or to all tokens (stage 1, sr_ratio 1); PCPVT: every block globally."""
    torch.manual_seed(0)
    name = f"twins_{variant}_small"
    model = timm.create_model(name, img_size=32, embed_dims=(16, 32), depths=(2, 2), num_heads=(2, 4),
                              sr_ratios=(2, 1), mlp_ratios=(2, 2), num_classes=3, **VARIANTS[variant])
    return randomize_(model)


@pytest.mark.parametrize("variant", VARIANTS)
def test_prepare_keeps_the_function_and_keys_are_the_window_or_the_reduced_tokens(variant):
    model, x = tiny_twins(variant), torch.randn(2, 3, 32, 32)
    groups = prepare_keeping_the_function(model, x)
    local = [isinstance(b.attn, LocallyGroupedAttention) for stage in model.blocks for b in stage]
    assert local == ([True, False] * 2 if variant == "svt" else [False] * 4)
    assert all(isinstance(b.attn, SpatialReductionAttention) for stage in model.blocks for b in stage[1:])
    assert [(g.block, g.stage, g.channels) for g in groups if g.kind == "width"] == [("blocks.0", 0, 16),
                                                                                      ("blocks.1", 1, 32)]
    assert [g.stage for g in groups if g.kind == "qk"] == [0, 0, 1, 1]
    tpr.measure_positions(model, groups, x)
    geometry = [(81, 9), (64, 16), (36, 9), (16, 16)] if variant == "svt" else [(64, 16), (64, 16), (16, 16), (16, 16)]
    assert [(g.tokens, g.keys) for g in groups if g.kind == "qk"] == geometry


@pytest.mark.parametrize("variant", VARIANTS)
def test_planted_zero_channels_are_pruned_first_and_change_nothing(variant):
    """Block 0 of stage 0: SVT's windowed attention (padded tokens carry the biases, zeroed too), PCPVT's global one
    with keys and values from the reduced stream."""
    model = tiny_twins(variant)
    qk, v, ffn = tpr.prepare(model)[:3]
    attn, mlp = model.blocks[0][0].attn, model.blocks[0][0].mlp
    with torch.no_grad():
        for h in range(2):  # one Q/K dim in every head: q . k loses nothing
            for layer in (attn.q, attn.k):
                layer.weight[h * 8 + 3] = 0
                layer.bias[h * 8 + 3] = 0
            attn.v.weight[h * 8 + 5] = 0
            attn.v.bias[h * 8 + 5] = 0
        mlp.fc1.weight[[3, 7]] = 0  # dead hidden channels: GELU(0) = 0
        mlp.fc1.bias[[3, 7]] = 0
    scale = attn.scale
    assert_planted_go_first_and_change_nothing(model, torch.randn(4, 3, 32, 32), batches(size=32),
                                               [(qk, [3, 11]), (v, [5, 13]), (ffn, [3, 7])])
    assert (attn.q.out_features, attn.k.out_features, attn.v.out_features, attn.proj.in_features) == (14,) * 4
    assert mlp.fc1.out_features == mlp.fc2.in_features == 30 and attn.scale == scale


@pytest.mark.parametrize("variant", VARIANTS)
def test_planted_dead_stage_width_channel_goes_first_and_the_pruned_model_runs(variant):
    """A stage channel written by nothing and read by nothing (the reduction conv's row and column, the position
    encoding conv's row among them) ranks first; LayerNorm statistics change when it goes, so only the ranking, the
    shapes and the MACs are checked after pruning."""
    model = tiny_twins(variant)
    widths = [g for g in tpr.prepare(model) if g.kind == "width"]
    assert_dead_widths_go_first(model, widths, [5, 30], batches(size=32))
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 3) and sum(tpr.count_macs(model, x[:1]).values()) == fvcore_macs(model, 32)
    sr, pos_conv = model.blocks[0][1].attn.sr, model.pos_block[0].proj[0]
    assert sr.in_channels == sr.out_channels == model.patch_embeds[1].proj.in_channels == 15
    assert pos_conv.weight.shape == (15, 1, 3, 3) and pos_conv.groups == 15 and pos_conv.bias.shape == (15,)
    assert [f["num_chs"] for f in model.feature_info] == model.embed_dims == [15, 31]
    assert model.num_features == model.norm.normalized_shape[0] == model.head.in_features == 31


@pytest.mark.parametrize("variant", VARIANTS)
def test_mac_counter_agrees_with_fvcore_before_and_after_pruning(variant):
    assert_mac_counter_matches_fvcore_before_and_after_pruning(tiny_twins(variant), 32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_pruned_model_runs_and_reports_its_own_widths(variant):
    model = tiny_twins(variant)
    assert_pruned_to_target_with_its_own_widths(model, lambda: [b for stage in model.blocks for b in stage], 32,
                                                lambda b: b.mlp.fc2.in_features, stages=2)
