"""Taylor pruning of timm BEiT, with a relative position table per block and with the model's shared one (passed
through every block's forward): the split attention is the same function and carries q_bias and v_bias, planted
zero Q/K, V and FFN channels go first and change nothing, a dead residual-stream channel goes first, the MAC counter
agrees with fvcore before and after pruning, a pruned model reports its own widths, and SwiGLU FFNs are refused."""
import pytest
import timm
import torch

from analysis import taylor_prune as tpr
from analysis.taylor_prune.builders.beit import SplitBeitAttention
from tests.test_taylor_prune import (assert_dead_widths_go_first, assert_macs_on_target,
                                     assert_planted_go_first_and_change_nothing, batches, fvcore_macs,
                                     prepare_keeping_the_function)
from tests.test_taylor_prune_cait import plant_dead_channels_, randomize_

SIZE, HEADS, DIM = 16, 2, 6  # 16 px at patch 8: 4 patch tokens and the class token; 2 heads of 6 dims (width 12)
# beit_base's own layout (a table per block, mean pooling into fc_norm, no absolute position embedding), and the
# shared table with an absolute position embedding and class-token pooling into the final norm
VARIANTS = {"per_block": {}, "shared": dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                                            use_abs_pos_emb=True, global_pool="token")}


def tiny_beit(variant, **kwargs):
    args = dict(img_size=SIZE, patch_size=8, embed_dim=HEADS * DIM, depth=2, num_heads=HEADS, mlp_ratio=2.0,
                num_classes=3, init_values=1.0)
    return randomize_(timm.create_model("beit_base_patch16_224", **{**args, **VARIANTS[variant], **kwargs}))


@pytest.mark.parametrize("variant", VARIANTS)
def test_split_attention_is_the_same_function_and_carries_the_biases(variant):
    model = tiny_beit(variant)
    shared = variant == "shared"
    assert (model.rel_pos_bias is not None) == shared and (model.blocks[0].attn.relative_position_bias_table is None
                                                          ) == shared
    q_bias, v_bias = model.blocks[0].attn.q_bias.detach().clone(), model.blocks[0].attn.v_bias.detach().clone()
    groups = prepare_keeping_the_function(model, torch.randn(2, 3, SIZE, SIZE))
    assert len(groups) == 2 * 3 + 1
    attn = model.blocks[0].attn
    assert isinstance(attn, SplitBeitAttention) and (attn.bias_owner is None) == shared
    assert torch.equal(attn.q.bias, q_bias) and attn.k.bias is None and torch.equal(attn.v.bias, v_bias)


@pytest.mark.parametrize("variant", VARIANTS)
def test_planted_zero_channels_are_pruned_first_and_change_nothing(variant):
    model = tiny_beit(variant)
    qk, v, ffn = tpr.prepare(model)[3:6]  # block 1
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    plant_dead_channels_(attn, mlp)
    scale = attn.scale
    assert_planted_go_first_and_change_nothing(model, torch.randn(4, 3, SIZE, SIZE), batches(size=SIZE),
                                               [(qk, [4, DIM + 4]), (v, [1, DIM + 1]), (ffn, [3, 7])])
    assert (qk.channels, v.channels, ffn.channels) == (10, 10, 22) and attn.scale == scale
    assert attn.q.bias.shape == attn.v.bias.shape == (10,)


@pytest.mark.parametrize("variant", VARIANTS)
def test_planted_dead_width_channel_is_pruned_first(variant):
    model = tiny_beit(variant)
    width = tpr.prepare(model)[-1]
    assert width.kind == "width" and width.channels == HEADS * DIM
    # channel 7: written by nothing (embeddings, class token, proj, fc2, gammas), read by nothing
    assert_dead_widths_go_first(model, [width], [7], batches(size=SIZE))
    tpr.prune_channels(width, [1])  # LayerNorm statistics move: only consistent shapes can be asserted
    assert model(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 3)
    assert model.cls_token.shape[-1] == model.head.in_features == model.num_features == 10
    assert model.pos_embed is None if variant == "per_block" else model.pos_embed.shape[-1] == 10
    assert all(b.gamma_1.shape == b.gamma_2.shape == (10,) for b in model.blocks)


@pytest.mark.parametrize("variant", VARIANTS)
def test_mac_counter_agrees_with_fvcore_before_and_after_pruning(variant):
    model = tiny_beit(variant)
    groups = tpr.prepare(model)
    macs = lambda: sum(tpr.count_macs(model, torch.randn(1, 3, SIZE, SIZE)).values())  # noqa: E731
    assert macs() == fvcore_macs(model, SIZE)
    for qk, v, ffn in (groups[0:3], groups[3:6]):
        tpr.prune_channels(qk, [0, DIM])
        tpr.prune_channels(v, [2, 3, DIM + 2, DIM + 3])
        tpr.prune_channels(ffn, list(range(5)))
    tpr.prune_channels(groups[-1], [0, 5, 9])
    assert macs() == fvcore_macs(model, SIZE)


def test_pruned_model_runs_and_reports_its_own_widths():
    model = tiny_beit("shared")
    result = tpr.prune_to_target(model, batches(size=SIZE), target_macs=0.6, steps=2, val_batches=batches(1, SIZE))
    s = result.summary
    assert_macs_on_target(s, 0.6)
    assert s["params_after_m"] < s["params_before_m"]
    assert list(result.blocks.in_dim) == [b.attn.q.in_features for b in model.blocks]
    assert list(result.blocks.qk_dim) == [b.attn.q.out_features for b in model.blocks]
    assert list(result.blocks.v_dim) == [b.attn.v.out_features for b in model.blocks]
    assert list(result.blocks.ffn_dim) == [b.mlp.fc1.out_features for b in model.blocks]
    assert (result.blocks.qk_dim % HEADS == 0).all() and (result.blocks.v_dim % HEADS == 0).all()
    assert model.rel_pos_bias.relative_position_bias_table.shape[-1] == HEADS  # heads are never pruned
    assert model(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 3)


def test_swiglu_ffn_is_discovered():
    """The builder refuses a SwiGLU FFN; discovery takes the model: an FFN channel is a row of both halves and a
    column of fc2."""
    model = tiny_beit("per_block", swiglu_mlp=True)
    groups = prepare_keeping_the_function(model, torch.randn(2, 3, SIZE, SIZE))
    mlp = model.blocks[0].mlp
    ffn = next(g for g in groups if g.block == "blocks.0" and g.kind == "ffn")
    assert {(s.layer, s.axis) for s in ffn.layout()} == {(mlp.fc1_g, "out"), (mlp.fc1_x, "out"), (mlp.fc2, "in")}
