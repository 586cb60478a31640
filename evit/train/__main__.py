"""`python -m evit.train`: the training command (see evit.train). It resolves a teacher named by --teacher
through the zoo (which may train a proxy for it) and passes it in, so the training loop stands below the zoo."""
from __future__ import annotations

import argparse
from typing import Any, Sequence

import torch.distributed as dist

from evit import train as training
from evit.cli import run_cli, settings_parser
from evit.train import TrainConfig, check_inputs, fit, init_distributed, load_config
from evit.zoo import check_teacher, teacher_loader


def build_parser() -> argparse.ArgumentParser:
    """One --flag per TrainConfig field; unset flags stay absent so config-file values survive."""
    parser = settings_parser(TrainConfig, "python -m evit.train", training.__doc__.split("\n\n")[0], keep_unset=True)
    parser.add_argument("--config", help="YAML/JSON training config (flags override its values)")
    return parser


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    values = load_config(args.pop("config")) if "config" in args else {}
    return TrainConfig(**{**values, **args})


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point; returns the final metrics."""

    def body() -> dict[str, Any]:
        cfg = parse_config(argv)
        check_inputs(cfg)
        check_teacher(cfg)
        init_distributed()
        try:
            return fit(cfg, teacher_loader(cfg))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    return run_cli(body)


if __name__ == "__main__":
    main()
