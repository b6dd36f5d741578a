"""Backend ``aoti``: torch.export + AOTInductor of the FLUX transformer (optionally the VAE
decoder), packaged once into the artifact cache and loaded by later processes (warm start),
replayed under CUDA graphs on NVIDIA/AMD GPUs.

Build: the transformer is exported with example inputs for the configured shapes (batch 1,
packed latents of ``(h/16)*(w/16)`` tokens x ``in_channels``, ``max_sequence_length`` text
tokens), compiled with ``aoti_compile_and_package`` and stored through ``ctx.artifact``; the
package is loaded with ``aoti_load_package`` and installed as the transformer's ``forward``,
keeping the signature and return values FluxPipeline relies on.

Weights: ``shared`` packages code only and hands the live module's tensors to the package at
load time, which is right only when Inductor kept every weight as it was: with ``max_autotune``
it makes derived constants the live module lacks. The package gets its own copy
(``load_constants(user_managed=False)``) and the live weights are released (``release_weights``;
the stack's snapshot restores them on close): zero-copy binding (``user_managed=True``) leaks a
reference to every bound tensor in the AOTInductor runtime of torch 2.11 to 2.13 (pytorch PR
194480). ``embedded`` (the flux-fast recipe's) bakes the weights into the package in the layout
Inductor chose for them, derived constants included (transposed or padded copies, packed CPU
GEMM weights), and is the only mode for quantized (tensor-subclass) weights; it writes the
weights twice to disk and compiles them into the shared library, which made a bf16 FLUX.1-dev
package take minutes longer to build and tens of GiB of disk. ``auto`` (the default) shares
plain weights and embeds quantized ones. Without the fix above, a bake-off's dropped pipeline
kept one transformer's weights (22 GiB on flux-dev-random) allocated for every later stack. Either way the
package's output is compared with the eager transformer's on example inputs before it is
installed (``self_check``): a package that computes something else fails the stack. The cache
key holds a fingerprint of the module's structure (and, embedded, of its values) and the C++
compiler the package was built with.

Numerics (``eager_rounding``, on by default): the exported graph keeps eager's bf16 rounding of
the scaled timestep and guidance, which Inductor's fusion would otherwise drop (see
``fluxopt.kit.eager_rounding``; without it the package scored a relative L2 of 0.51 against eager on
flux-dev-random).

C++ compiler: Inductor's configured compiler is used only if the libstdc++ it links is not
newer than the one this process loaded; otherwise a compatible one (``g++``) is chosen, for the
stack only (see ``_libstdcxx``).

Shapes: static by default (one package per height x width x sequence length). With
``dynamic=true`` the image-token dimension is a ``torch.export.Dim``: any height x width
(multiples of 16) with ``(h/16)*(w/16)`` between ``(min_resolution/16)^2`` and
``(max_resolution/16)^2`` tokens runs on one package (the VAE's latent height and width are
dynamic over ``min_resolution/8 .. max_resolution/8`` each).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from fluxopt import (INDUCTOR, RECIPE_INDUCTOR_FLAGS, Backend, ConfigError, FluxoptError, Shapes, StackContext, Stage,
                     CudaGraphRunner, TransformerForward, has_subclass_weights, hookimpl, keep_eager_timestep_rounding, module_fingerprint,
                     private_dir, transformer_inputs, validate_inductor_flags)
from fluxopt_plugins._libstdcxx import (Children, choose_compiler, compiler_libstdcxx, likely_compiler,
                                        loaded_libstdcxx, package_loads, packages_load)


log = logging.getLogger("fluxopt.aoti")

WEIGHT_MODES = ("auto", "shared", "embedded")
# Largest relative L2 error of the package against eager on example inputs, by dtype.
SELF_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
# With quantized weights (dynamic fp8 activations), one rounding flipped by Inductor's fusion of the
# scale computation moves a whole row: one call of flux-dev-random's fp8 transformer differed from
# eager fp8 by 0.098 (H100, docs/results/2026-11-26-h100-issue15i.md), where the packages that
# computed another function (the timestep rounding bug) scored 0.39 to 0.51.
QUANTIZED_SELF_CHECK_TOLERANCE = 0.25
TRANSFORMER_PACKAGE = "transformer.pt2"
VAE_PACKAGE = "vae_decoder.pt2"
# the child loads the package as this process will (open_package)
PROBE_CODE = "import sys; from pathlib import Path; from fluxopt_plugins.aoti import open_package; open_package(Path(sys.argv[1]), False)"
PROBE_TIMEOUT_S = 600


@dataclass
class AotiOptions:
    # Inductor's GEMM/conv autotuning at compile time. Off: a bake-off must build in minutes, and it
    # buys nothing measurable at FLUX's shapes (on the H100 no Inductor candidate beat cuBLAS for any
    # fp8 GEMM, at ~96 s of tuning per shape; on the H200 a bf16 build with it ran past 570 s)
    max_autotune: bool = False
    # the recipe's Inductor flags (conv_1x1_as_mm, coordinate descent, no epilogue fusion). Off, as
    # for compile: coordinate descent re-tunes every kernel in each build (on the H200 it gained
    # 1.1 % per step for 20-90 s of every build; docs/results/2026-12-03-h200-cd-tuning/)
    tuning_flags: bool = False
    inductor_config: dict[str, Any] = field(default_factory=dict)  # extra Inductor options for AOTI
    # keep eager's rounding of the scaled timestep/guidance (fluxopt.kit.eager_rounding): without it
    # the fused embedding sees 699.2 where eager sees 700.0 (bf16) and the images drift
    eager_rounding: bool = True
    cuda_graphs: bool = True  # record/replay the loaded package under CUDA graphs (GPU only)
    dynamic: bool = False  # dynamic image-token dimension (one package for a range of resolutions)
    min_resolution: int = 256  # dynamic: smallest square side covered, in pixels (multiple of 16)
    max_resolution: int = 1024  # dynamic: largest square side covered, in pixels (multiple of 16)
    # auto (shared, embedded for quantized weights) | shared (the live weights bound at load) | embedded (in the package)
    weights: str = "auto"
    release_weights: bool = True  # free the live transformer's weights (the package has its own copy)
    self_check: bool = True  # compare the package's output with eager on example inputs before using it
    # largest relative L2 error of that comparison; None: by dtype (bf16 0.05), 0.25 with quantized weights
    self_check_tolerance: Optional[float] = None
    vae: bool = False  # also export + AOT-compile the VAE decoder
    # also load this package in a child process first. Off: the compiler probe (once per machine)
    # already loaded a package built by the same compiler into the same runtime, and the loader's
    # crash does not depend on the model; a fresh process loading any package took 45-58 s on the
    # H200. On for a torch build under suspicion: a crash then fails this stack, not the bake-off.
    probe_load: bool = False


# ---------------------------------------------------------------------------------- inputs
def token_range(options: AotiOptions) -> tuple[int, int]:
    return (options.min_resolution // 16) ** 2, (options.max_resolution // 16) ** 2


def signature(inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in sorted(inputs.items())}


# ---------------------------------------------------------------------------------- export
class _TransformerGraph(torch.nn.Module):
    """The transformer with tensor-only keyword inputs and a tensor output (what is exported)."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                txt_ids: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                                txt_ids=txt_ids, guidance=guidance, joint_attention_kwargs=None,
                                return_dict=False)[0]


