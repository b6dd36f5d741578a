"""torchao quantization of the FLUX transformer's Linear layers (stage WEIGHTS, lossy).

One backend per torchao config: ``torchao_fp8`` (dynamic float8 activations and weights, the
flux-fast recipe), ``torchao_fp8_static`` (float8 activations with scales calibrated at build
time), ``torchao_fp8_weight_only``, ``torchao_int8`` (int8 weight-only, also runs on
the CPU), ``torchao_int8_dynamic`` (dynamic int8 activations and weights) and ``torchao_int4``
(int4 weight-only, CUDA). All share the module selection: Linear layers of ``pipe.transformer``
whose qualified name does not start with a ``skip`` prefix and whose in/out features are both
at least ``min_features`` (tiny layers gain nothing and lose precision). The embedders and the
final projection are skipped by default, as they are the most precision-sensitive.

The rule: a backend's process-wide settings are the stack's, undone when it closes. torchao's
configs set "recommended" Inductor flags process-wide by default (coordinate-descent tuning among
them) and never restore them: every later stack of the process would build with them, for
minutes instead of seconds (most of a ten-times-longer first build was coordinate-descent
tuning). So fluxopt turns that off and offers the same flags as ``inductor_tuning=true``, scoped
to the stack.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fluxopt import Backend, ConfigError, Package, Requirements, StackContext, Stage, hookimpl
from fluxopt_plugins._calibration import (CALIBRATION_PROMPTS, cached_calibration, calibration_key, run_calibration,
                                          validate_prompts)


log = logging.getLogger(__name__)
TORCHAO = Package("torchao", "pip install 'fluxopt[torchao]'")
MSLK = Package("mslk", "pip install 'fluxopt[mslk]' (torchao's Hopper kernels: int4 'plain'/'preshuffled', "
               "float8 per row)")
DEFAULT_SKIP = ["x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out"]
FP8_GRANULARITIES = ("row", "tensor")
FP8_KERNELS = ("auto", "torch", "mslk")
INT4_PACKING = ("auto", "tile_packed_to_4d", "plain", "preshuffled")
# What torchao.quantization.utils.recommended_inductor_config_setter sets globally (torchao 0.18).
TORCHAO_INDUCTOR_FLAGS = {
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "force_fuse_int_mm_with_mul": True,
    "fx_graph_cache": True,
    "triton.unique_kernel_names": True,
}


def _selected(module: torch.nn.Module, fqn: str, options: Any) -> bool:
    if not isinstance(module, torch.nn.Linear):
        return False
    if any(fqn == p or fqn.startswith(p + ".") for p in options.skip):
        return False
    return min(module.in_features, module.out_features) >= options.min_features


@dataclass
class TorchaoOptions:
    skip: list[str] = field(default_factory=lambda: list(DEFAULT_SKIP))  # module-name prefixes left alone
    min_features: int = 0  # skip Linear layers with in_features or out_features below this
    # torchao's recommended Inductor flags (coordinate-descent tuning...) for this stack only: minutes
    # more compile with torch.compile, for kernels tuned to the shapes
    inductor_tuning: bool = False


@dataclass
class TorchaoFp8Options(TorchaoOptions):
    granularity: str = "row"  # row (PerRow scales) | tensor (one scale per tensor)
    # which kernels quantize the activations and multiply: auto (mslk's where torchao would pick them:
    # Hopper or newer with mslk installed, per row; else torch's) | torch (aten ops and torch._scaled_mm,
    # which Inductor can fuse) | mslk (its Triton row quantization and CUTLASS GEMM, opaque to Inductor)
    kernel_preference: str = "auto"


@dataclass
class TorchaoFp8StaticOptions(TorchaoOptions):
    calibration_prompts: list[str] = field(default_factory=lambda: list(CALIBRATION_PROMPTS))
    calibration_seed: int = 1234  # generator seed of the calibration generations


@dataclass
class TorchaoInt4Options(TorchaoOptions):
    group_size: int = 128  # weights per scale/zero-point group
    # auto (preshuffled on Hopper where mslk is installed, else tile_packed_to_4d) | tile_packed_to_4d
    # (tinygemm: any CUDA GPU, no extra package, made for decoding) | plain | preshuffled (mslk)
    packing_format: str = "auto"


@dataclass
class TorchaoInt8DynamicOptions(TorchaoOptions):
    # cuBLAS's int8 GEMM takes nn.Linear's [N, K] weight as it is stored, through its transposed view
    # (column-major); false: torchao's own eager path, which copies it row-major on every call
    column_major_weight: bool = True
    # leave the AdaLayerNorm modulation Linears in bf16: fed the [batch, dim] conditioning vector, their
    # GEMMs have batch-many rows, which torch._int_mm refuses at 16 or fewer (torch.compile fails on them)
    skip_modulation: bool = True


class _TorchaoBackend(Backend):
    stage = Stage.WEIGHTS
    lossless = False
    options_class = TorchaoOptions
    requires = Requirements(packages=(TORCHAO,))

    exclusive_group = "quantization"
    exclusive_reason = "both quantize the transformer's Linear weights (one quantization per stack)"
    fp8_matmuls = False  # the GEMMs themselves run in float8 (not only the stored weights)

    def make_config(self, options: Any) -> Any:
        raise NotImplementedError

    def validate_options(self, options: Any) -> None:
        if options.min_features < 0:
            raise ConfigError(f"backend.{self.name}.min_features must be >= 0 (got {options.min_features})")

    def selected_linears(self, transformer: torch.nn.Module, options: Any) -> set[str]:
        """Qualified names of the Linear layers this stack quantizes."""
        return {fqn for fqn, m in transformer.named_modules() if _selected(m, fqn, options)}

    def apply(self, pipe: Any, options: Any, ctx: StackContext) -> None:
        transformer = pipe.transformer
        chosen = self.selected_linears(transformer, options)
        if not chosen:
            raise ConfigError(f"backend.{self.name} selects no Linear layer (skip={options.skip}, "
                              f"min_features={options.min_features})")
        if options.inductor_tuning:
            ctx.set_config(f"{self.name}: torchao Inductor flags", torch._inductor.config, TORCHAO_INDUCTOR_FLAGS)
        self.quantize(pipe, options, ctx)
        total = sum(isinstance(m, torch.nn.Linear) for m in transformer.modules())
        ctx.stats.setdefault("quantized_linears", {})[self.name] = {"quantized": len(chosen), "linears": total}
        if self.fp8_matmuls:
            ctx.stats.setdefault("compute_precision", {})["gemm"] = "fp8"

    def quantize(self, pipe: Any, options: Any, ctx: StackContext) -> None:
        """Quantize the selected Linear layers of ``pipe.transformer`` with ``make_config``'s config."""
        from torchao.quantization import quantize_

        config = dataclasses.replace(self.make_config(options), set_inductor_config=False)  # no global side effect
        chosen = self.selected_linears(pipe.transformer, options)
        with ctx.timed("quantize"):
            quantize_(pipe.transformer, config, filter_fn=lambda m, fqn: fqn in chosen)
        ctx.note(f"{self.name}: the selected Linear layers' weights quantized ({type(config).__name__})")


