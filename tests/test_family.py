"""experiments.family: one budget for every model, runs kept by model and budget under the output, accuracy vs
throughput."""
import json
import statistics

import numpy as np
import pandas as pd
import pytest
import torch

from evit import EfficientViTConfig, get_preset
from experiments import family
from evit import launch

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

    monkeypatch.setattr(launch, "fit", lambda *args: pytest.fail("a finished run must not be trained again"))
    again = family.train_and_time(["evit_m0"], runs, **TINY)
    assert again.val_acc.iloc[0] == df.val_acc.iloc[0]


def final(runs, model, seed, **budget):
    """A finished run's final metrics and training time, read back from its folder."""
    record = json.loads((launch.run_dir(runs, family.budget_config(model, seed=seed, **budget)) / "metrics.json"
                         ).read_text())
    return record["final"]["val_acc"], sum(row["epoch_time_s"] for row in record["history"])


def test_a_model_keeps_the_seeds_that_finished_and_one_with_none_is_named_and_left_out(cache, tmp_path, capsys):
    def break_run(model, seed):
        broken = launch.run_dir(tmp_path, family.budget_config(model, seed=seed, **TINY))
        broken.mkdir(parents=True)
        (broken / "last.pth").write_text("not a checkpoint")  # its training fails resuming from it
        return broken

    broken = [break_run("evit_m0", 1), break_run("evit_m1", 0), break_run("evit_m1", 1)]
    df = family.train_and_time(["evit_m0", "evit_m1"], tmp_path, seeds=(0, 1), **TINY)
    assert list(df.model) == ["evit_m0"]
    acc, train_time = final(tmp_path, "evit_m0", 0, **TINY)
    assert (df.val_acc.iat[0], df.train_time_s.iat[0], df.seeds.iat[0]) == (acc, train_time, 1)  # seed 0's alone
    assert np.isnan(df.val_acc_std.iat[0])  # one seed: no spread measured
    err = capsys.readouterr().err
    assert "3 of 4 runs did not finish" in err and "CheckpointError" in err
    assert f"{broken[0].name} (seed 1): " in err and f"{broken[2].name} (seed 1): " in err


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


def test_cli_trains_every_seed_and_writes_their_mean_and_std_and_the_figure(cache, tmp_path):
    family.main(["--models", "evit_m0", "--seeds", "0,1", "--epochs", "1", "--limit-train", "128", "--limit-val",
                 "32", "--out", str(tmp_path / "out")])
    df = pd.read_csv(tmp_path / "out" / "family.csv")
    assert {"model", "val_acc", "throughput_cpu", "params_m", "flops_m"} <= set(df.columns)
    assert (tmp_path / "out" / "family.png").stat().st_size > 0
    budget = dict(epochs=1, limit_train=128, limit_val=32)
    (acc0, time0), (acc1, time1) = (final(tmp_path / "out" / "runs", "evit_m0", seed, **budget) for seed in (0, 1))
    assert acc0 != acc1  # the seeds trained different networks (else the std below says nothing)
    row = df.iloc[0]
    assert row.val_acc == pytest.approx((acc0 + acc1) / 2, abs=1e-4)  # the CSV keeps 4 decimals
    assert row.val_acc_std == pytest.approx(statistics.stdev([acc0, acc1]), abs=1e-4)
    assert row.train_time_s == pytest.approx((time0 + time1) / 2, abs=1e-4)
    assert (row.seeds, row.pareto) == (2, True)
    # a job launcher's logs go beside the runs, in runs/jobs (test_launch)


def test_unknown_model_is_one_clear_line(cache, capsys):
    with pytest.raises(SystemExit):
        family.main(["--models", "evit_m9"])
    assert "unknown model 'evit_m9'" in capsys.readouterr().err


@pytest.mark.parametrize("seeds, problem", [("0,0", "got 0,0"), ("", "got none"), ("-1", "got -1"),
                                            ("a", "invalid comma-separated int value: 'a'")])
def test_bad_seeds_are_one_clear_line(seeds, problem, capsys, monkeypatch):
    monkeypatch.setattr(launch, "fit", lambda *args: pytest.fail("refused before any training"))
    with pytest.raises(SystemExit) as exit:
        family.main(["--seeds", seeds])
    err = capsys.readouterr().err.strip()
    if problem.startswith("invalid"):  # not a list of integers: argparse's usage, then its one line
        err = err.splitlines()[-1]
    assert exit.value.code == 2 and len(err.splitlines()) == 1
    assert "--seeds" in err and problem in err


def test_cuda_without_a_gpu_is_refused_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(launch, "fit", lambda *args: pytest.fail("refused before any training"))
    with pytest.raises(SystemExit) as exit:
        family.main(["--device", "cuda"])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert err == "error: --device cuda asked but no CUDA GPU is visible to torch; use --device cpu\n"


def speed_table(points, column="throughput_cpu"):
    """A planted table: (model, val_acc, throughput) per row, on a non-default index."""
    model, acc, speed = zip(*points)
    return pd.DataFrame({"model": model, "val_acc": acc, column: speed}, index=[10 * i for i in range(len(points))])


