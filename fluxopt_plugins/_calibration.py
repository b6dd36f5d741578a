"""Calibration generations shared by the backends that fix float8 scales at build time
(``torchao_fp8_static``, ``fp8_attention`` with static scales): the default prompts, and the
generations themselves at the stack's shapes."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

# Not the bench's prompts, so that the fidelity check measures prompts the scales were not fitted to.
CALIBRATION_PROMPTS = ["a busy street market at dusk, lanterns and crowds, photograph",
                       "an oil painting of a stormy sea with a lighthouse"]


def validate_prompts(setting: str, prompts: Sequence[str]) -> str | None:
    """Why ``prompts`` cannot calibrate (a sentence naming ``setting``), or None."""
    if not prompts or not all(p.strip() for p in prompts):
        return f"{setting} must be a non-empty list of non-empty prompts (got {list(prompts)!r})"
    return None


def run_calibration(pipe: Any, prompts: Sequence[str], seed: int, shapes: Any) -> None:
    """One generation per prompt at ``shapes`` (latents only), seeds ``seed``, ``seed + 1``..."""
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            pipe(prompt=prompt, height=shapes.height, width=shapes.width, num_inference_steps=shapes.steps,
                 guidance_scale=shapes.guidance_scale, max_sequence_length=shapes.max_sequence_length,
                 output_type="latent", generator=torch.Generator("cpu").manual_seed(seed + i))


CALIBRATION_FILE = "calibration.safetensors"


def calibration_key(pipe: Any, ctx: Any, backend: str, prompts: Sequence[str], seed: int) -> dict[str, Any]:
    """What a calibration's statistics depend on besides the model, shapes, dtype, device and
    versions that the artifact cache adds itself: the prompts and seed, the transformer as it is
    when calibrated (names, shapes and sampled values of its weights), and the options of the
    backends applied before ``backend`` (they shaped those weights and activations)."""
    from fluxopt import module_fingerprint

    entries = list(ctx.stack.entries) if ctx.stack is not None else []
    names = [e.name for e in entries]
    before = entries[:names.index(backend)] if backend in names else entries
    return {"prompts": list(prompts), "seed": seed,
            "transformer": module_fingerprint(pipe.transformer, values=True),
            "applied_before": {e.name: dataclasses.asdict(e.options) for e in before}}


def cached_calibration(ctx: Any, backend: str, key: Mapping[str, Any], names: Sequence[str],
                       calibrate: Callable[[], dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], bool]:
    """The statistics ``calibrate`` gathers (one tensor per name in ``names``), stored in the
    artifact cache under ``key``; a later process with the same key loads them instead of running
    the calibration generations (about half of a warm build of a static fp8 stack). Returns them
    (on the CPU when loaded) and whether they came from the cache. The cache verifies the entry's
    files; an entry whose names or values do not fit (another layer set, a non-finite statistic)
    is not trusted: the calibration runs again."""
    from safetensors.torch import load_file, save_file

    measured: dict[str, torch.Tensor] = {}

    def build(directory: Any) -> None:
        measured.update(calibrate())
        save_file({name: value.detach().cpu().contiguous() for name, value in measured.items()},
                  str(directory / CALIBRATION_FILE))

    entry = ctx.artifact(f"{backend}_calibration", key, build)
    if measured:
        return measured, False
    loaded = load_file(str(entry / CALIBRATION_FILE))
    if sorted(loaded) != sorted(names) or not all(bool(torch.isfinite(v).all()) for v in loaded.values()):
        log.warning("%s: the cached calibration does not fit this transformer; calibrating again", backend)
        return calibrate(), False
    return loaded, True