class TorchaoFp8(_TorchaoBackend):
    name = "torchao_fp8"
    description = "torchao float8 dynamic activations + float8 weights (Float8DynamicActivationFloat8WeightConfig)"
    options_class = TorchaoFp8Options
    requires = Requirements(nvidia=True, min_compute_capability=(8, 9), packages=(TORCHAO,))
    fp8_matmuls = True

    def validate_options(self, options: TorchaoFp8Options) -> None:
        super().validate_options(options)
        if options.granularity not in FP8_GRANULARITIES:
            raise ConfigError(f"backend.{self.name}.granularity={options.granularity!r} is not one of "
                              f"{', '.join(FP8_GRANULARITIES)}")
        if options.kernel_preference not in FP8_KERNELS:
            raise ConfigError(f"backend.{self.name}.kernel_preference={options.kernel_preference!r} is not one of "
                              f"{', '.join(FP8_KERNELS)}")
        if options.kernel_preference == "mslk" and options.granularity != "row":
            raise ConfigError(f"backend.{self.name}.kernel_preference=mslk needs granularity=row (mslk's float8 "
                              f"GEMM scales per row); this stack has granularity={options.granularity}")

    def unmet_requirement(self, options: TorchaoFp8Options, device: Any) -> str | None:
        unmet = super().unmet_requirement(options, device)
        if unmet is None and options.kernel_preference == "mslk":
            unmet = Requirements(min_compute_capability=(9, 0), packages=(MSLK,)).unmet(device)
        return unmet

    def quantize(self, pipe: Any, options: TorchaoFp8Options, ctx: StackContext) -> None:
        kernels = resolve_fp8_kernels(options, ctx.device)
        ctx.stats.setdefault(self.name, {})["kernel_preference"] = kernels
        super().quantize(pipe, dataclasses.replace(options, kernel_preference=kernels), ctx)

    def make_config(self, options: TorchaoFp8Options) -> Any:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor
        from torchao.quantization.quantize_.common import KernelPreference

        granularity = PerRow() if options.granularity == "row" else PerTensor()
        return Float8DynamicActivationFloat8WeightConfig(granularity=granularity,
                                                         kernel_preference=KernelPreference(options.kernel_preference))