class _VaeDecodeGraph(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z, return_dict=False)[0]


def vae_example(vae: torch.nn.Module, shapes: Shapes, device: torch.device) -> torch.Tensor:
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    dtype = next(vae.parameters()).dtype
    return torch.randn(shapes.batch_size, vae.config.latent_channels, shapes.height // scale,
                       shapes.width // scale, generator=torch.Generator().manual_seed(0)).to(device, dtype)


def inductor_configs(options: AotiOptions, weights: str) -> dict[str, Any]:
    """What the package is compiled with (the recipe flags are passed here, never set globally)."""
    configs: dict[str, Any] = {"max_autotune": options.max_autotune}
    if options.tuning_flags:
        configs.update(RECIPE_INDUCTOR_FLAGS)
    if weights == "shared":
        configs["aot_inductor.package_constants_in_so"] = False
    configs.update(options.inductor_config)
    return configs


def _export(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> Any:
    with torch.no_grad():
        return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)


def forget_traced_graphs() -> None:
    """Drop torch's reference to the last graph it traced for export: a module-level map (read
    only by its fake-tensor leak detector) keeps the traced graph, and through it the exported
    module and its weights, until the next export. Called when a build ends, however it ends: a
    stack stopped mid-build kept its transformer's 22 GiB allocated for every later stack."""
    from torch.fx.experimental import proxy_tensor

    getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", {}).clear()


# ---------------------------------------------------------------------------------- running
class AotiVaeDecode:
    """Stands in for ``AutoencoderKL.decode`` (``decode(z, return_dict=...)``)."""

    def __init__(self, run: Callable[..., torch.Tensor], dtype: torch.dtype, device: torch.device):
        self.run, self.dtype, self.device = run, dtype, device

    def __call__(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        out = self.run(z=z.to(device=self.device, dtype=self.dtype))
        if return_dict:
            from diffusers.models.autoencoders.vae import DecoderOutput

            return DecoderOutput(sample=out)
        return (out,)


class AotiLoadError(FluxoptError):
    """The AOTInductor runtime of this torch build could not load a package."""


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor stores: a tensor subclass (a quantized weight) by the tensors it is made of
    (fp8 data plus scales), not by its logical dtype, which would count a bf16 size."""
    if hasattr(tensor, "__tensor_flatten__"):  # a traceable wrapper subclass (torchao's)
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored."""
    return sum(map(tensor_bytes, itertools.chain(module.parameters(), module.buffers())))


# Writing a package with embedded weights holds them twice on disk (Inductor's serialized constants,
# then the package archive); a full disk fails deep inside torch's archive writer and aborts the
# process from a destructor, so the space is checked before the export starts.
EMBEDDED_COPIES = 2
SPACE_MARGIN_BYTES = 2 * 2**30  # compiled kernels, sources, the runtime's shared libraries


def resolve_weights(mode: str, quantized: bool) -> str:
    """``auto``: quantized (tensor-subclass) weights can only be embedded; plain ones are shared,
    which keeps them out of the compiled library and off the disk."""
    return mode if mode != "auto" else "embedded" if quantized else "shared"


def check_space(where: Path, modules: list[torch.nn.Module], weights: str) -> None:
    """Refuse to build when the disk holding ``where`` (the cache) cannot take the packages."""
    need = SPACE_MARGIN_BYTES + (EMBEDDED_COPIES * sum(map(weight_bytes, modules)) if weights == "embedded" else 0)
    free = shutil.disk_usage(where).free
    if free < need:
        raise ConfigError(f"aoti needs about {need / 2**30:.2f} GiB free to write its packages (weights "
                          f"{weights}), the disk holding {where} has {free / 2**30:.2f} GiB: free space there, "
                          "set cache.dir to a larger disk, or use backend.aoti.weights=shared")


def probe_load(path: Path) -> None:
    """Load ``path`` in a child process and raise AotiLoadError if that process dies.

    Why: a package that the process's runtime cannot load (an ABI mismatch of the torch build or
    of libstdc++) crashes the loading process with SIGSEGV, down to a single Linear layer; in
    process, that would take every other stack of a sweep with it."""
    proc = subprocess.run([sys.executable, "-c", PROBE_CODE, str(path)], capture_output=True, text=True,
                          timeout=PROBE_TIMEOUT_S)
    if proc.returncode == 0:
        return
    if proc.returncode < 0:
        how = f"was killed by {signal.Signals(-proc.returncode).name}"
    else:
        how = f"exited with {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}"
    raise AotiLoadError(f"aoti: a process loading the AOTInductor package {how} (torch {torch.__version__}); "
                        "packages built here cannot be loaded by this process (see stats.aoti.cxx_reason); "
                        "use backend=compile instead")


def open_package(path: Path, single_threaded: bool) -> Any:
    """The package's model, as ``torch._inductor.aoti_load_package`` returns it, without the
    description of the host that function makes first. That description serves only an advisory
    "device information mismatch" warning, and to name the CPU's vector ISA Inductor compiles and
    loads a test library per ISA in child processes; before torch 2.13 each child imports torch,
    which cost a warm aoti build most of its 42 s on the H200 (pytorch#191715). fluxopt's cache key
    already holds the GPU, torch and compiler a package was built with. The loader is built as
    torch's own ``load_package`` builds it for packages its archive reader cannot read; a torch
    whose loader is elsewhere or takes other arguments loads through the public function."""
    try:
        from torch._inductor.package.package import AOTICompiledModel

        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", single_threaded, 1, -1)
    except (ImportError, AttributeError, TypeError):
        return torch._inductor.aoti_load_package(str(path), run_single_threaded=single_threaded)
    return AOTICompiledModel(loader)


def load_package(path: Path, module: torch.nn.Module | None, prefix: str, single_threaded: bool) -> Any:
    """Load an AOTI package; with ``module``, copy its live tensors into the package's constants
    (a copy the package owns and frees with it; see the module docstring for why not zero-copy)."""
    compiled = open_package(path, single_threaded)
    if module is not None:
        live = {f"{prefix}.{name}": t.detach()
                for name, t in itertools.chain(module.named_parameters(), module.named_buffers())}
        needed = compiled.get_constant_fqns()
        missing = [n for n in needed if n not in live]
        if missing:
            raise RuntimeError(f"aoti: the package needs constants the live module lacks ({missing[:3]}...); "
                               "use backend.aoti.weights=embedded")
        compiled.load_constants({n: live[n] for n in needed}, check_full_update=True, user_managed=False)
    return compiled


# ---------------------------------------------------------------------------------- backend
class AotiBackend(Backend):
    name = "aoti"
    description = ("torch.export + AOTInductor package of the transformer (optional VAE decoder), cached on disk "
                   "for warm starts, replayed under CUDA graphs on GPU")
    options_class = AotiOptions
    stage = Stage.GRAPH
    lossless = True
    conflicts = {"trt_fp8": "both replace the transformer's execution with an ahead-of-time compiled engine "
                            "(AOTInductor package vs TensorRT engine); pick one"}

    def validate_options(self, options: AotiOptions) -> None:
        if options.weights not in WEIGHT_MODES:
            raise ConfigError(f"backend.aoti.weights={options.weights!r} is not one of {', '.join(WEIGHT_MODES)}")
        for name in ("min_resolution", "max_resolution"):
            value = getattr(options, name)
            if value % 16 or value < 32:
                raise ConfigError(f"backend.aoti.{name}={value} must be a multiple of 16 and at least 32")
        if options.min_resolution >= options.max_resolution:
            raise ConfigError("backend.aoti.min_resolution must be smaller than max_resolution")
        validate_inductor_flags("backend.aoti.inductor_config", options.inductor_config)
        if options.self_check_tolerance is not None and not 0 < options.self_check_tolerance < 1:
            raise ConfigError(f"backend.aoti.self_check_tolerance={options.self_check_tolerance} must be between 0 "
                              "and 1 (a relative L2 error), or null for the default")

    def incompatibility(self, options: AotiOptions, others: Any) -> str | None:
        # Known before anything loads: quantized weights are tensor subclasses, which a package
        # cannot bind as constants at load time (the build would refuse them after loading).
        quantizers = [e.name for e in others if e.backend.exclusive_group == "quantization"]
        if options.weights == "shared" and quantizers:
            return (f"backend.aoti.weights=shared cannot bind the quantized weights of {quantizers[0]}; "
                    "use backend.aoti.weights=embedded")
        return None

    def apply(self, pipe: Any, options: AotiOptions, ctx: StackContext) -> None:
        """Only checks: the export needs the final weights, so everything happens in ``build``."""
        if options.dynamic:
            low, high = token_range(options)
            tokens = ctx.shapes.latent_tokens
            if not low <= tokens <= high:
                raise ConfigError(
                    f"backend.aoti: {ctx.shapes.height}x{ctx.shapes.width} has {tokens} image tokens, outside the "
                    f"dynamic range {low}..{high} (min_resolution={options.min_resolution}, "
                    f"max_resolution={options.max_resolution})")

    def cache_key(self, options: AotiOptions) -> dict[str, Any]:
        """Options that change the package (replay, checks and weight release are decided at load)."""
        key = dataclasses.asdict(options)
        for name in ("cuda_graphs", "probe_load", "self_check", "self_check_tolerance", "release_weights"):
            key.pop(name)
        return key

    def build(self, pipe: Any, options: AotiOptions, ctx: StackContext) -> None:
        transformer = pipe.transformer
        device = next(transformer.parameters()).device
        dtype = transformer.dtype
        quantized = any(has_subclass_weights(m) for m in (transformer, pipe.vae))
        weights = resolve_weights(options.weights, quantized)
        if weights == "shared" and quantized:
            raise ConfigError("backend.aoti.weights=shared cannot bind tensor-subclass weights (a quantized "
                              "transformer); use backend.aoti.weights=embedded")
        from torch._inductor.cpp_builder import get_cpp_compiler  # Inductor loads in ~1.5 s: not before a build

        configured = get_cpp_compiler()
        # The compiler's probe (minutes once per machine, cached) runs beside the export and the
        # compile, which start with the compiler the probe will most likely confirm; only if it
        # rejects that one is the package compiled again with the one it accepts.
        probes: dict[str, dict[str, Any]] = {}
        guess = likely_compiler(configured)
        context = weakref.ref(ctx)
        children = Children()
        compiler_check = CompilerCheck(
            configured, lambda compilers: verified_compilers(compilers, context, probes, children))
        # a build that fails or is stopped rolls back through the context: its probes stop with it
        # (done by then on success)
        ctx.callback("aoti: stop the compiler probes", children.stop)
        undo = keep_eager_timestep_rounding(transformer) if options.eager_rounding else None
        if undo is not None:
            ctx.callback("aoti: eager timestep rounding", undo)
        rounded = undo is not None
        inputs = transformer_inputs(transformer, ctx.shapes, device, dtype)
        z = vae_example(pipe.vae, ctx.shapes, device) if options.vae else None
        configs = inductor_configs(options, weights)
        low, high = token_range(options)
        base_key = {**self.cache_key(options), "weights_mode": weights, "inductor_configs": configs,
                    "inputs": signature(inputs), "dynamic_tokens": [low, high] if options.dynamic else None,
                    "transformer": module_fingerprint(transformer, values=weights == "embedded"),
                    "vae_module": module_fingerprint(pipe.vae, values=weights == "embedded") if options.vae else None,
                    "vae_input": list(z.shape) if z is not None else None}
        key = {**base_key, "cxx": [guess, str(compiler_libstdcxx(guess))]}

        def build_packages(tmp: Path) -> None:
            check_space(ctx.cache_dir, [transformer, pipe.vae] if options.vae else [transformer], weights)
            # Inductor's compiled kernels and tuning results go to fluxopt's cache (shared with compile,
            # managed by fluxopt-cache), not /tmp: a build that is interrupted leaves them for the next one
            from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

            try:
                with temporary_cache_dir(str(private_dir(ctx.cache_dir / INDUCTOR))):
                    _build_packages(tmp)
            finally:
                forget_traced_graphs()

        def _build_packages(tmp: Path) -> None:
            dynamic_shapes = None
            if options.dynamic:
                tok = torch.export.Dim("image_tokens", min=low, max=high)
                dynamic_shapes = {k: ({1: tok} if k == "hidden_states" else {0: tok} if k == "img_ids" else None)
                                  for k in inputs}
            with ctx.timed("export"):
                program = _export(_TransformerGraph(transformer), (), inputs, dynamic_shapes)
            with ctx.timed("aoti_compile"):
                torch._inductor.aoti_compile_and_package(program, package_path=str(tmp / TRANSFORMER_PACKAGE),
                                                         inductor_configs=compiling)
            if z is not None:
                vae_dynamic = None
                if options.dynamic:
                    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
                    lh = torch.export.Dim("latent_h", min=options.min_resolution // scale,
                                          max=options.max_resolution // scale)
                    lw = torch.export.Dim("latent_w", min=options.min_resolution // scale,
                                          max=options.max_resolution // scale)
                    vae_dynamic = {"z": {2: lh, 3: lw}}
                with ctx.timed("export"):
                    program = _export(_VaeDecodeGraph(pipe.vae), (), {"z": z}, vae_dynamic)
                with ctx.timed("aoti_compile"):
                    torch._inductor.aoti_compile_and_package(program, package_path=str(tmp / VAE_PACKAGE),
                                                             inductor_configs=compiling)
            (tmp / "info.json").write_text(json.dumps({"weights": weights, "inputs": signature(inputs),
                                                       "dynamic_tokens": key["dynamic_tokens"],
                                                       "cxx": compiling["cpp.cxx"][1]},
                                                      indent=2))

        compiling = {**configs, "cpp.cxx": (None, guess)}  # passed to the compile only, never set globally
        entry = ctx.artifact(self.name, key, build_packages)
        with ctx.timed("compiler_check"):  # what is left of the probe once the compile is done
            cxx, cxx_reason = compiler_check.result()
        if cxx != guess:
            log.warning("aoti: the probe rejected %s, the compiler the package was built with; building it again "
                        "with %s", guess, cxx)
            key = {**base_key, "cxx": [cxx, str(compiler_libstdcxx(cxx))]}
            compiling = {**configs, "cpp.cxx": (None, cxx)}
            entry = ctx.artifact(self.name, key, build_packages)
        cache_info = ctx.stats.get("artifacts", {}).get(self.name, {})
        use_graphs = options.cuda_graphs and ctx.device.is_gpu
        if options.probe_load:
            with ctx.timed("load_probe"):
                probe_load(entry / TRANSFORMER_PACKAGE)
                if z is not None:
                    probe_load(entry / VAE_PACKAGE)
        with ctx.timed("load"):
            compiled = load_package(entry / TRANSFORMER_PACKAGE, transformer if weights == "shared" else None,
                                    "transformer", single_threaded=use_graphs)
            vae_compiled = None
            if z is not None:
                vae_compiled = load_package(entry / VAE_PACKAGE, pipe.vae if weights == "shared" else None, "vae",
                                            single_threaded=use_graphs)
        check: dict[str, float] = {}
        if options.self_check:
            tolerance = self_check_tolerance(options, transformer, dtype)
            with ctx.timed("self_check"), torch.no_grad():
                check["transformer_rel_l2"] = self_check(
                    "transformer", compiled(**inputs), _TransformerGraph(transformer)(**inputs), tolerance)
                if vae_compiled is not None:
                    check["vae_rel_l2"] = self_check("VAE decoder", vae_compiled(z=z), _VaeDecodeGraph(pipe.vae)(z),
                                                     options.self_check_tolerance or SELF_CHECK_TOLERANCE[z.dtype])
            check["tolerance"] = tolerance
        forward = TransformerForward(CudaGraphRunner(compiled) if use_graphs else compiled,
                                     dtypes={k: v.dtype for k, v in inputs.items()}, device=device)
        vae_decode = None
        if vae_compiled is not None:
            vae_decode = AotiVaeDecode(CudaGraphRunner(vae_compiled) if use_graphs else vae_compiled, z.dtype, device)
        ctx.callback("aoti: release the packages and their CUDA graphs",
                     lambda: release_packages(forward, vae_decode))
        released = 0
        if options.release_weights:
            released = release_weights(transformer)
        # Instance attributes shadowing the class methods, removed on close (with or without a snapshot).
        ctx.set_attr("aoti: transformer forward", transformer, "forward", forward)
        if vae_decode is not None:
            ctx.set_attr("aoti: VAE decode", pipe.vae, "decode", vae_decode)
        with ctx.timed("warmup"), torch.no_grad():  # first call; on GPU records the CUDA graph
            transformer(**inputs, return_dict=False)
            if vae_decode is not None:
                pipe.vae.decode(z, return_dict=False)
        ctx.stats["aoti"] = {
            "cache_hit": bool(cache_info.get("cache_hit")),
            "warm_start": bool(cache_info.get("cache_hit")),
            "rebuilt": cache_info.get("rebuilt"),
            "weights": weights,
            "released_weight_bytes": released,
            "cuda_graphs": use_graphs,
            "dynamic_tokens": key["dynamic_tokens"],
            "vae": options.vae,
            "cxx": cxx,
            "cxx_reason": cxx_reason,
            "compiler_probes": probes,
            "compiler_check_s": round(compiler_check.seconds, 1),  # beside the export and compile
            "compiled_twice": cxx != guess,
            "self_check": check,
            "eager_rounding": rounded,
            "package_bytes": sum(p.stat().st_size for p in entry.glob("*.pt2")),
            "inductor_cache_dir": str(ctx.cache_dir / INDUCTOR),
            "max_autotune": configs["max_autotune"],  # as compiled (inductor_config may override the option)
            "entry": entry.name,
        }


class CompilerCheck:
    """:func:`choose_compiler` in a thread of its own (its probes are child processes), so that
    the build goes on beside it; ``result()`` waits for the verdict and re-raises its error. A
    daemon thread: a stack stopped mid-build does not wait for probes it no longer needs."""

    def __init__(self, configured: str, verify: Callable[[list[str]], dict[str, tuple[bool, str]]]):
        self.seconds = 0.0
        self._outcome: tuple[str, str] | BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(configured, verify), daemon=True,
                                        name="aoti-compiler-check")
        self._thread.start()

    def _run(self, configured: str, verify: Callable[[list[str]], dict[str, tuple[bool, str]]]) -> None:
        start = time.perf_counter()
        try:
            self._outcome = choose_compiler(configured, verify=verify)
        except BaseException as exc:  # handed to the build thread by result()
            self._outcome = exc
        self.seconds = time.perf_counter() - start

    def result(self) -> tuple[str, str]:
        self._thread.join()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome


def verified_compilers(compilers: list[str], context: Callable[[], StackContext | None],
                       probes: dict[str, dict[str, Any]], children: Children) -> dict[str, tuple[bool, str]]:
    """``package_loads`` for each compiler, the uncached ones probed side by side, each verdict
    cached in the artifact cache per compiler binary and loaded libstdc++ (minutes once per
    machine). ``probes`` receives, per compiler, whether it was cached and the probe's seconds.

    ``context`` is a weak reference to the stack's context: the probes run in a thread beside the
    build, and a build that ends first (failed, stopped) must not have its pipeline held here."""
    ctx = context()
    if ctx is None:
        raise RuntimeError("aoti: the build ended before its compiler check")
    keys = {}
    for compiler in compilers:
        exe = shutil.which(compiler) or compiler
        keys[compiler] = {"compiler": os.path.realpath(exe),
                          "compiler_mtime": os.path.getmtime(exe) if os.path.exists(exe) else None,
                          "libstdcxx": str(loaded_libstdcxx())}
    missing = [c for c in compilers if ctx.artifact("aoti_compiler_check", keys[c], None) is None]
    del ctx  # not held while the probes run
    with tempfile.TemporaryDirectory() as work:
        fresh = packages_load(missing, Path(work), children)
    ctx = context()
    if ctx is None or children.stopped:  # what a stopped probe returned is no verdict: nothing cached
        raise RuntimeError("aoti: the build ended before its compiler check")
    verdicts = {}
    for compiler in compilers:
        def write(tmp: Path, compiler: str = compiler) -> None:  # an entry found above may vanish since
            ok, why, seconds = fresh[compiler] if compiler in fresh else package_loads(compiler, tmp, children)
            if children.stopped:
                raise RuntimeError("aoti: the build ended before its compiler check")
            (tmp / "verdict.json").write_text(json.dumps({"loads": ok, "why": why, "seconds": seconds}))

        entry = ctx.artifact("aoti_compiler_check", keys[compiler], write)
        verdict = json.loads((entry / "verdict.json").read_text())
        verdicts[compiler] = (bool(verdict["loads"]), verdict["why"])
        probes[compiler] = {"cached": compiler not in missing, **verdict.get("seconds", {})}
    return verdicts


class AotiMismatchError(FluxoptError):
    """The package computes a different function than the eager module it was exported from."""


def self_check_tolerance(options: AotiOptions, transformer: torch.nn.Module, dtype: torch.dtype) -> float:
    """The transformer's self-check tolerance: the user's, else by dtype, looser with quantized weights."""
    if options.self_check_tolerance is not None:
        return options.self_check_tolerance
    return QUANTIZED_SELF_CHECK_TOLERANCE if has_subclass_weights(transformer) else SELF_CHECK_TOLERANCE[dtype]


def self_check(what: str, got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> float:
    """Relative L2 error of the package's output against eager; AotiMismatchError above
    ``tolerance`` (a package that computes something else is never benchmarked)."""
    err = float((got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12))
    if not err <= tolerance:  # NaN fails too
        raise AotiMismatchError(f"aoti: the {what} package's output differs from eager by a relative L2 error of "
                                f"{err:.3g} on the example inputs (tolerance {tolerance:g}, "
                                "backend.aoti.self_check_tolerance); it computes a different function")
    return err


def release_packages(*forwards: TransformerForward | AotiVaeDecode | None) -> None:
    """Drop the loaded packages (which hold the weights bound to them) and free their CUDA graphs
    when the stack closes, whoever still references the forward that wrapped them."""
    for forward in forwards:
        if forward is None:
            continue
        if isinstance(forward.run, CudaGraphRunner):
            forward.run.release()
        forward.run = _closed


def _closed(**_: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("aoti: this package was released when its stack closed")


def release_weights(module: torch.nn.Module) -> int:
    """Point every parameter and buffer of ``module`` at an empty tensor (same dtype and device):
    an embedded package holds its own copy, so the live one would only double the memory."""
    freed = 0
    for t in itertools.chain(module.parameters(), module.buffers()):
        freed += t.numel() * t.element_size()
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    return freed


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [AotiBackend()]
