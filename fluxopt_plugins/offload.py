"""Backend ``offload``: keep weights in CPU memory and move them to the GPU when needed
(stage PLACEMENT, applied last, after quantization, caches and compile; lossless).

* ``auto`` (the default): ``group`` with ``block_level``, or ``model`` in a stack with a graph
  backend (compile, aoti) or on a transformer already compiled, recorded in the stack's stats.
* ``group``: diffusers' group offloading (``enable_group_offload``): each group of
  layers (``group_type=block_level``, the default: ``blocks_per_group`` transformer blocks;
  ``leaf_level``: every leaf layer) is moved to the GPU before its forward and back after it. With
  ``use_stream`` (the default) the host copies are pinned once and the next group is uploaded on a
  CUDA stream of its own while the current one computes, so the copies overlap compute.
* ``model``: ``enable_model_cpu_offload`` moves whole components (text encoders, transformer,
  VAE) to the GPU in turn; composes with ``compile`` (regional compile is the recipe's
  choice).
* ``sequential``: ``enable_sequential_cpu_offload`` streams every leaf module's weights to the
  GPU inside its forward, through accelerate hooks that replace the module's parameters;
  minimal memory, very slow.

Why ``auto`` picks as it does. Alone, block-level group offload is the mode that makes
offloading worth having: model offload holds the whole transformer on the GPU while it runs, so
its peak is the transformer's own size (22.7 GiB for FLUX.1 against the baseline's 25.2) and it
cannot run FLUX where the transformer does not fit, while block-level group offload holds one
block (2.4 GiB). Measured on the H200 at full size (docs/results/2026-12-04-h200-offload/),
streamed block-level was also the fastest of the three: 13.95 s a generation against 14.4
(leaf_level) and 19.4 (model, whose copies are pageable). Where PCIe is slower than the H200's,
the per-step traffic costs more. With compile, model offload is the recipe (diffusers' guide:
regional compile keeps its kernels and peaks at 22.7 GB) and the only mode that composes.

``sequential`` and ``group`` are refused together with ``compile`` or ``aoti``: their hooks swap
the parameters inside every forward, which a compiled graph would have to trace (meta or host
tensors turned into CUDA tensors), so a compiled transformer would either fail (fullgraph) or
fall back to eager with recompilations.

Every mode moves weights to a GPU and back, so a GPU is required.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fluxopt import Backend, ConfigError, Package, Requirements, StackContext, Stage, hookimpl


MODES = ("auto", "group", "model", "sequential")
GROUP_TYPES = ("block_level", "leaf_level")
SWAPPING_MODES = ("sequential", "group")  # hooks that swap parameters inside forward
GROUP_OPTIONS = ("group_type", "blocks_per_group", "use_stream")  # read only by mode=group


def _is_compiled(pipe: Any) -> bool:
    transformer = pipe.transformer
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in transformer.modules()) or \
        hasattr(transformer, "_orig_mod")


def _group_options_given(options: Any) -> list[str]:
    """``name=value`` for each group option set away from its default."""
    return [f"{name}={getattr(options, name)}" for name in GROUP_OPTIONS
            if getattr(options, name) != getattr(OffloadOptions, name)]


def resolve_mode(options: Any, pipe: Any, stack: Any) -> str:
    """``auto``: ``model`` where a graph backend shares the stack or the transformer is already
    compiled (model offload is the mode that composes with them), else ``group``."""
    if options.mode != "auto":
        return options.mode
    graph = stack is not None and any(e.backend.stage == Stage.GRAPH for e in stack.entries)
    return "model" if graph or _is_compiled(pipe) else "group"


@dataclass
class OffloadOptions:
    mode: str = "auto"  # auto (group, or model beside compile/aoti) | group | model | sequential
    group_type: str = "block_level"  # mode=group: block_level | leaf_level
    blocks_per_group: int = 1  # mode=group, group_type=block_level: blocks moved together
    use_stream: bool = True  # mode=group: pinned host copies, uploads on a CUDA stream overlapping compute


class OffloadBackend(Backend):
    name = "offload"
    description = ("CPU offload of the pipeline's components (group: diffusers' group offloading, one "
                   "transformer block on the GPU at a time, the default alone; model-level, the default "
                   "beside compile, or sequential: accelerate hooks)")
    options_class = OffloadOptions
    stage = Stage.PLACEMENT
    lossless = True
    requires = Requirements(gpu=True, packages=(Package("accelerate", "pip install accelerate"),))

    def validate_options(self, options: OffloadOptions) -> None:
        if options.mode not in MODES:
            raise ConfigError(f"backend.offload.mode={options.mode!r} is not one of {', '.join(MODES)}")
        if options.group_type not in GROUP_TYPES:
            raise ConfigError(f"backend.offload.group_type={options.group_type!r} is not one of "
                              f"{', '.join(GROUP_TYPES)}")
        if options.blocks_per_group < 1:
            raise ConfigError(f"backend.offload.blocks_per_group={options.blocks_per_group} must be >= 1")
        given = _group_options_given(options)
        if options.mode not in ("group", "auto") and given:
            raise ConfigError(f"backend.offload.{given[0]} applies to mode=group only; this stack has "
                              f"mode={options.mode}")
        if options.group_type != "block_level" and options.blocks_per_group != 1:
            raise ConfigError(f"backend.offload.blocks_per_group={options.blocks_per_group} applies to "
                              f"group_type=block_level only; this stack has group_type={options.group_type}")
        if options.use_stream and options.group_type == "block_level" and options.blocks_per_group != 1:
            raise ConfigError(f"backend.offload.blocks_per_group={options.blocks_per_group} must be 1 with "
                              "use_stream=true (diffusers prefetches one block at a time on its stream)")

    def incompatibility(self, options: OffloadOptions, others: Sequence[Any]) -> str | None:
        graph = any(e.backend.stage == Stage.GRAPH for e in others)
        if options.mode in SWAPPING_MODES and graph:
            return (f"mode={options.mode} swaps every module's parameters inside forward, which a compiled or "
                    "exported graph cannot follow; use backend.offload.mode=model")
        given = _group_options_given(options)
        if options.mode == "auto" and given and graph:
            return (f"backend.offload.{given[0]} applies to mode=group, and beside a compiled or exported graph "
                    "mode=auto is model (group offload swaps parameters inside forward)")
        return None

    def apply(self, pipe: Any, options: OffloadOptions, ctx: StackContext) -> None:
        mode = resolve_mode(options, pipe, ctx.stack)
        given = _group_options_given(options)
        if mode != "group" and given:
            raise ConfigError(f"backend.offload.{given[0]} applies to mode=group, and on a transformer already "
                              "compiled mode=auto is model (group offload swaps parameters inside forward)")
        ctx.stats.setdefault(self.name, {})["mode"] = mode
        if mode in SWAPPING_MODES and _is_compiled(pipe):
            raise ConfigError(f"backend.offload.mode={mode} cannot be combined with compile: its hooks "
                              "swap every module's parameters inside forward, which torch.compile cannot "
                              "trace; use backend.offload.mode=model")
        device = ctx.device.torch_device
        if mode == "model":
            pipe.enable_model_cpu_offload(device=device)
            ctx.note("offload: accelerate's model offload hooks")
        elif mode == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
            ctx.note("offload: accelerate's sequential offload hooks")
        else:
            # record_stream lets the allocator reuse a group's memory once the compute that read it is
            # done, instead of synchronizing the compute stream before every group goes back
            pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                      offload_type=options.group_type,
                                      num_blocks_per_group=options.blocks_per_group
                                      if options.group_type == "block_level" else None,
                                      use_stream=options.use_stream, record_stream=options.use_stream)
            ctx.note(f"offload: diffusers' group offloading hooks ({options.group_type}"
                     f"{', streamed' if options.use_stream else ''})")


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [OffloadBackend()]
