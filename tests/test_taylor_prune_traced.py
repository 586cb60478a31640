"""Taylor pruning of models no builder knows, their groups discovered from the model itself: three ViTs written
here (a fused qkv with an explicit q @ k^T; separate q, k, v Linears through scaled_dot_product_attention; windowed
attention with a per-head interleaved qkv, a relative-position bias, BatchNorm and a patch merging) keep their
function when rewritten, prune to a MAC target with separate Q/K, V and FFN groups, and rank channels planted dead
by hand in the original layout (Q/K, V, FFN, the residual stream) first, removing them without changing the output;
the MAC counter agrees with fvcore; the hand-written builders agree with the discovered groups where both apply; and
what the generic path cannot split is refused in one line naming the module and why."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from analysis import taylor_prune as tpr
from analysis.taylor_prune.builders.traced_attention import TracedAttention
from evit.models import create_model
from tests.test_taylor_prune import (assert_dead_widths_go_first, assert_macs_on_target,
                                     assert_mac_counter_matches_fvcore_before_and_after_pruning,
                                     assert_planted_go_first_and_change_nothing,
                                     assert_pruned_to_target_with_its_own_widths, batches, fvcore_macs,
                                     prepare_keeping_the_function, tiny_swin, tiny_vit)
from tests.test_taylor_prune_beit import tiny_beit
from tests.test_taylor_prune_cait import tiny_cait
from tests.test_taylor_prune_pvt import tiny_pvt
from tests.test_taylor_prune_swinv2 import randomize_

HEADS, DIM = 2, 8  # 2 heads of 8 dims: width 16


class PatchEmbed(nn.Module):
    def __init__(self, size, patch, width):
        super().__init__()
        self.img_size, self.proj = size, nn.Conv2d(3, width, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class FusedAttention(nn.Module):
    """One qkv Linear: rows [q of all heads | k | v], each head-major; q @ k^T written out, scaled after."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads, self.scale = heads, (width // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C))


class SdpaAttention(nn.Module):
    """Separate q, k, v Linears (k without bias) into scaled_dot_product_attention at its default scale; channels
    dim-major (dim j of head h at j * heads + h), in q, k, v and in the output's projection."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width, bias=False), nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = (layer(x).view(B, N, -1, self.heads).permute(0, 3, 1, 2) for layer in (self.q, self.k, self.v))
        return self.out(F.scaled_dot_product_attention(q, k, v).permute(0, 2, 3, 1).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, width, attention, norm=nn.LayerNorm):
        super().__init__()
        self.norm1, self.attn = norm(width), attention(width, HEADS)
        self.norm2, self.mlp = norm(width), Mlp(width, 2 * width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """16 px, patch 4: 16 tokens (and a class token with `cls=True`, else mean pooling), width 16, two blocks."""

    def __init__(self, attention, cls=True, classes=3, size=16):
        super().__init__()
        self.patch_embed = PatchEmbed(size, 4, HEADS * DIM)
        self.cls_token = nn.Parameter(torch.randn(1, 1, HEADS * DIM)) if cls else None
        self.pos_embed = nn.Parameter(torch.randn(1, 16 + cls, HEADS * DIM))
        self.blocks = nn.Sequential(*[Block(HEADS * DIM, attention) for _ in range(2)])
        self.norm, self.head = nn.LayerNorm(HEADS * DIM), nn.Linear(HEADS * DIM, classes)

    def forward(self, x):
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(1))


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channels of (..., channels) tokens: a dead channel's removal changes no other channel."""

    def forward(self, x):
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class WindowAttention(nn.Module):
    """Attention in windows of `window`^2 tokens with a learned relative-position bias per head; one qkv Linear
    whose rows are per head [q | k | v] (head h's q dim j at row 3 * h * dim + j)."""

    def __init__(self, width, heads, window=4):
        super().__init__()
        self.heads, self.scale = heads, (width // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("bias_index", relative[..., 0] * (2 * window - 1) + relative[..., 1])

    def forward(self, x):
        B_, N, C = x.shape
        q, k, v = self.qkv(x).view(B_, N, self.heads, -1).transpose(1, 2).chunk(3, dim=-1)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + self.bias_table[self.bias_index].permute(2, 0, 1)
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B_, N, C))


