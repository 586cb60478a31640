"""Files: atomic writes (a killed run never leaves a half-written CSV, JSON, figure or checkpoint behind), the one
checkpoint reader, and the one markdown table writer."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are meant to be shared
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_csv(df, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write a pandas DataFrame to CSV atomically (index off unless asked)."""
    kwargs.setdefault("index", False)
    return atomic_write(path, lambda tmp: df.to_csv(tmp, **kwargs))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_figure(fig, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically (format taken from `path`'s suffix)."""
    kwargs.setdefault("bbox_inches", "tight")
    kwargs.setdefault("dpi", 150)
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save atomically: a checkpoint on disk is always complete."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model; the message is one line naming the
    file."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The dict a checkpoint file holds (on the CPU, tensors only: weights_only), or a one-line CheckpointError for
    a missing, truncated or foreign file. Every checkpoint the project reads goes through here."""
    import torch

    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (RuntimeError, UnpicklingError, EOFError, ...) for bad files
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}); delete it to start "
                              f"over or pass another file") from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict of states")
    return checkpoint


def markdown_table(df, floatfmt: str = ".3f") -> str:
    """A DataFrame as a GitHub markdown table: the columns as they are named, floats formatted with `floatfmt`,
    everything else as its string. The one table writer of the reports, the README's support table and the
    presets' summary."""
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(format(v, floatfmt) if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
