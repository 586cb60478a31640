"""Taylor pruning of timm's LeViT (token and conv layout): Q/K and V read off the fused projections' per-head
layout (block qkv [q | k | v] per head; downsample q, and kv [k | v] per head), planted dead channels go first and
their removal changes nothing (BatchNorm is per channel, so also for the stage widths), the MAC counter agrees with
fvcore, and the pruned model reports its own widths."""
import pytest
import timm
import torch
import torch.nn as nn
from timm.models.levit import LevitBlock, LevitDownsample

from analysis import taylor_prune as tpr
from evit.models import skeleton
from tests.test_taylor_prune import (assert_macs_on_target, batches, fvcore_macs, prepare_keeping_the_function,
                                     randomize_evit_)

SIZE = 96  # stride-16 stem, then two stride-2 transitions: 6x6, 3x3 and 2x2 tokens


def tiny_levit(conv=False):
    """Widths 16/24/32, key_dim 4, heads 2/3/4 (the transitions: 16 // 4 = 4 and 24 // 4 = 6 heads), V = 2 key_dim
    in blocks and 4 key_dim in transitions, a distillation head; random weights and BatchNorm statistics (timm
    starts every branch's last BatchNorm at zero)."""
    torch.manual_seed(0)
    model = timm.create_model("levit_conv_128s" if conv else "levit_128s", img_size=SIZE, embed_dim=(16, 24, 32),
                              key_dim=4, num_heads=(2, 3, 4), depth=(1, 2, 1), num_classes=3)
    return randomize_evit_(model)


def levit_modules(model):
    return [m for m in model.modules() if isinstance(m, (LevitBlock, LevitDownsample))]


def attention_of(module):
    return module.attn if isinstance(module, LevitBlock) else module.attn_downsample


def zero_rows_(layer, rows):
    """Rows of a LinearNorm / ConvNorm that output exactly 0: the Linear (conv) rows and the BatchNorm's scale and
    shift."""
    layer.linear.weight[rows] = 0
    layer.bn.weight[rows] = 0
    layer.bn.bias[rows] = 0