class WindowBlock(Block):
    def __init__(self, width, window=4):
        super().__init__(width, WindowAttention, norm=TokenBatchNorm)
        self.window = window

    def forward(self, x):  # (B, H, W, C)
        B, H, W, C = x.shape
        w = self.window
        windows = x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
        windows = self.attn(self.norm1(windows)).view(B, H // w, W // w, w, w, C)
        x = x + windows.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        return x + self.mlp(self.norm2(x))


class Merge(nn.Module):
    """2x2 neighbours concatenated channel-wise (channel c of neighbour k at k * C + c), normed, reduced to 2C."""

    def __init__(self, width):
        super().__init__()
        self.norm, self.reduction = TokenBatchNorm(4 * width), nn.Linear(4 * width, 2 * width)

    def forward(self, x):
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class Stage(nn.Module):
    def __init__(self, width, merge):
        super().__init__()
        self.downsample = Merge(width // 2) if merge else nn.Identity()
        self.blocks = nn.Sequential(WindowBlock(width), WindowBlock(width))

    def forward(self, x):
        return self.blocks(self.downsample(x))


class WindowViT(nn.Module):
    """32 px, patch 4: stage 0 at 8x8 tokens (width 16, four 4x4 windows), a merge, stage 1 at 4x4 (width 32, one
    window); BatchNorm everywhere; mean pooling."""

    def __init__(self, classes=3):
        super().__init__()
        self.patch_embed = PatchEmbed(32, 4, HEADS * DIM)
        self.layers = nn.Sequential(Stage(HEADS * DIM, False), Stage(2 * HEADS * DIM, True))
        self.norm, self.head = TokenBatchNorm(2 * HEADS * DIM), nn.Linear(2 * HEADS * DIM, classes)

    def forward(self, x):
        x = self.patch_embed(x).unflatten(1, (8, 8))
        return self.head(self.norm(self.layers(x)).mean((1, 2)))


MODELS = {"fused": (lambda: TinyViT(FusedAttention), 16), "sdpa": (lambda: TinyViT(SdpaAttention, cls=False), 16),
          "window": (WindowViT, 32)}


def made(kind):
    torch.manual_seed(0)
    build, size = MODELS[kind]
    model = build().eval()
    if kind == "window":
        randomize_(model)
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm1d)):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return model, size


def blocks_of(model):
    return [m for m in model.modules() if isinstance(m, Block)]


def qkv_rows(kind, attention, role):
    """The original layer holding `role` and where the architecture puts dim j of head h in it: (layer, row(h, j))."""
    if kind == "fused":
        return attention.qkv, lambda h, j: "qkv".index(role) * HEADS * DIM + h * DIM + j
    if kind == "window":
        return attention.qkv, lambda h, j: 3 * h * DIM + "qkv".index(role) * DIM + j
    return getattr(attention, role), lambda h, j: j * HEADS + h


def zero_rows_(layer, rows):
    with torch.no_grad():
        layer.weight[rows] = 0
        if layer.bias is not None:
            layer.bias[rows] = 0


@pytest.mark.parametrize("kind", MODELS)
def test_rewrite_keeps_the_function_and_splits_q_k_v_per_block(kind):
    model, size = made(kind)
    groups = prepare_keeping_the_function(model, torch.randn(2, 3, size, size))
    blocks = blocks_of(model)
    assert all(isinstance(b.attn, TracedAttention) for b in blocks)
    per_block = [[g.kind for g in groups if g.block == name] for name in dict.fromkeys(g.block for g in groups
                                                                                       if g.kind != "width")]
    assert per_block == [["qk", "v", "ffn"]] * len(blocks)
    assert all(g.heads == HEADS and g.channels == HEADS * DIM * (1 + (kind == "window" and "layers.1" in g.block))
               for g in groups if g.kind in ("qk", "v"))
    widths = [(g.block, g.channels) for g in groups if g.kind == "width"]
    assert widths == ([("layers.0", 16), ("layers.1", 32)] if kind == "window" else [("embed", 16)])