def resolve_fp8_kernels(options: TorchaoFp8Options, device: Any) -> str:
    """``auto``: the kernels torchao's own ``AUTO`` would run (mslk's on sm90 or newer where mslk is
    installed, for per-row scales; torch's otherwise), named before quantizing, so that the record
    says which ran rather than leaving it to what happened to be installed. torchao decides per call
    and cannot be asked, so this repeats its 0.18 rule (``Float8Tensor``'s linear); the ``torchao``
    extra stays below 0.19 until the rule is read again."""
    if options.kernel_preference != "auto":
        return options.kernel_preference
    hopper_or_newer = device.is_gpu and not device.rocm and (device.capability or (0, 0)) >= (9, 0)
    return "mslk" if hopper_or_newer and options.granularity == "row" and not MSLK.missing() else "torch"


class TorchaoFp8Static(_TorchaoBackend):
    """Why static: a dynamic per-row scale costs an amax pass over every GEMM input before the
    GEMM can start (19 ms of the fp8 stack's 100 ms step on the H100); a scale fixed at build time
    leaves a divide-and-cast that Inductor can fuse into the op producing the input."""

    name = "torchao_fp8_static"
    description = ("torchao float8 static activations (one scale per layer, calibrated at build time on "
                   "calibration_prompts) + float8 weights (Float8StaticActivationFloat8WeightConfig)")
    options_class = TorchaoFp8StaticOptions
    requires = Requirements(nvidia=True, min_compute_capability=(8, 9), packages=(TORCHAO,))
    fp8_matmuls = True

    def validate_options(self, options: TorchaoFp8StaticOptions) -> None:
        super().validate_options(options)
        problem = validate_prompts(f"backend.{self.name}.calibration_prompts", options.calibration_prompts)
        if problem:
            raise ConfigError(problem)

    def quantize(self, pipe: Any, options: TorchaoFp8StaticOptions, ctx: StackContext) -> None:
        """Observers on the selected layers, calibration generations, then float8 with each layer's scale."""
        from torchao.prototype.quantization.quant_api import Float8ObservedLinear
        from torchao.quantization import Float8StaticActivationFloat8WeightConfig, quantize_

        chosen = self.selected_linears(pipe.transformer, options)
        with ctx.timed("quantize"):
            quantize_(pipe.transformer, Float8StaticActivationFloat8WeightConfig(step="prepare", set_inductor_config=False),
                      filter_fn=lambda m, fqn: fqn in chosen)
        observed = {fqn: m.input_act_obs for fqn, m in pipe.transformer.named_modules()
                    if isinstance(m, Float8ObservedLinear)}
        stats_names = [f"{fqn}.{bound}" for fqn in observed for bound in ("min_val", "max_val")]

        def observe() -> dict[str, torch.Tensor]:
            with ctx.timed("calibrate"):
                run_calibration(pipe, options.calibration_prompts, options.calibration_seed, ctx.shapes)
            return {f"{fqn}.{bound}": getattr(obs, bound) for fqn, obs in observed.items()
                    for bound in ("min_val", "max_val") if hasattr(obs, bound)}

        key = calibration_key(pipe, ctx, self.name, options.calibration_prompts, options.calibration_seed)
        measured, cached = cached_calibration(ctx, self.name, key, stats_names, observe)
        if cached:
            device = next(pipe.transformer.parameters()).device
            for fqn, obs in observed.items():
                obs.min_val, obs.max_val = (measured[f"{fqn}.{b}"].to(device) for b in ("min_val", "max_val"))
        ctx.stats.setdefault(self.name, {})["calibration"] = "cached" if cached else "measured"
        with ctx.timed("quantize"):
            quantize_(pipe.transformer, Float8StaticActivationFloat8WeightConfig(step="convert", set_inductor_config=False),
                      filter_fn=lambda m, fqn: isinstance(m, Float8ObservedLinear))
        ctx.note(f"{self.name}: the selected Linear layers float8 with calibrated activation scales")


