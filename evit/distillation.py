"""DeiT-style distillation (Touvron et al. 2021), as EfficientViT's official recipe runs it, and knowledge
distillation on the class logits (Hinton et al. 2015) from a teacher given as a module (a pruned model's unpruned
form, as NViT fine-tunes).

A student with a distillation head returns (class logits, distillation logits) in training: the class head learns
the labels, the distillation head the output of a frozen teacher, and evaluation averages the two heads (the model's
own eval forward). A student without one, taught by a teacher module, learns the labels and the teacher's softened
output with its class logits. Without a teacher the class head's loss is the whole loss.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from evit.builder.io import CheckpointError
from evit.cli import UserError
from evit.data import Datasets, check_fits
from evit.models import check_model, skeleton

if TYPE_CHECKING:
    from evit.train import TrainConfig

DISTILLATION_TYPES = ("hard", "soft")


class DistillationError(UserError, ValueError):
    """A teacher or distillation setting a run cannot train with: the message names it and what would do."""

# The TrainConfig fields of distillation.
DISTILLATION_SETTINGS = ("teacher", "teacher_weights", "distillation_type", "distillation_alpha", "distillation_tau")
# The distillation head's name in evit and in timm's distilled models (DeiT, LeViT, EfficientFormer, PiT, RepViT,
# SwiftFormer, iFormer: head_dist; EfficientViM: heads_dist).
HEAD_NAMES = ("head_dist", "heads_dist")
TEACHER_FILE_SUFFIXES = (".pth", ".pt")
TEACHER_HELP = "a model.pth written by evit.train, or a model name (its weights: --teacher-weights)"
TEACHER_WEIGHTS_HELP = ("weights of a teacher given by name: a checkpoint file (e.g. DeiT's RegNetY-160 file) or a "
                        "zoo keyword; unset: a proxy's Fashion-MNIST training (trained on first use), else the timm "
                        "hub's pretrained weights")


def soft_distillation(student: torch.Tensor, teacher: torch.Tensor, tau: float, per: str = "logit") -> torch.Tensor:
    """KL divergence of the tau-softened distributions times tau^2, summed and divided by the number of logits
    (per='logit': batch x classes) as DeiT's and EfficientViT's code do for a distillation head, or by the batch
    (per='image': Hinton et al.'s KD on the class logits, on the scale of the label loss it shares them with; timm's
    TokenDistillationTask does the same), which weighs this term `classes` times more at the same alpha."""
    kl = F.kl_div(F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1), reduction="sum",
                  log_target=True)
    return kl * tau * tau / (student.numel() if per == "logit" else len(student))


def hard_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the teacher's predicted class."""
    return F.cross_entropy(student, teacher.argmax(dim=1))


