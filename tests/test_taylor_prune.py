"""Taylor pruning: split attention is the same function, planted zero channels go first and change nothing,
importance is torch-pruning's, reported widths are the model's, Swin's stage widths go through PatchMerging, the
MAC counter matches a hand count and fvcore, and the allocation builds; EfficientViT's stage widths go through its
stem, transitions, heads and the CGA cascade."""
import pandas as pd
import pytest
import timm
import torch
import torch.nn as nn
import torch_pruning as tp

from analysis import taylor_prune as tpr
from analysis.taylor_prune import cli, importance
from evit.builder.summary import count_flops
from evit.models import create_model
from evit.data import ServedBatches, load_batches
from tests.test_train import one_line_error, refuse


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=8, embed_dim=12, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=3)
    return timm.create_model("vit_tiny_patch16_224", **{**args, **kwargs}).eval()


def tiny_swin():
    torch.manual_seed(0)
    return create_model("swin_proxy").eval()  # 32 px, widths 48/96/192, heads 3/6/12, windows of 4x4 tokens


def batches(n=2, size=16, classes=3):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, size, size, generator=gen), torch.randint(0, classes, (8,), generator=gen))
            for _ in range(n)]


def zero_channel_(group, c):
    """Zero channel c of a group in every layer (weights, biases of its rows, norm scale and shift)."""
    with torch.no_grad():
        for s in group.layout():
            i = s.offset + c - s.first
            tensor = getattr(s.layer, s.param)
            (tensor[..., i] if s.axis == "last" else tensor[i] if s.axis == "out" else tensor[:, i]).zero_()
            bias = getattr(s.layer, "bias", None) if s.axis == "out" else None
            if bias is not None:
                bias[i] = 0


def prepare_keeping_the_function(model, x):
    """prepare() rewrites the model into the same function (outputs within 1e-5), and a second pass on the rewritten
    model takes its own attentions and finds the same groups; returns the groups."""
    with torch.no_grad():
        expected = model(x)
        groups = tpr.prepare(model)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
        again = tpr.prepare(model)
        assert [(g.block, g.kind, g.channels) for g in again] == [(g.block, g.kind, g.channels) for g in groups]
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
    return groups


def ranked_first(group, channels, tol=0.0):
    """The group's lowest-importance units are exactly `channels` (a Q/K or V unit: one dim of every head; an FFN or
    width unit: one channel), each at importance <= tol, and the next unit is above it."""
    units = tpr.candidate_units(group, tpr.TaylorImportance()(group), floor=0.1)
    taken = len(channels) // len(units[0].channels)
    assert sorted(c for u in units[:taken] for c in u.channels) == sorted(channels)
    assert all(u.importance <= tol for u in units[:taken]) and units[taken].importance > tol


def assert_planted_go_first_and_change_nothing(model, x, data, planted, tol=1e-6):
    """After gradients on `data`, each group's planted channels ((group, channels) pairs) rank first at importance
    <= tol (0 for rows whose weights and biases are zero; a GELU(-10) hidden channel leaves ~1e-7), and removing
    them all leaves model(x) unchanged."""
    with torch.no_grad():
        before = model(x)
    tpr.accumulate_gradients(model, data)
    for group, channels in planted:
        ranked_first(group, channels, tol)
    for group, channels in planted:
        tpr.prune_channels(group, sorted(channels))
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)


def assert_dead_widths_go_first(model, widths, dead, data):
    """Channel dead[i] of width group widths[i], zeroed where it is written and read, ranks first at importance 0;
    then it is removed (LayerNorm statistics change, so the caller checks shapes and MACs)."""
    for width, c in zip(widths, dead):
        zero_channel_(width, c)
    tpr.accumulate_gradients(model, data)
    for width, c in zip(widths, dead):
        ranked_first(width, [c])
        tpr.prune_channels(width, [c])


def assert_mac_counter_matches_fvcore_before_and_after_pruning(model, size, classes=3):
    """Our count equals fvcore's on one image, before and after removing dims 0 and 3 of every head (channels 0 and
    3 of an FFN or width group) from every group; returns the groups."""
    x = torch.randn(1, 3, size, size)
    groups = tpr.prepare(model)
    assert sum(tpr.count_macs(model, x).values()) == fvcore_macs(model, size)
    for group in groups:
        per_head = group.channels // group.heads
        tpr.prune_channels(group, [h * per_head + k for h in range(group.heads) for k in (0, 3)])
    assert model(x).shape == (1, classes) and sum(tpr.count_macs(model, x).values()) == fvcore_macs(model, size)
    return groups


MAC_TOLERANCE = 0.05  # of the unpruned MACs, below the target: a step removes whole units (a channel of every head)


def assert_macs_on_target(summary, target: float) -> None:
    """The MACs kept land on the target from both sides: not short of it (2% over at most), and not pruned past
    it by more than MAC_TOLERANCE."""
    kept = summary["macs_after_m"] / summary["macs_before_m"]
    assert target - MAC_TOLERANCE <= kept <= target * 1.02, f"{kept:.3f} of the MACs kept for a target of {target}"


