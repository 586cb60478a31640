"""Head similarity (Fig. 4) with planted truth: identical heads, disjoint heads, batch-size independence,
attention capture for timm ViT / Swin and evit CGA / MHSA, and the CLI's errors."""
import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

import evit  # noqa: F401  (registers evit_custom)
from analysis import head_similarity as hs
from analysis.attention_capture import UnsupportedModelError, capture_attention, find_attention
from analysis.head_similarity import check_readable, head_similarity, main, max_other, pairwise_cosine
from tests.test_train import one_line_error

EVIT_TINY = dict(img_size=64, embed_dims=(16,), depths=(1,), num_heads=(2,), key_dims=4, window_sizes=4,
                 kernels=(3, 3), num_classes=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=0).eval()


def tiny_swin() -> SwinTransformer:
    torch.manual_seed(0)
    # 8x8 tokens in 4x4 windows: 4 windows per image, the second block shifted (masked windows).
    return SwinTransformer(img_size=16, patch_size=2, window_size=4, embed_dim=8, depths=(2,), num_heads=(2,),
                           num_classes=0).eval()


def tiny_evit(mixer: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("evit_custom", config=dict(EVIT_TINY, mixers=mixer)).eval()


def images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------ hand-made maps


def one_hot_maps(key_of_head: list[int], n: int) -> torch.Tensor:
    """(1, H, n, n) maps where every query of head h attends to key key_of_head[h] only."""
    maps = torch.zeros(1, len(key_of_head), n, n)
    for h, key in enumerate(key_of_head):
        maps[0, h, :, key] = 1
    return maps


def test_disjoint_heads_hand_made():
    n = 16
    sim_raw = pairwise_cosine(one_hot_maps([0, 1], n))[0]
    sim_centred = pairwise_cosine(one_hot_maps([0, 1], n), centred=True)[0]
    assert sim_raw[0, 1] == pytest.approx(0, abs=1e-12)
    # (e0 - u).(e1 - u) / |e - u|^2 = (-1/n) / (1 - 1/n): about 0, slightly negative.
    assert sim_centred[0, 1] == pytest.approx(-1 / (n - 1), abs=1e-12)
    assert max_other(sim_centred).tolist() == pytest.approx([-1 / (n - 1)] * 2)


def test_identical_and_uniform_heads_hand_made():
    n = 9
    uniform = torch.full((1, 1, n, n), 1 / n)
    maps = torch.cat([one_hot_maps([3, 3], n), uniform, uniform + 0.01 * one_hot_maps([5], n)], dim=1)
    raw, centred = pairwise_cosine(maps)[0], pairwise_cosine(maps, centred=True)[0]
    assert raw[0, 1] == pytest.approx(1, abs=1e-12) and centred[0, 1] == pytest.approx(1, abs=1e-12)
    # A flat map resembles a nearly flat one raw (the paper's measure) but not once the uniform part is removed.
    assert raw[2, 3] > 0.99
    assert centred[2, 3] == 0
    assert max_other(raw[None, :1, :1]).isnan().all()  # a single head has no other head


def test_centring_over_visible_keys():
    # Both heads attend uniformly to the keys a mask lets them see: nothing is left once that is removed.
    maps = torch.zeros(1, 2, 4, 4)
    maps[..., :2] = 0.5
    visible = maps[:, :1] > 0
    assert pairwise_cosine(maps, centred=True, visible=visible).abs().max() == 0
    assert pairwise_cosine(maps, centred=True)[0, 0, 1] == pytest.approx(1)  # the shared mask counts without it


# ---------------------------------------------------------------------------------------------- capture


@pytest.mark.parametrize("make, size, windows, tokens", [
    (tiny_vit, 16, 1, 17), (tiny_swin, 16, 4, 16), (lambda: tiny_evit("cga"), 64, 1, 16),
    (lambda: tiny_evit("mhsa"), 64, 1, 16)])
def test_capture_shapes_and_softmax(make, size, windows, tokens):
    model = make()
    with capture_attention(model) as capture:
        model(images(3, size))
        captured = capture.take()
    assert captured
    for maps, visible in captured.values():
        assert maps.shape == (3 * windows, 2, tokens, tokens)
        torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]))
        if visible is not None:  # Swin's shifted block: hidden keys get no attention
            assert visible.shape[0] == 3 * windows and not visible.all()
            assert maps.masked_select(~visible.expand_as(maps)).max() < 1e-30


