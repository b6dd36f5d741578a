"""``clip_score_drop``: how much a stack lowers the CLIP score (image-prompt agreement, 0-100) of
the baseline's image for the same prompt and seed; 0 = the same agreement, lower is better.

CLIP's weights cannot be downloaded by fluxopt: point ``FLUXOPT_CLIP_MODEL`` at a local CLIP
model directory in transformers format (e.g. a saved ``openai/clip-vit-base-patch32``). Without
it the metric is reported as not available (never a gate unless given a threshold, which then
fails with the reason)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from fluxopt import Metric, Sample, UnavailableError, hookimpl

MODEL_ENV = "FLUXOPT_CLIP_MODEL"
NEEDS = (f"not available: needs a local CLIP model directory (transformers format, e.g. "
         f"openai/clip-vit-base-patch32 saved with save_pretrained) in ${MODEL_ENV}")


@lru_cache(maxsize=2)
def _load(path: str) -> tuple[Any, Any]:
    from transformers import CLIPModel, CLIPProcessor

    try:
        return CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - a broken directory is the same answer: not available here
        raise UnavailableError(f"{NEEDS}; {path} could not be loaded ({type(exc).__name__}: "
                               f"{(str(exc).splitlines() or [''])[0]})") from None


def clip_score(image: Any, prompt: str, path: str) -> float:
    """CLIP score as usually reported: 100 x cosine(image embedding, text embedding), floored at 0."""
    model, processor = _load(path)
    inputs = processor(text=[prompt], images=[(image * 255).round().clip(0, 255).astype("uint8")],
                       return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        out = model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
    return max(100.0 * cos, 0.0)


def clip_score_drop(ref: Sample, out: Sample) -> float:
    path = os.environ.get(MODEL_ENV)
    if not path or not Path(path).is_dir():
        raise UnavailableError(NEEDS if not path else f"{NEEDS}; {path} is not a directory")
    return clip_score(ref.image, ref.prompt, path) - clip_score(out.image, out.prompt, path)


@hookimpl
def fluxopt_metrics() -> list[Metric]:
    return [Metric("clip_score_drop", clip_score_drop, False,
                   f"baseline CLIP score minus the stack's, same prompt and seed (0 = same; needs ${MODEL_ENV})")]