def assert_pruned_to_target_with_its_own_widths(model, blocks, size, ffn_width, classes=3, stages=1):
    """Pruned to 0.6 of its MACs in 2 steps: the target is met, the table's widths are the layers' (`blocks()`: the
    blocks after pruning; `ffn_width(block)`: its FFN's hidden width), heads stay equal, the floor holds, and the
    pruned model runs."""
    result = tpr.prune_to_target(model, batches(size=size, classes=classes), target_macs=0.6, steps=2,
                              val_batches=batches(1, size, classes))
    s = result.summary
    assert_macs_on_target(s, 0.6)
    assert s["params_after_m"] < s["params_before_m"]
    assert list(result.blocks.in_dim) == [b.attn.q.in_features for b in blocks()]
    assert list(result.blocks.qk_dim) == [b.attn.k.out_features for b in blocks()]
    assert list(result.blocks.v_dim) == [b.attn.v.out_features for b in blocks()]
    assert list(result.blocks.ffn_dim) == [ffn_width(b) for b in blocks()]
    assert (result.blocks.qk_dim % result.blocks.heads == 0).all() and (result.blocks.v_dim % result.blocks.heads
                                                                        == 0).all()  # heads stay equal
    assert (result.blocks[["qk_kept", "v_kept", "ffn_kept"]] >= 0.1 - 1e-9).all().all()  # the floor
    assert len(result.stages) == stages
    assert result.model(torch.randn(2, 3, size, size)).shape == (2, classes)
    return result


def fvcore_macs(model, size):
    """fvcore's count of the multiply-adds our counter covers (Linear, Conv, matmul), for one image."""
    from fvcore.nn import FlopCountAnalysis

    ops = FlopCountAnalysis(model, torch.randn(1, 3, size, size)).unsupported_ops_warnings(False).by_operator()
    return sum(v for k, v in ops.items() if k in ("linear", "conv", "matmul"))


def test_gradients_in_chunks_equal_whole_batches(monkeypatch):
    """Large inputs go through backward in chunks (bounded memory) with the same summed gradient."""
    model = tiny_vit()
    data = batches()
    tpr.accumulate_gradients(model, data)
    whole = {n: p.grad.clone() for n, p in model.named_parameters()}
    monkeypatch.setattr(importance, "GRADIENT_PIXELS", 3 * 16 * 16)  # 3 images per pass: chunks of 3, 3 and 2
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    tpr.accumulate_gradients(model, data)
    handle.remove()
    assert calls == [3, 3, 2] * len(data)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, whole[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name, size", [("vit", 16), ("swin", 32)])
def test_split_attention_is_the_same_function(name, size):
    model = tiny_vit() if name == "vit" else tiny_swin()
    prepare_keeping_the_function(model, torch.randn(2, 3, size, size))
    assert all(isinstance(m.attn, tpr.SplitAttention) for m in model.modules() if hasattr(m, "mlp"))


def test_planted_zero_channels_are_pruned_first_and_change_nothing():
    model = tiny_vit()
    groups = tpr.prepare(model)
    qk, v, ffn = groups[:3]  # block 0
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    with torch.no_grad():
        for h in range(2):  # one Q/K dim in every head: q . k loses nothing
            for layer in (attn.q, attn.k):
                layer.weight[h * 6 + 4].zero_()
                layer.bias[h * 6 + 4].zero_()
            attn.v.weight[h * 6 + 1].zero_()
            attn.v.bias[h * 6 + 1].zero_()
        mlp.fc1.weight[[3, 7]] = 0
        mlp.fc1.bias[[3, 7]] = -10.0  # GELU(-10) = 0: the hidden channel is dead
    scale = attn.scale
    assert_planted_go_first_and_change_nothing(model, torch.randn(4, 3, 16, 16), batches(),
                                               [(qk, [4, 10]), (v, [1, 7]), (ffn, [3, 7])])
    assert (qk.channels, v.channels, ffn.channels) == (10, 10, 22) and attn.scale == scale


def test_importance_is_torch_prunings_group_taylor():
    model = tiny_vit()
    mlp = model.blocks[0].mlp
    graph = tp.DependencyGraph().build_dependency(mlp, example_inputs=torch.randn(1, 5, 12))
    tp_group = graph.get_pruning_group(mlp.fc1, tp.prune_linear_out_channels, idxs=list(range(24)))
    ffn = tpr.prepare(model)[2]
    tpr.accumulate_gradients(model, batches())
    for normalizer in tpr.NORMALIZERS:
        for reduction in tpr.REDUCTIONS:
            scorer = tp.importance.GroupTaylorImportance(group_reduction=reduction, bias=True,
                                                         normalizer=None if normalizer == "none" else normalizer)
            torch.testing.assert_close(tpr.TaylorImportance(normalizer, reduction)(ffn), scorer(tp_group))


def test_mac_counter_matches_a_hand_count_before_and_after_pruning():
    model = tiny_vit(depth=1)
    groups = tpr.prepare(model)
    tokens, dim = 5, 12  # 2x2 patches + class token

    def hand(qk, v, hidden, dim=dim):
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
    width = groups[3]
    assert width.kind == "width" and width.channels == dim
    tpr.measure_positions(model, groups, x)  # a width channel's MACs: what removing it saves, counted by hand
    assert width.macs_per_channel() == hand(10, 8, 14) - hand(10, 8, 14, dim=dim - 1)
    tpr.prune_channels(width, [1, 5, 11])  # the residual stream: every layer that reads or writes it
    assert sum(tpr.count_macs(model, x).values()) == hand(10, 8, 14, dim=9) == fvcore_macs(model, 16)
    assert model.pos_embed.shape[-1] == model.cls_token.shape[-1] == model.norm.weight.shape[0] == 9
    assert model(x).shape == (2, 3) and model.num_features == 9


def test_planted_dead_width_channel_is_pruned_first():
    model = tiny_vit()
    width = tpr.prepare(model)[-1]
    zero_channel_(width, 7)  # channel 7 of the residual stream: written by nothing, read by nothing
    tpr.accumulate_gradients(model, batches())
    first = tpr.candidate_units(width, tpr.TaylorImportance()(width), floor=0.1)[0]
    assert first.channels == [7] and first.importance == 0


def test_distilled_deit_width_covers_the_distillation_token_and_head():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=16, patch_size=8, embed_dim=12, depth=2,
                              num_heads=2, num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    width = tpr.prepare(model)[-1]
    zero_channel_(width, 7)  # written by nothing (tokens, embeddings, projections), read by nothing
    tpr.accumulate_gradients(model, batches())
    first = tpr.candidate_units(width, tpr.TaylorImportance()(width), floor=0.1)[0]
    assert first.channels == [7] and first.importance == 0
    tpr.prune_channels(width, [1, 7])
    assert model.dist_token.shape[-1] == model.cls_token.shape[-1] == model.head_dist.in_features == 10
    assert model(x).shape == (2, 3)


def test_swin_stage_widths_go_through_patch_merging():
    model = tiny_swin()
    merge = model.layers[1].downsample
    channels = torch.arange(48.).expand(1, 2, 2, 48)  # PatchMerging puts stage channel c at c, C+c, 2C+c, 3C+c
    with torch.no_grad():
        norm, reduction = merge.norm, merge.reduction
        merge.norm = merge.reduction = nn.Identity()
        assert merge(channels).flatten().tolist() == list(range(48)) * 4
        merge.norm, merge.reduction = norm, reduction
    widths = [g for g in tpr.prepare(model) if g.kind == "width"]
    assert [(g.block, g.channels) for g in widths] == [("layers.0", 48), ("layers.1", 96), ("layers.2", 192)]
    zero_channel_(widths[1], 30)  # a dead channel of stage 1, read by stage 2's PatchMerging at 30, 126, 222, 318
    tpr.accumulate_gradients(model, batches(size=32, classes=10))
    first = tpr.candidate_units(widths[1], tpr.TaylorImportance()(widths[1]), floor=0.1)[0]
    assert first.channels == [30] and first.importance == 0
    norm_before, reduction_before = merge.norm.weight.detach().clone(), merge.reduction.weight.detach().clone()
    drop = list(range(0, 40)) + [45]  # enough that torch-pruning's LayerNorm pruner would reorder the kept channels
    tpr.prune_channels(widths[0], drop)
    keep = [k * 48 + c for k in range(4) for c in range(48) if c not in drop]
    assert torch.equal(merge.norm.weight, norm_before[keep]) and torch.equal(merge.reduction.weight,
                                                                             reduction_before[:, keep])
    tpr.prune_channels(widths[2], list(range(100)))
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10) and model.num_features == model.head.fc.in_features == 92
    assert sum(tpr.count_macs(model, x).values()) == fvcore_macs(model, 32)