@pytest.mark.parametrize("kind", MODELS)
def test_planted_dead_qk_v_ffn_channels_go_first_and_change_nothing(kind):
    """Dim 5 of every head's q and k, dim 2 of every head's v and FFN hidden channels 3 and 9 of block 1 are zeroed
    in the original layers, where the architecture puts them; the discovered groups rank exactly those first."""
    model, size = made(kind)
    block = blocks_of(model)[1]
    for role, j in (("q", 5), ("k", 5), ("v", 2)):
        layer, row = qkv_rows(kind, block.attn, role)
        zero_rows_(layer, [row(h, j) for h in range(HEADS)])
    zero_rows_(block.mlp.fc1, [3, 9])  # GELU(0) = 0: dead hidden channels
    groups = tpr.prepare(model)
    name = next(n for n, m in model.named_modules() if m is block)
    qk, v, ffn = (next(g for g in groups if g.block == name and g.kind == k) for k in ("qk", "v", "ffn"))
    assert_planted_go_first_and_change_nothing(model, torch.randn(4, 3, size, size), batches(size=size),
                                               [(qk, [h * DIM + 5 for h in range(HEADS)]),
                                                (v, [h * DIM + 2 for h in range(HEADS)]), (ffn, [3, 9])])
    assert (block.attn.q.out_features, block.attn.v.out_features, block.mlp.fc1.out_features) == (14, 14, 30)


def kill_stream_channel_(model, c):
    """Stream channel c of the single-stage ViT written by nothing and read by nothing, by hand."""
    with torch.no_grad():
        zero_rows_(model.patch_embed.proj, [c])
        for p in (model.cls_token, model.pos_embed):
            if p is not None:
                p[..., c] = 0
        for block in model.blocks:
            for norm in (block.norm1, block.norm2):
                zero_rows_(norm, [c])
            attn = block.attn
            for layer in [attn.qkv] if hasattr(attn, "qkv") else [attn.q, attn.k, attn.v]:
                layer.weight[:, c] = 0
            zero_rows_(attn.proj if hasattr(attn, "proj") else attn.out, [c])
            block.mlp.fc1.weight[:, c] = 0
            zero_rows_(block.mlp.fc2, [c])
        zero_rows_(model.norm, [c])
        model.head.weight[:, c] = 0


@pytest.mark.parametrize("kind", ["fused", "sdpa"])
def test_planted_dead_stream_channel_goes_first(kind):
    """LayerNorm statistics move when a dead channel goes, so the ranking, shapes and MACs are checked."""
    model, size = made(kind)
    kill_stream_channel_(model, 6)
    width = next(g for g in tpr.prepare(model) if g.kind == "width")
    assert_dead_widths_go_first(model, [width], [6], batches(size=size))
    x = torch.randn(2, 3, size, size)
    assert model(x).shape == (2, 3) and model.pos_embed.shape[-1] == model.head.in_features == 15
    assert all(b.attn.q.in_features == b.mlp.fc1.in_features == 15 for b in model.blocks)


def kill_window_stream_channel_(model, stage, c):
    """Channel c of a WindowViT stage's stream written by nothing and read by nothing, by hand: with BatchNorm its
    removal changes no other channel."""
    width = 16 * (stage + 1)
    s = model.layers[stage]
    with torch.no_grad():
        zero_rows_(model.patch_embed.proj if stage == 0 else s.downsample.reduction, [c])
        for block in s.blocks:
            for norm in (block.norm1, block.norm2):
                zero_rows_(norm, [c])
            block.attn.qkv.weight[:, c] = 0
            zero_rows_(block.attn.proj, [c])
            block.mlp.fc1.weight[:, c] = 0
            zero_rows_(block.mlp.fc2, [c])
        if stage == 0:  # the merge reads neighbour k's channel c at k * width + c
            merge = model.layers[1].downsample
            zero_rows_(merge.norm, [k * width + c for k in range(4)])
            merge.reduction.weight[:, [k * width + c for k in range(4)]] = 0
        else:
            zero_rows_(model.norm, [c])
            model.head.weight[:, c] = 0


