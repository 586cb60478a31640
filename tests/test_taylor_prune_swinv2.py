"""Taylor pruning of Swin v2 (timm's swinv2_* and swinv2_cr_*): the split cosine attention is the same function,
planted zero Q/K, V and FFN channels go first and change nothing, a dead stage-width channel goes first, the 2x2
patch merging puts stage channel c at c, C+c, 2C+c, 3C+c, the MAC counter agrees with fvcore before and after
pruning, and a pruned model reports its own widths."""
import math

import pytest
import timm
import torch

from analysis import taylor_prune as tpr
from analysis.taylor_prune.builders.swinv2 import CosineWindowAttention
from tests.test_taylor_prune import (assert_dead_widths_go_first,
                                     assert_mac_counter_matches_fvcore_before_and_after_pruning,
                                     assert_planted_go_first_and_change_nothing,
                                     assert_pruned_to_target_with_its_own_widths, batches, fvcore_macs,
                                     prepare_keeping_the_function)

MODELS = {"v2": "swinv2_tiny_window8_256", "cr": "swinv2_cr_tiny_224"}


def randomize_(model, seed=0):
    """Weights of unit gain (timm's init: std 0.02, and Swin v2's post-norms start at zero, so that the blocks
    would add nothing), norms around 1, biases and v2's q/v biases random, Swin v2's logit scales on both sides of
    timm's clamp at log(100)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "logit_scale" in name:
                p.copy_(math.log(100) + 2 * noise)
            elif p.dim() > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.3 * noise + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model.eval()


def tiny_swinv2(kind):
    """32 px, patch 2: stage 0 at 16x16 tokens (16 windows of 4x4), stage 1 at 8x8 (4 windows); both stages have
    a shifted (masked) block; widths 16/32, heads 2/4 (8 dims per head)."""
    torch.manual_seed(0)
    model = timm.create_model(MODELS[kind], img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2),
                              num_heads=(2, 4), num_classes=3)
    return randomize_(model)


def stages(model):
    return list(model.layers if hasattr(model, "layers") else model.stages)


@pytest.mark.parametrize("kind", MODELS)
def test_prepare_keeps_the_function(kind):
    model, x = tiny_swinv2(kind), torch.randn(2, 3, 32, 32)
    groups = prepare_keeping_the_function(model, x)
    blocks = [b for stage in stages(model) for b in stage.blocks]
    assert all(isinstance(b.attn, CosineWindowAttention) for b in blocks)
    prefix = "layers" if kind == "v2" else "stages"
    assert [(g.block, g.channels) for g in groups if g.kind == "width"] == [(f"{prefix}.0", 16), (f"{prefix}.1", 32)]


@pytest.mark.parametrize("kind", MODELS)
def test_patch_merging_puts_stage_channel_c_at_c_plus_k_times_width(kind):
    merge = stages(tiny_swinv2(kind))[1].downsample
    merge.norm = merge.reduction = torch.nn.Identity()
    channels = torch.arange(16.).expand(1, 2, 2, 16)
    assert merge(channels).flatten().tolist() == list(range(16)) * 4


@pytest.mark.parametrize("kind", MODELS)
def test_planted_zero_channels_are_pruned_first_and_change_nothing(kind):
    model = tiny_swinv2(kind)
    groups = tpr.prepare(model)
    name = ("layers" if kind == "v2" else "stages") + ".1.blocks.1"  # 4 heads of 8 dims, shifted windows
    qk, v, ffn = (g for g in groups if g.block == name)
    block = stages(model)[1].blocks[1]
    attn, mlp = block.attn, block.mlp
    with torch.no_grad():
        for h in range(4):  # one Q/K dim in every head: q/|q| and k/|k| lose nothing
            for layer in (attn.q, attn.k):  # v2's k has no bias (timm's k bias is a zero buffer)
                layer.weight[h * 8 + 3] = 0
                if layer.bias is not None:
                    layer.bias[h * 8 + 3] = 0
            attn.v.weight[h * 8 + 5] = 0
            attn.v.bias[h * 8 + 5] = 0
        mlp.fc1.weight[[3, 7]] = 0
        mlp.fc1.bias[[3, 7]] = -10.0  # GELU(-10) = 0: the hidden channel is dead
    logit_scale = attn.bias_owner.logit_scale.detach().clone()
    assert_planted_go_first_and_change_nothing(model, torch.randn(4, 3, 32, 32), batches(size=32),
                                               [(qk, [3, 11, 19, 27]), (v, [5, 13, 21, 29]), (ffn, [3, 7])])
    assert (attn.q.out_features, attn.k.out_features, attn.v.out_features, mlp.fc1.out_features) == (28, 28, 28, 126)
    assert torch.equal(attn.bias_owner.logit_scale, logit_scale)


@pytest.mark.parametrize("kind", MODELS)
def test_planted_dead_stage_width_channel_goes_first_and_the_pruned_model_runs(kind):
    """A stage channel written by nothing and read by nothing (through the next merge's four concatenated copies,
    swinv2_cr's merge norm among them) ranks first; LayerNorm statistics change when it goes, so only the ranking,
    the shapes and the MACs are checked after pruning."""
    model = tiny_swinv2(kind)
    widths = [g for g in tpr.prepare(model) if g.kind == "width"]
    assert_dead_widths_go_first(model, widths, [5, 30], batches(size=32))
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 3) and sum(tpr.count_macs(model, x[:1]).values()) == fvcore_macs(model, 32)
    assert [f["num_chs"] for f in model.feature_info] == [15, 31]
    assert model.num_features == model.head.fc.in_features == 31


@pytest.mark.parametrize("kind", MODELS)
def test_mac_counter_agrees_with_fvcore_before_and_after_pruning(kind):
    """fvcore counts the position-bias MLP on the coordinate table once per forward, as our counter does for one
    image."""
    model = tiny_swinv2(kind)
    groups = assert_mac_counter_matches_fvcore_before_and_after_pruning(model, 32)
    tpr.measure_positions(model, groups, torch.randn(1, 3, 32, 32))
    assert (groups[0].tokens, groups[0].keys) == (16 * 16, 4 * 4)  # every token queries its 4x4 window


@pytest.mark.parametrize("kind", MODELS)
def test_pruned_model_runs_and_reports_its_own_widths(kind):
    model = tiny_swinv2(kind)
    assert_pruned_to_target_with_its_own_widths(model, lambda: [b for stage in stages(model) for b in stage.blocks], 32,
                                                lambda b: b.mlp.fc1.out_features, stages=2)
