"""Taylor pruning of timm's eva.py ViTs (EVA-02, EVA-01, timm's SBB RoPE ViTs, RoPE-ViT, DINOv3, PE): the split
attention is the same function for every RoPE kind and layout, planted dead rotary pairs (a different pair in each
head), V dims and gated-FFN hidden channels go first and removing them changes nothing (the kept pairs keep their
frequencies), a dead residual-stream channel goes first, the MAC counter agrees with fvcore, the pruned model
reports its own widths, and the variants the pruner cannot carry over are refused in one line."""
import re

import pytest
import timm
import torch
from timm.layers import GluMlp, RmsNorm, SwiGLU
from timm.models.eva import EvaBlock

from analysis import taylor_prune as tpr
from analysis.taylor_prune.builders.eva import SplitEvaAttention
from tests.test_taylor_prune import (assert_macs_on_target, batches, fvcore_macs, prepare_keeping_the_function,
                                     zero_channel_)

# 32 px, patch 8: 16 patch tokens; width 24, two heads of 12 dims (6 rotary pairs)
CONFIGS = {
    "eva02": ("eva02_tiny_patch14_224", dict(ref_feat_shape=(4, 4))),  # fused qkv, q/v biases, GluMlp, interleaved
    "eva02_clip": ("eva02_base_patch16_clip_224", dict(ref_feat_shape=(4, 4))),  # q/k/v Linears, sub-LN, SwiGLU+LN
    "sbb": ("vit_medium_patch16_rope_reg1_gap_256", dict(ref_feat_shape=(4, 4))),  # register token, LayerScale
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", {}),  # AttentionRope, learned frequencies per head
    "dinov3": ("vit_small_plus_patch16_dinov3_qkvb", {}),  # half layout, class + 4 register tokens, SwiGLU
    "mrope": ("eva02_tiny_patch14_224", dict(rope_type="mrope")),  # multimodal RoPE: half layout, mixed axes
    "pe": ("vit_pe_spatial_tiny_patch16_512", {}),  # AttentionRope, norm_pre
    "eva01_post": ("eva02_enormous_patch14_clip_224", {}),  # post-norm blocks, no RoPE
}


def tiny_eva(config, **kwargs):
    torch.manual_seed(0)
    name, extra = CONFIGS[config]
    model = timm.create_model(name, img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0,
                              num_classes=3, **{**extra, **kwargs}).eval()
    with torch.no_grad():  # timm's zero biases and 1e-5 LayerScales would hide a wrong bias or block
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def zero_qkv_rows_(attn, part, rows):
    """Zero rows of q (part 0), k (1) or v (2) of an unsplit EvaAttention / AttentionRope, with their biases."""
    with torch.no_grad():
        if attn.qkv is None:
            layer = (attn.q_proj, attn.k_proj, attn.v_proj)[part]
            weight, bias = layer.weight, layer.bias
        else:
            width = attn.qkv.out_features // 3
            weight = attn.qkv.weight[part * width:(part + 1) * width]
            bias = (attn.qkv.bias[part * width:(part + 1) * width] if attn.qkv.bias is not None
                    else getattr(attn, ("q_bias", "k_bias", "v_bias")[part]))
        weight[rows] = 0
        if bias is not None:
            bias[rows] = 0


def kill_ffn_channels_(mlp, channels):
    """Zero hidden channels of timm's Mlp, GluMlp (both halves of fc1) or SwiGLU (fc1_g and fc1_x), and of its
    hidden norm: each carries 0 (GELU(0) = SiLU(0) = 0) and fc2 reads nothing from it."""
    hidden = mlp.fc2.in_features
    rows = {SwiGLU: lambda: [(mlp.fc1_g, 0), (mlp.fc1_x, 0)],
            GluMlp: lambda: [(mlp.fc1, 0), (mlp.fc1, hidden)]}.get(type(mlp), lambda: [(mlp.fc1, 0)])()
    with torch.no_grad():
        for layer, offset in rows:
            layer.weight[[offset + c for c in channels]] = 0
            layer.bias[[offset + c for c in channels]] = 0
        if hasattr(mlp.norm, "weight"):
            mlp.norm.weight[channels] = 0
            mlp.norm.bias[channels] = 0