class TorchaoFp8WeightOnly(_TorchaoBackend):
    name = "torchao_fp8_weight_only"
    description = "torchao float8 weight-only quantization (Float8WeightOnlyConfig)"
    requires = Requirements(nvidia=True, min_compute_capability=(8, 9), packages=(TORCHAO,))

    def make_config(self, options: TorchaoOptions) -> Any:
        from torchao.quantization import Float8WeightOnlyConfig

        return Float8WeightOnlyConfig()


class TorchaoInt8(_TorchaoBackend):
    name = "torchao_int8"
    description = "torchao int8 weight-only quantization (Int8WeightOnlyConfig); CPU and GPU"

    def make_config(self, options: TorchaoOptions) -> Any:
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()


class TorchaoInt8Dynamic(_TorchaoBackend):
    """Why the weight's layout is the stack's business: torchao 0.18's eager int8 linear hands
    ``torch._int_mm`` the weight's transposed view, and its ``safe_int_mm`` copies that to row-major
    before every call. On the H200, cuBLAS runs FLUX's GEMMs with that row-major right-hand matrix
    at about 112 int8 TOPS, against 615-820 with the column-major view, which gives the same
    integers (docs/results/2026-12-04-h200-int8-mm-layout.json): the stack ran at a seventh of
    bf16's speed. With ``column_major_weight`` the stack swaps in a ``safe_int_mm``
    that passes the view as it is wherever cuBLAS takes it, and leaves every other case (CPU,
    torch.compile's tracing, shapes cuBLAS refuses) to torchao's.

    Why the modulation Linears stay bf16 (``skip_modulation``): their GEMMs have one row per image,
    and ``torch._int_mm`` refuses 16 rows or fewer. Eager, torchao catches that error and multiplies
    in float32 after formatting the input for a fake-tensor check, eight device syncs a call (608 a
    step on FLUX.1); compiled, nothing catches the error and the build fails."""

    name = "torchao_int8_dynamic"
    description = "torchao dynamic int8 activations + int8 weights (Int8DynamicActivationInt8WeightConfig); CPU and GPU"
    options_class = TorchaoInt8DynamicOptions

    def make_config(self, options: TorchaoInt8DynamicOptions) -> Any:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        return Int8DynamicActivationInt8WeightConfig()

    def selected_linears(self, transformer: torch.nn.Module, options: TorchaoInt8DynamicOptions) -> set[str]:
        chosen = super().selected_linears(transformer, options)
        return chosen - modulation_linears(transformer) if options.skip_modulation else chosen

    def quantize(self, pipe: Any, options: TorchaoInt8DynamicOptions, ctx: StackContext) -> None:
        if options.column_major_weight:
            from torchao.kernel import intmm

            ctx.set_attr(f"{self.name}: int8 GEMMs on the column-major weight (torchao.kernel.intmm.safe_int_mm)",
                         intmm, "safe_int_mm", column_major_int_mm(intmm.safe_int_mm))
        super().quantize(pipe, options, ctx)


def modulation_linears(transformer: torch.nn.Module) -> set[str]:
    """The Linear layers of the transformer's AdaLayerNorm modules, which project the conditioning
    vector (one row per image) to each block's shift, scale and gate."""
    from diffusers.models.normalization import (AdaLayerNorm, AdaLayerNormContinuous, AdaLayerNormSingle,
                                                AdaLayerNormZero, AdaLayerNormZeroSingle)

    norms = (AdaLayerNorm, AdaLayerNormContinuous, AdaLayerNormSingle, AdaLayerNormZero, AdaLayerNormZeroSingle)
    return {f"{fqn}.{name}" if fqn else name for fqn, m in transformer.named_modules() if isinstance(m, norms)
            for name, child in m.named_children() if isinstance(child, torch.nn.Linear)}