@pytest.mark.parametrize("stage", [0, 1])
def test_window_vit_dead_stage_channel_goes_first_and_changes_nothing(stage):
    """Through the patch merging's concatenation too."""
    model, size = made("window")
    kill_window_stream_channel_(model, stage, 5)
    widths = [g for g in tpr.prepare(model) if g.kind == "width"]
    assert_planted_go_first_and_change_nothing(model, torch.randn(4, 3, size, size), batches(size=size),
                                               [(widths[stage], [5])])
    merge = model.layers[1].downsample
    assert merge.reduction.in_features == merge.norm.num_features == (60 if stage == 0 else 64)
    assert model.head.in_features == (32 if stage == 0 else 31)


@pytest.mark.parametrize("kind", ["fused", "window"])
def test_mac_counter_agrees_with_fvcore_before_and_after_pruning(kind):
    model, size = made(kind)
    assert_mac_counter_matches_fvcore_before_and_after_pruning(model, size)


def test_sdpa_macs_are_fvcores_plus_the_attention_matmuls():
    """fvcore does not count scaled_dot_product_attention: the counter adds q @ k^T and attn @ v at their widths."""
    model, size = made("sdpa")
    groups = tpr.prepare(model)
    x = torch.randn(1, 3, size, size)
    for qk_dims, v_dims in ((16, 16), (12, 14)):
        matmuls = 2 * 16 * 16 * (qk_dims + v_dims)  # two blocks, 16 tokens
        assert sum(tpr.count_macs(model, x).values()) == fvcore_macs(model, size) + matmuls
        for g in groups[:6]:  # block 0 and 1: Q/K loses 2 dims per head, V 1
            if g.kind in ("qk", "v"):
                drop = (0, 3) if g.kind == "qk" else (1,)
                per_head = g.channels // g.heads
                tpr.prune_channels(g, [h * per_head + k for h in range(g.heads) for k in drop])


@pytest.mark.parametrize("kind", MODELS)
def test_pruned_to_a_mac_target_with_its_own_widths(kind):
    model, size = made(kind)
    result = assert_pruned_to_target_with_its_own_widths(model, lambda: blocks_of(model), size,
                                                         lambda b: b.mlp.fc1.out_features,
                                                         stages=2 if kind == "window" else 1)
    assert (result.blocks[["qk_kept", "v_kept", "ffn_kept"]] < 1).any().all()  # every kind loses channels somewhere


# --- the builders agree with discovery where both apply ----------------------------------------------------------

def described(model, groups):
    """Each group as plain values: kind, block, stage, heads, channels, input width, and its slices by module name
    (a rewritten attention's layers named as the builder's are)."""
    names = {m: n.replace(".body", "") for n, m in model.named_modules()}
    return [(g.kind, g.block, g.stage, g.heads, g.channels, g.width(),
             sorted((names[s.layer], s.axis, s.offset, s.first, s.count, s.param if s.axis == "last" else "")
                    for s in g.layout())) for g in groups]


TRACED_FAMILIES = {"vit": (lambda: tiny_vit(), 16), "deit_distilled": (lambda: _deit_distilled(), 16),
            "swin": (tiny_swin, 32), "pvt": (lambda: tiny_pvt("sr"), 32), "beit": (lambda: tiny_beit("per_block"), 16),
            "beit_shared": (lambda: tiny_beit("shared"), 16), "cait": (lambda: tiny_cait(), 16)}


def _deit_distilled():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_distilled_patch16_224", img_size=16, patch_size=8, embed_dim=12, depth=2,
                             num_heads=2, num_classes=3).eval()


