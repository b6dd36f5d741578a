"""FLUX's tanh-approximate GELU computed through a sigmoid, for compiled transformers.

``0.5 (1 + tanh u) = sigmoid(2u)``, so ``gelu_tanh(x) = x sigmoid(2u)`` with
``u = sqrt(2/pi) (x + 0.044715 x^3)``: the same function. Inductor lowers ``tanh`` on CUDA to
libdevice's accurate tanh (no fast path) and ``sigmoid`` to an exp2 and a reciprocal; in the fp8
stack's kernel that applies the GELU and casts a single block's MLP activations to float8, this
took the kernel from 123 to 99 us on the H100 (``benchmarks/block_kernels_bench.py``). Computed in
fp32 like ``F.gelu``; the two differ by float32 rounding only.
"""

from __future__ import annotations

import math

import torch

_TWO_SQRT_2_OVER_PI = 2 * math.sqrt(2 / math.pi)


def sigmoid_gelu(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")`` as ``x * sigmoid(2u)``, in fp32, returned in ``x``'s dtype."""
    xf = x.float()
    return (xf * torch.sigmoid(_TWO_SQRT_2_OVER_PI * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)


class SigmoidGelu(torch.nn.Module):
    """Stands in for ``torch.nn.GELU(approximate="tanh")`` (a FLUX single block's ``act_mlp``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sigmoid_gelu(x)


def use_sigmoid_gelu(model: torch.nn.Module) -> int:
    """Route every tanh-approximate GELU of ``model`` through :func:`sigmoid_gelu`: ``nn.GELU``
    modules are swapped for :class:`SigmoidGelu`, diffusers' projecting ``GELU`` modules (the
    feed-forwards of joint blocks) get it as their ``gelu``. Returns how many were changed. The
    stack's pipeline snapshot undoes both (submodule tables and module attributes)."""
    from diffusers.models.activations import GELU as ProjectedGelu

    changed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.GELU) and child.approximate == "tanh":
                setattr(parent, name, SigmoidGelu())
                changed += 1
        if isinstance(parent, ProjectedGelu) and parent.approximate == "tanh":
            parent.gelu = sigmoid_gelu  # shadows the class's method for this module only
            changed += 1
    return changed
