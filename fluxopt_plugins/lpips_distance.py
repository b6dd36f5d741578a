"""``lpips``: the LPIPS perceptual distance (AlexNet variant) between the baseline's image and the
stack's for the same prompt and seed; 0 = identical, lower is better (differences people notice
start around 0.1).

Uses the ``lpips`` package (``pip install 'fluxopt[lpips]'``), which needs a torchvision built for
the installed torch, and torchvision's ImageNet AlexNet weights, which fluxopt never downloads:
they must already be in torch's hub cache (``<torch.hub.get_dir()>/checkpoints/``, where
torchvision keeps what it downloaded; ``$TORCH_HOME`` moves it). The package ships its own
linear-layer weights. Without any of these the metric is reported as not available with what is
missing (never a gate unless given a threshold, which then fails with the reason)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxopt import Metric, Sample, UnavailableError, hookimpl

ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet_Weights.IMAGENET1K_V1 file


def weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS


@lru_cache(maxsize=2)
def _model(weights: Path) -> Any:
    if not weights.is_file():
        raise UnavailableError(f"not available: needs torchvision's AlexNet weights at {weights} "
                               "(fluxopt does not download them; copy the file there or set $TORCH_HOME)")
    try:
        import lpips
    except Exception as exc:  # noqa: BLE001 - a missing package and a broken torchvision give the same answer
        raise UnavailableError(f"not available: needs the lpips package and a torchvision built for torch "
                               f"{torch.__version__} ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})"
                               ) from None
    return lpips.LPIPS(net="alex", verbose=False).eval()


def _as_input(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 floats in [0, 1] -> 1 x 3 x H x W in [-1, 1], LPIPS's input convention."""
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None] * 2 - 1


def lpips_distance(ref: Sample, out: Sample) -> float:
    model = _model(weights_path())
    with torch.no_grad():
        return float(model(_as_input(ref.image), _as_input(out.image)).item())


def unavailable() -> str | None:
    """Why LPIPS cannot be computed here (None: it can), without loading the network."""
    try:
        _model(weights_path())
    except UnavailableError as exc:
        return str(exc)
    return None


@hookimpl
def fluxopt_metrics() -> list[Metric]:
    return [Metric("lpips", lpips_distance, False,
                   "LPIPS perceptual distance to the baseline's image, AlexNet (0 = identical; needs "
                   f"torchvision's {ALEXNET_WEIGHTS} in torch's hub cache)", bounds=(0.0, None),
                   unavailable=unavailable)]