def column_major_int_mm(safe_int_mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                        ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``safe_int_mm`` that calls ``torch._int_mm`` on a column-major ``mat2`` as it is, where
    cuBLAS takes it: plain CUDA tensors outside tracing, a contiguous input of more than 16 rows, and
    inner and outer sizes that are multiples of 8 (``torch._int_mm``'s own conditions). Anything
    else goes to ``safe_int_mm`` unchanged, ROCm too: its int8 GEMMs with this layout are unmeasured."""

    def int_mm(input: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
        if (type(input) is torch.Tensor and type(mat2) is torch.Tensor and input.is_cuda and mat2.is_cuda
                and torch.version.hip is None and not torch.compiler.is_compiling()
                and input.dim() == 2 and mat2.dim() == 2
                and input.is_contiguous() and mat2.t().is_contiguous() and input.shape[0] > 16
                and input.shape[1] % 8 == 0 and mat2.shape[1] % 8 == 0 and input.shape[1] == mat2.shape[0]):
            return torch._int_mm(input, mat2)
        return safe_int_mm(input, mat2)

    return int_mm


def resolve_int4_packing(packing_format: str, device: Any) -> str:
    """``auto``: mslk's preshuffled kernels where they exist (Hopper with mslk installed), else
    tinygemm's. tinygemm is made for decoding, a few rows per GEMM: at FLUX's thousands of image
    tokens a generation takes minutes, where mslk's mixed-input GEMM runs near bf16 speed."""
    if packing_format != "auto":
        return packing_format
    return "preshuffled" if _hopper(device) and not MSLK.missing() else "tile_packed_to_4d"


def _hopper(device: Any) -> bool:
    """Where mslk's int4 kernels are built for (CUTLASS's sm90 mixed-input GEMM)."""
    return device.is_gpu and not device.rocm and device.capability is not None and device.capability[0] == 9


class TorchaoInt4(_TorchaoBackend):
    name = "torchao_int4"
    description = "torchao int4 weight-only quantization (Int4WeightOnlyConfig), CUDA"
    options_class = TorchaoInt4Options
    requires = Requirements(nvidia=True, packages=(TORCHAO,))

    def unmet_requirement(self, options: TorchaoInt4Options, device: Any) -> str | None:
        packages = (TORCHAO, MSLK) if options.packing_format in ("plain", "preshuffled") else (TORCHAO,)
        return Requirements(nvidia=True, packages=packages).unmet(device)

    def validate_options(self, options: TorchaoInt4Options) -> None:
        super().validate_options(options)
        if options.packing_format not in INT4_PACKING:
            raise ConfigError(f"backend.{self.name}.packing_format={options.packing_format!r} is not one of "
                              f"{', '.join(INT4_PACKING)}")
        if options.group_size not in (32, 64, 128, 256):
            raise ConfigError(f"backend.{self.name}.group_size must be 32, 64, 128 or 256 (got {options.group_size})")

    def quantize(self, pipe: Any, options: TorchaoInt4Options, ctx: StackContext) -> None:
        packing = resolve_int4_packing(options.packing_format, ctx.device)
        ctx.stats.setdefault(self.name, {})["packing_format"] = packing
        if options.packing_format == "auto" and _hopper(ctx.device) and MSLK.missing():
            log.warning("%s: mslk is not installed, so int4 runs on tinygemm, which takes minutes per image at "
                        "thousands of tokens; %s", self.name, MSLK.install)
        super().quantize(pipe, dataclasses.replace(options, packing_format=packing), ctx)

    def make_config(self, options: TorchaoInt4Options) -> Any:
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=options.group_size, int4_packing_format=options.packing_format)


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [TorchaoFp8(), TorchaoFp8Static(), TorchaoFp8WeightOnly(), TorchaoInt8(), TorchaoInt8Dynamic(), TorchaoInt4()]
