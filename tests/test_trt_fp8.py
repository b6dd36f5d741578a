"""Backend ``trt_fp8``: ModelOpt FP8 calibration, ONNX export with FP8 Q/DQ and its numerics on
CPU (tiny model); the TensorRT engine only where ``tensorrt`` and a CUDA GPU exist.

Tolerances: the exported graph run by onnxruntime (native FP8 QuantizeLinear/DequantizeLinear,
CPU kernels) must match ModelOpt's fake-quantized torch transformer to a relative L2 error of
1e-5 and a max abs error of 1e-3 (measured: ~1.5e-7 / ~4e-7, float32 accumulation-order noise;
the two round to FP8 E4M3 identically, round-to-nearest-even with saturation).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_result, run_cli

from fluxopt import Shapes
from fluxopt.errors import ConfigError

pytest.importorskip("modelopt.torch.quantization")
onnx = pytest.importorskip("onnx")

SHAPES = Shapes(height=64, width=64, steps=2, guidance_scale=3.5, max_sequence_length=32)
HAS_TRT_GPU = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def _quantized(fmt: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A tiny pipeline whose transformer is quantized (calibrated on 2 prompts x 2 steps)."""
    from fluxopt.zoo.tiny import build_tiny_pipeline
    from fluxopt_plugins.trt_fp8 import onnx_export, quantize

    pipe = build_tiny_pipeline().to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    args = onnx_export.example_inputs(pipe.transformer, SHAPES, seed=3)
    with torch.inference_mode():
        original = onnx_export.FluxForExport(pipe.transformer, True)(*args).clone()
    loop = quantize.calibration_loop(pipe, ["a red circle", "a blue square"], SHAPES.steps, SHAPES.height,
                                     SHAPES.width, SHAPES.guidance_scale, SHAPES.max_sequence_length,
                                     progress=False)
    summary = quantize.quantize_transformer(pipe.transformer, loop, fmt)
    return pipe, summary, args, original


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    from fluxopt_plugins.trt_fp8 import onnx_export

    pipe, summary, args, original = _quantized("fp8")
    out = tmp_path_factory.mktemp("trt-fp8-onnx")
    info = onnx_export.export_quantized(pipe.transformer, SHAPES, out, "fp8")
    return pipe, summary, args, original, info


def _torch_out(pipe, args) -> np.ndarray:
    from fluxopt_plugins.trt_fp8 import onnx_export

    with torch.inference_mode():
        return onnx_export.FluxForExport(pipe.transformer, True)(*args).numpy()


def _ort_out(path: str, pipe, args) -> np.ndarray:
    import onnxruntime as ort

    from fluxopt_plugins.trt_fp8 import onnx_export

    options = ort.SessionOptions()
    # ORT's int8 kernels on x86 CPUs without VNNI sum u8*s8 pairs in int16 (vpmaddubsw), which saturates;
    # the high-precision setting avoids it, so the comparison with torch does not depend on the CPU
    options.add_session_config_entry("session.x64quantprecision", "1")
    sess = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feeds = dict(zip(onnx_export.input_names(pipe.transformer), (a.numpy() for a in args)))
    return sess.run(None, {n: feeds[n] for n in names})[0]


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------ calibration (CPU)
@pytest.mark.xdist_group("trt_fp8_calibrated")  # one worker calibrates the shared fixture once
def test_fp8_calibration_on_cpu_quantizes_the_intended_linears(fp8):
    from fluxopt_plugins.trt_fp8.quantize import DEFAULT_KEEP_HIGH_PRECISION, kept_linear_names, linear_names, quantized_linear_names

    pipe, summary, args, original, _ = fp8
    tr = pipe.transformer
    quantized = set(quantized_linear_names(tr))
    kept = set(kept_linear_names(tr, DEFAULT_KEEP_HIGH_PRECISION))
    assert kept == {"x_embedder", "context_embedder", "norm_out.linear", "proj_out",
                    *(f"time_text_embed.{e}.linear_{i}" for e in ("timestep_embedder", "guidance_embedder",
                                                                   "text_embedder") for i in (1, 2))}
    assert quantized == set(linear_names(tr)) - kept and summary["quantized_layers"] == len(quantized) == 40
    assert "single_transformer_blocks.0.proj_out" in quantized  # only the final proj_out is kept
    for name, module in tr.named_modules():
        if name in quantized:
            for q in (module.weight_quantizer, module.input_quantizer):
                assert q.num_bits == (4, 3) and q.amax is not None and 0 < float(q.amax.max()) < float("inf")
        elif isinstance(module, torch.nn.LayerNorm) and hasattr(module, "input_quantizer"):
            assert not module.input_quantizer.is_enabled  # only GEMM inputs are quantized
    fake = _torch_out(pipe, args)
    err = _rel_l2(fake, original.numpy())
    assert 0 < err < 0.1, err  # FP8 changes the output, a little


