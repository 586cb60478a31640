"""The benchmark's method: BN folding keeps outputs, timing arithmetic, CSV columns, clear errors."""
from __future__ import annotations

import time

import pandas as pd
import pytest
import torch
import torch.nn as nn

from evit.builder.io import write_csv
from experiments import benchmark, reproduce
from evit import timing


def _conv_bn_net() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2)
    return net.eval()


def test_fold_batchnorm_keeps_outputs_for_plain_torch_models():
    net = _conv_bn_net()
    folded, ok = benchmark.fold_batchnorm(net)
    assert ok and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=0)


@pytest.mark.timing
def test_timing_reports_batch_over_iteration_time():
    measured = timing.time_callable(lambda: time.sleep(0.01), batch=8, warmup_s=0.0, seconds=0.1, repeats=3,
                                    sync=lambda: None)
    # 8 images every ~10 ms: about 800 img/s, never more
    assert 250 < measured.throughput <= 800
    assert measured.throughput_min <= measured.throughput <= measured.throughput_max
    assert 10 <= measured.latency_ms < 30


def test_cli_writes_csv_with_documented_columns(tmp_path):
    df = benchmark.main(["--models", "evit_m0", "--backends", "eager,onnxruntime", "--batch", "2",
                         "--img-size", "64", "--warmup", "0", "--seconds", "0.05", "--repeats", "2",
                         "--out", str(tmp_path)])
    csv = pd.read_csv(tmp_path / "cpu.csv")
    assert {"model", "device", "batch", "threads", "throughput", "latency_ms", "backend"} <= set(csv.columns)
    assert sorted(csv.batch.unique()) == [1, 2] and set(csv.backend) == {"eager", "onnxruntime"}
    assert (csv.throughput > 0).all() and csv.bn_folded.all()
    assert (tmp_path / "cpu.png").stat().st_size > 0
    assert len(df) == 4


