"""make reproduce's driver: cached steps are skipped, the report reads the CSVs back with verdicts and sets them
beside the reference's."""
from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from evit.builder.summary import preset_table
from evit.builder.io import write_csv
from experiments import reproduce


def _record(name: str):
    """A step that appends its name to out/calls.log (steps run in child processes: a list would stay there)."""
    def run(out, opts) -> None:
        with open(out / "calls.log", "a") as log:
            log.write(name + "\n")
    return run


def test_steps_with_outputs_are_skipped_and_forced_ones_rerun(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "done.csv").write_text("x\n1\n")
    monkeypatch.setattr(reproduce, "STEPS", [
        reproduce.Step("cached", ("a/done.csv",), _record("cached")),
        reproduce.Step("missing", ("b/none.csv",), _record("missing")),
        reproduce.Step("paper_only", (), _record("paper_only"), ("paper",)),
    ])
    calls = lambda: (tmp_path / "calls.log").read_text().split()  # noqa: E731
    reproduce.main(["--out", str(tmp_path)])
    assert calls() == ["missing"]
    reproduce.main(["--out", str(tmp_path), "--force", "cached", "--steps", "cached"])
    assert calls() == ["missing", "cached"]
    reproduce.main(["--out", str(tmp_path), "--force", "all"])
    assert calls() == ["missing", "cached", "cached", "missing"]  # every step of the scale, in order
    assert (tmp_path / "REPORT.md").is_file()


def test_each_step_runs_in_its_own_process_and_a_failure_stops_the_run(tmp_path, monkeypatch):
    import os

    def pid(out, opts) -> None:
        (out / "pid").write_text(str(os.getpid()))

    def user_error(out, opts) -> None:
        raise SystemExit(2)

    monkeypatch.setattr(reproduce, "STEPS", [reproduce.Step("pid", (), pid), reproduce.Step("bad", (), user_error),
                                             reproduce.Step("after", (), _record("after"))])
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert int((tmp_path / "pid").read_text()) != os.getpid() and not (tmp_path / "calls.log").exists()


def test_unknown_step_names_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--out", str(tmp_path), "--steps", "everything"])
    assert "unknown step(s) everything at quick scale; valid: proxies, presets" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reproduce.main(["--scale", "paper", "--out", str(tmp_path)])
    assert "--scale paper needs --data imagefolder:PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the proxy zoo has no place at paper scale
        reproduce.main(["--scale", "paper", "--data", "imagefolder:/x", "--steps", "proxies"])
    assert "unknown step(s) proxies at paper scale" in capsys.readouterr().err


@pytest.mark.parametrize("scale", sorted(reproduce.BUDGETS))
def test_every_step_budget_is_valid_settings(scale, tmp_path, monkeypatch):
    """Each step's first settings at each proxy scale pass its analysis's own check, with the scale's weights and
    the output inside the run folder (nothing runs)."""
    from analysis import head_similarity, mhsa_ratio, op_profile, taylor_prune
    from experiments import benchmark, family, prune_study
    from evit.zoo import PROXY_BUDGETS

    class Asked(Exception):
        pass

    def refuse(settings) -> None:
        raise Asked(settings)

    for module in (op_profile, head_similarity, taylor_prune, mhsa_ratio, prune_study, family, benchmark):
        monkeypatch.setattr(module, "run", refuse)
    opts = reproduce.Settings(scale=scale, device="cpu").resolved()
    for step in reproduce.STEPS:
        if step.name in ("presets", "proxies"):
            continue  # no settings: the preset table at 224 px, the zoo's proxies
        with pytest.raises(Asked) as asked:
            step.run(tmp_path, opts)
        settings = asked.value.args[0]
        settings.check()
        if step.name == "op_profile":  # it times widths, not weights: the models as built
            assert settings.weights == "random"
        else:
            assert getattr(settings, "weights", None) in (None, reproduce.BUDGETS[scale]["weights"]), step.name
        assert Path(settings.out).is_relative_to(tmp_path), step.name  # nothing lands outside the run
        assert getattr(settings, "parallel", opts.parallel) == opts.parallel, step.name  # the run's side by side
    assert reproduce.BUDGETS[scale]["weights"] in PROXY_BUDGETS


def test_trainings_run_one_per_core_inline_and_one_at_a_time_with_another_launcher():
    assert reproduce.Settings().resolved().parallel == len(os.sched_getaffinity(0))
    assert reproduce.Settings(kind="local").resolved().parallel == 1
    assert reproduce.Settings(parallel=1).resolved().parallel == 1
    with pytest.raises(SystemExit):  # side by side is the inline launcher's
        reproduce.main(["--launcher", "local", "--parallel", "2", "--steps", "presets"])