class DistillationLoss(nn.Module):
    """(1 - alpha) * base(class logits, targets) + alpha * distillation(distillation logits, teacher(inputs));
    `base` alone without a teacher. `on_logits`: the student has no distillation head, and its class logits take
    the distillation term too (soft: divided by the batch, see soft_distillation). The teacher runs in eval mode
    without gradients, on the student's (possibly mixed) inputs, under the caller's autocast."""

    def __init__(self, base: nn.Module, teacher: nn.Module | None = None, kind: str = "hard", alpha: float = 0.5,
                 tau: float = 1.0, on_logits: bool = False):
        super().__init__()
        self.base, self.teacher, self.kind, self.alpha, self.tau = base, teacher, kind, alpha, tau
        self.on_logits = on_logits

    def forward(self, inputs: torch.Tensor, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            return self.base(outputs, targets)
        if self.on_logits:
            outputs_dist = outputs
        elif isinstance(outputs, torch.Tensor):  # unpacking it would split the batch
            raise TypeError("with a teacher the student must return (class logits, distillation logits) in training")
        else:
            outputs, outputs_dist = outputs
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        if self.kind == "soft":
            distill = soft_distillation(outputs_dist, teacher_logits, self.tau, "image" if self.on_logits else "logit")
        else:
            distill = hard_distillation(outputs_dist, teacher_logits)
        return (1 - self.alpha) * self.base(outputs, targets) + self.alpha * distill


def has_distillation_head(model: nn.Module) -> bool:
    return any(name.rpartition(".")[2] in HEAD_NAMES and not isinstance(module, nn.Identity)
               for name, module in model.named_modules())


def is_teacher_file(teacher: str) -> bool:
    return teacher.endswith(TEACHER_FILE_SUFFIXES)


def check_pairing(cfg: TrainConfig, distilled: bool) -> None:
    """A distillation head trains only on a teacher, and a teacher trains only a distillation head (DeiT's code
    refuses a teacher for a single-head model too)."""
    if distilled and cfg.teacher is None:
        raise DistillationError(f"model {cfg.model} has a distillation head, which learns from a teacher: pass "
                                f"--teacher (a model.pth written by evit.train, or a model name), or build the "
                                f"model without the head")
    if cfg.teacher is not None and not distilled:
        raise DistillationError(f"--teacher trains a distillation head, and model {cfg.model} has none: build it "
                                f"with one (an evit config with distillation: true, --model-kwargs "
                                f"'{{\"distillation\": true}}', or a timm distilled model such as "
                                f"deit_tiny_distilled_patch16_224), or drop --teacher")


def check_distillation(cfg: TrainConfig) -> None:
    """Fail at once, loading no weights, on a bad distillation setting, a distillation head without a teacher or
    a teacher without one, an unknown teacher name or a missing teacher file."""
    if cfg.distillation_type not in DISTILLATION_TYPES:
        raise DistillationError(f"distillation_type '{cfg.distillation_type}' is not one of "
                                f"{', '.join(DISTILLATION_TYPES)}")
    if not 0 <= cfg.distillation_alpha <= 1 or cfg.distillation_tau <= 0:
        raise DistillationError(f"distillation_alpha must lie in [0, 1] and distillation_tau be > 0; got "
                                f"{cfg.distillation_alpha} and {cfg.distillation_tau}")
    check_pairing(cfg, has_distillation_head(skeleton(cfg.model, **cfg.model_kwargs)))
    if cfg.teacher is None:
        if cfg.teacher_weights is not None:
            raise DistillationError("--teacher-weights without --teacher: name the teacher they belong to")
        return
    if is_teacher_file(cfg.teacher):
        if cfg.teacher_weights is not None:
            raise DistillationError(f"--teacher-weights goes with a teacher name; the checkpoint {cfg.teacher} "
                                    f"holds its own weights")
        if not Path(cfg.teacher).is_file():
            raise CheckpointError(f"teacher checkpoint not found: {cfg.teacher}")
        return
    check_model(cfg.teacher)  # its weights, a zoo keyword or a file, are checked by evit.zoo.check_teacher


def distillation_loss(base: nn.Module, cfg: TrainConfig, model: nn.Module, data: Datasets,
                      device: torch.device, teacher: nn.Module | None = None) -> DistillationLoss:
    """The training loss of `model` under `cfg`. With a teacher (cfg.teacher, or the module `teacher`, e.g. a
    pruned model's unpruned form): the teacher, frozen, in eval mode, on `device`, and `model` switched to returning
    both heads' logits in training (timm's distilled models need asking; evit's do it). A teacher module teaches
    the distillation head where `model` has one, else its class logits."""
    distilled = has_distillation_head(model)
    if teacher is None:
        check_pairing(cfg, distilled)
        if cfg.teacher is None:
            return DistillationLoss(base)
        raise ValueError(f"a run with teacher {cfg.teacher} needs the teacher passed in: resolve it with "
                         f"evit.zoo.teacher_loader (as evit.launch and `python -m evit.train` do)")
    spec = cfg.teacher or type(teacher).__name__  # the name the user gave it, where it came by name or file
    teacher.requires_grad_(False)
    check_fits(teacher, f"teacher {spec}", data)  # the teacher must take the student's inputs, predict its classes
    if distilled and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)
    return DistillationLoss(base, teacher.to(device), cfg.distillation_type, cfg.distillation_alpha,
                            cfg.distillation_tau, on_logits=not distilled)
