"""Calibration generations shared by the backends that fix float8 scales at build time
(``torchao_fp8_static``, ``fp8_attention`` with static scales): the default prompts, and the
generations themselves at the stack's shapes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

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