def test_paper_scale_trains_the_papers_subnetworks_and_family_with_the_runs_launcher(tmp_path, monkeypatch):
    from analysis import mhsa_ratio
    from experiments import family
    from evit.launch import Launcher

    asked = []
    for module in (mhsa_ratio, family):
        monkeypatch.setattr(module, "run", asked.append)
    launcher = Launcher(kind="local", gpus_per_job=2, time_min=2880)
    opts = reproduce.Settings(scale="paper", device="cuda", data="imagefolder:/data/in1k",
                              **dataclasses.asdict(launcher)).resolved()
    for step in reproduce.STEPS:
        if step.name in ("mhsa_ratio", "family"):
            step.run(tmp_path, opts)
    studies, trained = asked[:2], asked[2:]
    assert [s.downscale for s in studies] == [1.25, 1.5] and all(s.family == ["deit", "swin"] for s in studies)
    assert [s.models[0] for s in trained] == ["evit_m0"] * 2 and len(trained[0].models) == 6
    for settings in studies + trained[:1]:  # (the allocations' configs come from the pruning step, not run here)
        settings.check()
    for settings in asked:
        assert Launcher.of(settings) == launcher and settings.data == "imagefolder:/data/in1k"
        assert settings.img_size == 224 and Path(settings.out).is_relative_to(tmp_path)


def test_report_gives_the_presets_claim_a_verdict(tmp_path):
    write_csv(preset_table(224), tmp_path / "presets" / "presets.csv")
    report = reproduce.write_report(tmp_path).read_text()
    assert "## M0-M5: params and FLOPs" in report and "**confirmed**" in report
    assert "evit_m5" in report and "Head similarity" not in report  # sections only for results that exist


def test_report_sections_read_the_analysis_csvs(tmp_path):
    from analysis.op_profile import profile_model

    for model in ("deit_tiny", "swin_tiny"):
        prof = profile_model(model, batch=1, img_size=64, iters=1, warmup=0, peaks=(100.0, 10.0))
        write_csv(prof.classes, tmp_path / "op_profile" / f"{model}_cpu_classes.csv")
    write_csv(pd.DataFrame(dict(model=["evit_m0", "evit_m1", "evit_m2"], params_m=[2.3, 3.0, 4.2],
                                flops_m=[79, 167, 201], val_acc=[80.0, 82.0, 84.0], throughput_cpu=[400, 300, 250],
                                paper_top1=[63.2, 68.4, 70.8], paper_v100_img_s=[27644, 20093, 18218], epochs=3,
                                limit_train=20000, img_size=64)), tmp_path / "family" / "family.csv")
    report = reproduce.write_report(tmp_path).read_text()
    assert "## Memory-bound operators (Fig. 2)" in report and "deit_tiny (cpu)" in report
    assert "## The M0-M5 family" in report and "**confirmed**: the Spearman rank correlation" in report


def test_report_judges_the_derived_allocations_against_m0_over_seeds(tmp_path):
    """The family step's allocation table (M0 and the derived configs, 3 seeds each): its section and claim, and
    the derived configs' attention blocks read from the pruning step's configs."""
    from evit import get_preset

    get_preset("m0").replace(mixers=(("none",), ("none", "cga"), ("none", "none", "cga"))).to_file(
        tmp_path / "taylor_prune" / "deit_proxy_allocation.yaml")
    write_csv(pd.DataFrame(dict(model=["evit_m0", "deit_proxy_allocation"], params_m=[2.3, 2.6], flops_m=[79, 96],
                                val_acc=[80.0, 85.0], val_acc_std=[1.0, 1.0], seeds=3, throughput_cpu=[400.0, 410.0],
                                throughput_cpu_min=[390.0, 400.0], throughput_cpu_max=[410.0, 420.0], epochs=3,
                                limit_train=20000, img_size=64, pareto=[False, True])),
              tmp_path / "family" / "allocation.csv")
    report = reproduce.write_report(tmp_path).read_text()
    section = report[report.index("## Pruning-derived allocations against M0"):]
    assert "until their FLOPs match M0's" in section and "3 seeds" in section  # no pruning summary: before --match
    assert "| deit_proxy_allocation |" in section and "| 2/6 |" in section and "1.02" in section  # vs M0's speed
    assert "**confirmed**: evit_m0 reaches 80.00 ± 1.00%" in section
    write_csv(pd.DataFrame(dict(model=["deit_proxy"], allocation_match=["throughput"])),
              tmp_path / "taylor_prune" / "deit_proxy_summary.csv")
    assert reproduce._allocation_match(tmp_path) == "their measured deploy throughput matches M0's"


def plant(folder: Path, band_accuracy: float, with_family: bool = True) -> Path:
    """A results folder with the presets table, an MHSA-proportion summary (25% of attention at `band_accuracy`
    against 100% at 80) and, `with_family`, the family table."""
    write_csv(pd.DataFrame(dict(model=["evit_m0", "evit_m1"], flops_fused_vs_paper_pct=[0.25, -0.1],
                                params_fused_m=[2.33, 2.98], paper_params_m=[2.3, 3.0])),
              folder / "presets" / "presets.csv")
    write_csv(pd.DataFrame(dict(family="deit", share=[0.25, 1.0], actual_share=[0.25, 1.0],
                                val_acc_mean=[band_accuracy, 80.0], val_acc_std=0.5, seeds=3)),
              folder / "mhsa_ratio" / "summary.csv")
    if with_family:
        write_csv(pd.DataFrame(dict(model=["evit_m0", "evit_m1"], params_m=[2.3, 3.0], flops_m=[79, 167],
                                    val_acc=[80.0, 82.0], throughput_cpu=[400.0, 300.0], paper_top1=[63.2, 68.4],
                                    paper_v100_img_s=[27644, 20093], epochs=3, limit_train=20000, img_size=64)),
                  folder / "family" / "family.csv")
    return folder


