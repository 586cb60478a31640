"""MHSA-proportion study: which blocks keep attention, and that the others really lose it."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from timm.models.vision_transformer import Attention

from analysis import mhsa_ratio
from evit.efficientvit import CascadedGroupAttention, MultiHeadSelfAttention
from tests.test_train import one_line_error, refuse


@pytest.mark.parametrize("depth, share, expected", [
    (4, 0.0, []), (4, 0.25, [3]), (4, 0.5, [1, 3]), (4, 1.0, [0, 1, 2, 3]), (6, 0.5, [1, 3, 5]),
])
def test_attention_blocks_are_evenly_spaced_and_end_last(depth, share, expected):
    assert mhsa_ratio.attention_blocks(depth, share) == expected


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_deit_variant_keeps_attention_only_where_asked(share):
    model, keep = mhsa_ratio.build_variant("deit", share)
    with_attention = [i for i, b in enumerate(model.blocks) if any(isinstance(m, Attention) for m in b.modules())]
    assert with_attention == keep
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 10)


def test_ffn_only_block_is_the_block_without_its_attention_branch():
    model, _ = mhsa_ratio.build_variant("deit", 1.0)
    block = model.blocks[0].eval()
    ffn_only = mhsa_ratio.FFNOnlyBlock(block)
    x = torch.randn(2, 17, 96)
    with torch.no_grad():
        block.attn.proj.weight.zero_()
        block.attn.proj.bias.zero_()  # attention branch now adds exactly zero
        torch.testing.assert_close(ffn_only(x), block(x))


@pytest.mark.parametrize("mixer, kind", [("cga", CascadedGroupAttention), ("mhsa", MultiHeadSelfAttention)])
def test_evit_variant_uses_the_mixer_knob(mixer, kind):
    model, keep = mhsa_ratio.build_variant("evit", 0.5, mixer)
    assert keep == [1, 3, 5]
    assert sum(isinstance(m, kind) for m in model.modules()) == 3
    blocks = [b for stage in model.stages for b in stage.blocks]
    assert [i for i, b in enumerate(blocks) if b.mixer_type != "none"] == keep


def test_attention_free_deit_still_sees_the_image():
    # With a class token and no attention, the class token would never mix with the patches: constant output.
    model, keep = mhsa_ratio.build_variant("deit", 0.0)
    model.eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out, shuffled = model(x), model(x.flip(0))
    assert keep == [] and not torch.allclose(out[0], out[1])
    torch.testing.assert_close(shuffled, out.flip(0))


def test_cli_writes_runs_summary_and_figure(tmp_path, monkeypatch):
    speeds = iter(range(1, 100))
    monkeypatch.setattr(mhsa_ratio, "measure_speed", lambda model, img_size, peaks: dict(
        throughput=float(next(speeds)), memory_bound_share=0.5))
    args = ["--shares", "0,1", "--seeds", "0,1", "--epochs", "1", "--limit-train", "256", "--limit-val", "128",
            "--out", str(tmp_path)]
    mhsa_ratio.main(["--family", "deit"] + args)
    runs = mhsa_ratio.main(["--family", "evit"] + args)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert set(runs.family) == {"deit", "evit"}  # the summary covers every family run in the folder
    assert len(summary) == 4 and (summary.seeds == 2).all() and summary.val_acc_std.notna().all()
    assert (tmp_path / "mhsa_ratio.png").stat().st_size > 0
    again = mhsa_ratio.main(["--family", "deit", "--speed-only", "--out", str(tmp_path)])
    deit = runs[runs.family == "deit"]
    assert list(again[again.family == "deit"].val_acc) == list(deit.val_acc)  # accuracies kept, not retrained
    assert (again[again.family == "deit"].throughput > deit.throughput.max()).all()  # speeds measured again


def test_bad_shares_and_families_are_clear_errors(capsys):
    with pytest.raises(SystemExit):
        mhsa_ratio.main(["--family", "resnet"])
    assert "unknown family resnet; valid: deit, evit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mhsa_ratio.main(["--shares", "0.5,2"])
    assert "[0, 1]" in capsys.readouterr().err


def test_missing_data_fails_at_once_before_any_training(tmp_path, capsys, monkeypatch):
    refuse(monkeypatch, mhsa_ratio, ["build_datasets", "train"], "the data was read or a variant trained")
    err = one_line_error(capsys, ["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)], mhsa_ratio.main)
    assert f"Fashion-MNIST not found in {tmp_path / 'nowhere'}" in err and "--data-dir" in err
