"""Backend ``fuse_qkv``: one matmul for q, k and v (``fuse_qkv_projections`` on the transformer
and the VAE), as in the flux-fast recipe. Same arithmetic, so lossless. torch.compile can do
this fusion itself, so expect little gain on top of ``compile``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fluxopt import Backend, StackContext, Stage, hookimpl



@dataclass
class FuseQKVOptions:
    transformer: bool = True
    vae: bool = True


class FuseQKVBackend(Backend):
    name = "fuse_qkv"
    description = "fuse the q/k/v projections of the transformer and VAE attention into one matmul"
    options_class = FuseQKVOptions
    stage = Stage.WEIGHTS
    lossless = True

    def apply(self, pipe: Any, options: FuseQKVOptions, ctx: StackContext) -> None:
        if options.transformer:
            pipe.transformer.fuse_qkv_projections()
            ctx.note("fuse_qkv: the transformer's q, k, v projections fused")
        if options.vae:
            pipe.vae.fuse_qkv_projections()
            ctx.note("fuse_qkv: the VAE's q, k, v projections fused")


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [FuseQKVBackend()]