@pytest.mark.parametrize("conv", [False, True])
def test_prepare_keeps_the_function_and_finds_every_group(conv):
    model, x = tiny_levit(conv), torch.randn(2, 3, SIZE, SIZE)
    groups = prepare_keeping_the_function(model, x)
    blocks = ["stages.0.blocks.0", "stages.1.downsample", "stages.1.blocks.0", "stages.1.blocks.1",
              "stages.2.downsample", "stages.2.blocks.0"]
    assert [(g.block, g.kind) for g in groups] == [(b, k) for b in blocks for k in ("qk", "v", "ffn")] + [
        (f"stages.{s}", "width") for s in range(3)]
    # (heads, Q/K, V, FFN hidden, width) per block: blocks V = 2 key_dim, transitions 4 key_dim, MLP ratio 2
    assert [(g.heads, g.channels, g.width()) for g in groups if g.kind != "ffn"][:4] == [(2, 8, 16), (2, 16, 16),
                                                                                         (4, 16, 24), (4, 64, 24)]
    assert [g.channels for g in groups if g.kind in ("ffn", "width")] == [32, 48, 48, 48, 64, 64, 16, 24, 32]


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("where", ["stages.0.blocks.0", "stages.2.downsample"])
def test_planted_qk_v_ffn_channels_go_first_and_change_nothing(where, conv):
    model = tiny_levit(conv)
    groups = tpr.prepare(model)
    qk, v, ffn = (g for g in groups if g.block == where)
    module = model.get_submodule(where)
    attn = attention_of(module)
    heads, kd, vd = attn.num_heads, attn.key_dim, attn.val_dim
    dim_qk, dim_v = 1, 2  # planted: Q/K dim 1 and V dim 2 of every head
    with torch.no_grad():
        for h in range(heads):
            if isinstance(module, LevitBlock):  # one qkv, per head [q (kd) | k (kd) | v (vd)]
                stride = 2 * kd + vd
                zero_rows_(attn.qkv, [h * stride + dim_qk, h * stride + kd + dim_qk, h * stride + 2 * kd + dim_v])
            else:  # q on the subsampled tokens [q of head 0 | ...], kv per head [k (kd) | v (vd)]
                zero_rows_(attn.q.ln, [h * kd + dim_qk])
                zero_rows_(attn.kv, [h * (kd + vd) + dim_qk, h * (kd + vd) + kd + dim_v])
        zero_rows_(module.mlp.ln1, [3, 7])  # hard-swish(0) = 0: two dead hidden channels
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        before = model(x)
    tpr.accumulate_gradients(model, batches(size=SIZE))
    planted = {"qk": [h * kd + dim_qk for h in range(heads)], "v": [h * vd + dim_v for h in range(heads)]}
    for group in (qk, v):
        units = tpr.candidate_units(group, tpr.TaylorImportance()(group), floor=0.1)
        assert sorted(units[0].channels) == planted[group.kind] and units[0].importance == 0
        assert units[1].importance > 0
    ffn_units = tpr.candidate_units(ffn, tpr.TaylorImportance()(ffn), floor=0.1)
    assert sorted(u.channels[0] for u in ffn_units[:2]) == [3, 7]
    assert ffn_units[0].importance == ffn_units[1].importance == 0 and ffn_units[2].importance > 0
    scale = attn.scale
    for group in (qk, v):
        tpr.prune_channels(group, planted[group.kind])
    tpr.prune_channels(ffn, [3, 7])
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
    assert (attn.key_dim, attn.val_dim, attn.scale) == (kd - 1, vd - 1, scale)
    assert (attn.key_attn_dim, attn.val_attn_dim) == (heads * (kd - 1), heads * (vd - 1))
    fused = attn.qkv if isinstance(module, LevitBlock) else attn.kv
    per_head = (2 if isinstance(module, LevitBlock) else 1) * (kd - 1) + vd - 1
    assert fused.linear.weight.shape[0] == fused.bn.num_features == heads * per_head
    assert attn.proj.ln.linear.weight.shape[1] == heads * (vd - 1)
    assert module.mlp.ln1.bn.num_features == module.mlp.ln2.linear.weight.shape[1] == ffn.original - 2


def kill_stream_channels_(model, s, channels):
    """Make `channels` of stage s's stream carry nothing, written out from the architecture (not from the width
    group's layout): every writer's rows are zero (the stem's last Conv-BN or the transition's attention proj and
    MLP, every block's proj and MLP), and the classifier heads' BatchNorm1d, which would shift a zero channel,
    outputs 0 there too. Readers' columns then get no gradient."""
    stage = model.stages[s]
    writers = [model.stem[-1]] if s == 0 else [stage.downsample.attn_downsample.proj.ln, stage.downsample.mlp.ln2]
    writers += [layer for block in stage.blocks for layer in (block.attn.proj.ln, block.mlp.ln2)]
    with torch.no_grad():
        for layer in writers:
            zero_rows_(layer, channels)
        if s == len(model.stages) - 1:
            for head in (model.head, model.head_dist):
                head.bn.weight[channels] = 0
                head.bn.bias[channels] = 0


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_planted_dead_stage_width_channel_goes_first_and_changes_nothing(stage, conv):
    model = tiny_levit(conv)
    widths = [g for g in tpr.prepare(model) if g.kind == "width"]
    width = widths[stage]
    kill_stream_channels_(model, stage, [5])
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        before = model(x)
    tpr.accumulate_gradients(model, batches(size=SIZE))
    units = tpr.candidate_units(width, tpr.TaylorImportance()(width), floor=0.1)
    assert units[0].channels == [5] and units[0].importance == 0 and units[1].importance > 0
    tpr.prune_channels(width, [5])
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
    new = width.original - 1
    assert model.feature_info[stage]["num_chs"] == model.embed_dim[stage] == new
    for block in model.stages[stage].blocks:
        assert block.attn.qkv.linear.weight.shape[1] == block.attn.proj.ln.bn.num_features == new
        assert block.mlp.ln1.linear.weight.shape[1] == block.mlp.ln2.bn.num_features == new
    if stage < 2:
        following = model.stages[stage + 1].downsample.attn_downsample
        assert following.kv.linear.weight.shape[1] == following.q.ln.linear.weight.shape[1] == new
    else:
        assert model.num_features == model.head.linear.in_features == model.head_dist.bn.num_features == new