@pytest.mark.parametrize("config", list(CONFIGS))
def test_split_attention_is_the_same_function(config):
    model = tiny_eva(config)
    prepare_keeping_the_function(model, torch.randn(2, 3, 32, 32))
    assert all(isinstance(block.attn, SplitEvaAttention) for block in model.blocks)


@pytest.mark.parametrize("config", ["eva02", "dinov3", "rope_mixed", "eva02_clip"])
def test_planted_rotary_pairs_v_dims_and_ffn_channels_go_first_and_change_nothing(config):
    """A pair j of head h (dims 2j, 2j+1 interleaved; j, j + 6 in the half layout) is zero in q and k, in head 0
    pair 1 and in head 1 pair 4: removing them leaves every other pair at its own frequency. eva02_clip's sub-LN
    (over V) and FFN norm renormalize over fewer channels: there only the ranking is exact."""
    model = tiny_eva(config)
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    dim, pairs = attn.head_dim, attn.head_dim // 2
    planted_pairs, planted_v, planted_ffn = [1, 4], [2, 9], [3, 7]
    for h, j in enumerate(planted_pairs):
        dims = [j, j + pairs] if attn.rotate_half else [2 * j, 2 * j + 1]
        for part in (0, 1):
            zero_qkv_rows_(attn, part, [h * dim + i for i in dims])
    v_channels = [h * dim + i for h, i in enumerate(planted_v)]
    zero_qkv_rows_(attn, 2, v_channels)
    if hasattr(attn.norm, "weight"):
        with torch.no_grad():
            attn.norm.weight[v_channels] = 0
            attn.norm.bias[v_channels] = 0
    kill_ffn_channels_(mlp, planted_ffn)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    qk, v, ffn = tpr.prepare(model)[:3]
    tpr.accumulate_gradients(model, batches(size=32))
    qk_channels = [h * pairs + j for h, j in enumerate(planted_pairs)]
    for group, planted in ((qk, qk_channels), (v, v_channels)):
        units = tpr.candidate_units(group, tpr.TaylorImportance()(group), floor=0.1)
        assert sorted(units[0].channels) == planted and units[0].importance == 0 and units[1].importance > 0
    ffn_units = tpr.candidate_units(ffn, tpr.TaylorImportance()(ffn), floor=0.1)
    assert sorted(u.channels[0] for u in ffn_units[:2]) == planted_ffn
    assert ffn_units[0].importance == ffn_units[1].importance == 0 and ffn_units[2].importance > 0
    scale, attn = model.blocks[0].attn.scale, model.blocks[0].attn
    tpr.prune_channels(qk, qk_channels)
    tpr.prune_channels(v, v_channels)
    tpr.prune_channels(ffn, planted_ffn)
    with torch.no_grad():
        after = model(x)
    if config != "eva02_clip":
        torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert after.shape == before.shape and attn.scale == scale
    assert attn.rope_pairs.tolist() == [0, 2, 3, 4, 5] + [0, 1, 2, 3, 5]  # each head's kept pairs
    assert "rope_pairs" in dict(attn.named_buffers()) and "rope_pairs" not in dict(attn.named_parameters())
    assert attn.q.out_features == attn.k.out_features == 20 and attn.v.out_features == attn.proj.in_features == 22
    assert (qk.channels, v.channels, ffn.channels) == (10, 22, 46)
    assert attn.norm(torch.zeros(1, 22)).shape == (1, 22) and mlp.fc2.in_features == 46