@pytest.mark.parametrize("argv, message", [
    (["--models", "evit_m9"], "unknown model 'evit_m9'"),
    (["--models", "evit_m0", "--backends", "tensorrt"], "unknown backend(s) tensorrt"),
    (["--levers", "--device", "cuda"], "--levers measures the CPU inference path"),
    (["--fast-path", "--cuda-graphs"], "--cuda-graphs adds a --fast-path variant on the GPU"),
    (["--fast-path", "--deploy-backends", "onnx"],
     "--deploy-backends must name at least one of auto, compile, trace; got onnx"),
])
def test_cli_errors_are_one_clear_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(argv + ["--out", str(tmp_path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--models", "evit_m0", "--device", "cuda", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err


def test_onnxruntime_runs_models_with_fused_attention():
    pytest.importorskip("onnxruntime")
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).eval()
    assert model.blocks[0].attn.fused_attn  # SDPA, which the TorchScript ONNX exporter cannot take
    x = torch.randn(2, 3, 32, 32)
    out = benchmark._runner(model, "onnxruntime", x, False)()[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), atol=1e-4, rtol=0)
    assert model.blocks[0].attn.fused_attn  # restored after the export


def test_fast_path_table_matches_timm_and_rates_against_onnxruntime(tmp_path, monkeypatch):
    """The default's row names the candidate it chose (here among the traced ones: compiling takes minutes)."""
    import evit.builder.fast_path as fast_path

    monkeypatch.setenv("EVIT_CACHE", str(tmp_path))
    monkeypatch.setattr(fast_path, "DEPLOY_CANDIDATES",
                        {n: c for n, c in fast_path.DEPLOY_CANDIDATES.items() if c.backend == "trace"})
    df = benchmark.fast_path_table(("m0",), batch=2, img_size=64, warmup_s=0.0, seconds=0.05, repeats=1,
                                   deploy_backends=("auto", "trace"))
    assert list(df.variant) == ["timm eager", "timm BN-folded + trace (official)", benchmark.DEPLOY_VARIANT,
                                "evit.deploy (trace)", benchmark.ONNX_VARIANT]
    choice = df.set_index("variant").deploy_choice
    assert choice[benchmark.DEPLOY_VARIANT] in ("trace", "trace, NCHW")
    assert choice.drop(benchmark.DEPLOY_VARIANT).isna().all()
    assert benchmark.fast_path_claims(df.assign(batch=16), "cpu")[0].numbers  # judged on the default's row
    deployed = df.set_index("variant").loc["evit.deploy (trace)"]
    assert deployed.max_abs_diff_vs_timm <= 1e-4 < deployed.max_abs_output_timm
    rows = df.set_index("variant")
    assert rows.loc[benchmark.ONNX_VARIANT, "ratio_vs_onnxruntime"] == pytest.approx(1.0)
    assert rows.loc["timm eager", "ratio_vs_timm_eager"] == pytest.approx(1.0)
    assert (df.throughput > 0).all()
    with pytest.raises(ValueError, match="cuda_graphs=True needs device='cuda', not 'cpu'"):
        benchmark.fast_path_table(("m0",), cuda_graphs=True)


def test_fast_path_table_under_amp_and_its_report_section(tmp_path):
    # the GPU table's method (every variant under autocast, no ONNX Runtime) run on CPU, where autocast is bfloat16
    df = benchmark.fast_path_table(("m0",), batch=2, img_size=64, warmup_s=0.0, seconds=0.05, repeats=1,
                                   deploy_backends=("trace",), amp=True)
    rows = df.set_index("variant")
    assert benchmark.ONNX_VARIANT not in rows.index and rows.ratio_vs_onnxruntime.isna().all() and df.amp.all()
    deployed = rows.loc["evit.deploy (trace)"]
    # bfloat16 keeps 8 bits of mantissa: differences of a few percent of the output, far above float32's 1e-6
    assert 1e-4 < deployed.max_abs_diff_vs_timm < 0.1 * deployed.max_abs_output_timm
    write_csv(df, tmp_path / "benchmark" / "fast_path_cuda_test.csv")
    report = reproduce.write_report(tmp_path).read_text()
    assert "## Fast path: evit.deploy vs timm's port (cuda_test, batch 2 under AMP)" in report
    assert benchmark.fast_path_claims(df, "cuda_test") == [] and "**met**" not in report  # no compiled row, no verdict
    assert "ONNX Runtime's throughput" not in report


@pytest.mark.parametrize("name, stem", [("NVIDIA H100 80GB HBM3", "cuda_h100"), ("NVIDIA H200", "cuda_h200"),
                                        ("Tesla V100-SXM2-16GB", "cuda_v100"), ("NVIDIA A100-SXM4-80GB", "cuda_a100"),
                                        ("NVIDIA GeForce RTX 4090", "cuda_4090")])
def test_gpu_results_are_named_by_the_gpu_model(name, stem, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: name)
    assert benchmark.device_stem("cuda") == stem and benchmark.device_stem("cpu") == "cpu"


@pytest.mark.timing
def test_the_deploy_paths_ratio_to_timm_eager_keeps_its_side_of_one_beside_a_busy_core(request):
    """evit.deploy's traced path against timm eager on the same weights, timed interleaved on a quiet machine and
    beside a planted busy loop: the ratio may move, not cross 1."""
    import timm

    import evit

    torch.set_num_threads(1)
    reference = benchmark.randomize_batchnorm_(timm.create_model("efficientvit_m0").eval())
    ours = timm.create_model("evit_m0").eval()
    ours.load_state_dict(evit.from_timm(reference.state_dict()))
    x = torch.randn(4, 3, 224, 224)
    fast = evit.deploy(ours, x, backend="trace")
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def ratio() -> float:
        with torch.inference_mode():
            t = timing.time_interleaved({"eager": lambda: reference(x), "deploy": lambda: fast(x_cl)}, 4, 0.3, 0.3,
                                        5, lambda: None)
        return t["deploy"].throughput / t["eager"].throughput

    quiet = ratio()
    request.getfixturevalue("busy_loop")
    busy = ratio()
    assert (quiet > 1) == (busy > 1), (quiet, busy)