@pytest.mark.parametrize("family", TRACED_FAMILIES)
def test_builders_agree_with_the_discovered_groups(family):
    """The same groups (kinds, blocks, stages, heads, channels, the layers and offsets they live in) and the same
    MACs. PVT-v2's spatial-reduction conv: the builder ties its output channels to the stage width, discovery finds
    them a width of their own (sr conv rows, its norm, k and v columns), the only difference."""
    build, size = TRACED_FAMILIES[family]
    built, found = build(), build()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = found(x)
    by_builder, discovered = described(built, tpr.prepare(built)), described(found, tpr.prepare(found, builders=False))
    with torch.no_grad():
        torch.testing.assert_close(found(x), expected, atol=1e-5, rtol=0)
    assert all(isinstance(m, TracedAttention) for n, m in found.named_modules() if n.endswith(".attn"))
    if family == "pvt":
        reduced = [g for g in discovered if g[0] == "width" and ".blocks." in g[1]]
        assert [(g[1], g[4]) for g in reduced] == [("stages.0.blocks.0", 16)]
        assert {s[0] for s in reduced[0][6]} == {"stages.0.blocks.0.attn." + n for n in ("sr", "norm", "k", "v")}
        discovered = [g for g in discovered if g not in reduced]
        moved = set(reduced[0][6])
        by_builder = [g[:6] + ([s for s in g[6] if s not in moved],) for g in by_builder]
    assert discovered == by_builder
    macs = [sum(tpr.count_macs(m, x[:1]).values()) for m in (built, found)]
    assert macs[0] == macs[1]


# --- refusals ----------------------------------------------------------------------------------------------------

class QKNormAttention(FusedAttention):
    def __init__(self, width, heads):
        super().__init__(width, heads)
        self.q_norm = nn.LayerNorm(width // heads)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (self.q_norm(q) @ k.transpose(-2, -1)) * self.scale
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C))


class RotaryAttention(FusedAttention):
    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        angle = torch.arange(N, dtype=x.dtype)[:, None] * torch.arange(C // self.heads, dtype=x.dtype)
        q, k = (t * angle.cos() + t.flip(-1) * angle.sin() for t in (q, k))
        attn = (q @ k.transpose(-2, -1)) * self.scale
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C))


