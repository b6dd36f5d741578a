"""Backend ``compile``: torch.compile of the FLUX transformer, whole or regional.

Regional compilation (``compile_repeated_blocks``) compiles one double and one single block
and reuses the kernels for the others: the same steady-state speed for a fraction of the
compile time. Inductor flags are applied through ``torch._inductor.config.patch`` entered on
the stack's exit stack, so they do not leak into the next measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from fluxopt.backend import Backend, Stage, StackContext
from fluxopt.errors import ConfigError
from fluxopt.hookspecs import hookimpl

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# The flux-fast recipe's Inductor tuning flags.
RECIPE_INDUCTOR_FLAGS = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
}


@dataclass
class CompileOptions:
    regional: bool = False  # compile_repeated_blocks instead of the whole transformer
    mode: str = "default"  # one of MODES
    fullgraph: bool = True  # fail on graph breaks instead of silently slicing the graph
    dynamic: Optional[bool] = None  # True avoids recompiles when the resolution changes
    backend: str = "inductor"
    compile_vae: bool = False  # also compile vae.decode
    tuning_flags: bool = False  # the recipe's Inductor flags (slower compile, a bit faster kernels)
    inductor_config: dict[str, Any] = field(default_factory=dict)  # extra torch._inductor.config flags


class CompileBackend(Backend):
    name = "compile"
    description = "torch.compile of the transformer (full or regional), optional VAE decode, Inductor flags"
    options_class = CompileOptions
    stage = Stage.GRAPH
    lossless = True

    def validate_options(self, options: CompileOptions) -> None:
        if options.mode not in MODES:
            raise ConfigError(f"backend.compile.mode={options.mode!r} is not one of {', '.join(MODES)}")
        import torch._inductor.config as inductor_config

        unknown = [k for k in options.inductor_config if not hasattr(inductor_config, k)]
        if unknown:
            raise ConfigError(f"backend.compile.inductor_config has unknown Inductor flags {unknown} "
                              "(see torch._inductor.config)")

    def apply(self, pipe: Any, options: CompileOptions, ctx: StackContext) -> None:
        flags = {**(RECIPE_INDUCTOR_FLAGS if options.tuning_flags else {}), **options.inductor_config}
        if flags:
            ctx.exit_stack.enter_context(torch._inductor.config.patch(flags))
        kwargs = {"fullgraph": options.fullgraph, "dynamic": options.dynamic, "backend": options.backend,
                  "mode": None if options.mode == "default" else options.mode}
        if options.regional:
            pipe.transformer.compile_repeated_blocks(**kwargs)
        else:
            pipe.transformer.compile(**kwargs)
        if options.compile_vae:
            pipe.vae.decode = torch.compile(pipe.vae.decode, **kwargs)

    def build(self, pipe: Any, options: CompileOptions, ctx: StackContext) -> None:
        """torch.compile is lazy: one call at the bench shapes triggers (and times) compilation."""
        with ctx.timed("compile"):
            ctx.run_once()


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [CompileBackend()]
