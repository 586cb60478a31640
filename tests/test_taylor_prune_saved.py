"""Pruned models kept: `--save-model` writes a file that reloads at the pruned widths without re-pruning (in a fresh
process too), through every `--weights PATH` (the analyses' zoo, evit.train, experiments.benchmark with its
ONNX export); bad files and another architecture are one line and exit 2; `--finetune-teacher unpruned` distills
the fine-tune from the unpruned model."""
import pickle
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch
import yaml
from timm.loss import LabelSmoothingCrossEntropy

import analysis.taylor_prune.cli as tp_cli
import evit.train as train_mod
import evit.train.__main__ as train_command
from analysis import head_similarity, op_profile
from analysis.taylor_prune import prune_to_target
from analysis.taylor_prune.saved import FORMAT, save_pruned
from evit.builder.io import read_checkpoint, torch_save
from experiments import benchmark
from evit import zoo
from experiments.benchmark import _runner, randomize_batchnorm_
from evit.distillation import DistillationLoss, soft_distillation
from evit.zoo import load_model, load_for_command
from tests.test_train import REPO, env_1_thread, one_line_error

SIZES = {"deit_proxy": 28, "evit": 32}


def evit_config(folder):
    """An evit M0 at 32 px, 10 classes, as a config file (the architecture is recorded by its content)."""
    path = folder / "tiny_evit.yaml"
    path.write_text(yaml.safe_dump(dict(preset="m0", img_size=32, num_classes=10)))
    return str(path)