# ------------------------------------------------------------------ ONNX export (CPU)
@pytest.mark.xdist_group("trt_fp8_calibrated")  # one worker calibrates the shared fixture once
def test_onnx_export_has_native_fp8_qdq_on_quantized_layers_only(fp8):
    from fluxopt_plugins.trt_fp8 import onnx_export
    from fluxopt_plugins.trt_fp8.quantize import quantized_linear_names

    pipe, summary, _, _, info = fp8
    path = Path(info["onnx_path"])
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))
    assert not [n for n in model.graph.node if n.domain == "trt"]  # custom TRT ops were rewritten
    qdq = onnx_export.summarize_qdq(model)
    n = summary["quantized_layers"]
    # One activation Q/DQ pair and one weight DQ (its Q folded into an FP8 initializer) per layer.
    assert (qdq.fp8_quantize, qdq.fp8_dequantize) == (n, 2 * n) == (qdq.quantize, qdq.dequantize)
    assert info["fp8_qdq_nodes"] == 3 * n and info["weights_folded_to_fp8"] == n
    fp8_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN and i.dims]
    assert len(fp8_weights) == n
    assert set(qdq.layers) == set(quantized_linear_names(pipe.transformer))
    assert not set(qdq.layers) & set(summary["kept_high_precision"])
    assert [i.name for i in model.graph.input] == list(onnx_export.input_names(pipe.transformer))
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"  # dynamic batch for the TensorRT profile
    assert model.opset_import[0].version >= 19


@pytest.mark.xdist_group("trt_fp8_calibrated")  # one worker calibrates the shared fixture once
def test_onnx_runtime_matches_fake_quantized_torch(fp8):
    pipe, _, args, _, info = fp8
    ort_out = _ort_out(info["onnx_path"], pipe, args)
    ref = _torch_out(pipe, args)
    assert _rel_l2(ort_out, ref) < 1e-5
    assert float(np.abs(ort_out - ref).max()) < 1e-3


@pytest.mark.xdist_group("trt_fp8_calibrated")  # one worker calibrates the shared fixture once
def test_large_models_are_saved_with_external_data_and_checked_by_path(fp8, tmp_path, monkeypatch):
    from fluxopt_plugins.trt_fp8 import onnx_export

    pipe, _, args, _, info = fp8
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    path = tmp_path / onnx_export.ONNX_FILE
    onnx_export.save_model(onnx.load(info["onnx_path"]), path)
    assert (tmp_path / onnx_export.DATA_FILE).stat().st_size > 0
    external = [i for i in onnx.load(str(path), load_external_data=False).graph.initializer
                if i.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) >= 40  # at least every FP8 weight lives in the data file
    onnx.checker.check_model(str(path))
    assert _rel_l2(_ort_out(str(path), pipe, args), _torch_out(pipe, args)) < 1e-5


def test_int8_smoothquant_exports_int8_qdq_that_onnxruntime_runs(tmp_path):
    from fluxopt_plugins.trt_fp8 import onnx_export

    pipe, summary, args, original = _quantized("int8_sq")
    info = onnx_export.export_quantized(pipe.transformer, SHAPES, tmp_path, "int8_sq")
    assert info["int8_qdq_nodes"] == 4 * summary["quantized_layers"] and info["fp8_qdq_nodes"] == 0
    ort_out = _ort_out(info["onnx_path"], pipe, args)
    assert _rel_l2(ort_out, _torch_out(pipe, args)) < 1e-5
    assert _rel_l2(ort_out, original.numpy()) < 0.1