class SharedQKAttention(nn.Module):
    """q and k are one Linear's output: a dim of q cannot go without the same dim of k, but they are not q . k."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads, self.qk, self.v, self.proj = heads, nn.Linear(width, width), nn.Linear(width, width), nn.Linear(
            width, width)

    def forward(self, x):
        B, N, C = x.shape
        qk = self.qk(x).view(B, N, self.heads, -1).transpose(1, 2)
        v = self.v(x).view(B, N, self.heads, -1).transpose(1, 2)
        attn = (qk @ qk.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class BranchingAttention(FusedAttention):
    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return super().forward(x)


class ChannelAttention(FusedAttention):
    """Cross-covariance style: the softmax runs over channels (q^T @ k contracts the tokens)."""

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q.transpose(-2, -1) @ k).softmax(dim=-1)  # (B, heads, dim, dim)
        return self.proj((v @ attn).transpose(1, 2).reshape(B, N, C))


class ValueSkipAttention(FusedAttention):
    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v + v).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("attention, reason", [
    (QKNormAttention, "q goes through a norm (q_norm (LayerNorm)) between its projection and the attention: one norm "
                      "over the head dim cannot lose a different dim in each head"),
    (RotaryAttention, "q is combined with another tensor (add) between its projection and the attention (a rotary "
                      "embedding or a gate)"),
    (SharedQKAttention, "q and k are the same rows of qk (one op makes both; they cannot be sliced apart)"),
    (BranchingAttention, "its forward cannot be traced by torch.fx (TraceError: symbolically traced variables cannot "
                         "be used as inputs to control flow)"),
    (ChannelAttention, "attention over channels: its q @ k^T contracts the tokens (the softmax runs over channels)"),
    (ValueSkipAttention, "v is also read outside the attention (by add)"),
])
def test_what_cannot_be_split_is_refused_in_one_line(attention, reason):
    model, _ = made("fused")
    for block in model.blocks:
        block.attn = attention(HEADS * DIM, HEADS).eval()
    with pytest.raises(tpr.UnsupportedModelError) as error:
        tpr.prepare(model)
    assert str(error.value) == f"blocks.0.attn ({attention.__name__}): {reason}"


def test_a_model_without_attention_is_refused_naming_the_supported():
    with pytest.raises(tpr.UnsupportedModelError, match=r"^ResNet has no prunable blocks; supported: .*any softmax "
                                                         r"attention"):
        tpr.prepare(create_model("resnet18"))



def test_builders_take_their_blocks_and_discovery_the_rest():
    """EVA-02 with attention pooling: the EVA builder takes the rotary blocks (no trace could split them), the
    pooling head (learned queries from a Linear of its own) is discovered, and the widths through both are found:
    the same function, pruned to a MAC target, and it runs."""
    from analysis.taylor_prune.builders.eva import SplitEvaAttention
    from tests.test_taylor_prune_eva import tiny_eva

    model = tiny_eva("eva02", global_pool="map")
    groups = prepare_keeping_the_function(model, torch.randn(2, 3, 32, 32))
    assert all(isinstance(b.attn, SplitEvaAttention) for b in model.blocks)
    assert isinstance(model.attn_pool, TracedAttention)
    assert [(g.block, g.kind) for g in groups if g.attention is model.attn_pool] == [("attn_pool", "qk"),
                                                                                    ("attn_pool", "v")]
    stream = next(g for g in groups if g.kind == "width" and g.block == "embed")
    assert {s.layer for s in stream.layout()} >= {model.attn_pool.k, model.attn_pool.v, model.blocks[1].attn.q}
    result = tpr.prune_to_target(model, batches(size=32), target_macs=0.6, steps=2)
    assert_macs_on_target(result.summary, 0.6)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_a_pruned_discovered_model_saves_and_loads_whole():
    """Pruned models are saved whole (torch.save): the rewritten attention's graph survives the round trip."""
    import io

    model, size = made("window")
    groups = tpr.prepare(model)
    tpr.prune_channels(groups[0], [0, 8])  # a Q/K dim of each head: the layout follows the pruned width
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert isinstance(loaded.layers[0].blocks[0].attn, TracedAttention)


@pytest.mark.parametrize("model, message", [
    ("convit_tiny", "error: blocks.0.attn (GPSA): its forward cannot be traced by torch.fx (TraceError: symbolically "
                    "traced variables cannot be used as inputs to control flow)"),
    ("davit_tiny", "error: stages.0.blocks.0.1.attn (ChannelAttention): attention over channels: its q @ k^T "
                   "contracts the tokens (the softmax runs over channels)"),
])
def test_the_cli_refuses_a_timm_family_at_once_in_one_line(capsys, monkeypatch, model, message):
    """The CLI checks the model's skeleton (meta tensors) before any weights or data: the refusal comes first."""
    from analysis.taylor_prune import cli
    from tests.test_train import one_line_error, refuse

    refuse(monkeypatch, cli, ["load_for_command", "load_batches"], "weights or data were loaded")
    assert one_line_error(capsys, ["--model", model, "--weights", "random"], tpr.main) == message


class FixedScale(nn.Module):
    """A per-channel scale that reshapes its parameter to the size it was built with (as metaformer's Scale does):
    the stream it scales cannot lose a channel without breaking the forward."""

    def __init__(self, width):
        super().__init__()
        self.shape, self.scale = (width,), nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x):
        return x * self.scale.view(self.shape)


def test_a_group_whose_pruning_breaks_the_forward_is_left_out():
    """The width through a FixedScale is not a group (one trial pruning finds it); the blocks still prune."""
    model, size = made("fused")
    model.norm = nn.Sequential(FixedScale(HEADS * DIM), model.norm)
    groups = tpr.prepare(model)
    assert [g.kind for g in groups] == ["qk", "v", "ffn"] * 2
    result = tpr.prune_to_target(model, batches(size=size), target_macs=0.8, steps=1)
    assert_macs_on_target(result.summary, 0.8)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 3)