@pytest.mark.parametrize("name, size", [("vit", 16), ("swin", 32)])
def test_pruned_model_runs_and_reports_its_own_widths(name, size):
    model = tiny_vit() if name == "vit" else tiny_swin()
    classes = 3 if name == "vit" else 10
    result = tpr.prune_to_target(model, batches(size=size, classes=classes), target_macs=0.6, steps=2,
                              val_batches=batches(1, size, classes))
    s = result.summary
    assert_macs_on_target(s, 0.6)
    assert s["params_after_m"] < s["params_before_m"]
    assert s["macs_after_m"] * 1e6 == sum(tpr.count_macs(model, torch.randn(1, 3, size, size)).values())
    blocks = [m for m in result.model.modules() if hasattr(m, "mlp")]
    assert list(result.blocks.in_dim) == [b.attn.q.in_features for b in blocks]
    assert list(result.blocks.qk_dim) == [b.attn.q.out_features for b in blocks]
    assert list(result.blocks.v_dim) == [b.attn.v.out_features for b in blocks]
    assert list(result.blocks.ffn_dim) == [b.mlp.fc1.out_features for b in blocks]
    assert list(result.blocks.params_after_m * 1e6) == pytest.approx([sum(p.numel() for p in b.parameters())
                                                                      for b in blocks])
    assert (result.blocks.qk_ratio == result.blocks.qk_dim / result.blocks.in_dim).all()
    assert (result.blocks.width_kept == result.blocks.in_dim / result.blocks.in_dim_before).all()
    assert (result.blocks.qk_dim % result.blocks.heads == 0).all()  # heads stay equal
    assert (result.blocks[["qk_kept", "v_kept", "ffn_kept"]] >= 0.1 - 1e-9).all().all()  # the floor
    assert len(result.stages) == (1 if name == "vit" else 3)
    assert result.model(torch.randn(2, 3, size, size)).shape == (2, classes)