def test_the_report_sets_each_claim_and_its_numbers_beside_the_reference(tmp_path):
    run, reference = plant(tmp_path / "run", 90.0), plant(tmp_path / "reference", 70.0, with_family=False)
    text = reproduce.beside_reference(run, reference)
    assert f"The reference ({reference}) lacks the results of family: left out." in text
    assert "| the presets have the paper's params and FLOPs. | confirmed | confirmed |" in text
    assert "| attention in 20-40% of the blocks beats more attention (deit family). | confirmed | refuted |" in text
    assert "| deit accuracy, best at 20-40% attention | 90.000 | 70.000 |" in text
    assert "larger presets trade speed for accuracy" not in text  # the step the reference lacks is left out
    report = reproduce.write_report(run, "quick", reference).read_text()
    assert report.endswith("## This run beside the reference\n\n" + text)
    assert "This folder is the reference" in reproduce.beside_reference(reference, reference)


def test_a_run_prints_its_claims_beside_the_reference(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "STEPS", [])
    run, reference = plant(tmp_path / "run", 90.0), plant(tmp_path / "reference", 70.0)
    reproduce.main(["--out", str(run), "--reference", str(reference)])
    printed = capsys.readouterr().out
    assert "| claim | this run | reference |" in printed and "| number | this run | reference |" in printed
    assert "| larger presets trade speed for accuracy. | confirmed | confirmed |" in printed


def test_a_run_computes_into_an_untracked_run_folder_and_compares_with_the_committed_results(
        tmp_path, monkeypatch, capsys):
    """With no --out, the presets step really computed: into runs/quick (which git ignores), its claims set
    beside results/quick's, which stays as it was."""
    reference = plant(tmp_path / "results" / "quick", 70.0)
    committed = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(reproduce, "STEPS", [reproduce.Step("presets", ("presets/presets.csv",), reproduce._presets)])
    report = reproduce.main([])
    assert report.resolve() == (tmp_path / "runs" / "quick" / "REPORT.md").resolve()
    computed = pd.read_csv(tmp_path / "runs" / "quick" / "presets" / "presets.csv")
    assert list(computed.model) == [f"evit_m{i}" for i in range(6)]  # all six, not the planted two
    assert {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()} == committed
    assert "| the presets have the paper's params and FLOPs. | confirmed | confirmed |" in capsys.readouterr().out
    ignored = subprocess.run(["git", "check-ignore", "-q", "runs/quick/REPORT.md"], cwd=Path(__file__).parents[1])
    assert ignored.returncode == 0  # a run leaves git status clean


def test_a_timed_verdict_names_its_ridge_and_is_marked_when_measured_under_load(tmp_path):
    """The Fig. 2 claim names the ridge its run was judged with; a step that started on a busy machine has its
    timed verdicts marked in the report and beside the reference, rather than silently standing as quiet ones."""
    from analysis.op_profile import profile_model
    from evit.builder.io import write_json

    for out in ("run", "reference"):
        for model in ("deit_tiny", "swin_tiny"):
            prof = profile_model(model, batch=1, img_size=64, iters=1, warmup=0, peaks=(100.0, 10.0))
            write_csv(prof.classes, tmp_path / out / "op_profile" / f"{model}_cpu_classes.csv")
        write_json(tmp_path / out / "op_profile" / "roofline_cpu.json", dict(gflops=100.0, gbs=10.0, ridge=10.0))
    quiet = reproduce.write_report(tmp_path / "run", "quick", tmp_path / "reference").read_text()
    assert "judged with the ridge at cpu: 10.00 FLOP/byte" in quiet and "under load" not in quiet
    reproduce.record_load(tmp_path / "run", "op_profile", 1.4)
    reproduce.record_load(tmp_path / "run", "head_similarity", 1.4)  # not a timed section: nothing to mark
    report = reproduce.write_report(tmp_path / "run", "quick", tmp_path / "reference").read_text()
    verdict = next(c.verdict for c in reproduce.judge_folder(tmp_path / "reference")["op_profile"])
    assert (f"**{verdict}** (measured under load: other processes used 1.4 of {os.cpu_count()} cores as it "
            f"started)") in report
    assert f"| {verdict} (under load) | {verdict} |" in report
    reproduce.record_load(tmp_path / "run", "op_profile", 0.1)
    assert "under load" not in reproduce.write_report(tmp_path / "run", "quick", tmp_path / "reference").read_text()
