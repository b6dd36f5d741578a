"""fp8 attention against the bf16 kernels at FLUX.1-dev's attention shape (1024x1024: 4096 image +
512 text tokens, 24 heads of 128), timed and checked with the ``attention`` backend's own
benchmark (median of CUDA-event timings, relative L2 error against SDPA's math kernel in fp32).

    python benchmarks/attention_fp8_bench.py OUT.json

Rows: cuDNN bf16 (the default of compiled stacks) and flash (FA2) through diffusers' dispatcher;
``fp8_attention``'s cuDNN kernel on already-quantized inputs (the kernel and its output's dequantization) and with its
per-tensor quantization of q, k, v included (as a stack runs it, but eager: under torch.compile
the quantization fuses into the kernels producing q, k and v); the reference kernel's error only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fluxopt_plugins._fp8_attention_kernels import (attention_fp8, cudnn_fp8_attention, cudnn_frontend_version,
                                                    quantize_per_tensor)
from fluxopt.files import write_json_atomic
from fluxopt_plugins.attention import _dispatch, benchmark_kernels


def main(out_path: str) -> None:
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4608, 24, 128, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        reference = _dispatch("_native_math")(q.float(), k.float(), v.float())
    (q8, dq), (k8, dk), (v8, dv) = quantize_per_tensor(q), quantize_per_tensor(k), quantize_per_tensor(v)
    scale = q.shape[-1] ** -0.5
    kernels = {
        "_native_cudnn (bf16)": _dispatch("_native_cudnn"),
        "_native_flash (bf16)": _dispatch("_native_flash"),
        "fp8 cudnn, kernel only": lambda q, k, v: cudnn_fp8_attention(q8, k8, v8, dq, dk, dv, scale).float() * dv,
        "fp8 cudnn, with quantization": lambda q, k, v: attention_fp8(q, k, v, "cudnn"),
    }
    # fp8 on random inputs errs by a few per cent (the output averages thousands of values of v):
    # the bound here only keeps a broken kernel from being timed; the image gate judges fidelity
    results = benchmark_kernels(kernels, q, k, v, reference, iterations=20, max_rel_error=0.15)
    ref_fp8 = attention_fp8(q, k, v, "reference").float()
    fp8_out = attention_fp8(q, k, v, "cudnn").float()
    results["fp8 reference (plain torch)"] = {
        "rel_error": float((ref_fp8 - reference).norm() / reference.norm()),
        "rel_error_vs_cudnn_fp8": float((ref_fp8 - fp8_out).norm() / ref_fp8.norm())}
    frontend, library = cudnn_frontend_version()
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn_frontend": frontend,
              "cudnn": library, "shape": list(q.shape), "kernels": results}
    write_json_atomic(Path(out_path), record)
    print_rows(results)


def print_rows(results: dict[str, dict], width: int = 32) -> None:
    """One line per kernel: its name, then each of its figures."""
    for name, r in results.items():
        print(f"{name:{width}s} " + " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                                            for key, value in r.items()))


if __name__ == "__main__":
    main(sys.argv[1])