@pytest.mark.parametrize("config", ["sbb", "dinov3", "pe", "eva01_post"])
def test_planted_dead_width_channel_goes_first(config):
    """Stream channel 7 zero in every writer (so it stays 0 through every block, pre- or post-norm) and every
    reader goes first; removing it and another leaves a model that runs, tokens and classifier included."""
    model = tiny_eva(config)
    width = tpr.prepare(model)[-1]
    zero_channel_(width, 7)
    outputs = []
    handles = [block.register_forward_hook(lambda m, args, out: outputs.append(out)) for block in model.blocks]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    assert all((out[..., 7] == 0).all() for out in outputs)  # every writer of the stream is in the group
    tpr.accumulate_gradients(model, batches(size=32))
    units = tpr.candidate_units(width, tpr.TaylorImportance()(width), floor=0.1)
    assert units[0].channels == [7] and units[0].importance == 0 and units[1].importance > 0
    tpr.prune_channels(width, [1, 7])
    tokens = [getattr(model, p) for p in ("cls_token", "reg_token", "pos_embed") if getattr(model, p) is not None]
    assert tokens and all(t.shape[-1] == 22 for t in tokens)
    assert model.num_features == model.head.in_features == model.feature_info[-1]["num_chs"] == 22
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize("config", ["eva02", "rope_mixed", "eva02_clip"])
def test_mac_counter_agrees_with_fvcore_before_and_after_pruning(config):
    model = tiny_eva(config)
    groups = tpr.prepare(model)
    x = torch.randn(1, 3, 32, 32)
    macs = lambda: sum(tpr.count_macs(model, x).values())  # noqa: E731
    assert macs() == fvcore_macs(model, 32)
    qk, v, ffn = groups[:3]
    tokens, dim = 16 + model.num_prefix_tokens, 24
    tpr.measure_positions(model, groups, x)  # a pair: two rows of q and of k, two channels of q @ k^T
    assert qk.macs_per_channel() == 2 * 2 * tokens * dim + 2 * tokens * tokens
    tpr.prune_channels(qk, [0, 6 + 3])
    tpr.prune_channels(v, [2, 3, 12, 20])
    tpr.prune_channels(ffn, list(range(10)))
    tpr.prune_channels(groups[-1], [0, 5, 11])
    assert model(x).shape == (1, 3) and macs() == fvcore_macs(model, 32)


@pytest.mark.parametrize("config", ["eva02", "dinov3"])
def test_pruned_model_runs_and_reports_its_own_widths(config):
    result = tpr.prune_to_target(tiny_eva(config), batches(size=32), target_macs=0.6, steps=2,
                              val_batches=batches(1, 32))
    s = result.summary
    assert_macs_on_target(s, 0.6)
    assert s["params_after_m"] < s["params_before_m"]
    assert s["macs_after_m"] * 1e6 == sum(tpr.count_macs(result.model, torch.randn(1, 3, 32, 32)).values())
    blocks = list(result.model.blocks)
    assert list(result.blocks.in_dim) == [b.attn.q.in_features for b in blocks]
    assert list(result.blocks.qk_dim) == [b.attn.q.out_features for b in blocks]
    assert list(result.blocks.v_dim) == [b.attn.v.out_features for b in blocks]
    assert list(result.blocks.ffn_dim) == [b.mlp.fc2.in_features for b in blocks]
    assert (result.blocks.qk_dim % result.blocks.heads == 0).all() and (result.blocks.v_dim % 2 == 0).all()
    assert (result.blocks[["qk_kept", "v_kept", "ffn_kept"]] >= 0.1 - 1e-9).all().all()  # the floor
    for b in blocks:
        assert 2 * b.attn.rope_pairs.numel() == b.attn.q.out_features == b.attn.k.out_features
    assert result.model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(qk_norm=True), "blocks.0.attn (EvaAttention) has q/k norms"),
    (dict(attn_type="rope", qkv_fused=False, num_kv_heads=1), "blocks.0.attn (AttentionRope) has grouped-query"),
    (dict(norm_layer=RmsNorm), "blocks.0.norm1 (RmsNorm) is not a LayerNorm"),
    ("gate", "blocks.1.attn (EvaAttention) has a sigmoid output gate"),
])
def test_variants_the_pruner_cannot_carry_are_refused_in_one_line(kwargs, message):
    model = tiny_eva("eva02", **(kwargs if isinstance(kwargs, dict) else {}))
    if kwargs == "gate":  # no eva.py config gates its attention; the block has the option
        model.blocks[1] = EvaBlock(24, 2, mlp_ratio=2.0, gated_attn=True)
    with pytest.raises(tpr.UnsupportedModelError, match=re.escape(message)) as refusal:
        tpr.prepare(model)
    assert "\n" not in str(refusal.value)