def test_swin_shifted_windows_report_visible_keys():
    model = tiny_swin()
    with capture_attention(model) as capture:
        model(images(1, 16))
        assert [c.visible is None for c in capture.take().values()] == [True, False]


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin])
def test_sdpa_maps_equal_the_explicit_path(make):
    """With the fused path (F.scaled_dot_product_attention) the maps are computed from q, k, bias and mask; they
    equal the explicit softmax path's, and the model's output is unchanged by the capture."""
    model, x = make(), images(2, 16)
    modules = [m for m in model.modules() if hasattr(m, "fused_attn")]
    maps = {}
    for fused in (True, False):
        for m in modules:
            m.fused_attn = fused
        expected = model(x)
        with capture_attention(model) as capture:
            torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
            maps[fused] = capture.take()
    assert maps[True].keys() == maps[False].keys()
    for name, (sdpa, explicit) in enumerate(zip(maps[True].values(), maps[False].values())):
        torch.testing.assert_close(sdpa.maps, explicit.maps, atol=1e-6, rtol=1e-5)
        assert (sdpa.visible is None) == (explicit.visible is None)


def test_sdpa_boolean_and_causal_masks_give_visible_keys():
    class Causal(torch.nn.Module):
        def forward(self, q, k, v, mask=None):
            if mask is None:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q = k = v = torch.randn(2, 3, 5, 4)
    model = Causal()
    keep = torch.rand(5, 5) > 0.3
    keep[:, 0] = True  # every query sees at least one key
    for mask, expected in ((None, torch.ones(5, 5, dtype=torch.bool).tril()), (keep, keep)):
        with capture_attention(model) as capture:
            model(q, k, v, mask)
            maps, visible = capture.take()[""]
        assert maps.shape == (2, 3, 5, 5) and torch.equal(visible, expected.expand(2, 3, 5, 5))
        assert maps.masked_select(~visible).abs().max() == 0


def test_hooks_removed_after_an_error():
    model = tiny_vit()
    with pytest.raises(KeyError):
        with capture_attention(model):
            raise KeyError("removed even after an error")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.overrides._get_current_function_mode() is None


@pytest.mark.parametrize("model", [torch.nn.Conv2d(3, 4, 3), torch.nn.Sequential(torch.nn.Flatten(1),
                                                                                     torch.nn.Softmax(-1))])
def test_model_without_attention_is_rejected(model):
    with pytest.raises(UnsupportedModelError, match="no softmax attention"):
        find_attention(model, images(1, 8))


def test_single_head_model_is_refused_by_head_similarity():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=8, depth=1, num_heads=1, num_classes=0)
    with pytest.raises(UnsupportedModelError, match="single head"):
        check_readable(model, 16)


# ------------------------------------------------------------------------------------------ planted truth


def copy_rows(tensor: torch.Tensor, src: slice, dst: slice) -> None:
    with torch.no_grad():
        tensor[dst] = tensor[src]


def assert_identical_heads(model: torch.nn.Module, size: int, sites: int) -> pd.DataFrame:
    """Every site of `model` has two heads planted identical: both similarities are 1, each head's closest
    head is the other."""
    df = head_similarity(model.eval(), images(3, size), batch_size=3)
    assert df.module.nunique() == sites and (df.num_heads == 2).all()
    assert df.max_cos_raw.to_numpy() == pytest.approx(1, abs=1e-6)
    assert df.max_cos_centred.to_numpy() == pytest.approx(1, abs=1e-5)
    assert df.most_similar_head.tolist() == [1, 0] * sites
    return df


def copy_head(module: torch.nn.Module, width: int, offset: int = 0) -> None:
    """Plant head 1 = head 0 in a projection: rows [offset, offset + width) of every parameter and buffer of
    `module` whose first dim is its output (Linear weight/bias, BatchNorm affine and running statistics) are copied
    to the next `width` rows."""
    outputs = next(p.shape[0] for p in module.parameters())
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.dim() and tensor.shape[0] == outputs:
            copy_rows(tensor, slice(offset, offset + width), slice(offset + width, offset + 2 * width))


