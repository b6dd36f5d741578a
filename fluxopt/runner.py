"""The Run concept: one model under one bench, the baseline and one or more stacks.

validate (before loading anything) -> baseline -> for each stack: load, apply in stage order,
build (timed), warm-up, timed iterations, fidelity -> result.json + report.

A stack that fails is recorded with its phase and reason and the run goes on; result.json is
rewritten (atomically) after every stack so nothing measured is lost if the process dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import time
import traceback
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from fluxopt import plugins
from fluxopt.artifacts import default_cache_dir
from fluxopt.config import DEFAULT_PROMPTS, selected_backends
from fluxopt.backend import Shapes, StackContext
from fluxopt.environment import DeviceInfo, capture_environment, detect_device
from fluxopt.errors import ConfigError, UnavailableError
from fluxopt.fidelity import evaluate
from fluxopt.measure import Generator, Measurement, Sample, measure
from fluxopt.models import ModelSpec, load_pipeline
from fluxopt.result import RESULT_FILE, SCHEMA_VERSION, StackResult, write_json_atomic
from fluxopt.stack import Stack, build_stack

log = logging.getLogger("fluxopt")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str, device: DeviceInfo) -> torch.dtype:
    """``auto`` is bf16 on GPU and fp32 on CPU (bf16 matmuls on CPU are slow and imprecise)."""
    if name == "auto":
        return torch.bfloat16 if device.is_gpu else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_model(name: str) -> ModelSpec:
    registry = plugins.models()
    if name not in registry:
        raise ConfigError(f"unknown model '{name}'. Known models: {', '.join(sorted(registry))}")
    return registry[name]


def resolve_shapes(bench: Mapping[str, Any], spec: ModelSpec) -> Shapes:
    d = spec.defaults

    def pick(key: str, default: Any) -> Any:
        value = bench.get(key)
        return default if value is None else value

    shapes = Shapes(height=int(pick("height", d.height)), width=int(pick("width", d.width)),
                    steps=int(pick("steps", d.steps)), guidance_scale=float(pick("guidance_scale", d.guidance_scale)),
                    max_sequence_length=int(pick("max_sequence_length", d.max_sequence_length)))
    if shapes.height % 16 or shapes.width % 16:
        raise ConfigError(f"bench.height and bench.width must be multiples of 16 (FLUX packs 2x2 latent "
                          f"patches of an 8x VAE); got {shapes.height}x{shapes.width}")
    if shapes.steps < 1:
        raise ConfigError("bench.steps must be at least 1")
    return shapes


def plan_stacks(selection: Mapping[str, Any]) -> tuple[list[Stack], bool]:
    """The stacks to measure: the selected one, or (no selection) every backend alone."""
    if selection:
        return [build_stack(selection)], True
    return [build_stack([name]) for name in sorted(plugins.backends())], False


def _speedup(base: dict[str, Any], other: dict[str, Any]) -> tuple[float, float]:
    """Ratio of medians and its 1-sigma uncertainty (relative spreads added in quadrature)."""
    speedup = base["median"] / other["median"]
    rel = math.hypot(base["std"] / base["median"], other["std"] / other["median"])
    return speedup, speedup * rel


def _restore_compiler_config_after(exit_stack: contextlib.ExitStack) -> None:
    """Put Dynamo's and Inductor's global config back when the stack ends, whatever changed it:
    libraries set process-wide flags (torchao's "recommended" Inductor config did), and a flag
    left behind would change the compile time and kernels of every later stack."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    for config in (dynamo_config, inductor_config):
        exit_stack.callback(config.load_config, config.get_config_copy())


class Run:
    def __init__(self, cfg: DictConfig | Mapping[str, Any], output_dir: Path, stacks: list[Stack] | None = None):
        """``stacks`` replaces the stacks the config selects (benchmark scripts compare a chosen list)."""
        self.cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        self.output_dir = Path(output_dir)
        self.device = detect_device(self.cfg.get("device", "auto"))
        self.spec = resolve_model(self.cfg.model.name)
        self.dtype = resolve_dtype(self.cfg.model.get("dtype", "auto"), self.device)
        self.shapes = resolve_shapes(self.cfg.bench, self.spec)
        prompts = self.cfg.bench.get("prompts")
        self.prompts = tuple(prompts if prompts is not None else (self.spec.defaults.prompts or DEFAULT_PROMPTS))
        if not self.prompts:
            raise ConfigError("bench.prompts is empty: give at least one prompt")
        self.seed = int(self.cfg.bench.seed)
        self.cache_dir = Path(self.cfg.cache.dir).expanduser() if self.cfg.cache.get("dir") else default_cache_dir()
        selection = selected_backends(self.cfg)
        self.stacks, self.explicit = (stacks, False) if stacks is not None else plan_stacks(selection)
        self.results: list[StackResult] = []
        self.baseline: StackResult | None = None
        self.started = datetime.now(timezone.utc).isoformat()
        self.environment: dict[str, Any] = {}
        if self.explicit:  # a stack the user asked for must be runnable: say why not, before loading
            unmet = self.stacks[0].unmet_requirements(self.device)
            if unmet:
                raise UnavailableError(f"stack '{self.stacks[0].name}' cannot run here: " + "; ".join(unmet))

    # ------------------------------------------------------------------ pipeline
    def _load(self) -> Any:
        return load_pipeline(self.spec, self.device.torch_device, self.dtype, self.cache_dir,
                             path=self.cfg.model.get("path"), revision=self.cfg.model.get("revision"))

    def _measure(self, pipe: Any, on_phase: Any = None) -> Measurement:
        bench = self.cfg.bench
        return measure(Generator(pipe, self.shapes, self.device), self.prompts, self.seed,
                       warmup=int(bench.warmup), iterations=int(bench.iterations), on_phase=on_phase)

    def _save_images(self, label: str, samples: list[Sample]) -> list[str]:
        if not self.cfg.get("save_images", True):
            return []
        paths = []
        for i, sample in enumerate(samples):
            rel = Path("images") / label / f"{i:02d}_seed{sample.seed}.png"
            (self.output_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            pixels = np.nan_to_num(sample.image, nan=0.0).clip(0, 1)
            Image.fromarray((pixels * 255).round().astype(np.uint8)).save(self.output_dir / rel)
            paths.append(str(rel))
        return paths

    @staticmethod
    def _fill(result: StackResult, m: Measurement) -> None:
        result.latency = m.latency.to_dict()
        result.step_latency = m.step_latency.to_dict() if m.step_latency else None
        result.first_call_s = m.first_call_s
        result.peak_memory_bytes = m.peak_memory_bytes
        result.memory_kind = m.memory_kind

    # ------------------------------------------------------------------ phases
    def measure_baseline(self) -> list[Sample]:
        log.info("baseline: loading %s on %s (%s)", self.spec.name, self.device.name, self.dtype)
        pipe = self._load()
        m = self._measure(pipe)
        self.baseline = StackResult(stack="baseline", backends=[], status="ok", lossless=True)
        self._fill(self.baseline, m)
        self.baseline.images = self._save_images("baseline", m.samples)
        del pipe
        self._release()
        return m.samples

    def measure_stack(self, stack: Stack, reference: list[Sample]) -> StackResult:
        result = StackResult(stack=stack.name, backends=stack.names, status="ok",
                             options=stack.options_dict(), lossless=stack.is_lossless())
        unmet = stack.unmet_requirements(self.device)
        if unmet:
            result.status, result.reason = "skipped", "; ".join(unmet)
            return result
        phase = ["load"]  # the phase in progress, for attributing a failure
        with contextlib.ExitStack() as exit_stack:
            _restore_compiler_config_after(exit_stack)
            try:
                self._apply_build_measure(stack, result, reference, exit_stack, phase)
            except Exception as exc:  # noqa: BLE001 - any backend failure is recorded, the run goes on
                result.status, result.phase = "failed", phase[0]
                if isinstance(exc, torch.OutOfMemoryError):
                    result.reason = "out of memory: " + str(exc).splitlines()[0]
                else:
                    result.reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                self._log_failure(stack.name, exc)
        self._release()  # the pipeline died with _apply_build_measure's frame
        if result.status == "ok" or result.phase == "fidelity":
            result.speedup, result.speedup_uncertainty = _speedup(self.baseline.latency, result.latency)
            result.within_noise = abs(result.speedup - 1.0) <= 2 * result.speedup_uncertainty
        return result

    def _apply_build_measure(self, stack: Stack, result: StackResult, reference: list[Sample],
                             exit_stack: contextlib.ExitStack, phase: list[str]) -> None:
        """Load a fresh pipeline, apply and build the stack, measure it and judge its fidelity."""
        def enter(name: str) -> None:
            phase[0] = name
            log.info("stack %s: %s", stack.name, name)

        pipe = self._load()
        gen = Generator(pipe, self.shapes, self.device)
        ctx = StackContext(device=self.device, dtype=self.dtype, model=self.spec, shapes=self.shapes,
                           cache_dir=self.cache_dir, exit_stack=exit_stack, prompts=self.prompts, stack=stack,
                           run_once=lambda: gen(self.prompts[0], self.seed))
        enter("apply")
        for entry in stack.entries:
            entry.backend.apply(pipe, entry.options, ctx)
        enter("build")
        start = time.perf_counter()
        for entry in stack.entries:
            entry.backend.build(pipe, entry.options, ctx)
        result.build_s = time.perf_counter() - start
        result.build_phases_s = ctx.stats.pop("build_phases_s", {})
        log.info("stack %s: built in %.1f s", stack.name, result.build_s)
        m = self._measure(pipe, enter)
        self._fill(result, m)
        result.stats = ctx.stats
        enter("fidelity")
        result.images = self._save_images(stack.name, m.samples)
        thresholds = self.cfg.fidelity.lossless if result.lossless else self.cfg.fidelity.lossy
        result.fidelity = evaluate(reference, m.samples, plugins.metrics(), dict(thresholds))
        result.fidelity["model"] = self.spec.name
        result.fidelity["model_trained"] = self.spec.trained
        if not result.fidelity["passed"]:
            result.status, result.reason = "failed", f"fidelity: {result.fidelity['reason']}"
            result.phase = "fidelity"

    def _log_failure(self, stack_name: str, exc: BaseException) -> None:
        path = self.output_dir / "logs" / f"{stack_name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(exc)))
        log.warning("stack %s failed: %s (traceback in %s)", stack_name, exc, path)

    def _release(self) -> None:
        """Drop compiled graphs and cached memory so the next stack starts clean."""
        torch._dynamo.reset()
        gc.collect()
        if self.device.is_gpu:
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ output
    def to_dict(self, complete: bool) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "complete": complete,
            "started": self.started,
            "finished": datetime.now(timezone.utc).isoformat() if complete else None,
            "model": {"name": self.spec.name, "trained": self.spec.trained, "dtype": str(self.dtype).removeprefix("torch.")},
            "shapes": dataclasses.asdict(self.shapes),
            "prompts": list(self.prompts),
            "seed": self.seed,
            "mode": "stack" if self.explicit else "bakeoff",
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "environment": self.environment,
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "stacks": [r.to_dict() for r in self.results],
        }

    def write(self, complete: bool) -> dict[str, Any]:
        data = self.to_dict(complete)
        write_json_atomic(self.output_dir / RESULT_FILE, data)
        return data

    def execute(self) -> dict[str, Any]:
        from fluxopt.report import write_run_report

        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.environment = capture_environment(self.device)
        hook = plugins.hook()
        hook.fluxopt_run_started(config=OmegaConf.to_container(self.cfg, resolve=True),
                                 output_dir=str(self.output_dir))
        reference = self.measure_baseline()
        self.write(complete=False)
        for stack in self.stacks:
            log.info("stack %s", stack.name)
            result = self.measure_stack(stack, reference)
            self.results.append(result)
            self.write(complete=False)
            hook.fluxopt_stack_finished(result=result, output_dir=str(self.output_dir))
        data = self.write(complete=True)
        write_run_report(data, self.output_dir)
        hook.fluxopt_run_finished(result=data, output_dir=str(self.output_dir))
        return data