@pytest.mark.parametrize("conv", [False, True])
def test_mac_counter_agrees_with_fvcore_before_and_after_pruning(conv):
    model, x = tiny_levit(conv), torch.randn(2, 3, SIZE, SIZE)
    macs = lambda: sum(tpr.count_macs(model, x).values())  # noqa: E731
    assert macs() == fvcore_macs(model, SIZE)
    groups = tpr.prepare(model)
    tpr.measure_positions(model, groups, x)
    transitions = [g for g in groups if g.kind == "qk" and g.block.endswith("downsample")]
    assert [(g.tokens, g.keys) for g in transitions] == [(9, 36), (4, 9)]  # subsampled queries, all keys
    for group in groups:  # the first and third channel of every head (of every group)
        per_head = group.channels // group.heads
        tpr.prune_channels(group, [h * per_head + k for h in range(group.heads) for k in (0, 2)])
    assert model(x).shape == (2, 3) and macs() == fvcore_macs(model, SIZE)


def test_pruned_model_runs_and_reports_its_own_widths():
    model = tiny_levit()
    scales = [attention_of(m).scale for m in levit_modules(model)]
    result = tpr.prune_to_target(model, batches(size=SIZE), target_macs=0.6, steps=2, val_batches=batches(1, SIZE))
    s = result.summary
    assert_macs_on_target(s, 0.6)
    assert s["params_after_m"] < s["params_before_m"]
    modules = levit_modules(result.model)
    attns = [attention_of(m) for m in modules]
    assert list(result.blocks.in_dim) == [m.mlp.ln1.linear.in_features for m in modules]
    assert list(result.blocks.qk_dim) == [a.num_heads * a.key_dim for a in attns]
    assert list(result.blocks.v_dim) == [a.num_heads * a.val_dim for a in attns]
    assert list(result.blocks.ffn_dim) == [m.mlp.ln1.linear.out_features for m in modules]
    assert [a.scale for a in attns] == scales  # the original softmax scale
    for a in attns:
        fused = a.qkv if hasattr(a, "qkv") else a.kv
        assert fused.linear.out_features == fused.bn.num_features == a.num_heads * (
            (2 if hasattr(a, "qkv") else 1) * a.key_dim + a.val_dim)
        assert a.proj.ln.linear.in_features == a.val_attn_dim == a.num_heads * a.val_dim
    assert ((result.blocks.qk_dim % result.blocks.heads == 0) & (result.blocks.v_dim % result.blocks.heads == 0)).all()
    assert (result.blocks[["qk_kept", "v_kept", "ffn_kept"]] >= 0.1 - 1e-9).all().all()  # the floor
    assert list(result.stages.in_dim) == [f["num_chs"] for f in model.feature_info]
    assert result.model(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stem_backbone=nn.Conv2d(3, 16, 16, 16), stem_stride=16), r"^stem \(Conv2d\) is not timm's LeViT"),
    (dict(down_op="", embed_dim=(16, 16, 16)), r"^stages.1.downsample \(Identity\) is not timm's LevitDownsample"),
])
def test_unknown_stems_and_transitions_are_refused_in_one_line(kwargs, message):
    model = timm.create_model("levit_128s", **{**dict(img_size=SIZE, embed_dim=(16, 24, 32), key_dim=4,
                                                      num_heads=(2, 3, 4), depth=(1, 1, 1)), **kwargs})
    with pytest.raises(tpr.UnsupportedModelError, match=message) as error:
        tpr.prepare(model)
    assert "\n" not in str(error.value)


def test_full_size_skeleton_prepares():
    """The command line's input check: the weightless full-size model has its groups."""
    groups = tpr.prepare(skeleton("levit_128s"))
    assert [g.channels for g in groups if g.kind == "width"] == [128, 256, 384] and len(groups) == 3 * 11 + 3