# ------------------------------------------------------------------ options and requirements
def test_options_are_validated():
    from fluxopt.stack import build_stack

    with pytest.raises(ConfigError, match="quant_format"):
        build_stack({"trt_fp8": {"quant_format": "int4"}})
    with pytest.raises(ConfigError, match="stop_after"):
        build_stack({"trt_fp8": {"stop_after": "export"}})
    with pytest.raises(ConfigError, match="cannot be combined"):
        build_stack(["trt_fp8", "compile"])


def test_stop_after_onnx_needs_only_modelopt():
    from fluxopt.environment import DeviceInfo
    from fluxopt.stack import build_stack

    cpu = DeviceInfo(type="cpu", name="test cpu")
    assert build_stack({"trt_fp8": {"stop_after": "onnx"}}).unmet_requirements(cpu) == []
    (reason,) = build_stack(["trt_fp8"]).unmet_requirements(cpu)
    assert "tensorrt" in reason or "NVIDIA GPU" in reason


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_cli_without_tensorrt_fails_before_loading(tmp_path):
    proc = run_cli("+backend=trt_fp8", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "needs the Python package 'tensorrt'" in proc.stderr
    assert "pip install 'fluxopt[tensorrt]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "result.json").exists()


def test_cli_stop_after_onnx_runs_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("+backend=trt_fp8", "backend.trt_fp8.stop_after=onnx", "backend.trt_fp8.calib_steps=1",
                   "bench.steps=2", "bench.iterations=2", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (stack,) = read_result(run_dir)["stacks"]
    assert stack["status"] == "ok", stack
    assert stack["lossless"] is False and stack["fidelity"]["passed"] is True
    assert stack["build_phases_s"]["calibrate"] > 0 and stack["build_phases_s"]["export"] > 0
    assert "engine_build" not in stack["build_phases_s"]
    stats = stack["stats"]["trt_fp8"]
    assert stats["stopped_after"] == "onnx" and "fake-quantized" in stats["measured"]
    assert stats["fp8_qdq_nodes"] == 120 and Path(stats["onnx_path"]).exists()
    assert stats["onnx_size_bytes"] > 0 and stats["calib_steps"] == 1


# ------------------------------------------------------------------ TensorRT (GPU only; not run in CI)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT_GPU, reason="needs the tensorrt package and a CUDA GPU")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_engine_matches_fake_quantized_torch(tmp_path, cuda_graph):
    from fluxopt_plugins.trt_fp8 import engine, onnx_export

    major_minor = torch.cuda.get_device_capability()
    if major_minor < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    pipe, summary, args, _ = _quantized("fp8", device="cuda", dtype=torch.bfloat16)
    info = onnx_export.export_quantized(pipe.transformer, SHAPES, tmp_path, "fp8")
    shapes = onnx_export.input_shapes(pipe.transformer, SHAPES, 1)
    profile = {n: (s, s, s) for n, s in shapes.items()}
    cache = tmp_path / "timing.cache"
    built = engine.build_engine(Path(info["onnx_path"]), tmp_path / engine.ENGINE_FILE, profile, 3, cache)
    assert built["engine_size_bytes"] > 0 and cache.stat().st_size > 0
    ref = torch.from_numpy(_torch_out_gpu(pipe, args))
    runner = engine.TrtTransformer(tmp_path / engine.ENGINE_FILE, cuda_graph=cuda_graph)
    kwargs = dict(zip(onnx_export.input_names(pipe.transformer), args))
    for _ in range(2):  # the second call replays the CUDA graph
        (out,) = runner.forward(**kwargs, return_dict=False)
        assert _rel_l2(out.float().cpu().numpy(), ref.numpy()) < 0.05


def _torch_out_gpu(pipe, args) -> np.ndarray:
    from fluxopt_plugins.trt_fp8 import onnx_export

    with torch.inference_mode():
        return onnx_export.FluxForExport(pipe.transformer, True)(*args).float().cpu().numpy()
