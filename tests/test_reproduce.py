"""make reproduce's driver: cached steps are skipped, the report reads the CSVs back with verdicts."""
from __future__ import annotations

import pytest

from evit.summary import preset_table
from evit.io import write_csv
from experiments import reproduce


def test_steps_with_outputs_are_skipped_and_forced_ones_rerun(tmp_path, monkeypatch):
    calls = []
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "done.csv").write_text("x\n1\n")
    monkeypatch.setattr(reproduce, "STEPS", [
        reproduce.Step("cached", ("a/done.csv",), lambda out: calls.append("cached")),
        reproduce.Step("missing", ("b/none.csv",), lambda out: calls.append("missing")),
    ])
    reproduce.main(["--out", str(tmp_path)])
    assert calls == ["missing"]
    reproduce.main(["--out", str(tmp_path), "--force", "cached", "--steps", "cached"])
    assert calls == ["missing", "cached"]
    assert (tmp_path / "REPORT.md").is_file()


def test_unknown_step_names_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--out", str(tmp_path), "--steps", "everything"])
    assert "unknown step(s) everything; valid: presets" in capsys.readouterr().err


def test_report_gives_the_presets_claim_a_verdict(tmp_path):
    write_csv(preset_table(224), tmp_path / "presets" / "presets.csv")
    report = reproduce.write_report(tmp_path).read_text()
    assert "## M0-M5: params and FLOPs" in report and "**confirmed**" in report
    assert "evit_m5" in report and "Head similarity" not in report  # sections only for results that exist
