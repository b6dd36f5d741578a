"""Backend ``trt_fp8``: ModelOpt FP8 (or INT8 SmoothQuant) quantization of the FLUX transformer,
exported to ONNX with Q/DQ nodes and built into a TensorRT engine that replaces its forward.

Phases (each timed in ``build_phases_s``): ``calibrate`` (ModelOpt PTQ, running the pipeline on
the calibration prompts at the bench resolution), ``export`` (ONNX with FP8 Q/DQ, cached as the
artifact ``trt_fp8_onnx``), ``engine_build`` (TensorRT, cached as the artifact ``trt_fp8``, keyed
by TensorRT version and GPU) and ``load`` (deserialise and install the runtime). A cached engine
skips the first three.

``stop_after=onnx`` (or ``engine``) stops before the engine is used: the run then measures the
pipeline with ModelOpt's *fake-quantized* torch transformer, which is slower than the baseline
(quantize-dequantize in float around every GEMM) and only says what the quantization does to
fidelity. ``stats["trt_fp8"]["measured"]`` says which of the two was measured. See docs/tensorrt.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fluxopt import Backend, ConfigError, Package, Requirements, StackContext, Stage, hookimpl, private_dir
from fluxopt_plugins.trt_fp8.quantize import DEFAULT_KEEP_HIGH_PRECISION, QUANT_FORMATS

MODELOPT = Package("modelopt", "pip install 'fluxopt[modelopt]'")
TENSORRT = Package("tensorrt", "pip install 'fluxopt[tensorrt]' (needs NVIDIA's TensorRT libraries)")
STOP_AFTER = ("onnx", "engine", "run")
FAKE_QUANT = "fake-quantized torch transformer (ModelOpt fake quant, slower than the baseline; fidelity only)"
# FP8 GEMMs need Ada (8.9) or Hopper and newer; INT8 Q/DQ runs on Turing (7.5) and newer.
MIN_CAPABILITY = {"fp8": (8, 9), "int8_sq": (7, 5)}
RUNTIME_ONLY_OPTIONS = ("stop_after", "cuda_graph", "free_torch_weights")


@dataclass
class TrtFp8Options:
    quant_format: str = "fp8"  # fp8 | int8_sq (INT8 SmoothQuant)
    calib_prompts: list[str] = field(default_factory=list)  # empty: the bench prompts
    calib_steps: Optional[int] = None  # denoising steps per calibration prompt; None: the bench steps
    keep_high_precision: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP_HIGH_PRECISION))  # fnmatch on Linear module names
    smoothquant_alpha: float = 0.5  # int8_sq only: migration strength of SmoothQuant
    stop_after: Optional[str] = None  # onnx | engine | run (null = run): where the build stops
    max_batch_size: int = 1  # upper end of the engine's batch profile
    optimization_level: int = 3  # TensorRT builder optimization level 0..5
    workspace_gib: Optional[float] = None  # TensorRT workspace pool limit; None: TensorRT's default
    cuda_graph: bool = False  # capture the engine's enqueue in a CUDA graph
    free_torch_weights: bool = True  # release the torch transformer's weights once the engine runs


class TrtFp8Backend(Backend):
    name = "trt_fp8"
    description = ("ModelOpt FP8 (or INT8 SmoothQuant) PTQ of the transformer, ONNX with Q/DQ, TensorRT "
                   "engine replacing its forward (stop_after=onnx runs anywhere)")
    options_class = TrtFp8Options
    stage = Stage.GRAPH
    lossless = False
    requires = Requirements(nvidia=True, min_compute_capability=(8, 9), packages=(MODELOPT, TENSORRT))

    def unmet_requirement(self, options: TrtFp8Options, device: Any) -> str | None:
        """TensorRT and an NVIDIA GPU only when an engine is built; calibration and export run anywhere."""
        if options.stop_after == "onnx":
            return Requirements(packages=(MODELOPT,)).unmet(device)
        return Requirements(nvidia=True, min_compute_capability=MIN_CAPABILITY.get(options.quant_format, (8, 9)),
                            packages=(MODELOPT, TENSORRT)).unmet(device)

    def validate_options(self, options: TrtFp8Options) -> None:
        if options.quant_format not in QUANT_FORMATS:
            raise ConfigError(f"backend.trt_fp8.quant_format={options.quant_format!r} is not one of "
                              f"{', '.join(QUANT_FORMATS)}")
        if options.stop_after is not None and options.stop_after not in STOP_AFTER:
            raise ConfigError(f"backend.trt_fp8.stop_after={options.stop_after!r} is not one of "
                              f"{', '.join(STOP_AFTER)} (or null)")
        if not 0 <= options.optimization_level <= 5:
            raise ConfigError("backend.trt_fp8.optimization_level must be between 0 and 5")
        if options.max_batch_size < 1:
            raise ConfigError("backend.trt_fp8.max_batch_size must be at least 1")
        if options.calib_steps is not None and options.calib_steps < 1:
            raise ConfigError("backend.trt_fp8.calib_steps must be at least 1 (or null for the bench steps)")

    def cache_key(self, options: TrtFp8Options) -> dict[str, Any]:
        """Options that change what is built (not how it is then run)."""
        key = super().cache_key(options)
        for name in RUNTIME_ONLY_OPTIONS:
            key.pop(name, None)
        return key

    def apply(self, pipe: Any, options: TrtFp8Options, ctx: StackContext) -> None:
        from diffusers import FluxTransformer2DModel

        if not isinstance(pipe.transformer, FluxTransformer2DModel):
            raise TypeError(f"trt_fp8 needs a FluxTransformer2DModel, got {type(pipe.transformer).__name__}")
        ctx.stats.setdefault("compute_precision", {})["gemm"] = "fp8"

    # ------------------------------------------------------------------ phases
    def build(self, pipe: Any, options: TrtFp8Options, ctx: StackContext) -> None:
        from fluxopt_plugins.trt_fp8 import onnx_export, quantize

        shapes = ctx.shapes
        prompts = tuple(options.calib_prompts) or tuple(ctx.prompts)
        if not prompts:
            raise ConfigError("trt_fp8 needs calibration prompts (backend.trt_fp8.calib_prompts or bench.prompts)")
        steps = options.calib_steps or shapes.steps
        stats: dict[str, Any] = ctx.stats.setdefault(self.name, {})
        stats.update(quant_format=options.quant_format, calib_prompts=len(prompts), calib_steps=steps)
        state = {"calibrated": False}

        def calibrate() -> None:
            if state["calibrated"]:
                return
            with ctx.timed("calibrate"):
                loop = quantize.calibration_loop(pipe, prompts, steps, shapes.height, shapes.width,
                                                 shapes.guidance_scale, shapes.max_sequence_length)
                stats["quantization"] = quantize.quantize_transformer(
                    pipe.transformer, loop, options.quant_format, options.keep_high_precision,
                    options.smoothquant_alpha)
            state["calibrated"] = True

        def export(tmp: Path) -> None:
            calibrate()
            with ctx.timed("export"):
                info = onnx_export.export_quantized(pipe.transformer, shapes, tmp, options.quant_format,
                                                    batch=shapes.batch_size)
            (tmp / "export.json").write_text(json.dumps(info, indent=2))

        key = {**self.cache_key(options), "calib_prompts": list(prompts), "calib_steps": steps}
        stop = options.stop_after or "run"

        def onnx_artifact() -> Path:
            onnx_dir = ctx.artifact("trt_fp8_onnx", key, export)
            info = json.loads((onnx_dir / "export.json").read_text())
            info["onnx_path"] = str(onnx_dir / onnx_export.ONNX_FILE)
            stats.update({k: info[k] for k in ("onnx_path", "onnx_size_bytes", "fp8_qdq_nodes", "int8_qdq_nodes",
                                               "qdq_nodes", "weights_folded_to_fp8")})
            return onnx_dir

        if stop == "onnx":
            onnx_artifact()
            calibrate()  # a cached export skipped it; what is measured is the fake-quantized transformer
            stats.update(stopped_after="onnx", measured=FAKE_QUANT)
            ctx.measures_partial(f"stop_after=onnx: {FAKE_QUANT}")
            return

        from fluxopt_plugins.trt_fp8 import engine

        trt_version = engine.tensorrt_version()
        batch_hi = max(options.max_batch_size, shapes.batch_size)
        profile = {name: (lo, opt, hi) for name, lo, opt, hi in zip(
            onnx_export.input_names(pipe.transformer),
            onnx_export.input_shapes(pipe.transformer, shapes, 1).values(),
            onnx_export.input_shapes(pipe.transformer, shapes, shapes.batch_size).values(),
            onnx_export.input_shapes(pipe.transformer, shapes, batch_hi).values())}
        gpu = f"{ctx.device.name} sm{''.join(map(str, ctx.device.capability or ()))}"
        timing_cache = private_dir(ctx.cache_dir / "artifacts" / "trt_fp8_timing") / \
            f"tensorrt-{trt_version}-{gpu.replace(' ', '_').replace('/', '_')}.cache"
        workspace = int(options.workspace_gib * 1024**3) if options.workspace_gib else None

        def build_engine(tmp: Path) -> None:
            onnx_dir = onnx_artifact()
            with ctx.timed("engine_build"):
                info = engine.build_engine(onnx_dir / onnx_export.ONNX_FILE, tmp / engine.ENGINE_FILE, profile,
                                           options.optimization_level, timing_cache, workspace)
            (tmp / "engine.json").write_text(json.dumps(info, indent=2))

        engine_key = {**key, "tensorrt": trt_version, "gpu": gpu}
        engine_dir = ctx.artifact(self.name, engine_key, build_engine)
        engine_path = engine_dir / engine.ENGINE_FILE
        stats.update(engine_path=str(engine_path), engine_size_bytes=engine_path.stat().st_size,
                     tensorrt=trt_version, timing_cache=str(timing_cache))
        if stop == "engine":
            calibrate()
            stats.update(stopped_after="engine", measured=FAKE_QUANT)
            ctx.measures_partial(f"stop_after=engine: {FAKE_QUANT}")
            return
        with ctx.timed("load"):
            runner = engine.TrtTransformer(engine_path, cuda_graph=options.cuda_graph)
            engine.install(pipe.transformer, runner, free_weights=options.free_torch_weights)
        stats.update(stopped_after=None, measured="TensorRT engine", cuda_graph=options.cuda_graph)


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [TrtFp8Backend()]
