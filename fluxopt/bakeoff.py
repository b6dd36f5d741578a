"""``fluxopt.benchmark``: the bake-off on a pipeline you built (your checkpoint, your prompts).

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16).to("cuda")
    record = fluxopt.benchmark(pipe, ["compile", ["torchao_fp8", "compile"]], prompts=["a red fox"])
    record.stacks[0].speedup, record.stacks[0].passed_gate

The same measurement as the CLI (baseline first, then each stack applied, built, warmed up,
timed and judged against the baseline's images), returning the same record the CLI writes to
``result.json``; each stack is undone before the next, so the pipeline ends as it started.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fluxopt.serving import pipeline_device
from fluxopt.apply import check_pipeline
from fluxopt.config import run_config, run_id
from fluxopt.errors import ConfigError
from fluxopt.models import DEV_DEFAULTS, ModelSpec
from fluxopt.plan import check_writable_dir, plan_run
from fluxopt.record import RunRecord
from fluxopt.runner import Run
from fluxopt.stack import build_stack


def benchmark(pipe: Any, stacks: Sequence[Any], *,
              prompts: Sequence[str] | None = None, seed: int | None = None, height: int | None = None,
              width: int | None = None, steps: int | None = None, guidance_scale: float | None = None,
              max_sequence_length: int | None = None, warmup: int | None = None, iterations: int | None = None,
              max_time_s: float | None = None, target_rse: float | None = None,
              fidelity: Mapping[str, Mapping[str, float]] | None = None,
              trained: bool = True, name: str = "your pipeline", output_dir: str | Path | None = None,
              save_images: bool = True) -> RunRecord:
    """Measure each stack (a backend name, a list of names or options objects, or names -> options)
    on ``pipe`` against its own baseline; a setting left out (None) is the command line's default
    (FLUX.1-dev's shapes, ``bench``'s seed, warm-up and timed calls, fluxopt's prompts); returns the run record (also written to ``output_dir``, by default
    ``outputs/benchmark/<time>-<id>``). ``fidelity`` sets thresholds on top of the defaults
    (``{"lossless": {"psnr": 40}}``), as ``fidelity.lossless.psnr=40`` does on the command line;
    ``trained=False`` marks random weights, whose fidelity says nothing about image quality.

    The settings go through the same :class:`fluxopt.config.RunConfig` as the command line's
    (named as there: ``bench.seed``, ``fidelity.lossless.psnr``...), so anything the CLI refuses
    this refuses with the same message, before anything runs."""
    if isinstance(stacks, (str, Mapping)) or not stacks:
        raise ConfigError("stacks is a list of stacks, e.g. ['compile', ['torchao_fp8', 'compile']]")
    if prompts is not None and (isinstance(prompts, str) or not isinstance(prompts, Sequence)):
        raise ConfigError(f"bench.prompts={prompts!r} is not allowed: a non-empty list of strings")
    if fidelity is not None and not isinstance(fidelity, Mapping):
        raise ConfigError(f"fidelity={fidelity!r} is not allowed: a mapping like {{'lossless': {{'psnr': 40}}}}")
    given = {"seed": seed, "steps": steps, "height": height, "width": width, "guidance_scale": guidance_scale,
             "max_sequence_length": max_sequence_length, "warmup": warmup, "iterations": iterations,
             "max_time_s": max_time_s, "target_rse": target_rse, "prompts": None if prompts is None else list(prompts)}
    settings = {"model": {"name": name}, "fidelity": dict(fidelity or {}), "save_images": save_images,
                "bench": {k: v for k, v in given.items() if v is not None}}
    config = run_config(settings)
    built = [build_stack(s) for s in stacks]
    check_pipeline(pipe)
    out = Path(output_dir) if output_dir else Path("outputs") / "benchmark" / (
        f"{dt.datetime.now():%Y-%m-%d_%H-%M-%S}-{run_id()}")
    check_writable_dir("output_dir", out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={out} is a file, not a directory")
    spec = ModelSpec(name=name, description="a pipeline passed to fluxopt.benchmark", defaults=DEV_DEFAULTS,
                     factory=lambda *_: pipe, trained=trained)
    cfg = OmegaConf.structured(config)
    plan = plan_run(cfg, stacks=built, spec=spec, device=pipeline_device(pipe), dtype=pipe.transformer.dtype,
                    explicit=len(built) == 1, check_memory=False, check_requirements=False)
    return Run(cfg, out, plan=plan, pipeline=pipe, provenance={"api": "fluxopt.benchmark"}).execute()
