"""Taylor pruning: split attention is the same function, planted zero channels go first and change nothing,
reported widths are the model's, the MAC counter matches a hand count, and the allocation builds."""
import pandas as pd
import pytest
import timm
import torch

from analysis import taylor_prune as tpr
from evit.summary import count_flops
from experiments.models import create_model


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=8, embed_dim=12, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=3)
    return timm.create_model("vit_tiny_patch16_224", **{**args, **kwargs}).eval()


def batches(n=2, size=16, classes=3):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, size, size, generator=gen), torch.randint(0, classes, (8,), generator=gen))
            for _ in range(n)]


@pytest.mark.parametrize("name, size", [("vit", 16), ("swin_proxy", 32)])
def test_split_attention_is_the_same_function(name, size):
    model = tiny_vit() if name == "vit" else create_model(name).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        tpr.prepare(model)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
    assert all(isinstance(m.attn, tpr.SplitAttention) for m in model.modules() if hasattr(m, "mlp"))


def test_planted_zero_channels_are_pruned_first_and_change_nothing():
    model = tiny_vit()
    groups = tpr.prepare(model)
    qk, v, ffn = groups[:3]  # block 0
    with torch.no_grad():
        for h in range(2):  # one Q/K dim in every head: q . k loses nothing
            for layer in qk.outputs:
                layer.weight[h * 6 + 4].zero_()
                layer.bias[h * 6 + 4].zero_()
            v.outputs[0].weight[h * 6 + 1].zero_()
            v.outputs[0].bias[h * 6 + 1].zero_()
        ffn.outputs[0].weight[[3, 7]] = 0
        ffn.outputs[0].bias[[3, 7]] = -10.0  # GELU(-10) = 0: the hidden channel is dead
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    tpr.accumulate_gradients(model, batches())
    for group, planted in ((qk, [4, 10]), (v, [1, 7])):
        first = tpr.candidate_units(group, tpr.channel_importance(group), floor=0.1)[0]
        assert sorted(first.channels) == planted and first.importance == 0
    ffn_units = tpr.candidate_units(ffn, tpr.channel_importance(ffn), floor=0.1)
    assert sorted(u.channels[0] for u in ffn_units[:2]) == [3, 7]
    assert ffn_units[0].importance < 1e-6 and ffn_units[1].importance < 1e-6
    tpr.prune_channels(qk, [4, 10])
    tpr.prune_channels(v, [1, 7])
    tpr.prune_channels(ffn, [3, 7])
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
    assert (qk.channels, v.channels, ffn.channels) == (10, 10, 22)


def test_mac_counter_matches_a_hand_count_before_and_after_pruning():
    model = tiny_vit(depth=1)
    groups = tpr.prepare(model)
    tokens, dim = 5, 12  # 2x2 patches + class token

    def hand(qk, v, hidden):
        return (4 * dim * 3 * 8 * 8                      # patch embedding conv
                + tokens * dim * (2 * qk + v)            # q, k, v
                + tokens * tokens * (qk + v)             # q @ k^T and attn @ v, all heads
                + tokens * v * dim                       # proj
                + 2 * tokens * dim * hidden              # fc1, fc2
                + dim * 3)                               # classifier on the class token

    x = torch.randn(2, 3, 16, 16)
    assert sum(tpr.count_macs(model, x).values()) == hand(12, 12, 24)
    tpr.prune_channels(groups[0], [0, 6])
    tpr.prune_channels(groups[1], [2, 3, 8, 9])
    tpr.prune_channels(groups[2], list(range(10)))
    assert sum(tpr.count_macs(model, x).values()) == hand(10, 8, 14)


@pytest.mark.parametrize("name, size", [("vit", 16), ("swin_proxy", 32)])
def test_pruned_model_runs_and_reports_its_own_widths(name, size):
    model = tiny_vit() if name == "vit" else create_model(name).eval()
    result = tpr.taylor_prune(model, batches(size=size, classes=3), target_macs=0.6, steps=2,
                              val_batches=batches(1, size))
    s = result.summary
    assert s["macs_after_m"] <= 0.6 * s["macs_before_m"] * 1.02 and s["params_after_m"] < s["params_before_m"]
    blocks = [m for m in result.model.modules() if hasattr(m, "mlp")]
    assert list(result.blocks.qk_dim) == [b.attn.q.out_features for b in blocks]
    assert list(result.blocks.v_dim) == [b.attn.v.out_features for b in blocks]
    assert list(result.blocks.ffn_dim) == [b.mlp.fc1.out_features for b in blocks]
    assert (result.blocks.qk_dim % result.blocks.heads == 0).all()  # heads stay equal
    assert (result.blocks[["qk_kept", "v_kept", "ffn_kept"]] >= 0.1 - 1e-9).all().all()  # the floor
    assert result.model(torch.randn(2, 3, size, size)).shape == (2, 3 if name == "vit" else 10)


def test_allocation_config_builds_at_the_presets_flops():
    blocks = pd.DataFrame(dict(block=range(6), qk_ratio=[1.0, 1.0, 0.5, 0.5, 0.25, 0.25], v_ratio=1.0,
                               ffn_ratio=[2.0, 2.0, 2.0, 1.5, 1.0, 1.0]))
    config = tpr.allocation_config(blocks, "m0", match_flops=False)
    assert config.key_dims == (16, 16, 12) and config.mlp_ratio == (2.0, 1.75, 1.0)
    matched = tpr.allocation_config(blocks, "m0")
    model = timm.create_model("evit_custom", config=matched).eval()
    import evit

    flops = count_flops(evit.fuse(model), 224)
    assert abs(flops / count_flops(evit.fuse(timm.create_model("evit_m0").eval()), 224) - 1) < 0.05
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_cli_writes_blocks_summary_figure_and_config(tmp_path):
    tpr.main(["--model", "deit_proxy", "--weights", "random", "--data", "digits", "--batches", "1", "--batch", "32",
              "--val-images", "64", "--steps", "1", "--out", str(tmp_path)])
    blocks = pd.read_csv(tmp_path / "deit_proxy.csv")
    assert {"block", "in_dim", "qk_ratio", "v_ratio", "ffn_ratio"} <= set(blocks.columns) and len(blocks) == 4
    summary = pd.read_csv(tmp_path / "deit_proxy_summary.csv")
    assert summary.normalizer.iat[0] == "mean" and summary.reduction.iat[0] == "sum"
    assert (tmp_path / "deit_proxy.png").stat().st_size > 0
    assert timm.create_model("evit_custom", config=str(tmp_path / "deit_proxy_allocation.yaml"))


def test_clear_errors(capsys):
    with pytest.raises(SystemExit):
        tpr.main(["--model", "deit_tinny", "--weights", "random"])
    assert "unknown model 'deit_tinny'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tpr.main(["--model", "evit_m0", "--weights", "random"])
    assert "supported: timm VisionTransformer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tpr.main(["--target-macs", "1.5"])
    assert "(0, 1)" in capsys.readouterr().err