def images(name):
    return torch.randn(6, 3, SIZES[name], SIZES[name], generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """{kind: (model name, pruned model in memory, its file, the unpruned model's parameter shapes)}: deit_proxy
    and an evit config, random weights (evit's BatchNorms randomized so every branch counts), pruned to half their
    MACs in one step on random images and saved."""
    folder = tmp_path_factory.mktemp("pruned")
    made = {}
    for kind, name in (("deit_proxy", "deit_proxy"), ("evit", evit_config(folder))):
        model, weights = load_for_command(name, "random")
        randomize_batchnorm_(model)
        unpruned = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        x, y = images(kind), torch.arange(6) % 10
        result = prune_to_target(model, [(x, y)], 0.5, steps=1)
        path = save_pruned(result.model, folder / f"{kind}.pth", name, weights, result.summary)
        made[kind] = (name, result.model, str(path), unpruned)
    return made


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_saved_file_records_architecture_widths_and_weights(pruned):
    name, model, path, unpruned = pruned["deit_proxy"]
    ckpt = read_checkpoint(path)
    assert ckpt["format"] == FORMAT and ckpt["rebuilder"] == "analysis.taylor_prune.saved"
    assert ckpt["architecture"] == {"model": "deit_proxy", "config": None, "kwargs": {}}
    groups = ckpt["structure"]["groups"]
    assert [g["kind"] for g in groups[:3]] == ["qk", "v", "ffn"] and groups[-1]["kind"] == "width"
    assert sum(g["channels"] for g in groups) < 4 * (96 + 96 + 384) + 96  # pruned: fewer channels than built
    assert ckpt["structure"]["summary"]["macs_after_m"] < ckpt["structure"]["summary"]["macs_before_m"]
    assert shapes(model) == {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()} != unpruned
    _, _, evit_path, _ = pruned["evit"]
    assert read_checkpoint(evit_path)["architecture"]["config"]["img_size"] == 32  # the config's content


def test_reloads_in_a_fresh_process_with_identical_outputs_and_shapes(pruned, tmp_path):
    """A new interpreter knows nothing of the pruning: the zoo imports the rebuilder the file names."""
    cases = {kind: (name, path, images(kind)) for kind, (name, _, path, _) in pruned.items()}
    torch.save(cases, tmp_path / "cases.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from evit.zoo import load_model
        assert "analysis.taylor_prune.saved" not in sys.modules
        out = {{}}
        for kind, (name, path, x) in torch.load({str(tmp_path / "cases.pt")!r}).items():
            model = load_model(name, path)
            with torch.no_grad():
                out[kind] = (model(x), {{k: tuple(v.shape) for k, v in model.state_dict().items()}})
        assert "analysis.taylor_prune.saved" in sys.modules
        torch.save(out, {str(tmp_path / "out.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env_1_thread(), check=True, timeout=120)
    reloaded = torch.load(tmp_path / "out.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child ran: bit-identical outputs need the same reduction order
    try:
        with torch.no_grad():
            expected = {kind: model(images(kind)) for kind, (_, model, _, _) in pruned.items()}
    finally:
        torch.set_num_threads(threads)
    for kind, (name, model, path, unpruned) in pruned.items():
        outputs, reloaded_shapes = reloaded[kind]
        assert torch.equal(outputs, expected[kind]), kind
        assert reloaded_shapes == shapes(model) != unpruned, kind


def test_the_analyses_weights_path_gets_the_pruned_model(pruned):
    for kind, (name, model, path, _) in pruned.items():
        loaded, weights = load_for_command(name, path)
        with torch.no_grad():
            assert weights == path and torch.equal(loaded(images(kind)), model(images(kind))), kind


def test_head_similarity_and_op_profile_read_the_pruned_model(pruned, tmp_path):
    name, model, path, _ = pruned["deit_proxy"]
    df = head_similarity.model_similarity(name, path, "digits", num_images=4, batch_size=4, seeds=[])
    assert (df.weights == path).all() and df.num_heads.tolist() == [3] * 12
    profile = op_profile.run(op_profile.Settings(models=[name], weights=path, batch=2, iters=1, warmup=1,
                                                 peak_gflops=10.0, peak_gbs=10.0, out=tmp_path))[0]
    fc1 = model.blocks[0].mlp.fc1
    assert fc1.in_features < 96 and fc1.out_features < 384
    # profiled at the pruned widths: the first FFN layer's matmul, (tokens, width) @ (width, hidden)
    assert profile.signatures.shapes.str.endswith(f"[{fc1.in_features}, {fc1.out_features}]]").any()


def test_training_starts_from_the_pruned_weights_and_its_model_pth_rebuilds(pruned, tmp_path):
    """With a learning rate of 0 the weights stay as loaded: the run's model.pth must give the pruned model's
    outputs, so the run started from the file's weights at its widths and wrote a file that rebuilds them."""
    name, model, path, _ = pruned["deit_proxy"]
    train_command.main(["--model", name, "--weights", path, "--data", "digits", "--epochs", "1", "--lr-base", "0",
                    "--min-lr", "0", "--warmup-lr", "0", "--warmup-epochs", "0", "--limit-train", "64",
                    "--limit-val", "32", "--batch-size", "32", "--threads", "1", "--out", str(tmp_path)])
    trained = load_model(name, str(tmp_path / "model.pth"))
    with torch.no_grad():
        assert torch.equal(trained(images("deit_proxy")), model(images("deit_proxy")))
    assert read_checkpoint(tmp_path / "model.pth")["img_size"] == 28  # the model's own size, not digits' 8 px


def test_benchmark_times_the_pruned_model_beside_the_unpruned_one_with_onnx(pruned, tmp_path):
    name, model, path, _ = pruned["deit_proxy"]
    df = benchmark.main(["--models", name, "--weights", path, "--backends", "trace,onnxruntime", "--batch", "2",
                         "--warmup", "0", "--seconds", "0.02", "--repeats", "1", "--out", str(tmp_path)])
    csv = pd.read_csv(tmp_path / "cpu.csv")
    assert len(df) == len(csv) == 8 and set(csv.backend) == {"trace", "onnxruntime"}
    params = csv.groupby("model").params_m.first()
    assert params[f"{name} ({path})"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6, abs=1e-3)
    assert params[name] == pytest.approx(0.464, abs=1e-3) and params[name] > params[f"{name} ({path})"]
    x = images("deit_proxy")[:2]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(_runner(model, "onnxruntime", x, False)()[0]), model(x),
                                   atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, pruned):
    """A truncated pruned file and a foreign one (a plain dict pickled, not a torch checkpoint)."""
    folder = tmp_path_factory.mktemp("bad")
    data = open(pruned["deit_proxy"][2], "rb").read()
    (folder / "truncated.pth").write_bytes(data[: len(data) // 2])
    with open(folder / "foreign.pth", "wb") as f:
        pickle.dump({"model": "deit_proxy", "weights": [1, 2, 3]}, f, protocol=2)
    return {"truncated": (str(folder / "truncated.pth"), "RuntimeError"),
            "foreign": (str(folder / "foreign.pth"), "RuntimeError")}


COMMANDS = {
    "taylor_prune": (tp_cli.main, ["--model", "deit_proxy", "--data", "digits"]),
    "train": (train_command.main, ["--model", "deit_proxy", "--data", "digits"]),
    "benchmark": (benchmark.main, ["--models", "deit_proxy"]),
    "head_similarity": (head_similarity.main, ["--model", "deit_proxy", "--data", "digits"]),
}


@pytest.mark.parametrize("bad", ["truncated", "foreign"])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_truncated_or_foreign_file_is_one_line_and_exit_2(command, bad, bad_files, capsys, tmp_path):
    cli, argv = COMMANDS[command]
    path, error = bad_files[bad]
    err = one_line_error(capsys, argv + ["--weights", path, "--out", str(tmp_path)], cli)
    assert err == (f"error: checkpoint {path} is corrupt or unreadable ({error}); delete it to start over or pass "
                   f"another file")


@pytest.mark.parametrize("command", ["taylor_prune", "train", "benchmark"])
def test_another_architecture_than_the_file_holds_is_refused(command, pruned, capsys, tmp_path):
    cli, argv = COMMANDS[command]
    path = pruned["deit_proxy"][2]
    argv = [a.replace("deit_proxy", "swin_proxy") for a in argv] + ["--weights", path, "--out", str(tmp_path)]
    assert one_line_error(capsys, argv, cli) == (f"error: {path} holds deit_proxy, not swin_proxy: pass the model it "
                                                 f"holds, or other weights")


def test_an_evit_config_is_matched_by_content_not_by_file(pruned, tmp_path):
    name, model, path, _ = pruned["evit"]
    same = tmp_path / "copy.yaml"
    same.write_text(open(name).read())
    with torch.no_grad():
        assert torch.equal(load_model(str(same), path)(images("evit")), model(images("evit")))
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(dict(preset="m1", img_size=32, num_classes=10)))
    with pytest.raises(zoo.CheckpointError, match=f"holds an evit config .* not {other}"):
        load_model(str(other), path)


def test_a_rebuilder_outside_the_project_is_never_imported(pruned, tmp_path):
    ckpt = dict(read_checkpoint(pruned["deit_proxy"][2]), format="other/1", rebuilder="os")
    torch_save(ckpt, tmp_path / "planted.pth")
    with pytest.raises(zoo.CheckpointError, match="names rebuilder module 'os', not a module of this project"):
        load_model("deit_proxy", str(tmp_path / "planted.pth"))


# --- the unpruned model as the fine-tune's teacher -------------------------------------------------------------

def test_kd_on_class_logits_matches_hand_computed_value():
    """No distillation head: the class logits take the label loss and the teacher's softened output, KL per image
    times tau^2 (Hinton et al.), not DeiT's per-logit division."""
    student, teacher_logits = torch.zeros(2, 2), 2.0 * torch.tensor([[1.0986123, 0.0], [0.0, 1.0986123]])
    teacher = lambda x: teacher_logits  # noqa: E731
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, "soft", alpha=0.5, tau=2.0,
                            on_logits=True)(None, student, torch.tensor([0, 1]))
    kl = 0.75 * torch.log(torch.tensor(1.5)) + 0.25 * torch.log(torch.tensor(0.5))  # per image: softmax 3:1 vs 1:1
    assert loss.item() == pytest.approx(0.5 * 0.6931472 + 0.5 * float(kl) * 4, rel=1e-5)


def test_finetune_teacher_unpruned_distills_from_the_unpruned_models_logits(monkeypatch, tmp_path):
    """The fine-tune's loss, read off the run itself, equals (1 - alpha) * label loss + alpha * soft KD against
    the logits of the model as loaded (an independent copy), and its KD term is not zero."""
    built = []
    real = train_mod.distillation_loss

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train_mod, "distillation_loss", spy)
    settings = tp_cli.Settings(model="deit_proxy", weights="random", data="digits", batches=1, batch=8,
                               val_images=16, steps=1, finetune_epochs=1, finetune_images=128,
                               finetune_teacher="unpruned", out=tmp_path)
    result = tp_cli.prune_model(settings)
    loss = built[0]
    unpruned = load_for_command("deit_proxy", "random")[0]  # random weights drawn with the same seed
    x, y = images("deit_proxy"), torch.arange(6) % 10
    with torch.no_grad():
        student, teacher = result.model(x), unpruned(x)
        kd = soft_distillation(student, teacher, 1.0, "image")
        expected = 0.5 * LabelSmoothingCrossEntropy(0.1)(student, y) + 0.5 * kd
        assert loss.on_logits and kd > 1e-3 and torch.allclose(loss(x, student, y), expected, atol=1e-6)
    assert result.summary["finetune_teacher"] == "unpruned"


def test_finetune_teacher_without_a_finetune_is_one_line(capsys, tmp_path):
    err = one_line_error(capsys, ["--model", "deit_proxy", "--finetune-teacher", "unpruned", "--out", str(tmp_path)],
                         tp_cli.main)
    assert err == "error: --finetune-teacher unpruned teaches the fine-tune: add --finetune-epochs N"
