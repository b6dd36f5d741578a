"""Backend ``compile``: torch.compile of the FLUX transformer, whole or regional.

Regional compilation (``compile_repeated_blocks``) compiles one double and one single block
and reuses the kernels for the others: the same steady-state speed for a fraction of the
compile time. Inductor flags are set through the stack's context (``ctx.set_config``), so they
are undone when the stack closes and never leak into the next measurement.

Warm starts (``cache=true``, the default): Inductor's own caches (FX graph, AOT autograd,
autotuning, Triton kernels) are pointed into ``<cache.dir>/inductor`` for the stack, and after
a cold build PyTorch's portable "mega-cache" (``torch.compiler.save_cache_artifacts``) is stored
as a verified artifact entry; a later process loads it (``load_cache_artifacts``) before the
first call compiles. ``stats["compile_cache"]`` says whether it was loaded and how many FX graphs
came from cache, so cold build and warm start times can be told apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from fluxopt import (
    INDUCTOR,
    RECIPE_INDUCTOR_FLAGS,
    Backend,
    ConfigError,
    CudaGraphRunner,
    StackContext,
    Stage,
    TransformerForward,
    hookimpl,
    keep_eager_timestep_rounding,
    module_fingerprint,
    private_dir,
    validate_inductor_flags,
)

MEGA_CACHE = "mega_cache.bin"
BREAKDOWN_ENTRIES = 10  # compile-time breakdown: this many slowest compiler phases go into stats
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class CompileOptions:
    # compile_repeated_blocks: one block of each kind compiled and reused for the others. The same
    # step time as the whole transformer in one graph for a fraction of the build (docs/backends.md
    # has the measurements), so the default; false compiles the whole transformer, embeddings too
    regional: bool = True
    mode: str = "default"  # one of MODES
    # Fail on graph breaks instead of silently slicing the graph. None (auto): True, except with a
    # step cache inside the transformer, whose per-step skip decision is a data-dependent branch.
    fullgraph: Optional[bool] = None
    dynamic: Optional[bool] = None  # True avoids recompiles when the resolution changes
    backend: str = "inductor"
    compile_vae: bool = False  # also compile vae.decode
    tuning_flags: bool = False  # the recipe's Inductor flags (slower compile, a bit faster kernels)
    inductor_config: dict[str, Any] = field(default_factory=dict)  # extra torch._inductor.config flags
    # whole graph: keep eager's rounding of the scaled timestep/guidance (fluxopt.kit.eager_rounding);
    # without it the fused embedding sees 699.2 where eager sees 700.0 and the images drift
    eager_rounding: bool = True
    cache: bool = True  # persistent compile caches in cache.dir (warm start in later processes)
    # replay the whole compiled transformer as one CUDA graph per input shape (GPU only): no host
    # overhead per kernel; needs a transformer without host syncs (no offload, no step cache but
    # one that decides between steps, such as fixed_cache)
    cuda_graphs: bool = False
    # FLUX's tanh-GELUs computed as x * sigmoid(2u), the same function, which Inductor compiles to
    # faster kernels than libdevice's tanh (fluxopt_plugins._sigmoid_gelu; ~1 ms a step on the H100)
    sigmoid_gelu: bool = False


def inductor_flags(options: CompileOptions) -> dict[str, Any]:
    """The Inductor configuration the stack compiles under (patched, never set globally)."""
    return {**(RECIPE_INDUCTOR_FLAGS if options.tuning_flags else {}), **options.inductor_config}


def compiled_code(pipe: Any, options: CompileOptions) -> list[Any]:
    """The code objects Dynamo keeps compiled entries on for this stack: the forward of each
    repeated block class (regional) or of the transformer, every decorator's wrapper included, and
    the VAE's decode. Dynamo keys its entries by code object, so entries from every pipeline compiled
    in a process accumulate there until the recompile limit (8) fails the next compile; closing the
    stack drops them. (Another live pipeline of the same classes then compiles again on its next call.)"""
    transformer = pipe.transformer
    repeated = set(getattr(transformer, "_repeated_blocks", None) or ())
    functions = ([cls.forward for cls in {type(m) for m in transformer.modules() if type(m).__name__ in repeated}]
                 if options.regional else [type(transformer).forward])
    if options.compile_vae:
        functions.append(type(pipe.vae).decode)
    codes = []
    for fn in functions:
        while fn is not None:
            codes.append(fn.__code__)
            fn = getattr(fn, "__wrapped__", None)
    return codes


class CompileBackend(Backend):
    name = "compile"
    description = "torch.compile of the transformer (full or regional), optional VAE decode, Inductor flags"
    options_class = CompileOptions
    stage = Stage.GRAPH
    lossless = True

    def validate_options(self, options: CompileOptions) -> None:
        if options.mode not in MODES:
            raise ConfigError(f"backend.compile.mode={options.mode!r} is not one of {', '.join(MODES)}")
        validate_inductor_flags("backend.compile.inductor_config", options.inductor_config)

    def incompatibility(self, options: CompileOptions, others: Sequence[Any]) -> str | None:
        if options.cuda_graphs:
            for other in others:
                if other.backend.stage in (Stage.CACHE, Stage.PLACEMENT) and not other.backend.between_steps:
                    return (f"cuda_graphs=true replays one fixed graph per step, and {other.name} decides on the "
                            "host what runs (or moves weights) during the step; use backend.compile.cuda_graphs=false")
        return None

    def apply(self, pipe: Any, options: CompileOptions, ctx: StackContext) -> None:
        ctx.set_config("compile: Inductor flags", torch._inductor.config, inductor_flags(options))
        fullgraph = options.fullgraph
        if fullgraph is None:
            fullgraph = not (ctx.stack and any(e.backend.stage == Stage.CACHE and not e.backend.between_steps
                                               for e in ctx.stack.entries))
        ctx.stats.setdefault("compile", {})["fullgraph"] = fullgraph
        if options.eager_rounding and not options.regional:  # regional: the embeddings stay eager
            undo = keep_eager_timestep_rounding(pipe.transformer)
            if undo is not None:
                ctx.callback("compile: eager timestep rounding", undo)
            ctx.stats["compile"]["eager_rounding"] = undo is not None
        if options.sigmoid_gelu:
            from fluxopt_plugins._sigmoid_gelu import use_sigmoid_gelu

            ctx.stats["compile"]["sigmoid_gelu"] = use_sigmoid_gelu(pipe.transformer)
        kwargs = {"fullgraph": fullgraph, "dynamic": options.dynamic, "backend": options.backend,
                  "mode": None if options.mode == "default" else options.mode}
        codes = compiled_code(pipe, options)

        def drop_compiled() -> None:  # the snapshot restores the modules; Dynamo's entries go here
            for code in codes:
                torch._dynamo.reset_code(code)

        if options.regional:
            pipe.transformer.compile_repeated_blocks(**kwargs)
            ctx.callback("compile: the repeated blocks compiled (regional)", drop_compiled)
        else:
            pipe.transformer.compile(**kwargs)
            ctx.callback("compile: the transformer compiled", drop_compiled)
        if options.compile_vae:
            ctx.set_attr("compile: the VAE decoder compiled", pipe.vae, "decode", torch.compile(pipe.vae.decode, **kwargs))
        if options.cache:
            from torch._functorch import config as functorch_config
            from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

            inductor_dir = str(private_dir(ctx.cache_dir / INDUCTOR))
            ctx.enter_context("compile: Inductor cache directory", temporary_cache_dir(inductor_dir))
            ctx.set_config("compile: FX graph and autotune caches", torch._inductor.config,
                           {"fx_graph_cache": True, "autotune_local_cache": True})
            ctx.set_config("compile: AOT autograd cache", functorch_config, {"enable_autograd_cache": True})

    def build(self, pipe: Any, options: CompileOptions, ctx: StackContext) -> None:
        """torch.compile is lazy: one call at the bench shapes triggers (and times) compilation."""
        self._compile(pipe, options, ctx)
        if options.cuda_graphs and ctx.device.is_gpu:
            transformer = pipe.transformer
            original = transformer._compiled_call_impl or transformer._call_impl
            run = CudaGraphRunner(lambda **t: original(**t, joint_attention_kwargs=None, return_dict=False)[0])
            # Module.__call__ goes through _compiled_call_impl when it is set
            ctx.set_attr("compile: the transformer replayed from CUDA graphs", transformer, "_compiled_call_impl",
                         TransformerForward(run, fallback=original, what="compile cuda_graphs"))
            ctx.callback("compile: free the CUDA graphs", run.release)
            with compile_breakdown(ctx, "cuda_graph_capture"), ctx.timed("cuda_graph_capture"):
                ctx.run_once()
            ctx.stats.setdefault("compile", {})["cuda_graphs"] = len(run.graphs)

    def _compile(self, pipe: Any, options: CompileOptions, ctx: StackContext) -> None:
        if not options.cache:
            with compile_breakdown(ctx, "compile"), ctx.timed("compile"):
                ctx.run_once()
            return
        from torch._dynamo.utils import counters

        key = {**self.cache_key(options), "transformer": module_fingerprint(pipe.transformer, values=False),
               "vae": module_fingerprint(pipe.vae, values=False) if options.compile_vae else None,
               "inductor_flags": inductor_flags_digest()}
        info: dict[str, Any] = {"loaded": False, "saved": False,
                                "inductor_cache_dir": str(ctx.cache_dir / INDUCTOR)}
        entry = ctx.artifact(self.name, key, None)  # look up only: the bundle exists after compiling
        if entry is not None:
            with ctx.timed("compile_cache_load"):
                torch.compiler.load_cache_artifacts((entry / MEGA_CACHE).read_bytes())
            info["loaded"] = True
        before = {k: counters["inductor"][k] for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}
        with compile_breakdown(ctx, "compile"), ctx.timed("compile"):
            ctx.run_once()
        hits = counters["inductor"]["fxgraph_cache_hit"] - before["fxgraph_cache_hit"]
        misses = counters["inductor"]["fxgraph_cache_miss"] - before["fxgraph_cache_miss"]
        info.update(fx_graph_cache_hits=hits, fx_graph_cache_misses=misses,
                    warm_start=hits > 0 and misses == 0, compile_s=ctx.stats["build_phases_s"]["compile"])
        if entry is None:
            saved = torch.compiler.save_cache_artifacts()
            if saved is not None:
                data = saved[0]
                with ctx.timed("compile_cache_save"):
                    ctx.artifact(self.name, key, lambda tmp: (tmp / MEGA_CACHE).write_bytes(data))
                artifact = ctx.stats["artifacts"][self.name]
                # This process compiled: not a cache hit, even if another process saved the same
                # entry while we compiled (then our save found theirs).
                info.update(saved=artifact.get("built", False), saved_by_other_process=not artifact.get("built"),
                            bytes=len(data))
                artifact["cache_hit"] = False
        ctx.stats["compile_cache"] = info


def inductor_flags_digest() -> str:
    """A digest of Inductor's settings as the stack's backends left them (tuning flags set by a
    quantization backend included): the portable cache saved after a build holds graphs compiled
    under these settings, so an entry is only looked up under the same ones."""
    import hashlib

    import torch._inductor.config as inductor_config

    plain = {k: v for k, v in sorted(inductor_config.get_config_copy().items())
             if isinstance(v, (bool, int, float, str, type(None))) and not any(w in k for w in ("dir", "path"))}
    return hashlib.sha256(repr(plain).encode()).hexdigest()[:16]


def _compile_times() -> dict[str, float]:
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    return {name: float(value) for name, value in zip(names, values)}


@contextlib.contextmanager
def compile_breakdown(ctx: StackContext, phase: str) -> Iterator[None]:
    """Record what the compiler did during a build phase, in ``stats["compile"]``: where the time
    went (Dynamo's per-phase timers, e.g. Inductor lowering, Triton compilation, autotuning; the
    slowest entries, which nest and so overlap) as ``breakdown_s`` for the compile phase and
    ``<phase>_breakdown_s`` for another, and in ``compiler_work[phase]`` how many frames Dynamo
    compiled and how many coordinate-descent benchmarks Inductor ran. A phase other than
    ``compile`` that compiles or tunes is a recompilation or a tuning that was not cached: the
    usual cause of a slow CUDA graph capture or of a warm build that is not warm."""
    from torch._dynamo.utils import counters

    def work() -> dict[str, int]:
        return {"frames_compiled": int(counters["frames"]["ok"]),
                "coordesc_benchmarks": int(counters["inductor"]["coordesc_tuning_bench"])}

    before, before_work = _compile_times(), work()
    try:
        yield
    finally:
        after, after_work = _compile_times(), work()
        spent = {name: after[name] - before.get(name, 0.0) for name in after}
        slowest = sorted(((t, n) for n, t in spent.items() if t > 0.01), reverse=True)[:BREAKDOWN_ENTRIES]
        stats = ctx.stats.setdefault("compile", {})
        stats["breakdown_s" if phase == "compile" else f"{phase}_breakdown_s"] = {n: round(t, 2) for t, n in slowest}
        stats.setdefault("compiler_work", {})[phase] = {k: after_work[k] - before_work[k] for k in after_work}


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [CompileBackend()]
