"""Backend ``channels_last``: the VAE's convolutions in NHWC memory format (flux-fast recipe).
A layout change only, so lossless; it helps the VAE decode on GPUs (cuDNN NHWC kernels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fluxopt import Backend, StackContext, Stage, hookimpl



@dataclass
class ChannelsLastOptions:
    pass


class ChannelsLastBackend(Backend):
    name = "channels_last"
    description = "VAE weights in channels_last (NHWC) memory format"
    options_class = ChannelsLastOptions
    stage = Stage.WEIGHTS
    lossless = True

    def apply(self, pipe: Any, options: ChannelsLastOptions, ctx: StackContext) -> None:
        pipe.vae.to(memory_format=torch.channels_last)
        ctx.note("channels_last: the VAE's weights in channels_last layout")


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [ChannelsLastBackend()]
