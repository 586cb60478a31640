"""Every command's --help runs (subcommands too), and the README's commands name real commands and flags.

The commands are found in the code: every module of evit/, experiments/ and analysis/ with a `__main__` guard and
every package with a `__main__.py`, so a new command is covered without listing it here. Each is run as
`python -m` runs it (runpy, module executed as __main__), in this process: one import of torch for all of them.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import runpy
import shlex
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("evit", "experiments", "analysis")
MAIN_GUARD = re.compile(r"""^if __name__ == ["']__main__["']:""", re.MULTILINE)


def commands() -> list[str]:
    """Module names of every `python -m` command of the packages."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "__main__.py":
                found.append(".".join(path.parent.relative_to(ROOT).parts))
            elif MAIN_GUARD.search(path.read_text()):
                found.append(".".join(path.with_suffix("").relative_to(ROOT).parts))
    return found


@dataclass
class Run:
    """A command run in this process: its exit status ("raised" for an exception), its stdout and stderr
    together, and the argument parsers it parsed with, outermost first."""
    status: object
    output: str
    parsers: list[argparse.ArgumentParser]


@contextlib.contextmanager
def recording_parsers() -> Iterator[list[argparse.ArgumentParser]]:
    """Every parser that parses arguments inside, outermost first (subcommands parse after their parent)."""
    parsers: list[argparse.ArgumentParser] = []
    real = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, *args, **kwargs):
        parsers.append(self)
        return real(self, *args, **kwargs)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", parse_known_args):
        yield parsers


def captured(body) -> Run:
    """Run `body()` with stdout and stderr captured, as a command ends: SystemExit's code, or "raised"."""
    output = io.StringIO()
    with recording_parsers() as parsers, contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            body()
            status = 0
        except SystemExit as e:
            status = e.code or 0
        except Exception:  # what the user would see: the traceback
            status = "raised"
            output.write(traceback.format_exc())
    return Run(status, output.getvalue(), parsers)


@functools.cache
def run_command(module: str, *argv: str) -> Run:
    """`python -m module argv...`, in this process."""
    def body() -> None:
        with mock.patch.object(sys, "argv", ["python", *argv]), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules" (imported by others)
            runpy.run_module(module, run_name="__main__", alter_sys=True)

    return captured(body)


def subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, ...]]:
    """Every subcommand path of a parser (("train",), ...), nested ones too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield (name,)
                yield from ((name, *deeper) for deeper in subcommands(subparser))


def assert_help(module: str, *path: str) -> Run:
    run = run_command(module, *path, "--help")
    shown = " ".join(["python -m", module, *path, "--help"])
    assert "Traceback" not in run.output, f"{shown} printed a traceback:\n{run.output}"
    assert run.status == 0, f"{shown} ended with {run.status}:\n{run.output}"
    usage, _, rest = run.output.partition("\n")
    assert usage.startswith("usage: ") and rest.strip(), f"{shown} printed no usage text:\n{run.output}"
    return run


@pytest.mark.parametrize("module", commands())
def test_help_runs(module):
    """`--help` ends with status 0 and a usage text, for the command and each of its subcommands."""
    parser = assert_help(module).parsers[0]
    for path in subcommands(parser):
        assert_help(module, *path)


def test_commands_are_found():
    """The discovery sees packages with __main__.py, modules with a guard, and subcommands."""
    found = commands()
    assert {"analysis.taylor_prune", "analysis.head_similarity", "evit.zoo", "experiments.reproduce"} <= set(
        found)
    assert "evit.cli" not in found  # a library module, no command
    assert list(subcommands(run_command("evit.zoo", "--help").parsers[0])) == [("list",), ("train",)]


# ------------------------------------------------------------------------------------------ the README


def readme_commands(text: str) -> list[list[str]]:
    """The words of each `python -m` command of a markdown text: the lines of its ```bash blocks (continuation
    lines joined, comments dropped) and its inline `python -m ...` code."""
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
             for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`(python -m [^`]+)`", text)
    found = [shlex.split(line, comments=True) for line in lines]
    return [words[2:] for words in found if words[:2] == ["python", "-m"]]


def test_readme_commands_are_read():
    text = "```bash\nmake test\npython -m a.b --x 1 \\\n    --y 2   # note\n```\nor `python -m c --z`.\n"
    assert readme_commands(text) == [["a.b", "--x", "1", "--y", "2"], ["c", "--z"]]


README_COMMANDS = readme_commands((ROOT / "README.md").read_text())


def test_the_readme_has_commands():
    assert len(README_COMMANDS) >= 5


def flags(words: list[str]) -> list[str]:
    """The --flags among a command's words (a value given as --flag=value counts as --flag)."""
    return [word.split("=")[0] for word in words if word.startswith("--")]


@pytest.mark.parametrize("words", README_COMMANDS, ids=" ".join)
def test_readme_command_exists_and_takes_its_flags(words):
    """The README's command is one of the commands, its --help runs, and its parser (subcommand parsers too)
    takes every flag and value it passes, spelled out (not as an abbreviation argparse would accept)."""
    module, argv = words[0], words[1:]
    assert module in commands(), f"the README runs python -m {module}, which is no command"
    parser = assert_help(module).parsers[0]
    parsed: list[tuple[argparse.Namespace, list[str]]] = []
    run = captured(lambda: parsed.append(parser.parse_known_args(argv)))
    assert run.status == 0 and parsed, f"python -m {' '.join(words)}: its parser refused it:\n{run.output}"
    _, unknown = parsed[0]
    assert not unknown, f"python -m {' '.join(words)}: {module} has no {' '.join(unknown)}"
    known = {flag for p in run.parsers for flag in p._option_string_actions}
    assert not set(flags(argv)) - known, f"python -m {' '.join(words)}: abbreviated or unknown flags " \
                                         f"{sorted(set(flags(argv)) - known)}"


def default_outs(module: str) -> list[Path]:
    """Where a command writes when no --out is given: its Settings' `out` default, else its DEFAULT_OUT (one
    folder, or one per scale); none for commands whose output is not a folder of results (zoo, train)."""
    import dataclasses
    import importlib

    imported = importlib.import_module(module)
    settings = getattr(imported, "Settings", None)
    if settings is not None and dataclasses.is_dataclass(settings):
        out = next((f.default for f in dataclasses.fields(settings) if f.name == "out"), None)
        if out is not None:
            return [Path(out)]
    default = getattr(imported, "DEFAULT_OUT", None)
    if isinstance(default, dict):
        return [Path(p) for p in default.values()]
    return [] if default is None else [Path(default)]


def ignored_by_git(path: Path) -> bool:
    import subprocess

    return subprocess.run(["git", "check-ignore", "-q", str(path / "anything.csv")], cwd=ROOT).returncode == 0


@pytest.mark.parametrize("words", [w for w in README_COMMANDS if "--out" not in flags(w)], ids=" ".join)
def test_readme_command_without_out_leaves_the_committed_results_alone(words):
    """A README command that names no --out writes into a folder git ignores (runs/...), never into results/:
    only the documented regenerate commands, with an explicit --out results..., write the reference."""
    for out in default_outs(words[0]):
        assert not out.is_absolute() and ignored_by_git(out), \
            f"python -m {' '.join(words)} writes into {out}, which git tracks"


def test_default_outs_are_read():
    assert default_outs("analysis.taylor_prune") == [Path("runs/taylor_prune")]
    assert Path("runs/quick") in default_outs("experiments.reproduce")
    assert not ignored_by_git(Path("results/taylor_prune"))  # the check can fail
