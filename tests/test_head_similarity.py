"""Head similarity (Fig. 4) with planted truth: identical heads, disjoint heads, batch-size independence,
attention capture for timm ViT / Swin and evit CGA / MHSA, and the CLI's errors."""
import pandas as pd
import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

import evit  # noqa: F401  (registers evit_custom)
from analysis.attention_capture import TIMM_ATTENTION, UnsupportedModelError, capture_attention, find_attention
from analysis.head_similarity import head_similarity, main, max_other, pairwise_cosine

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
    with capture_attention(model) as sites:
        model(images(3, size))
        for site in sites:
            maps, visible = site.take()
            assert maps.shape == (3 * windows, 2, tokens, tokens)
            torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]))
            if visible is not None:  # Swin's shifted block: hidden keys get no attention
                assert visible.shape == (3 * windows, 1, tokens, tokens) and not visible.all()
                assert maps.masked_select(~visible).max() < 1e-30


def test_swin_shifted_windows_report_visible_keys():
    model = tiny_swin()
    with capture_attention(model) as sites:
        model(images(1, 16))
        assert [site.take().visible is None for site in sites] == [True, False]


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin])
def test_fused_attention_disabled_then_restored(make):
    model = make()
    modules = [m for m in model.modules() if isinstance(m, TIMM_ATTENTION)]
    for m in modules:
        m.fused_attn = True
    expected = model(images(2, 16))
    with pytest.raises(KeyError):
        with capture_attention(model):
            assert not any(m.fused_attn for m in modules)
            torch.testing.assert_close(model(images(2, 16)), expected, atol=1e-5, rtol=1e-5)
            raise KeyError("restored even after an error")
    assert all(m.fused_attn for m in modules)
    assert all(not m.attn_drop._forward_hooks for m in modules)


def test_model_without_attention_is_rejected():
    with pytest.raises(UnsupportedModelError, match="no attention module"):
        find_attention(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------ planted truth


def copy_rows(tensor: torch.Tensor, src: slice, dst: slice) -> None:
    with torch.no_grad():
        tensor[dst] = tensor[src]


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


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_writes_csv_and_figure(tmp_path):
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
