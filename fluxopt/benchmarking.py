"""``fluxopt.benchmark``: the bake-off on a pipeline you built (your checkpoint, your prompts).

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16).to("cuda")
    result = fluxopt.benchmark(pipe, ["compile", ["torchao_fp8", "compile"]], prompts=["a red fox"])
    result["stacks"][0]["speedup"], result["stacks"][0]["fidelity"]["passed"]

The same measurement as the CLI (baseline first, then each stack applied, built, warmed up,
timed and judged against the baseline's images), returning the same record the CLI writes to
``result.json``; each stack is undone before the next, so the pipeline ends as it started.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fluxopt.api import check_shapes, pipeline_device
from fluxopt.apply import check_pipeline
from fluxopt.artifacts import default_cache_dir
from fluxopt.config import FidelityConfig, run_id
from fluxopt.errors import ConfigError
from fluxopt.models import GenerationDefaults, ModelSpec
from fluxopt.plan import RunPlan, check_prompts
from fluxopt.runner import Run
from fluxopt.stack import build_stack

DEFAULT_PROMPTS = ("a photo of a red fox in the snow",)


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} is not allowed: an integer >= {minimum}")
    return value


def benchmark(pipe: Any, stacks: Sequence[str | Sequence[str] | Mapping[str, Any]], *,
              prompts: Sequence[str] = DEFAULT_PROMPTS, seed: int = 0, height: int = 1024, width: int = 1024,
              steps: int = 28, guidance_scale: float = 3.5, max_sequence_length: int = 512,
              warmup: int = 1, iterations: int = 3, fidelity: Mapping[str, Mapping[str, float]] | None = None,
              trained: bool = True, name: str = "your pipeline", output_dir: str | Path | None = None,
              save_images: bool = True) -> dict[str, Any]:
    """Measure each stack (a backend name, a list of names, or names -> options) on ``pipe``
    against its own baseline; returns the run record (also written to ``output_dir``, by default
    ``outputs/benchmark/<time>-<id>``). ``fidelity`` overrides the thresholds
    (``{"lossless": {...}, "lossy": {...}}``); ``trained=False`` marks random weights, whose
    fidelity says nothing about image quality. Everything is validated before anything runs."""
    if isinstance(stacks, (str, Mapping)) or not stacks:
        raise ConfigError("stacks is a list of stacks, e.g. ['compile', ['torchao_fp8', 'compile']]")
    built = [build_stack(s) for s in stacks]
    check_pipeline(pipe)
    shapes = check_shapes(height, width, steps, guidance_scale, max_sequence_length)
    prompts = check_prompts(list(prompts))
    thresholds = dataclasses.asdict(FidelityConfig())
    for kind, values in (fidelity or {}).items():
        if kind not in thresholds:
            raise ConfigError(f"fidelity: {kind!r} is not allowed: 'lossless' or 'lossy'")
        thresholds[kind] = dict(values)
    device = pipeline_device(pipe)
    spec = ModelSpec(name=name, description="a pipeline passed to fluxopt.benchmark",
                     defaults=GenerationDefaults(steps, guidance_scale, height, width, max_sequence_length, prompts),
                     factory=lambda *_: pipe, trained=trained)
    plan = RunPlan(device=device, spec=spec, dtype=pipe.transformer.dtype, shapes=shapes, prompts=prompts,
                   seed=_count("seed", seed, 0), warmup=_count("warmup", warmup, 0),
                   iterations=_count("iterations", iterations, 1), stacks=tuple(built), explicit=len(built) == 1,
                   cache_dir=default_cache_dir())
    cfg = OmegaConf.create({"model": {"name": name}, "fidelity": thresholds, "save_images": save_images,
                            "bench": {"seed": seed, "steps": steps, "height": height, "width": width,
                                      "guidance_scale": guidance_scale, "max_sequence_length": max_sequence_length,
                                      "warmup": warmup, "iterations": iterations, "prompts": list(prompts),
                                      "profile": False}})
    out = Path(output_dir) if output_dir else Path("outputs") / "benchmark" / (
        f"{dt.datetime.now():%Y-%m-%d_%H-%M-%S}-{run_id()}")
    return Run(cfg, out, plan=plan, pipeline=pipe, provenance={"api": "fluxopt.benchmark"}).execute()
