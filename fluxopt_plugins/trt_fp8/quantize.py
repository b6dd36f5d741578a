"""ModelOpt post-training quantization of the FLUX transformer (phase 1 of ``trt_fp8``).

Only ``nn.Linear`` layers are quantized (weights and input activations, per-tensor FP8 E4M3,
or INT8 with per-channel weights for SmoothQuant). ModelOpt would also put input quantizers on
LayerNorm modules with its generic presets; TensorRT only fuses Q/DQ into GEMMs, so those would
add conversions without speed, and are left out here.

Layers kept in high precision by default (``DEFAULT_KEEP_HIGH_PRECISION``), following the
``filter_func_default`` of ModelOpt's diffusers example (examples/diffusers/quantization):

* ``x_embedder``, ``context_embedder``: the first projections of the raw latents and of the T5
  embeddings, whose activations have the widest dynamic range (T5 outliers) and which cost a
  negligible share of the FLOPs;
* ``time_text_embed.*``: timestep/guidance/pooled-text MLPs, run once per step on one token;
  their error is broadcast into every block's AdaLN modulation;
* ``norm_out.*`` and the final ``proj_out``: the last AdaLN modulation and the projection that
  produces the velocity prediction, whose error goes straight into the latent update.

The attention BMMs (q/k/v, softmax) are not quantized (ModelOpt's example default,
``--quantize-mha`` off): FP8 attention needs ModelOpt's FP8 MHA export path and TensorRT
fused-attention support for the FLUX head size.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import torch

QUANT_FORMATS = ("fp8", "int8_sq")

DEFAULT_KEEP_HIGH_PRECISION = ("x_embedder", "context_embedder", "time_text_embed.*", "norm_out.*", "proj_out")

FP8_E4M3 = (4, 3)


def linear_names(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def kept_linear_names(model: torch.nn.Module, keep: Sequence[str]) -> list[str]:
    """The Linear layers (module names) that ``keep`` (fnmatch patterns on module names) holds back."""
    return [n for n in linear_names(model) if any(fnmatch.fnmatchcase(n, pat) for pat in keep)]


def quant_config(model: torch.nn.Module, quant_format: str, keep: Sequence[str],
                 smoothquant_alpha: float = 0.5) -> dict[str, Any]:
    """A ModelOpt quantization config (list form of ModelOpt 0.47) for ``model``.

    Starts from everything disabled, enables Linear weight and input quantizers, then disables
    the kept layers by their exact module names (so ``proj_out`` does not also catch the
    single blocks' ``proj_out``, as ModelOpt's LLM preset pattern ``*proj_out.*`` would).
    """
    if quant_format == "fp8":
        weight = {"num_bits": FP8_E4M3, "axis": None}
        act = {"num_bits": FP8_E4M3, "axis": None}
        algorithm: Any = "max"
    elif quant_format == "int8_sq":
        weight = {"num_bits": 8, "axis": 0}  # per output channel
        act = {"num_bits": 8, "axis": None}  # per tensor (what TensorRT's INT8 GEMMs take)
        algorithm = {"method": "smoothquant", "alpha": smoothquant_alpha}
    else:
        raise ValueError(f"quant_format={quant_format!r} is not one of {', '.join(QUANT_FORMATS)}")
    cfg: list[dict[str, Any]] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "parent_class": "nn.Linear", "cfg": weight},
        {"quantizer_name": "*input_quantizer", "parent_class": "nn.Linear", "cfg": act},
    ]
    for name in kept_linear_names(model, keep):
        cfg.append({"quantizer_name": f"{name}.*", "enable": False})
    return {"quant_cfg": cfg, "algorithm": algorithm}


def quantized_linear_names(model: torch.nn.Module) -> list[str]:
    """Linear layers whose weight quantizer is enabled after ``mtq.quantize``."""
    out = []
    for name, m in model.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if isinstance(m, torch.nn.Linear) and wq is not None and wq.is_enabled:
            out.append(name)
    return out


def calibration_loop(pipe: Any, prompts: Sequence[str], steps: int, height: int, width: int,
                     guidance_scale: float, max_sequence_length: int, seed: int = 0,
                     progress: bool = True) -> Callable[[Any], None]:
    """The ``forward_loop`` ModelOpt calls: the whole pipeline at the target resolution, so the
    activations seen are those of real denoising steps (latent output: the VAE is not needed)."""
    from tqdm.auto import tqdm

    def loop(_model: Any) -> None:
        for i, prompt in enumerate(tqdm(list(prompts), desc="trt_fp8 calibration", unit="prompt",
                                        disable=not progress)):
            generator = torch.Generator(device="cpu").manual_seed(seed + i)
            with torch.no_grad():
                pipe(prompt=prompt, height=height, width=width, num_inference_steps=steps,
                     guidance_scale=guidance_scale, max_sequence_length=max_sequence_length,
                     generator=generator, output_type="latent")

    return loop


def quantize_transformer(transformer: torch.nn.Module, forward_loop: Callable[[Any], None],
                         quant_format: str = "fp8", keep: Sequence[str] = DEFAULT_KEEP_HIGH_PRECISION,
                         smoothquant_alpha: float = 0.5) -> dict[str, Any]:
    """Insert fake-quant modules into ``transformer`` (in place) and calibrate them.

    Returns a summary: which Linear layers are quantized and which were kept.
    """
    import modelopt.torch.quantization as mtq

    cfg = quant_config(transformer, quant_format, keep, smoothquant_alpha)
    kept = kept_linear_names(transformer, keep)
    mtq.quantize(transformer, cfg, forward_loop)
    quantized = quantized_linear_names(transformer)
    return {"quant_format": quant_format, "quantized_layers": len(quantized),
            "kept_high_precision": kept, "linear_layers": len(linear_names(transformer))}