def test_an_unreachable_target_stops_at_the_floor(capsys):
    result = tpr.prune_to_target(tiny_vit(), batches(1), target_macs=0.05, steps=2, floor=0.5)
    assert (result.blocks[["qk_kept", "v_kept", "ffn_kept", "width_kept"]] == 0.5).all().all()
    assert "not reached" in capsys.readouterr().err and result.summary["macs_kept"] > 0.05


def test_allocation_config_builds_at_the_presets_flops():
    blocks = pd.DataFrame(dict(block=range(6), qk_ratio=[1.0, 1.0, 0.5, 0.5, 0.25, 0.25], v_ratio=0.5,
                               ffn_ratio=[2.0, 2.0, 2.0, 1.5, 1.0, 1.0]))
    config = tpr.allocation_config(blocks, "m0", match="none")
    assert config.embed_dims == (64, 128, 192) and config.v_ratio == (1.0,) * 3
    assert config.key_dims == (16, 16, 12) and config.mlp_ratio == (2.0, 1.75, 1.0)
    # the kept input widths scale the stages; MHSA takes the measured V ratio
    widths = blocks.assign(width_kept=[1.0, 1.0, 0.75, 0.75, 0.5, 0.5])
    config = tpr.allocation_config(widths, "m0", mixer="mhsa", match="none")
    assert config.embed_dims == (64, 96, 96) and config.v_ratio == (0.5,) * 3 and config.mixers[0] == ("mhsa",)
    assert config.key_dims == (16, 12, 8)  # qk_ratio of the new width, per head
    matched = tpr.allocation_config(blocks, "m0")
    model = timm.create_model("evit_custom", config=matched).eval()
    import evit

    flops = count_flops(evit.fuse(model), 224)
    assert abs(flops / count_flops(evit.fuse(timm.create_model("evit_m0").eval()), 224) - 1) < 0.05
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_allocation_takes_the_mhsa_studys_best_share(tmp_path):
    """The Fig. 3 finding feeds the config: attention only in the best share of the blocks, ending at the last."""
    blocks = pd.DataFrame(dict(block=range(6), qk_ratio=0.5, v_ratio=1.0, ffn_ratio=2.0))
    summary = pd.DataFrame(dict(family=["deit", "evit", "evit", "evit"], share=[1.0, 0.0, 0.5, 1.0],
                                val_acc_mean=[90.0, 80.0, 82.0, 82.0]))
    summary.to_csv(tmp_path / "summary.csv", index=False)
    share = cli.read_attention_share(str(tmp_path / "summary.csv"))
    assert share == 0.5  # the evit rows' best; the tie with 1.0 goes to the cheaper share
    config = tpr.allocation_config(blocks, "m0", match="none", attention_share=share)
    assert config.mixers == (("none",), ("cga", "none"), ("cga", "none", "cga"))  # m0 depths 1, 2, 3: blocks 1, 3, 5
    matched = tpr.allocation_config(blocks, "m0", attention_share=0.5)
    assert matched.embed_dims > config.embed_dims  # fewer attention blocks leave FLOPs for width
    model = timm.create_model("evit_custom", config=matched).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("value, message", [("1.5", "must lie in [0, 1]"), ("nothing.csv", "existing summary.csv")])
