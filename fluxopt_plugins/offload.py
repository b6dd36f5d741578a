"""Backend ``offload``: keep weights in CPU memory and move them to the GPU when needed
(stage PLACEMENT, applied last, after quantization, caches and compile; lossless).

* ``model``: ``enable_model_cpu_offload`` moves whole components (text encoders, transformer,
  VAE) to the GPU in turn; composes with ``compile`` (regional compile is the recipe's
  choice: 22.7 GB peak for FLUX.1-dev on an H100).
* ``sequential``: ``enable_sequential_cpu_offload`` streams every leaf module's weights to the
  GPU inside its forward, through accelerate hooks that replace the module's parameters;
  minimal memory, very slow. It is refused together with ``compile``: torch.compile would
  have to trace those hooks' parameter swaps (meta/CPU tensors turned into CUDA tensors inside
  every forward), which it cannot do in one graph, so a compiled transformer would either fail
  (fullgraph) or fall back to eager with recompilations.

accelerate's hooks move the weights to an accelerator, so a GPU is required.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fluxopt import Backend, ConfigError, Package, Requirements, StackContext, Stage, hookimpl


MODES = ("model", "sequential")


def _is_compiled(pipe: Any) -> bool:
    transformer = pipe.transformer
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in transformer.modules()) or \
        hasattr(transformer, "_orig_mod")


@dataclass
class OffloadOptions:
    mode: str = "model"  # model | sequential


class OffloadBackend(Backend):
    name = "offload"
    description = "CPU offload of the pipeline's components (model-level or sequential, accelerate hooks)"
    options_class = OffloadOptions
    stage = Stage.PLACEMENT
    lossless = True
    requires = Requirements(gpu=True, packages=(Package("accelerate", "pip install accelerate"),))

    def validate_options(self, options: OffloadOptions) -> None:
        if options.mode not in MODES:
            raise ConfigError(f"backend.offload.mode={options.mode!r} is not one of {', '.join(MODES)}")

    def incompatibility(self, options: OffloadOptions, others: Sequence[Any]) -> str | None:
        if options.mode == "sequential" and any(e.backend.stage == Stage.GRAPH for e in others):
            return ("mode=sequential swaps every module's parameters inside forward, which a compiled or "
                    "exported graph cannot follow; use backend.offload.mode=model")
        return None

    def apply(self, pipe: Any, options: OffloadOptions, ctx: StackContext) -> None:
        if options.mode == "sequential" and _is_compiled(pipe):
            raise ConfigError("backend.offload.mode=sequential cannot be combined with compile: its accelerate "
                              "hooks swap every module's parameters inside forward, which torch.compile cannot "
                              "trace; use backend.offload.mode=model")
        device = ctx.device.torch_device
        if options.mode == "model":
            pipe.enable_model_cpu_offload(device=device)
            ctx.note("offload: accelerate's model offload hooks")
        else:
            pipe.enable_sequential_cpu_offload(device=device)
            ctx.note("offload: accelerate's sequential offload hooks")


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [OffloadBackend()]
