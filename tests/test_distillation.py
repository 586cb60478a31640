"""DeiT-style distillation: the losses against hand-computed values, a distillation head that learns a planted
teacher while the class head learns the labels, evaluation on both heads averaged, and the CLI's one-line errors."""
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn
import yaml

import evit.train as train_mod
from evit.builder.io import read_checkpoint, torch_save
from evit.data import build_datasets
from evit.distillation import DISTILLATION_SETTINGS, DistillationLoss, distillation_loss
from evit.launch import recipe
from evit.models import create_model
from evit.train.__main__ import main
from evit.zoo import teacher_loader
from tests.test_train import one_line_error, refuse, to_argv

SIZE = 32  # digits upsampled from 8 px, so that evit's 16x patch embedding leaves 2x2 tokens
# A two-stage evit with a distillation head, written to a config file as a user would.
STUDENT = dict(img_size=SIZE, embed_dims=[16, 32], depths=[1, 1], num_heads=[2, 2], key_dims=4, window_sizes=2,
               distillation=True)
TEACHER = ("vit_tiny_patch16_224", dict(patch_size=8, embed_dim=32, depth=1, num_heads=2))
RUN = dict(data="digits", img_size=SIZE, batch_size=32, lr=3e-3, warmup_epochs=0, threads=1)
PLANTED = 3  # the class the planted teacher always predicts


def write_student(tmp_path: Path, **overrides) -> str:
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump({**STUDENT, **overrides}))
    return str(path)


def write_teacher(path: Path, num_classes: int = 10) -> str:
    """A model.pth (the layout evit.train writes) of a tiny ViT that predicts PLANTED whatever it sees."""
    name, kwargs = TEACHER
    model = create_model(name, img_size=SIZE, num_classes=num_classes, **kwargs)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(5 * nn.functional.one_hot(torch.tensor(PLANTED), num_classes))
    torch_save({"model": name, "model_kwargs": kwargs, "img_size": SIZE, "num_classes": num_classes,
                "state_dict": model.state_dict()}, path)
    return str(path)


class FixedLogits(nn.Module):
    """A teacher whose logits are given, whatever the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


# Two images of two classes, labelled 0 and 1; uniform class logits (so the label loss is ln 2).
TARGETS = torch.tensor([0, 1])
ZEROS = torch.zeros(2, 2)


def test_soft_distillation_matches_hand_computed_value():
    tau = 2.0
    teacher = FixedLogits(tau * torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)]]))  # softmax(./tau) = 3:1
    loss = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", alpha=0.5, tau=tau)(None, (ZEROS, ZEROS), TARGETS)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(teacher || uniform student), per image
    soft = 2 * kl * tau ** 2 / 4  # summed over the 2 images, times tau^2, over the 4 logits (DeiT's normalization)
    assert loss.item() == pytest.approx(0.5 * math.log(2) + 0.5 * soft, rel=1e-6)


def test_hard_distillation_matches_hand_computed_value():
    teacher = FixedLogits(torch.tensor([[1.0, 2.0], [0.0, 7.0]]))  # argmax: class 1 for both (not the labels)
    dist = torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)]])  # softmax 3:1 for class 0, then for class 1
    loss = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", alpha=0.25)(None, (ZEROS, dist), TARGETS)
    hard = (-math.log(0.25) - math.log(0.75)) / 2
    assert loss.item() == pytest.approx(0.75 * math.log(2) + 0.25 * hard, rel=1e-6)


def test_without_a_teacher_the_loss_is_the_base_loss():
    logits = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    base = nn.CrossEntropyLoss()
    assert torch.equal(DistillationLoss(base)(None, logits, TARGETS), base(logits, TARGETS))


def test_unset_distillation_settings_leave_recipe_keys_as_before():
    """Proxies and family runs are cached under a hash of their recipe: settings that act on nothing stay out."""
    assert not set(DISTILLATION_SETTINGS) & set(recipe(train_mod.TrainConfig()))
    assert set(DISTILLATION_SETTINGS) <= set(recipe(train_mod.TrainConfig(teacher="teacher.pth")))


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """The student trained on digits labels with the planted teacher, half and half (hard distillation)."""
    tmp = tmp_path_factory.mktemp("planted")
    cfg = dict(RUN, model=write_student(tmp), teacher=write_teacher(tmp / "teacher.pth"), epochs=3,
               distillation_type="hard", distillation_alpha=0.5, out=str(tmp / "run"))
    main(to_argv(cfg))
    return tmp / "run"


def heads_on_val(run: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(class head logits, distillation head logits, labels) of the trained student on the validation set."""
    saved = read_checkpoint(run / "model.pth")
    model = create_model(saved["model"], num_classes=saved["num_classes"], **saved["model_kwargs"])
    model.load_state_dict(saved["state_dict"])
    model.eval()
    val = build_datasets("digits", SIZE).val
    x = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        return model.head(pooled), model.head_dist(pooled), labels


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * int(logits.argmax(1).eq(labels).sum()) / len(labels)


def test_distillation_head_learns_the_teacher_and_class_head_the_labels(planted_run):
    logits, logits_dist, labels = heads_on_val(planted_run)
    assert (logits_dist.argmax(1) == PLANTED).float().mean() > 0.95  # the teacher's answer, whatever the image
    assert (logits.argmax(1) == labels).float().mean() > 0.8  # chance is 10%
    assert (logits.argmax(1) == PLANTED).float().mean() < 0.4


