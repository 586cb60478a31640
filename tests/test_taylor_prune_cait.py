"""Taylor pruning of timm CaiT: the split talking-heads and class attentions are the same function, planted zero
Q/K, V and FFN channels of both block kinds go first and change nothing, a dead residual-stream channel (shared by
the patch tokens and the class token) goes first, the class attention counts one query per image, the MAC counter
agrees with fvcore before and after pruning, and a pruned model reports its own widths."""
import pytest
import timm
import torch

from analysis import taylor_prune as tpr
from analysis.taylor_prune.builders.cait import SplitClassAttn, SplitTalkingHeadAttn
from tests.test_taylor_prune import (assert_dead_widths_go_first, assert_macs_on_target,
                                     assert_planted_go_first_and_change_nothing, batches, fvcore_macs,
                                     prepare_keeping_the_function)

SIZE, TOKENS, HEADS, DIM = 16, 4, 2, 6  # 16 px at patch 8: 4 patch tokens; 2 heads of 6 dims (width 12)


def randomize_(model, seed=0):
    """Random weights of a size that matters: timm's init leaves biases, position tables and LayerScale near zero,
    where a channel the builder forgot would hardly change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def plant_dead_channels_(attn, mlp):
    """Q/K dim 4 and V dim 1 of every head, hidden channels 3 and 7 of the FFN: dead. The Q/K dim is dead through q
    alone (rows and bias): k stays live, so a forgotten q bias would keep the dim in the logits."""
    with torch.no_grad():
        for h in range(HEADS):
            attn.q.weight[h * DIM + 4] = 0
            attn.q.bias[h * DIM + 4] = 0
            attn.v.weight[h * DIM + 1] = 0
            attn.v.bias[h * DIM + 1] = 0
        mlp.fc1.weight[[3, 7]] = 0
        mlp.fc1.bias[[3, 7]] = -10.0  # GELU(-10) = 0: the hidden channel is dead


def tiny_cait(**kwargs):
    args = dict(img_size=SIZE, patch_size=8, embed_dim=HEADS * DIM, depth=2, num_heads=HEADS, depth_token_only=2,
                mlp_ratio=2.0, mlp_ratio_token_only=2.0, num_classes=3, init_values=1.0)
    return randomize_(timm.create_model("cait_xxs24_224", **{**args, **kwargs}))


def by_block(groups):
    return {(g.block, g.kind): g for g in groups}


def test_split_attentions_are_the_same_function():
    model = tiny_cait()
    groups = prepare_keeping_the_function(model, torch.randn(2, 3, SIZE, SIZE))
    assert len(groups) == 4 * 3 + 1
    assert all(isinstance(b.attn, SplitTalkingHeadAttn) for b in model.blocks)
    assert all(isinstance(b.attn, SplitClassAttn) for b in model.blocks_token_only)


@pytest.mark.parametrize("block", ["blocks.1", "blocks_token_only.0"])  # talking heads; class attention
def test_planted_zero_channels_are_pruned_first_and_change_nothing(block):
    model = tiny_cait()
    groups = by_block(tpr.prepare(model))
    qk, v, ffn = (groups[block, kind] for kind in ("qk", "v", "ffn"))
    attn, mlp = model.get_submodule(block).attn, model.get_submodule(block).mlp
    plant_dead_channels_(attn, mlp)
    scale = attn.scale
    assert_planted_go_first_and_change_nothing(model, torch.randn(4, 3, SIZE, SIZE), batches(size=SIZE),
                                               [(qk, [4, DIM + 4]), (v, [1, DIM + 1]), (ffn, [3, 7])])
    assert (qk.channels, v.channels, ffn.channels) == (10, 10, 22) and attn.scale == scale


def test_planted_dead_width_channel_is_pruned_first_in_both_block_kinds():
    model = tiny_cait()
    width = tpr.prepare(model)[-1]
    assert width.kind == "width" and width.channels == HEADS * DIM
    # channel 7: written by nothing (embeddings, class token, proj, fc2, gammas), read by nothing
    assert_dead_widths_go_first(model, [width], [7], batches(size=SIZE))
    tpr.prune_channels(width, [1])  # LayerNorm statistics move: only consistent shapes can be asserted
    assert model(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 3)
    assert model.cls_token.shape[-1] == model.pos_embed.shape[-1] == model.head.in_features == 10
    assert all(b.gamma_1.shape == b.gamma_2.shape == (10,) and b.attn.k.in_features == 10
               for b in [*model.blocks, *model.blocks_token_only])
    assert model.num_features == model.embed_dim == 10


def test_class_attention_has_one_query_per_image_and_macs_agree_with_fvcore():
    model = tiny_cait()
    groups = by_block(tpr.prepare(model))
    macs = lambda: tpr.count_macs(model, torch.randn(1, 3, SIZE, SIZE))  # noqa: E731
    assert sum(macs().values()) == fvcore_macs(model, SIZE)  # talking heads: Linears over the heads, both count
    with torch.no_grad():
        model(torch.randn(2, 3, SIZE, SIZE))
    class_attn = model.blocks_token_only[0].attn
    assert class_attn.geometry == (2, TOKENS + 1)  # the class token's query over 2 images; class + patch keys
    assert model.blocks[0].attn.geometry == (2 * TOKENS, TOKENS)
    for block in ("blocks.0", "blocks_token_only.1"):
        tpr.prune_channels(groups[block, "qk"], [0, DIM])
        tpr.prune_channels(groups[block, "v"], [2, 3, DIM + 2, DIM + 3])
        tpr.prune_channels(groups[block, "ffn"], list(range(5)))
    tpr.prune_channels(groups["embed", "width"], [0, 5, 9])
    counted = macs()
    assert counted["blocks_token_only.1.attn"] == 1 * (TOKENS + 1) * (10 + 8)  # q @ k^T, attn @ v at their widths
    assert sum(counted.values()) == fvcore_macs(model, SIZE)


def test_pruned_model_runs_and_reports_its_own_widths():
    model = tiny_cait()
    result = tpr.prune_to_target(model, batches(size=SIZE), target_macs=0.6, steps=2, val_batches=batches(1, SIZE))
    s = result.summary
    assert_macs_on_target(s, 0.6)
    assert s["params_after_m"] < s["params_before_m"]
    blocks = [*model.blocks, *model.blocks_token_only]
    assert list(result.blocks.name) == [f"blocks.{i}" for i in range(2)] + [f"blocks_token_only.{i}" for i in range(2)]
    assert list(result.blocks.in_dim) == [b.attn.q.in_features for b in blocks]
    assert list(result.blocks.qk_dim) == [b.attn.q.out_features for b in blocks]
    assert list(result.blocks.v_dim) == [b.attn.v.out_features for b in blocks]
    assert list(result.blocks.ffn_dim) == [b.mlp.fc1.out_features for b in blocks]
    assert (result.blocks.qk_dim % HEADS == 0).all() and (result.blocks.v_dim % HEADS == 0).all()
    assert all(b.attn.proj_l.in_features == b.attn.proj_w.out_features == HEADS for b in model.blocks)
    assert model(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 3)
