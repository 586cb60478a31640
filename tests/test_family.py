"""experiments.family: one budget for every model, runs kept by model and budget under the output, accuracy vs
throughput."""
import pandas as pd
import pytest

from evit import EfficientViTConfig, get_preset
from experiments import family, launch

TINY = dict(epochs=1, limit_train=64, limit_val=32, batch_size=32)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVIT_CACHE", str(tmp_path / "zoo"))
    return tmp_path / "zoo"


def test_presets_and_config_files_train_once_with_one_budget(cache, tmp_path, monkeypatch):
    config = tmp_path / "narrow.yaml"
    get_preset("m0").replace(embed_dims=(32, 64, 96), num_heads=(2, 2, 2), name="narrow").to_file(config)
    runs = tmp_path / "runs"
    df = family.train_and_time(["evit_m0", str(config)], runs, **TINY)
    assert list(df.model) == ["evit_m0", "narrow"]
    assert df.val_acc.between(0, 100).all() and (df.throughput_cpu > 0).all()
    assert df.flops_m.iloc[1] < df.flops_m.iloc[0]  # the narrower config is cheaper
    assert df.paper_top1.iloc[0] == 63.2 and pd.isna(df.paper_top1.iloc[1])
    assert sorted(p.name for p in runs.iterdir()) == sorted(
        launch.run_dir(runs, family.budget_config(m, **TINY)).name for m in ("evit_m0", str(config)))

    monkeypatch.setattr(launch, "fit", lambda cfg: pytest.fail("a finished run must not be trained again"))
    again = family.train_and_time(["evit_m0"], runs, **TINY)
    assert again.val_acc.iloc[0] == df.val_acc.iloc[0]


def test_a_model_that_fails_to_train_is_named_and_left_out(cache, tmp_path, capsys):
    broken = launch.run_dir(tmp_path, family.budget_config("evit_m1", **TINY))
    broken.mkdir(parents=True)
    (broken / "last.pth").write_text("not a checkpoint")  # its training fails resuming from it
    df = family.train_and_time(["evit_m0", "evit_m1"], tmp_path, **TINY)
    assert list(df.model) == ["evit_m0"]
    err = capsys.readouterr().err
    assert "1 of 2 runs did not finish" in err and f"{broken.name} (seed 0): " in err and "CheckpointError" in err


def test_run_key_follows_the_budget_and_the_config_content(tmp_path):
    config = tmp_path / "c.yaml"
    EfficientViTConfig().to_file(config)
    def key(**budget):
        return launch.run_dir(tmp_path, family.budget_config(str(config), **budget))

    first = key(**TINY)
    assert key(**TINY) == first
    assert key(**dict(TINY, epochs=2)) != first
    EfficientViTConfig(embed_dims=(32, 64, 96)).to_file(config)
    assert key(**TINY) != first


def test_cli_writes_csv_and_figure_and_keeps_its_runs_under_out(cache, tmp_path):
    family.main(["--models", "evit_m0", "--epochs", "1", "--limit-train", "128", "--limit-val", "32",
                 "--out", str(tmp_path / "out")])
    df = pd.read_csv(tmp_path / "out" / "family.csv")
    assert {"model", "val_acc", "throughput_cpu", "params_m", "flops_m"} <= set(df.columns)
    assert (tmp_path / "out" / "family.png").stat().st_size > 0
    run = launch.run_dir(tmp_path / "out" / "runs", family.budget_config("evit_m0", epochs=1, limit_train=128,
                                                                         limit_val=32))
    assert (run / "metrics.csv").exists()  # a job launcher's logs go beside it, in runs/jobs (test_launch)


def test_unknown_model_is_one_clear_line(cache, capsys):
    with pytest.raises(SystemExit):
        family.main(["--models", "evit_m9"])
    assert "unknown model 'evit_m9'" in capsys.readouterr().err