def test_evaluation_averages_both_heads(planted_run):
    logits, logits_dist, labels = heads_on_val(planted_run)
    written = pd.read_csv(planted_run / "metrics.csv")["val_acc"].iloc[-1]
    averaged = accuracy((logits + logits_dist) / 2, labels)
    assert written == pytest.approx(averaged, abs=1e-9)
    # The heads disagree: either head alone would have scored differently.
    assert accuracy(logits, labels) != averaged != accuracy(logits_dist, labels)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_reported_crash_evit_with_distillation_trains_with_a_teacher(tmp_path, kind):
    """`evit.train --model <config with distillation: true> --data digits` with a teacher: metrics written."""
    out = tmp_path / "run"
    final = main(to_argv(dict(RUN, model=write_student(tmp_path), teacher=write_teacher(tmp_path / "t.pth"),
                              distillation_type=kind, epochs=1, limit_train=256, out=str(out))))
    assert final["epoch"] == 1 and math.isfinite(final["train_loss"])
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1]


def test_timm_distilled_deit_is_switched_to_return_both_heads(tmp_path):
    """timm's distilled DeiT averages its heads in training unless asked for both (set_distilled_training)."""
    kwargs = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)
    final = main(to_argv(dict(RUN, model="deit_tiny_distilled_patch16_224", model_kwargs=kwargs,
                              teacher=write_teacher(tmp_path / "t.pth"), epochs=1, limit_train=256)))
    assert final["epoch"] == 1 and math.isfinite(final["train_loss"])


@pytest.fixture
def no_data_loading(monkeypatch):
    refuse(monkeypatch, train_mod, ["build_datasets"], "the data was loaded")


def test_cli_error_distillation_head_without_teacher(tmp_path, capsys, no_data_loading):
    """The reported command itself: one line naming --teacher, exit 2, before the data loads."""
    err = one_line_error(capsys, ["--model", write_student(tmp_path), "--data", "digits"])
    assert "distillation head" in err and "--teacher" in err


def test_cli_error_teacher_without_distillation_head(tmp_path, capsys, no_data_loading):
    argv = ["--model", write_student(tmp_path, distillation=False), "--data", "digits",
            "--teacher", write_teacher(tmp_path / "t.pth")]
    err = one_line_error(capsys, argv)
    assert "has none" in err and "distillation: true" in err


def test_cli_error_teacher_checkpoint_not_found(tmp_path, capsys, no_data_loading):
    missing = tmp_path / "nowhere" / "model.pth"
    err = one_line_error(capsys, ["--model", write_student(tmp_path), "--data", "digits", "--teacher", str(missing)])
    assert f"teacher checkpoint not found: {missing}" in err


def test_cli_error_teacher_with_other_classes(tmp_path, capsys):
    argv = to_argv(dict(RUN, model=write_student(tmp_path), teacher=write_teacher(tmp_path / "t.pth", 5), epochs=1))
    assert "predicts 5 classes; 10 in the data" in one_line_error(capsys, argv)


def test_teacher_by_name_with_a_weights_file_is_frozen_in_eval_mode(tmp_path):
    """The official teacher's way: a timm name, and a file in DeiT's layout ({'model': state dict}) that does not say
    its classes (the data's are used)."""
    saved = create_model("regnety_002", num_classes=10).state_dict()
    torch.save({"model": saved}, tmp_path / "weights.pth")
    cfg = train_mod.TrainConfig(**RUN, model=write_student(tmp_path), teacher="regnety_002",
                                teacher_weights=str(tmp_path / "weights.pth"))
    data = build_datasets("digits", SIZE)
    loss = distillation_loss(nn.CrossEntropyLoss(), cfg, create_model(cfg.model, num_classes=10), data,
                             torch.device("cpu"), teacher_loader(cfg)(data.num_classes))
    teacher = loss.teacher
    assert teacher.state_dict().keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_a_named_teacher_that_no_caller_resolved_is_refused(tmp_path):
    """The loop never resolves a teacher by name itself (that would need the zoo, which stands on the loop)."""
    cfg = train_mod.TrainConfig(**RUN, model=write_student(tmp_path), teacher="regnety_002")
    with pytest.raises(ValueError, match="needs the teacher passed in: resolve it with evit.zoo.teacher_loader"):
        distillation_loss(nn.CrossEntropyLoss(), cfg, create_model(cfg.model, num_classes=10),
                          build_datasets("digits", SIZE), torch.device("cpu"))


def test_cli_error_teacher_that_cannot_take_the_inputs(tmp_path, capsys):
    argv = to_argv(dict(RUN, model=write_student(tmp_path), teacher="deit_proxy", teacher_weights="random"))
    assert "teacher deit_proxy cannot take this run's (3, 32, 32) inputs" in one_line_error(capsys, argv)


def test_cli_error_teacher_weights_not_found(tmp_path, capsys, no_data_loading):
    argv = ["--model", write_student(tmp_path), "--data", "digits", "--teacher", "deit_proxy",
            "--teacher-weights", str(tmp_path / "nowhere.pth")]
    assert f"teacher weights not found: {tmp_path / 'nowhere.pth'}" in one_line_error(capsys, argv)


def test_a_student_returning_one_tensor_is_refused_not_split():
    """Unpacking a (2, classes) tensor would read its two images as the two heads."""
    loss = DistillationLoss(nn.CrossEntropyLoss(), FixedLogits(ZEROS))
    with pytest.raises(TypeError, match="class logits, distillation logits"):
        loss(None, ZEROS, TARGETS)
