"""What every command shares: a settings dataclass whose fields are its flags, and one way to end on a user error.

A command declares `@dataclass class Settings` with `option(...)` fields and a `check()` that raises UserError;
its `run(settings)` checks them and does the work, so that other code (experiments.reproduce) builds settings
objects instead of argv lists, and its `main(argv)` is `run_cli(lambda: run(parse_settings(Settings, argv, ...)))`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import field
from typing import Any, Callable, Optional, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

from evit import ConfigError
from evit.builder.io import CheckpointError


class UserError(Exception):
    """A mistake in what the user asked for (a name, a file, a combination of settings): the message is one line
    that names the problem and the valid choices, and a command ends with it and exit status 2."""


# ConfigError and CheckpointError belong to the builder (evit/builder/), which imports nothing of the library.
USER_ERRORS: tuple[type[Exception], ...] = (UserError, ConfigError, CheckpointError)

Settings = TypeVar("Settings")


def option(default: Any, help: str, *, flags: Sequence[str] = (), **argparse_kwargs: Any) -> Any:
    """A settings field and its --flag: `help` (the default is appended), the flag's names (`flags`; default the
    field's name, --like-this) and any add_argument keyword (choices, metavar, nargs, const). A list default is
    copied per instance; on the command line a list is comma-separated."""
    text = help if isinstance(default, (dict, list)) else f"{help} (default: {default})"
    # argparse formats help strings with %: a percentage in the text is text, not a format.
    metadata = {"help": text.replace("%", "%%"),
                "flags": tuple(flags), **argparse_kwargs}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _comma_list(item: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        return [item(part.strip()) for part in text.split(",") if part.strip()]

    parse.__name__ = f"comma-separated {item.__name__}"  # argparse names the type in its error message
    return parse


def _flag_type(hint: Any) -> Callable[[str], Any]:
    """The argparse `type` for a field's annotation: Optional[X] -> X, dict -> JSON, list[X] -> comma-separated."""
    if get_origin(hint) is Union:
        hint = next(a for a in get_args(hint) if a is not type(None))
    if hint is dict:
        return json.loads
    if get_origin(hint) is list:
        return _comma_list(get_args(hint)[0])
    return hint


def settings_parser(cls: type, prog: str, description: Optional[str] = None,
                    keep_unset: bool = False) -> argparse.ArgumentParser:
    """One --flag per field of the settings dataclass `cls` (a bool field is --flag / --no-flag). `keep_unset`:
    unset flags stay absent from the namespace (so that values from a config file survive)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS if keep_unset else None)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kwargs = {k: v for k, v in f.metadata.items() if k != "flags"}
        names = f.metadata.get("flags") or ["--" + f.name.replace("_", "-")]
        if hints[f.name] is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(*names, dest=f.name, type=_flag_type(hints[f.name]), **kwargs)
    return parser


def parse_settings(cls: type[Settings], argv: Optional[Sequence[str]], prog: str,
                   description: Optional[str] = None) -> Settings:
    """Settings `cls` from the command line (a value of the wrong type ends the program with the parser's error
    and exit status 2). Combinations are judged by the settings' `check()`, which `run` calls first."""
    return settings_from(cls, settings_parser(cls, prog, description).parse_args(argv))


def settings_from(cls: type[Settings], namespace: argparse.Namespace) -> Settings:
    """Settings `cls` from the fields of a parsed namespace (which may hold other flags too); flags left unset
    (None) keep the field's default."""
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in values.items() if value is not None})


def run_cli(body: Callable[[], Any]) -> Any:
    """Run a command's body; a user error ends it with one line on stderr and exit status 2, not a traceback."""
    try:
        return body()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
