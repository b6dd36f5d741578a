"""Backend ``context_parallel``: one image's token sequence split across GPUs (diffusers 0.42
context parallelism: ``transformer.enable_parallelism(config=ContextParallelConfig(...))``).

``mode=ulysses`` (all-to-all over attention heads; heads must divide by ``world_size``) or
``mode=ring`` (K/V passed around a ring; the sequence must divide by ``world_size``). Needs
``world_size`` NVIDIA GPUs and one process per GPU: fluxopt re-launches itself with torchrun
when this backend is selected (fluxopt/scale/torchrun.py); rank 0 writes the results.

Composition: the attention kernel (``attention`` backend) is set in its ``apply``, compile only
wraps the module there, and step caches register their hooks there too; this backend enables
parallelism in ``build`` (before compile's first call), so all of them compose in stage order.
Only attention kernels diffusers marks as context-parallel capable work (native, flash,
_native_cudnn, _native_flash, sage...). Not verified on a multi-GPU machine: docs/scale-out.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from fluxopt import Backend, ConfigError, Requirements, StackContext, Stage, hookimpl


MODES = ("ulysses", "ring")


@dataclass
class ContextParallelOptions:
    world_size: int = 2  # GPUs (= torchrun processes) one image is split across
    mode: str = "ulysses"  # ulysses | ring
    convert_to_fp32: bool = True  # ring: merge partial attention outputs in fp32


class ContextParallelBackend(Backend):
    name = "context_parallel"
    description = "split one image's sequence across GPUs (diffusers context parallelism, ulysses|ring; torchrun)"
    options_class = ContextParallelOptions
    stage = Stage.ATTENTION
    lossless = True
    requires = Requirements(nvidia=True)
    conflicts = {
        "offload": "offloading moves the transformer off the GPU each rank holds its shard of the sequence on",
        "aoti": "an exported graph replaces the transformer forward that carries the context-parallel hooks",
        "trt_fp8": "a TensorRT engine replaces the transformer forward that carries the context-parallel hooks",
    }

    def validate_options(self, options: ContextParallelOptions) -> None:
        if options.mode not in MODES:
            raise ConfigError(f"backend.context_parallel.mode={options.mode!r} is not one of {', '.join(MODES)}")
        if options.world_size < 2:
            raise ConfigError(f"backend.context_parallel.world_size={options.world_size} must be >= 2 "
                              "(one GPU needs no context parallelism)")

    def processes(self, options: ContextParallelOptions) -> int:
        return options.world_size

    def unmet_requirement(self, options: ContextParallelOptions, device: Any) -> str | None:
        unmet = super().unmet_requirement(options, device)
        if unmet:
            return unmet
        return _unmet_gpus(options.world_size, torch.cuda.device_count(), os.environ)

    def apply(self, pipe: Any, options: ContextParallelOptions, ctx: StackContext) -> None:
        ctx.stats["context_parallel"] = {"world_size": options.world_size, "mode": options.mode,
                                         "rank": int(os.environ.get("RANK", "0"))}

    def build(self, pipe: Any, options: ContextParallelOptions, ctx: StackContext) -> None:
        from diffusers import ContextParallelConfig

        degree = {"ulysses_degree" if options.mode == "ulysses" else "ring_degree": options.world_size}
        with ctx.timed("enable_parallelism"):
            pipe.transformer.enable_parallelism(
                config=ContextParallelConfig(**degree, convert_to_fp32=options.convert_to_fp32))


def _unmet_gpus(world_size: int, device_count: int, env: Any) -> str | None:
    """Why ``world_size`` ranks cannot run here (None: they can)."""
    if device_count < world_size:
        return f"needs {world_size} NVIDIA GPUs (world_size={world_size}); this machine has {device_count}"
    launched = env.get("WORLD_SIZE")
    if launched is None:
        return ("needs one process per GPU under torchrun; `python -m fluxopt +backend=context_parallel` "
                "launches them itself (a bake-off of every backend does not)")
    if int(launched) != world_size:
        return f"launched with WORLD_SIZE={launched} but backend.context_parallel.world_size={world_size}"
    if not torch.distributed.is_initialized():
        return "torch.distributed is not initialised in this process (fluxopt.scale.torchrun.init_rank)"
    return None


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [ContextParallelBackend()]