def test_pareto_front_keeps_the_points_no_other_beats_in_accuracy_and_throughput():
    df = speed_table([("best", 80.0, 100.0), ("best_twin", 80.0, 100.0),  # equal points: both on the front
                      ("fastest", 70.0, 200.0), ("middle", 78.0, 160.0),
                      ("as_accurate_slower", 70.0, 190.0),  # ties fastest in accuracy, slower: off
                      ("as_fast_less_accurate", 79.0, 100.0),  # ties best in speed, less accurate: off
                      ("worst", 60.0, 50.0)])
    front = family.pareto_front(df)
    assert list(front.index) == list(df.index) and front.dtype == bool
    assert list(df.model[front]) == ["best", "best_twin", "fastest", "middle"]
    assert family.pareto_front(speed_table([("alone", 50.0, 10.0)])).tolist() == [True]
    on_gpu = speed_table([("a", 80.0, 100.0), ("b", 79.0, 90.0)], "throughput_cuda")
    assert family.pareto_front(on_gpu).tolist() == [True, False]


def test_plot_draws_presets_and_config_files_apart_and_the_front_as_a_staircase():
    df = speed_table([("evit_m0", 70.0, 300.0), ("evit_m1", 75.0, 200.0), ("evit_m2", 72.0, 150.0),
                      ("deit_proxy_allocation", 74.0, 320.0)])
    df = df.assign(val_acc_std=[0.5, 0.4, np.nan, 0.3], seeds=[2, 2, 1, 2], throughput_cpu_min=df.throughput_cpu - 5,
                   throughput_cpu_max=df.throughput_cpu + 5, pareto=family.pareto_front(df), data="digits",
                   epochs=2, limit_train=np.nan, img_size=32, paper_top1=[63.2, 68.4, 70.8, np.nan],
                   paper_v100_img_s=[27644, 20093, 18218, np.nan])
    ours = family.plot(df).axes[0]
    markers = {c.get_label(): c.lines[0].get_marker() for c in ours.containers}
    assert markers == {"presets": "o", "config files": "s"}
    (front,) = [line for line in ours.get_lines() if line.get_label() == "Pareto front"]
    assert front.get_drawstyle() == "steps-pre"
    assert list(front.get_xdata()) == [200.0, 320.0] and list(front.get_ydata()) == [75.0, 74.0]


def claim_table(m0, *derived, seeds=3):
    """A planted allocation table: (val_acc, std, throughput) of evit_m0 and of each derived config."""
    rows = [("evit_m0", *m0)] + [(f"cfg{i}_allocation", *d) for i, d in enumerate(derived)]
    return pd.DataFrame(rows, columns=["model", "val_acc", "val_acc_std", "throughput_cpu"]).assign(seeds=seeds)


@pytest.mark.parametrize("derived, verdict", [
    ([(82.0, 0.5, 220.0), (79.0, 0.5, 200.0)], "confirmed"),  # one config beats M0 by 2 > sqrt(0.5² + 0.5²)
    ([(78.0, 0.5, 220.0), (77.0, 1.0, 200.0)], "refuted"),  # M0 beats both by more than their margins
    ([(78.0, 0.5, 220.0), (80.5, 0.5, 200.0)], "inconclusive"),  # M0 beats one, the other is within its margin
    ([(85.0, 4.0, 220.0)], "inconclusive"),  # a gap of 5 is not more than sqrt(3² + 4²) = 5
    ([(86.0, 4.0, 220.0)], "confirmed"),  # a gap of 6 is (though not more than 3 + 4)
])
def test_allocation_claim_judges_each_derived_config_against_m0_by_their_combined_std(derived, verdict):
    m0 = (80.0, 0.5 if len(derived) > 1 else 3.0, 200.0)
    (claim,) = family.allocation_claims(claim_table(m0, *derived))
    assert claim.verdict == verdict
    assert claim.numbers["cfg0_allocation throughput / evit_m0's"] == pytest.approx(derived[0][2] / 200.0)
    assert claim.numbers["cfg0_allocation accuracy gap to evit_m0 (points)"] == pytest.approx(derived[0][0] - 80.0)
    assert f"at {derived[0][2] / 200.0:.2f}x evit_m0's throughput" in claim.evidence


def test_allocation_claim_needs_two_seeds_a_derived_config_and_the_reference():
    beaten = [(80.0, 0.5, 200.0), (85.0, 0.5, 200.0)]
    assert family.allocation_claims(claim_table(*beaten, seeds=[1, 3])) == []  # M0 with one seed
    assert family.allocation_claims(claim_table(*beaten, seeds=[3, 1])) == []  # the derived config with one
    assert family.allocation_claims(claim_table(beaten[0])) == []
    assert family.allocation_claims(claim_table(*beaten).iloc[1:]) == []
    with_presets = pd.concat([claim_table(*beaten), claim_table((90.0, 0.1, 100.0)).assign(model="evit_m1")])
    (claim,) = family.allocation_claims(with_presets)  # a preset beside them is not a derived config
    assert claim.verdict == "confirmed" and "evit_m1" not in claim.evidence
