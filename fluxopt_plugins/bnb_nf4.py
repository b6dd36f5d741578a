"""Backend ``bnb_nf4``: bitsandbytes NF4 (4-bit NormalFloat) weights for the transformer and
the T5 text encoder, as in the torch.compile-and-diffusers recipe (15 GB peak for FLUX.1-dev).

diffusers/transformers normally quantize while loading (``from_pretrained(...,
quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))``).
A backend receives an already loaded pipeline, so this one re-quantizes in place: every
selected ``nn.Linear`` is replaced by a ``bnb.nn.Linear4bit`` whose ``Params4bit`` weight is
built from the loaded weight and quantized when moved to the GPU (bitsandbytes quantizes on
``.to(cuda)``). The result is numerically the load-time NF4 of the same weights, but the full
precision model must fit in memory first, so the peak-memory saving at load time is not
reproduced (steady-state memory is). A ``load_kwargs`` core hook would be needed for that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fluxopt import Backend, ConfigError, Package, Requirements, StackContext, Stage, hookimpl


BNB = Package("bitsandbytes", "pip install 'fluxopt[bnb]'")
COMPONENTS = ("transformer", "text_encoder_2")


def _skipped(fqn: str, prefixes: list[str]) -> bool:
    return any(fqn == p or fqn.startswith(p + ".") or fqn.endswith("." + p) for p in prefixes)


def replace_with_nf4(module: torch.nn.Module, skip: list[str], compute_dtype: torch.dtype, device: torch.device,
                     double_quant: bool) -> int:
    """Swap nn.Linear -> bnb.nn.Linear4bit (NF4) in place; returns how many were replaced."""
    import bitsandbytes as bnb

    count = 0
    for fqn, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{fqn}.{name}" if fqn else name
            if type(child) is not torch.nn.Linear or _skipped(full, skip):
                continue
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                    compute_dtype=compute_dtype, compress_statistics=double_quant,
                                    quant_type="nf4", device="cpu")
            new.weight = bnb.nn.Params4bit(child.weight.data.to("cpu", compute_dtype), requires_grad=False,
                                           quant_type="nf4", compress_statistics=double_quant)
            if child.bias is not None:
                new.bias = torch.nn.Parameter(child.bias.data.to("cpu", compute_dtype), requires_grad=False)
            new.requires_grad_(False)
            setattr(parent, name, new.to(device))  # Params4bit quantizes here
            count += 1
    return count


@dataclass
class BnbNF4Options:
    components: list[str] = field(default_factory=lambda: list(COMPONENTS))  # transformer, text_encoder_2
    skip: list[str] = field(default_factory=list)  # module-name prefixes (or last names) left in full precision
    double_quant: bool = False  # also quantize the quantization constants (bnb_4bit_use_double_quant)


class BnbNF4Backend(Backend):
    name = "bnb_nf4"
    description = "bitsandbytes NF4 4-bit weights for the transformer and T5 (re-quantized after loading)"
    options_class = BnbNF4Options
    stage = Stage.WEIGHTS
    lossless = False
    requires = Requirements(packages=(BNB,))  # bitsandbytes >= 0.48 runs NF4 on the CPU too
    exclusive_group = "quantization"
    exclusive_reason = "both quantize the transformer's Linear weights (one quantization per stack)"

    def validate_options(self, options: BnbNF4Options) -> None:
        unknown = [c for c in options.components if c not in COMPONENTS]
        if unknown or not options.components:
            raise ConfigError(f"backend.bnb_nf4.components={options.components} must be a non-empty subset of "
                              f"{', '.join(COMPONENTS)}")

    def apply(self, pipe: Any, options: BnbNF4Options, ctx: StackContext) -> None:
        compute_dtype = ctx.dtype
        counts = {}
        with ctx.timed("quantize"):
            for component in options.components:
                module = getattr(pipe, component)
                # transformers keeps some T5 layers in fp32 for stability (``wo``); leave them alone.
                keep = list(getattr(module, "_keep_in_fp32_modules", None) or [])
                counts[component] = replace_with_nf4(module, options.skip + keep, compute_dtype,
                                                     ctx.device.torch_device, options.double_quant)
        ctx.stats["nf4_linears"] = counts


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [BnbNF4Backend()]
