"""Training: learning on real data, exact resume (also after kill -9), DDP = single process, CLI errors, config."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import evit.train as train_mod
from evit.models import create_model
from evit.builder.io import read_checkpoint
from evit.train import TrainConfig, fit, train
from evit.train.__main__ import main, parse_config
from tests.test_data import make_image_folder

REPO = Path(__file__).resolve().parents[1]
# A LayerNorm ViT (no BatchNorm) on sklearn digits at their native 8x8: 2x2 patches of 4 px.
TINY = dict(model="vit_tiny_patch16_224", model_kwargs=dict(patch_size=4, embed_dim=32, depth=1, num_heads=2),
            data="digits", batch_size=32, lr=3e-3, warmup_epochs=0, threads=1, limit_train=512)
# Every source of randomness a resume must restore: mixup/cutmix (numpy), drop path (torch), EMA.
RANDOM = dict(mixup=0.8, cutmix=1.0, ema_decay=0.9,
              model_kwargs=dict(TINY["model_kwargs"], drop_path_rate=0.1), warmup_epochs=1)


def env_1_thread() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    # No GPU for the children: the DDP test's gloo ranks match the one-process CPU run on a GPU machine too.
    return {**env, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metrics(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "metrics.csv").drop(columns="epoch_time_s")


def to_argv(cfg: dict) -> list[str]:
    argv = []
    for key, value in cfg.items():
        if value is None:
            continue
        argv += [f"--{key.replace('_', '-')}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return argv


def test_loss_decreases_on_digits(tmp_path):
    model = create_model(TINY["model"], num_classes=10, img_size=8, **TINY["model_kwargs"])
    final = train(model, dict(TINY, epochs=3, out=str(tmp_path)))
    losses = pd.read_csv(tmp_path / "metrics.csv")["train_loss"].tolist()
    assert losses[0] > losses[1] > losses[2] and losses[2] < losses[0] - 0.2
    assert final["epoch"] == 3 and final["val_acc"] > 40  # chance is 10%
    assert final["train_loss"] == losses[2] and final["best_val_acc"] >= final["val_acc"]


def test_outputs_per_epoch(tmp_path):
    fit(dict(TINY, epochs=2, out=str(tmp_path)))
    rows = pd.read_csv(tmp_path / "metrics.csv")
    assert rows["epoch"].tolist() == [1, 2] and {"train_loss", "val_acc"} <= set(rows.columns)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["world_size"] == 1 and len(saved["history"]) == 2 and saved["config"]["epochs"] == 2
    assert read_checkpoint(tmp_path / "last.pth")["epoch"] == 2
    final = read_checkpoint(tmp_path / "model.pth")
    assert final["num_classes"] == 10 and final["metrics"]["val_acc"] == rows["val_acc"].iloc[-1]


def test_resume_after_crash_reproduces_straight_run(tmp_path, monkeypatch):
    cfg = dict(TINY, **RANDOM, epochs=3)
    fit(dict(cfg, out=str(tmp_path / "straight")))

    real_epoch, crash, calls = train_mod.train_one_epoch, [True], []

    def epoch_that_crashes_once(state, *args):
        calls.append(state.epoch)
        loss = real_epoch(state, *args)
        if state.epoch == 1 and crash and crash.pop():  # epoch 2 changed the weights in memory, then the process "dies"
            raise KeyboardInterrupt
        return loss

    monkeypatch.setattr(train_mod, "train_one_epoch", epoch_that_crashes_once)
    with pytest.raises(KeyboardInterrupt):
        fit(dict(cfg, out=str(tmp_path / "resumed")))
    fit(dict(cfg, out=str(tmp_path / "resumed"), resume="auto"))

    assert calls == [0, 1, 1, 2]  # the resumed run redoes only the lost epoch 2, then epoch 3
    straight, resumed = (read_checkpoint(tmp_path / d / "last.pth") for d in ("straight", "resumed"))
    assert state_dicts_equal(straight["model"], resumed["model"])
    assert state_dicts_equal(straight["ema"], resumed["ema"])
    pd.testing.assert_frame_equal(metrics(tmp_path / "straight"), metrics(tmp_path / "resumed"))


def test_kill_9_mid_run_then_resume(tmp_path):
    cfg = dict(TINY, **RANDOM, epochs=4, limit_train=None)
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    argv = to_argv(cfg)
    proc = subprocess.Popen([sys.executable, "-m", "evit.train", *argv, "--out", str(killed)],
                            env=env_1_thread(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (killed / "metrics.csv").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read()
    done = read_checkpoint(killed / "last.pth")["epoch"]
    assert 1 <= done < cfg["epochs"], "the run must be killed mid-way for this test to mean anything"

    main([*argv, "--out", str(killed), "--resume"])
    main([*argv, "--out", str(straight)])
    assert state_dicts_equal(read_checkpoint(killed / "model.pth")["state_dict"],
                             read_checkpoint(straight / "model.pth")["state_dict"])
    pd.testing.assert_frame_equal(metrics(killed), metrics(straight))


def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    """torchrun, gloo, 2 processes x 16 images == 1 process x 32 images, within float rounding.

    The model has LayerNorm and no BatchNorm (per-process batch statistics would differ), no dropout or drop
    path, no mixup: both runs see the same global batches, so DDP's averaged gradients must equal the
    single process's. SGD, not AdamW: Adam's first step is lr * sign(grad), which turns float rounding in
    near-zero gradients (summed in a different order) into differences of the size of lr."""
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(dict(TINY, epochs=1, limit_train=256, opt="sgd", lr=0.1)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "evit.train", "--config", str(cfg_file), "--batch-size", "16", "--out", str(tmp_path / "ddp")]
    result = subprocess.run(cmd, env=env_1_thread(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    main(["--config", str(cfg_file), "--batch-size", "32", "--out", str(tmp_path / "single")])

    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["world_size"] == 2
    ddp, single = (read_checkpoint(tmp_path / d / "model.pth")["state_dict"] for d in ("ddp", "single"))
    assert ddp.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-5)
    train_mod.seed_everything(0)  # the initial weights: training must have moved them well beyond the tolerance
    initial = create_model(TINY["model"], num_classes=10, img_size=8, **TINY["model_kwargs"]).state_dict()
    assert (single["head.weight"] - initial["head.weight"]).abs().max() > 1e-3
    ddp_row, single_row = (metrics(tmp_path / d).iloc[0] for d in ("ddp", "single"))
    assert ddp_row["val_acc"] == single_row["val_acc"]
    assert ddp_row["train_loss"] == pytest.approx(single_row["train_loss"], abs=1e-5)


def test_image_folder_with_the_official_recipe(tmp_path):
    """RandAugment, random erasing, repeated augmentation, mixup/cutmix, AGC clipping and EMA, end to end."""
    make_image_folder(tmp_path / "images", per_class=8)
    recipe = REPO / "experiments/configs/imagenet_official.yaml"
    data = f"imagefolder:{tmp_path / 'images'}"
    argv = to_argv(dict(TINY, epochs=1, batch_size=4, img_size=16, limit_train=None, data=data))
    final = main(["--config", str(recipe), *argv, "--workers", "0", "--out", str(tmp_path / "run")])
    assert final["epoch"] == 1 and "val_acc_ema" in final


def one_line_error(capsys, argv: list[str], cli=main, seconds: float = 10.0) -> str:
    """Run a CLI's main(argv): it must exit 2 within `seconds` with one `error: ...` line on stderr."""
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        cli(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert elapsed < seconds, f"took {elapsed:.1f} s to report: {err}"
    return err


def refuse(monkeypatch, module, names: list[str], what: str) -> None:
    """Make each `module.name` fail the test when called: `what` must not happen before the inputs are checked."""
    def refused(*args, **kwargs):
        raise AssertionError(f"{what} before the inputs were checked")

    for name in names:
        monkeypatch.setattr(module, name, refused)


@pytest.fixture
def no_data_loading(monkeypatch):
    """Input errors must come before the data loads: loading fails the test."""
    refuse(monkeypatch, train_mod, ["build_datasets"], "the data was loaded")


def test_cli_error_missing_data(tmp_path, capsys, no_data_loading):
    err = one_line_error(capsys, ["--data", "fashion_mnist", "--data-dir", str(tmp_path / "nowhere")])
    assert str(tmp_path / "nowhere") in err and "--data-dir" in err


def test_cli_error_missing_image_folder_split(tmp_path, capsys, no_data_loading):
    (tmp_path / "train" / "cls").mkdir(parents=True)
    err = one_line_error(capsys, ["--data", f"imagefolder:{tmp_path}"])
    assert "no val/ folder" in err and str(tmp_path) in err


def test_cli_error_unknown_data_spec(capsys, no_data_loading):
    assert "fashion_mnist, digits or imagefolder:PATH" in one_line_error(capsys, ["--data", "cifar10"])


def test_cli_error_empty_image_folder(tmp_path, capsys):
    (tmp_path / "train" / "cls").mkdir(parents=True)
    (tmp_path / "val" / "cls").mkdir(parents=True)
    assert str(tmp_path / "train") in one_line_error(capsys, ["--data", f"imagefolder:{tmp_path}"])


def test_cli_error_corrupt_checkpoint(tmp_path, capsys):
    fit(dict(TINY, epochs=1, out=str(tmp_path)))
    path = tmp_path / "last.pth"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a truncated write
    err = one_line_error(capsys, to_argv(dict(TINY, epochs=2)) + ["--resume", str(path)])
    assert str(path) in err and "corrupt" in err


def test_cli_error_checkpoint_of_another_model(tmp_path, capsys):
    fit(dict(TINY, epochs=1, out=str(tmp_path)))
    other = dict(TINY, model_kwargs=dict(TINY["model_kwargs"], embed_dim=16))
    err = one_line_error(capsys, to_argv(other) + ["--resume", str(tmp_path / "last.pth")])
    assert "do not fit" in err and "shape" in err


def test_cli_error_unknown_model(capsys, no_data_loading):
    err = one_line_error(capsys, ["--data", "digits", "--model", "vit_tinny_patch16_224"])
    assert "unknown model 'vit_tinny_patch16_224'" in err and "vit_tiny_patch16_224" in err


@pytest.mark.parametrize("text, message", [("embed_dims: [64, 128\n", "expected ',' or ']'"),
                                           ("mixers: attention\n", "unknown mixer 'attention'"),
                                           ("embed_dims: 64\n", "not iterable")])
def test_cli_error_bad_evit_config_file(tmp_path, capsys, no_data_loading, text, message):
    path = tmp_path / "arch.yaml"
    path.write_text(text)
    err = one_line_error(capsys, ["--data", "digits", "--model", str(path)])
    assert str(path) in err and message in err


def test_cli_error_bad_training_config_syntax(tmp_path, capsys, no_data_loading):
    path = tmp_path / "cfg.yaml"
    path.write_text("epochs: [3\n")
    assert str(path) in one_line_error(capsys, ["--config", str(path)])


def test_cli_error_unknown_config_key(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text("epochs: 3\nlearning_rate: 0.1\n")
    assert "learning_rate" in one_line_error(capsys, ["--config", str(path)])


def test_official_recipe_config_and_flag_override():
    cfg = parse_config(["--config", str(REPO / "experiments/configs/imagenet_official.yaml"), "--epochs", "7",
                        "--no-repeated-aug"])
    assert cfg.epochs == 7 and cfg.repeated_aug is False  # flags win
    official = dict(opt="adamw", opt_eps=1e-8, lr_base=1e-3, weight_decay=0.025, warmup_epochs=5, warmup_lr=1e-6,
                    min_lr=1e-5, clip_grad=0.02, clip_mode="agc", ema_decay=0.99996, smoothing=0.1, mixup=0.8,
                    cutmix=1.0, re_prob=0.25, auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4,
                    interpolation="bicubic", crop_pct=0.875, img_size=224)
    assert {k: getattr(cfg, k) for k in official} == official
    assert parse_config([]) == TrainConfig()