def test_attention_share_errors_name_the_valid_values(value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tpr.main(["--attention-share", value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_writes_blocks_stages_summary_figure_and_config(tmp_path):
    tpr.main(["--model", "deit_proxy", "--weights", "random", "--data", "digits", "--batches", "1", "--batch", "32",
              "--val-images", "64", "--steps", "1", "--out", str(tmp_path), "--config-out",
              str(tmp_path / "alloc.yaml")])
    blocks = pd.read_csv(tmp_path / "deit_proxy.csv")
    assert {"block", "in_dim", "qk_ratio", "v_ratio", "ffn_ratio", "macs_after_m", "params_after_m"} <= set(
        blocks.columns) and len(blocks) == 4
    assert len(pd.read_csv(tmp_path / "deit_proxy_stages.csv")) == 1
    summary = pd.read_csv(tmp_path / "deit_proxy_summary.csv")
    assert summary.normalizer.iat[0] == "mean" and summary.reduction.iat[0] == "sum"
    assert_macs_on_target(summary.iloc[0], 0.5)
    assert (tmp_path / "deit_proxy.png").stat().st_size > 0
    assert timm.create_model("evit_custom", config=str(tmp_path / "alloc.yaml"))


def test_clear_errors(capsys, monkeypatch, tmp_path):
    with pytest.raises(SystemExit):
        tpr.main(["--model", "deit_tinny", "--weights", "random"])
    assert "unknown model 'deit_tinny'. Close matches: deit_tiny" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tpr.main(["--model", "resnet18", "--weights", "random"])
    assert "ResNet has no prunable blocks; supported: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tpr.main(["--target-macs", "1.5"])
    assert "(0, 1)" in capsys.readouterr().err
    # auto weights for a hub model without hub or cache: an error, not a silent random init
    from huggingface_hub import constants

    import evit.zoo

    monkeypatch.setattr(evit.zoo, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        tpr.main(["--model", "deit_tiny"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pretrained weights for 'deit_tiny' are unreachable") and "--weights random" in err


def test_validation_batches_are_served_when_read():
    train, val, classes = load_batches("digits", 16, batches=2, batch=8, val_images=20)
    assert classes == 10 and [len(y) for _, y in train] == [8, 8] and train[0][0].shape == (8, 3, 16, 16)
    assert isinstance(val, ServedBatches) and [len(y) for _, y in val] == [8, 8, 4]
    assert val[2][0] is not val[2][0] and torch.equal(val[2][0], val[2][0])  # served again, the same images
    with pytest.raises(IndexError):
        val[3]


@pytest.fixture
def no_long_work(monkeypatch):
    """Input errors must come before any weights load (a proxy would train, hub weights download) or data is read:
    either fails the test."""
    refuse(monkeypatch, cli, ["load_for_command", "load_batches"], "weights or data were loaded")


@pytest.mark.parametrize("argv, message", [
    (["--data-dir", "/nowhere/fmnist"], "Fashion-MNIST not found in /nowhere/fmnist"),
    (["--data", "imagefolder:/nowhere/imagenet"], "no train/ folder in /nowhere/imagenet"),
    (["--data", "cifar10"], "unknown data 'cifar10': use fashion_mnist, digits or imagefolder:PATH"),
    (["--model", "deit_tinny"], "unknown model 'deit_tinny'. Close matches: deit_tiny"),
    (["--model", "resnet18"], "no prunable blocks; supported: "),
    (["--model", "xcit_nano_12_p16_224"], "blocks.0.attn (XCA): q is normalized (normalize) between its projection "
                                          "and the attention"),
    (["--model", "nowhere.yaml"], "evit config file not found: nowhere.yaml"),
])
def test_bad_inputs_fail_at_once_before_weights_or_data(capsys, no_long_work, argv, message):
    assert message in one_line_error(capsys, ["--model", "deit_proxy", *argv], tpr.main)


# --- EfficientViT --------------------------------------------------------------------------------------------------

def randomize_evit_(model, seed=0):
    """Random weights and BatchNorm running stats (last norms of every branch non-zero, so every branch counts)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if name.endswith("running_var")
                        else torch.randn(t.shape, generator=gen) * 0.1)
    return model.eval()


def evit_m0(**kwargs):
    return randomize_evit_(timm.create_model("evit_m0", img_size=64, num_classes=10, **kwargs))


def evit_modules(model):
    from evit.builder.efficientvit import EfficientViTBlock

    return [b for b in model.modules() if isinstance(b, EfficientViTBlock)]


@pytest.mark.parametrize("mixer", ["cga", "mhsa"])
def test_evit_planted_qk_v_ffn_channels_go_first_in_cga_and_mhsa(mixer):
    model = evit_m0() if mixer == "cga" else evit_m0(mixers="mhsa", v_ratio=0.5)
    groups = tpr.prepare(model)
    block = evit_modules(model)[0]
    attn, ffn0 = block.mixer.m.attn, block.ffn0.m
    heads, kd, vd = attn.num_heads, attn.key_dim, attn.val_dim
    assert [g.kind for g in groups[:4]] == ["qk", "v", "ffn", "ffn"]  # block 0: mixer, then its two FFNs
    qk, v, ffn = groups[:3]
    assert ffn.layout()[0].layer is ffn0.pw1.conv
    dim_qk, dim_v = 3, 1  # planted: Q/K dim 3 and (MHSA) V dim 1 of every head
    with torch.no_grad():
        def zero_rows(conv_norm, rows):  # conv rows and BN scale and shift: those channels output exactly 0
            conv_norm.conv.weight[rows] = 0
            conv_norm.bn.weight[rows] = 0
            conv_norm.bn.bias[rows] = 0

        # every other FFN hidden and V channel alive after its ReLU (no natural ties at importance 0)
        ffn0.pw1.bn.bias.abs_().add_(1.0)
        if mixer == "mhsa":
            attn.qkv.bn.bias[2 * heads * kd:].abs_().add_(1.0)
        for h in range(heads):
            if mixer == "cga":  # head h's own qkv conv: rows [Q (kd) | K (kd) | V (vd)]
                zero_rows(attn.qkvs[h], [dim_qk, kd + dim_qk])
            else:  # one qkv conv: [Q of all heads | K of all heads | V of all heads]
                zero_rows(attn.qkv, [h * kd + dim_qk, (heads + h) * kd + dim_qk, 2 * heads * kd + h * vd + dim_v])
            zero_rows(attn.dws[h], [dim_qk])  # the depthwise conv on Q
        zero_rows(ffn0.pw1, [5, 9])  # ReLU(0) = 0: two dead FFN hidden channels
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    tpr.accumulate_gradients(model, batches(size=64, classes=10))
    planted = {"qk": [h * kd + dim_qk for h in range(heads)], "v": [h * vd + dim_v for h in range(heads)]}
    for group in (qk, v) if mixer == "mhsa" else (qk,):
        first = tpr.candidate_units(group, tpr.TaylorImportance()(group), floor=0.1)[0]
        assert sorted(first.channels) == planted[group.kind] and first.importance == 0
    ffn_units = tpr.candidate_units(ffn, tpr.TaylorImportance()(ffn), floor=0.1)
    assert sorted(u.channels[0] for u in ffn_units[:2]) == [5, 9]
    assert ffn_units[0].importance == 0 and ffn_units[1].importance == 0 and ffn_units[2].importance > 0
    scale = attn.scale
    tpr.prune_channels(qk, planted["qk"])
    tpr.prune_channels(ffn, [5, 9])
    if mixer == "mhsa":
        tpr.prune_channels(v, planted["v"])
    assert not v.prunable if mixer == "cga" else v.prunable
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
    assert attn.key_dim == kd - 1 and attn.scale == scale and attn.val_dim == (vd if mixer == "cga" else vd - 1)
    assert (qk.channels, ffn.channels) == (heads * (kd - 1), 128 - 2)
    assert ffn0.pw1.conv.out_channels == ffn0.pw1.bn.num_features == ffn0.pw2.conv.in_channels == 126
    assert attn.dws[0].conv.weight.shape == (kd - 1, 1, 5, 5) and attn.dws[0].conv.groups == kd - 1


def one_block_evit(mixer):
    import evit

    torch.manual_seed(0)
    config = evit.EfficientViTConfig(img_size=32, num_classes=3, embed_dims=(16,), depths=(1,), num_heads=(2,),
                                     key_dims=4, v_ratio=1.0 if mixer == "cga" else 0.5, mlp_ratio=2,
                                     window_sizes=4, kernels=(3, 5), stem_depth=2, mixers=mixer)
    return randomize_evit_(evit.EfficientViT(config))


@pytest.mark.parametrize("mixer", ["cga", "mhsa"])
def test_evit_one_block_mac_counter_matches_a_hand_count(mixer):
    model = one_block_evit(mixer)
    groups = tpr.prepare(model)
    positions, dim, heads, window = 8 * 8, 16, 2, 16  # 32 px / patch 4; four 4x4 windows of 16 tokens

    def hand(kd, vd, hidden0, hidden1):
        qkv_in = dim // heads if mixer == "cga" else dim  # CGA: each head sees its split
        return (16 * 16 * 8 * 3 * 9 + positions * 16 * 8 * 9    # patch embedding: two 3x3 stride-2 convs
                + 2 * positions * dim * 9                        # dw0, dw1
                + 2 * positions * dim * (hidden0 + hidden1)      # ffn0, ffn1
                + heads * positions * qkv_in * (2 * kd + vd)     # qkv convs
                + positions * kd * (3 * 3 + 5 * 5)               # depthwise Q convs (kernels 3 and 5)
                + heads * positions * window * (kd + vd)         # q @ k^T and attn @ v in every window
                + positions * heads * vd * dim                   # proj
                + dim * 3)                                       # classifier

    x = torch.randn(2, 3, 32, 32)
    vd = 8 if mixer == "cga" else 4
    assert sum(tpr.count_macs(model, x).values()) == hand(4, vd, 32, 32)
    block = model.stages[0].blocks[0]
    qk, v = (next(g for g in groups if g.kind == k) for k in ("qk", "v"))
    ffn0, ffn1 = (next(g for g in groups if g.kind == "ffn" and g.layout()[0].layer is ffn.m.pw1.conv)
                  for ffn in (block.ffn0, block.ffn1))
    tpr.prune_channels(qk, [1, 6])                 # one dim per head
    tpr.prune_channels(ffn0, list(range(10)))
    tpr.prune_channels(ffn1, [0, 31])
    if mixer == "mhsa":
        tpr.prune_channels(v, [0, 2, 4, 7])        # two dims per head
    assert sum(tpr.count_macs(model, x).values()) == hand(3, vd if mixer == "cga" else 2, 22, 30)
    tpr.measure_positions(model, groups, x)
    assert (qk.tokens, qk.keys) == (positions, window)
    assert set(ffn0.positions.values()) == {positions}
    # the Q/K channels' MACs (qkv rows, depthwise Q convs, q @ k^T): the hand count with kd=3 minus kd=0
    assert qk.macs_per_channel() * qk.channels == pytest.approx(hand(3, 0, 0, 0) - hand(0, 0, 0, 0))
    assert ffn0.macs_per_channel() == 2 * positions * dim
    if mixer == "mhsa":  # V rows, proj columns, attn @ v
        assert v.macs_per_channel() * v.channels == pytest.approx(hand(0, 2, 0, 0) - hand(0, 0, 0, 0))


@pytest.mark.parametrize("mixer", ["cga", "mhsa"])
def test_evit_pruned_model_runs_and_reports_its_own_widths(mixer):
    model = evit_m0() if mixer == "cga" else evit_m0(mixers="mhsa", v_ratio=0.5)
    scales = [b.mixer.m.attn.scale for b in evit_modules(model)]
    result = tpr.prune_to_target(model, batches(size=64, classes=10), target_macs=0.8, steps=2,
                              val_batches=batches(1, 64, classes=10))
    s = result.summary
    assert_macs_on_target(s, 0.8)
    assert s["params_after_m"] < s["params_before_m"]
    blocks = evit_modules(result.model)
    attns = [b.mixer.m.attn for b in blocks]
    assert list(result.blocks.qk_dim) == [a.num_heads * a.key_dim for a in attns]
    assert list(result.blocks.v_dim) == [a.num_heads * a.val_dim for a in attns]
    assert list(result.blocks.ffn_dim) == [b.ffn0.m.pw1.conv.out_channels + b.ffn1.m.pw1.conv.out_channels
                                           for b in blocks]
    assert [a.scale for a in attns] == scales  # the original softmax scale
    for a in attns:
        qkvs = a.qkvs if mixer == "cga" else [a.qkv]
        per = 1 if mixer == "cga" else a.num_heads
        assert all(q.conv.out_channels == q.bn.num_features == per * (2 * a.key_dim + a.val_dim) for q in qkvs)
        assert all(d.conv.out_channels == d.conv.groups == d.bn.num_features == a.key_dim for d in a.dws)
        assert a.proj[1].conv.in_channels == a.num_heads * a.val_dim
    if mixer == "cga":  # V is tied to the cascade: no group of its own, it follows the stage width
        assert (result.blocks.v_ratio == 1.0).all() and (result.blocks.v_kept == result.blocks.width_kept).all()
    else:
        assert (result.blocks.v_dim % result.blocks.heads == 0).all()
    assert (result.blocks.qk_dim % result.blocks.heads == 0).all() and (result.blocks.qk_kept < 1).any()
    assert (result.blocks[["qk_kept", "v_kept", "ffn_kept"]] >= 0.1 - 1e-9).all().all()  # the floor
    assert (result.blocks.ffn_ratio == result.blocks.ffn_dim / (2 * result.blocks.in_dim)).all()  # per FFN
    assert result.model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_evit_layernorm_is_rejected():
    with pytest.raises(tpr.UnsupportedModelError, match="only BatchNorm"):
        tpr.prepare(timm.create_model("evit_m0", img_size=64, norm="ln"))


@pytest.mark.parametrize("mixers", ["cga", "mhsa"])
def test_evit_mac_counter_agrees_with_fvcore_before_and_after_pruning(mixers):
    import evit

    model, x = evit_m0(mixers=mixers), torch.randn(2, 3, 64, 64)
    macs = lambda: sum(tpr.count_macs(model, x).values())  # noqa: E731
    assert macs() == count_flops(evit.fuse(model), 64)  # an independent counter: fvcore, one MAC = one flop
    tpr.prune_to_target(model, batches(1, 64, 10), target_macs=0.7, steps=1)
    assert macs() == count_flops(evit.fuse(model), 64)
    for width in (g for g in tpr.prepare(model) if g.kind == "width"):  # and the stage widths (CGA: every chunk)
        per_head = width.channels // width.heads
        tpr.prune_channels(width, [h * per_head + k for h in range(width.heads) for k in (0, 3)])
        assert width.channels == width.original - 2 * width.heads
    assert model(x).shape == (2, 10) and macs() == count_flops(evit.fuse(model), 64)


def three_stage_evit(mixer):
    """64 px, patch 4: stages at 16, 8, 4 tokens a side; CGA chunks of 8, 8 and 16 channels (stage 1: three heads,
    so the chunk-0 tie to the last head is not the previous head); a distillation head (a second reader)."""
    import evit

    config = evit.EfficientViTConfig(img_size=64, num_classes=5, embed_dims=(16, 24, 32), depths=(1, 2, 1),
                                     num_heads=(2, 3, 2), key_dims=4, v_ratio=1.0 if mixer == "cga" else 0.5,
                                     mlp_ratio=2, window_sizes=4, kernels=(3, 5, 3), stem_depth=2, mixers=mixer,
                                     distillation=True)
    return randomize_evit_(evit.EfficientViT(config))


def kill_stream_channels_(model, s, channels):
    """Make `channels` of stage s's stream carry nothing, written out by hand from the architecture (not from the
    width group's layout): every writer's rows (conv, BN scale and shift) and every reader's columns are zero."""
    from evit.builder.efficientvit import CascadedGroupAttention, ConvMlp, ConvNorm, MultiHeadSelfAttention, Residual

    stage, stages = model.stages[s], list(model.stages)
    width = stage.blocks[0].ffn0.m.pw1.conv.in_channels

    def rows(conv_norm, idx):
        conv_norm.conv.weight[idx] = 0
        conv_norm.bn.weight[idx] = 0
        conv_norm.bn.bias[idx] = 0

    def cols(conv, idx):
        conv.weight[:, idx] = 0

    with torch.no_grad():
        rows(model.patch_embed[-1] if s == 0 else stage.downsample.patchmerge.conv3, channels)
        parts = [stage.blocks] + ([stage.downsample.res2] if s else [])
        parts += [stages[s + 1].downsample.res1] if s + 1 < len(stages) else []
        for module in (m for part in parts for m in part.modules()):
            if isinstance(module, Residual) and isinstance(module.m, ConvNorm):  # depthwise: its row per channel
                rows(module.m, channels)
            elif isinstance(module, ConvMlp):
                cols(module.pw1.conv, channels)
                rows(module.pw2, channels)
            elif isinstance(module, MultiHeadSelfAttention):
                cols(module.qkv.conv, channels)
                rows(module.proj[1], channels)
            elif isinstance(module, CascadedGroupAttention):
                heads, d = module.num_heads, width // module.num_heads
                for c in channels:
                    h, j = divmod(c, d)
                    prev = (h - 1) % heads  # the V added to chunk h (chunk 0: the last head's V, by convention)
                    cols(module.qkvs[h].conv, [j])
                    rows(module.qkvs[prev], [2 * module.key_dim + j])
                    cols(module.proj[1].conv, [prev * d + j])
                rows(module.proj[1], channels)
        if s + 1 < len(stages):
            cols(stages[s + 1].downsample.patchmerge.conv1.conv, channels)
        else:
            for head in (model.head, model.head_dist):
                head.bn.weight[channels] = 0
                head.bn.bias[channels] = 0
                cols(head.linear, channels)


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("mixer", ["cga", "mhsa"])
def test_evit_planted_dead_stage_width_channel_goes_first_and_changes_nothing(mixer, stage):
    model = three_stage_evit(mixer)
    widths = [g for g in tpr.prepare(model) if g.kind == "width"]
    assert [(g.block, g.channels) for g in widths] == [("stages.0", 16), ("stages.1", 24), ("stages.2", 32)]
    width = widths[stage]
    heads = (2, 3, 2)[stage] if mixer == "cga" else 1  # CGA: one channel of every chunk
    d = width.channels // heads
    # a different index in every chunk: with the same index, any chunk -> V head tie would remove the same rows
    planted = [h * d + (5 + 2 * h) % d for h in range(heads)]
    kill_stream_channels_(model, stage, planted)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    tpr.accumulate_gradients(model, batches(size=64, classes=5))
    units = tpr.candidate_units(width, tpr.TaylorImportance()(width), floor=0.1)
    assert sorted(units[0].channels) == planted and units[0].importance == 0 and units[1].importance > 0
    tpr.prune_channels(width, planted)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
    new = width.channels
    assert new == 16 + 8 * stage - heads and model.feature_info[stage]["num_chs"] == new
    for block in evit_modules(model.stages[stage]):
        attn = block.mixer.m.attn
        assert block.ffn0.m.pw1.conv.in_channels == attn.proj[1].conv.out_channels == new
        assert block.dw0.m.conv.out_channels == block.dw0.m.conv.groups == block.dw0.m.bn.num_features == new
        if mixer == "cga":  # equal chunks, V = chunk width, the proj reads all heads' V
            assert all(q.conv.in_channels == attn.val_dim == new // heads for q in attn.qkvs)
            assert attn.proj[1].conv.in_channels == new
    if stage == 2:
        assert model.num_features == model.head.linear.in_features == model.head_dist.bn.num_features == new


def test_evit_stage_widths_pruned_to_a_mac_target():
    import evit

    model, x = evit_m0(), torch.randn(2, 3, 64, 64)
    result = tpr.prune_to_target(model, batches(size=64, classes=10), target_macs=0.6, steps=2, prune_width=True)
    s = result.summary
    assert s["width_pruned"]
    assert_macs_on_target(s, 0.6)
    assert model(x).shape == (2, 10)
    widths = [stage.blocks[0].ffn0.m.pw1.conv.in_channels for stage in model.stages]
    assert list(result.stages.in_dim) == widths and (result.stages.width_kept < 1).any()
    assert list(result.blocks.in_dim) == [widths[i] for i in result.blocks.stage]
    assert [f["num_chs"] for f in model.feature_info] == widths and model.num_features == widths[-1]
    for block in evit_modules(model):  # CGA: equal chunks, V = chunk width
        attn = block.mixer.m.attn
        assert all(q.conv.in_channels == attn.val_dim for q in attn.qkvs)
        assert attn.num_heads * attn.val_dim == block.ffn0.m.pw1.conv.in_channels
    assert (result.blocks.v_ratio == 1.0).all() and (result.blocks.v_kept == result.blocks.width_kept).all()
    assert sum(tpr.count_macs(model, x).values()) == count_flops(evit.fuse(model), 64)
    # the allocation scales each preset stage by the kept widths of its blocks
    dims = tpr.allocation_config(result.blocks, "m0", match="none").embed_dims
    unpruned = tpr.allocation_config(result.blocks.assign(width_kept=1.0), "m0", match="none").embed_dims
    assert dims != unpruned and all(a <= b for a, b in zip(dims, unpruned))


def test_timm_efficientvit_msra_is_pruned_as_its_evit_preset():
    """timm's port of the paper's model converts to evit_m0 with the same weights and function, then prunes."""
    from evit.builder.efficientvit import EfficientViT
    from evit.models import skeleton

    torch.manual_seed(0)
    port = timm.create_model("efficientvit_m0", num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    model = tpr.prunable(port)
    assert isinstance(model, EfficientViT) and model is not port
    with torch.no_grad():
        torch.testing.assert_close(model(x), port(x), atol=0, rtol=0)
    result = tpr.prune_to_target(port, [(x, torch.tensor([1, 2]))], target_macs=0.8, steps=1)
    assert isinstance(result.model, EfficientViT)
    assert_macs_on_target(result.summary, 0.8)
    assert result.model(x).shape == (2, 10)
    assert len(tpr.prepare(tpr.prunable(skeleton("efficientvit_m0")))) == len(tpr.prepare(model))  # input check