def test_identical_heads_swin_v1_shifted_windows_with_bias():
    model = tiny_swin()  # window attention, relative position bias, the second block's windows shifted (masked)
    for block in model.layers[0].blocks:
        attn, dim = block.attn, block.attn.qkv.in_features
        for offset in (0, dim):  # q, then k
            copy_head(attn.qkv, dim // 2, offset)
        copy_rows(attn.relative_position_bias_table.T, 0, 1)
    df = assert_identical_heads(model, 16, sites=2)
    assert df.maps_per_image.tolist() == [4] * 4 and (df.key_tokens == 16).all()


def test_identical_heads_swin_v2_cosine_attention_and_continuous_bias():
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    torch.manual_seed(0)
    model = SwinTransformerV2(img_size=16, patch_size=2, window_size=4, embed_dim=8, depths=(2,), num_heads=(2,),
                              num_classes=0)
    for block in model.layers[0].blocks:
        attn, dim = block.attn, block.attn.qkv.in_features
        for offset in (0, dim):
            copy_head(attn.qkv, dim // 2, offset)
        for p in (attn.q_bias, attn.k_bias, attn.logit_scale, attn.cpb_mlp[2].weight):
            copy_rows(p, slice(0, p.shape[0] // 2), slice(p.shape[0] // 2, None))
    assert_identical_heads(model, 16, sites=2)


def test_identical_heads_pvt_v2_spatial_reduction():
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    torch.manual_seed(0)  # 32 px: 8x8 queries; keys through a stride-2 reduction conv and its norm: 4x4
    model = PyramidVisionTransformerV2(depths=(1,), embed_dims=(16,), num_heads=(2,), sr_ratios=(2,),
                                       mlp_ratios=(2,), num_classes=0)
    attn = model.stages[0].blocks[0].attn
    copy_head(attn.q, 8)
    copy_head(attn.kv, 8)  # the k half comes first
    df = assert_identical_heads(model, 32, sites=1)
    assert (df.query_tokens == 64).all() and (df.key_tokens == 16).all()


def test_identical_heads_levit_attention_biases_and_stride_2_attention():
    from timm.models.levit import Levit

    torch.manual_seed(0)  # 64 px: 4x4 tokens, a stride-2 attention to 2x2, 2 heads everywhere
    model = Levit(img_size=64, embed_dim=(16, 32), key_dim=8, depth=(1, 1), num_heads=(2, 4), attn_ratio=2,
                  mlp_ratio=2, num_classes=0)
    downsample = model.stages[1].downsample.attn_downsample
    assert downsample.num_heads == 2
    for attn in (model.stages[0].blocks[0].attn, downsample):
        if attn is downsample:  # q from its own subsampled projection, k/v per head chunks of key + value dims
            copy_head(attn.q.ln.linear, attn.key_dim)
            copy_head(attn.q.ln.bn, attn.key_dim)
            chunk = attn.key_dim + attn.val_dim
        else:  # q/k/v per head chunks of 2 key dims + value dims
            chunk = 2 * attn.key_dim + attn.val_dim
        for projection in (attn.kv if attn is downsample else attn.qkv).children():
            copy_head(projection, chunk)
        copy_rows(attn.attention_biases, 0, 1)
    model.stages[1].blocks[0].attn.attention_biases.data.zero_()
    df = head_similarity(model.eval(), images(3, 64), batch_size=3)
    planted = df[df.module.isin(["stages.0.blocks.0.attn", "stages.1.downsample.attn_downsample"])]
    assert len(planted) == 4 and planted.max_cos_raw.to_numpy() == pytest.approx(1, abs=1e-6)
    assert planted.max_cos_centred.to_numpy() == pytest.approx(1, abs=1e-5)
    assert planted.query_tokens.tolist() == [16, 16, 4, 4] and (planted.key_tokens == 16).all()


def test_identical_heads_cait_talking_heads_and_class_attention():
    from timm.models.cait import Cait

    torch.manual_seed(0)
    model = Cait(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, depth_token_only=1, num_classes=0)
    talking = model.blocks[0].attn  # the map read is the softmax between the two head-mixing projections:
    copy_head(talking.proj_l, 1)    # equal mixing rows make it equal for both heads whatever q and k are
    class_attn = model.blocks_token_only[0].attn
    copy_head(class_attn.q, 8)
    copy_head(class_attn.k, 8)
    df = assert_identical_heads(model, 16, sites=2)
    assert df.query_tokens.tolist() == [16, 16, 1, 1] and df.key_tokens.tolist() == [16, 16, 17, 17]


def test_identical_heads_vit():
    model = tiny_vit()
    for block in model.blocks:
        qkv, hd, dim = block.attn.qkv, block.attn.head_dim, block.attn.qkv.in_features
        for offset in (0, dim):  # q, then k: head 1 gets head 0's rows
            for p in (qkv.weight, qkv.bias):
                copy_rows(p, slice(offset, offset + hd), slice(offset + hd, offset + 2 * hd))
    df = head_similarity(model, images(4, 16), batch_size=4)
    assert len(df) == 4 and df.most_similar_head.tolist() == [1, 0, 1, 0]
    assert df.max_cos_raw.to_numpy() == pytest.approx(1, abs=1e-6)
    assert df.max_cos_centred.to_numpy() == pytest.approx(1, abs=1e-6)


def test_identical_heads_evit_mhsa():
    model = tiny_evit("mhsa")
    attn = model.stages[0].blocks[0].mixer.m.attn
    kd = attn.key_dim
    for offset in (0, attn.num_heads * kd):  # q, then k
        for p in (*attn.qkv.parameters(), attn.qkv.bn.running_mean, attn.qkv.bn.running_var):
            copy_rows(p, slice(offset, offset + kd), slice(offset + kd, offset + 2 * kd))
    attn.dws[1].load_state_dict(attn.dws[0].state_dict())
    copy_rows(attn.attention_biases, 0, 1)
    df = head_similarity(model, images(4, 64), batch_size=4)
    assert df.max_cos_raw.to_numpy() == pytest.approx(1, abs=1e-6)
    assert df.max_cos_centred.to_numpy() == pytest.approx(1, abs=1e-6)


def test_disjoint_heads_evit_model():
    # Zero Q/K: the maps are softmax(relative bias). Head 0 attends to its own token, head 1 to its
    # horizontal neighbours: disjoint keys for every query.
    model = tiny_evit("mhsa")
    attn = model.stages[0].blocks[0].mixer.m.attn
    with torch.no_grad():
        attn.qkv.conv.weight.zero_()
        attn.attention_biases.fill_(-50)
        attn.attention_biases[0, 0] = 50  # |dy| = 0, |dx| = 0
        attn.attention_biases[1, 1] = 50  # |dy| = 0, |dx| = 1
    df = head_similarity(model, images(2, 64))
    assert df.max_cos_raw.to_numpy() == pytest.approx(0, abs=1e-6)
    assert (df.max_cos_centred.abs() < 0.1).all()


@pytest.mark.parametrize("make, size", [(tiny_vit, 16), (tiny_swin, 16), (lambda: tiny_evit("cga"), 64)])
def test_independent_of_batch_size(make, size):
    model, x = make(), images(5, size)
    columns = ["max_cos_raw", "max_cos_centred"]
    small, whole = head_similarity(model, x, batch_size=2), head_similarity(model, x, batch_size=5)
    pd.testing.assert_frame_equal(small[columns], whole[columns], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ uniform maps: no cosine


def test_uniform_maps_told_apart_from_near_uniform_ones():
    """A softmax of equal logits over the keys a query sees is uniform, also beside Swin's -100 mask (hidden keys
    keep ~1e-44, not 0); logits spread by 1e-6, as in evit_m0's second stage at random init, are not."""
    torch.manual_seed(0)
    logits = torch.zeros(3, 2, 16, 16)
    logits[1, :, :, 8:] = -100
    logits[2, 1] = 1e-6 * torch.randn(16, 16)
    visible = (logits[:, :1] > -100).expand(3, 2, 16, 16)
    assert hs.is_uniform(logits.softmax(-1), visible).tolist() == [[True, True], [True, True], [True, False]]


def identical_heads_swin_without_bias() -> torch.nn.Module:
    """tiny_swin with head 1 = head 0 and no position bias: a window of identical tokens gets uniform maps."""
    model = tiny_swin()
    for block in model.layers[0].blocks:
        attn, dim = block.attn, block.attn.qkv.in_features
        for offset in (0, dim):  # q, then k
            copy_head(attn.qkv, dim // 2, offset)
        attn.relative_position_bias_table.data.zero_()
    return model


def blank_window_images() -> torch.Tensor:
    """3 images of 8x8 tokens in 4x4 windows: image 1 blank, image 2 blank on its left half. Blank windows: 4 + 2
    in the first block; in the second (shifted by 2 tokens) the 4 of image 1, no shifted window of image 2 lies in
    its blank half."""
    x = images(3, 16)
    x[1] = 0.3
    x[2, :, :, :8] = -0.5
    return x


def mean_max_cosine_counting_uniform_as_0(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The centred measure straight from its definition, a uniform map counting as similarity 0 to every head:
    per map each head's maximum cosine to another head, mean over all maps."""
    with capture_attention(model) as capture:
        model(x)
        captured = capture.take()
    means = {}
    for name, (maps, visible) in captured.items():
        uniform = 1 / maps.shape[-1] if visible is None else visible / visible.sum(-1, keepdim=True)
        flat = (maps - uniform).flatten(2).double()
        cos = F.cosine_similarity(flat[:, :, None], flat[:, None], dim=-1)  # a zero vector gives 0
        means[name] = cos.diagonal_scatter(torch.full(cos.shape[:2], -torch.inf, dtype=cos.dtype), 0, 1, 2
                                           ).amax(-1).mean(0)
    return means


def test_identical_heads_on_blank_windows_are_identical():
    """Planted: identical heads. The blank windows' maps are uniform; left out of the centred mean, the rest give
    exactly 1, where counting them as 0 gives 0.5 and 0.67."""
    model, x = identical_heads_swin_without_bias(), blank_window_images()
    df = head_similarity(model, x, batch_size=3)
    assert df.max_cos_raw.to_numpy() == pytest.approx(1, abs=1e-6)
    assert df.max_cos_centred.to_numpy() == pytest.approx(1, abs=1e-6)
    assert df.most_similar_head.tolist() == [1, 0, 1, 0]
    counted_as_0 = mean_max_cosine_counting_uniform_as_0(model, x)
    assert [v.tolist() for v in counted_as_0.values()] == [pytest.approx([6 / 12] * 2), pytest.approx([8 / 12] * 2)]


def test_left_out_maps_are_the_blank_windows_of_every_head():
    df = head_similarity(identical_heads_swin_without_bias(), blank_window_images(), batch_size=2)
    assert df.centred_maps_left_out.tolist() == [6, 6, 4, 4]  # blank windows, per head (2 heads a site)
    assert (df.maps_per_image == 4).all()


def test_all_maps_uniform_gives_nan_and_says_so():
    x = blank_window_images()[1:2].expand(2, -1, -1, -1)  # two blank images: every map uniform
    df = head_similarity(identical_heads_swin_without_bias(), x)
    assert df.max_cos_centred.isna().all() and df.most_similar_head.isna().all()
    assert df.max_cos_raw.to_numpy() == pytest.approx(1, abs=1e-6)
    assert (df.centred_maps_left_out == 8).all()
    df["model"], df["num_images"] = "planted", 2
    assert hs.left_out_summary(df) == ("planted: 32 of 32 centred maps left out (uniform: no cosine); no map left, "
                                       "NaN: layers.0.blocks.0.attn, layers.0.blocks.1.attn")


class FixedMaps(torch.nn.Module):
    """Attention whose maps are softmax(`logits`) (H, N, N) for every image."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), *self.logits.shape).softmax(-1)


def test_a_uniform_head_is_no_other_heads_neighbour():
    """Planted: head 0 attends to key 0, head 1 to key 1, head 2 uniformly. Heads 0 and 1 are each other's
    closest, at the disjoint heads' -1/(n-1) (a uniform head counted as 0 would make it 0); head 2 has none."""
    n = 5
    logits = torch.zeros(3, n, n)
    logits[0, :, 0] = logits[1, :, 1] = 50
    df = head_similarity(FixedMaps(logits), torch.zeros(4, 1), batch_size=3)
    assert df.max_cos_centred.tolist()[:2] == pytest.approx([-1 / (n - 1)] * 2, abs=1e-9)
    assert np.isnan(df.max_cos_centred.iat[2])
    assert df.centred_maps_left_out.tolist() == [0, 0, 4] and df.most_similar_head.tolist()[:2] == [1, 0]
    assert np.isnan(df.most_similar_head.iat[2])


@pytest.mark.parametrize("make, size", [(tiny_vit, 16), (tiny_swin, 16), (lambda: tiny_evit("cga"), 64),
                                        (identical_heads_swin_without_bias, 16)])
def test_without_uniform_maps_the_measure_is_unchanged(make, size):
    """Random images leave no map uniform: nothing is left out, and the centred means are the definition's."""
    model, x = make(), images(3, size)
    df = head_similarity(model, x, batch_size=3)  # one forward, as the reference's: the same maps to the bit
    assert (df.centred_maps_left_out == 0).all()
    expected = torch.cat(list(mean_max_cosine_counting_uniform_as_0(model, x).values()))
    np.testing.assert_allclose(df.max_cos_centred, expected, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_writes_csv_and_figure(tmp_path, capsys):
    config = tmp_path / "tiny_mhsa.yaml"
    config.write_text("".join(f"{k}: {list(v) if isinstance(v, tuple) else v}\n" for k, v in EVIT_TINY.items())
                      + "mixers: mhsa\n")
    argv = ["--model", f"{config},{config}", "--weights", "random", "--data", "digits", "--num-images", "3",
            "--batch", "2", "--seeds", "0,1", "--out", str(tmp_path)]
    df = main(argv)[0]
    csv = pd.read_csv(tmp_path / "tiny_mhsa.csv")
    assert {"block", "head", "max_cos_raw", "max_cos_centred", "most_similar_head", "baseline_raw_mean",
            "baseline_centred_mean", "baseline_raw_std", "weights"} <= set(csv.columns)
    assert len(csv) == len(df) == 2 and (csv.weights == "random").all() and (csv.num_images == 3).all()
    assert (csv.baseline_seeds == 2).all() and csv.baseline_raw_std.notna().all()
    assert (tmp_path / "tiny_mhsa_vs_tiny_mhsa.png").stat().st_size > 0
    maps = 2 * 3 * int(csv.maps_per_image.iat[0])  # heads x images x windows
    assert (f"tiny_mhsa: {csv.centred_maps_left_out.sum()} of {maps} centred maps left out (uniform: no cosine)\n"
            in capsys.readouterr().out)


def test_random_weights_are_the_baselines_seed_0_computed_once(monkeypatch):
    """With random weights the model measured is the baseline's seed 0: computed once, and equal to it."""
    calls = []
    real = hs.head_similarity
    monkeypatch.setattr(hs, "head_similarity", lambda *args: calls.append(1) or real(*args))
    df = hs.model_similarity("evit_m0", "random", data="digits", num_images=2, batch_size=2, seeds=(0, 1), img_size=64)
    assert len(calls) == 2  # the model (= seed 0) and seed 1
    fresh = real(hs.load_for_command("evit_m0", "random", seed=0)[0], hs.load_images("digits", 64, 2), 2)
    np.testing.assert_allclose(df.max_cos_raw, fresh.max_cos_raw, atol=1e-6)


def test_cli_unknown_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "no_such_model", "--weights", "random"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'no_such_model'") and "\n" not in err


def test_cli_pretrained_offline_fails_fast(capsys, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as on a machine without internet
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # and an empty hub cache
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "evit_m0", "--weights", "pretrained", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "pretrained weights for 'evit_m0' are unreachable" in err and "\n" not in err


@pytest.mark.parametrize("argv, message", [
    (["--model", "deit_tiny", "--data-dir", "/no/such/dir"], "Fashion-MNIST not found in /no/such/dir"),
    (["--model", "deit_tiny", "--data", "cifar10"], "unknown data 'cifar10'"),
    (["--model", "deit_tiny,resnet18"], "ResNet has no softmax attention whose maps can be read"),
])
def test_cli_bad_input_fails_before_any_work(argv, message, capsys, tmp_path):
    """One line, exit 2, before any proxy is trained or image loaded (the first model would take minutes)."""
    assert message in one_line_error(capsys, argv + ["--out", str(tmp_path)], main)
    assert not list(tmp_path.iterdir())
