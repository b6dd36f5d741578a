"""torch._int_mm at FLUX.1-dev's linear shapes with the weight in each layout, against the bf16
matmul: whether ``torchao_int8_dynamic``'s eager slowness (7x bf16's step time on the H200,
docs/results/2026-12-03-h200-int4/) is the layout torchao hands cuBLAS. torchao 0.18's eager
int8 linear passes ``qdata.contiguous().t()``, which its ``safe_int_mm`` makes contiguous again:
a row-major right-hand matrix, where cuBLAS's int8 tensor-core kernels take a column-major one
(the transposed view of the row-major ``[N, K]`` weight, free to make).

    python benchmarks/int8_mm_layout_bench.py OUT.json

Each row: median ms (torch.utils.benchmark, which synchronises CUDA), and TOPS. Needs torch
alone, so it runs on the GPU machine's stock image with nothing carried.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.utils.benchmark as benchmark

TOKENS = 4096 + 512  # 1024x1024's image tokens and the text tokens, as the joint blocks see them
SHAPES = {"qkv/out (3072x3072)": (3072, 3072), "mlp up (3072->12288)": (3072, 12288),
          "mlp down (12288->3072)": (12288, 3072), "single block out (15360->3072)": (15360, 3072)}


def main(out_path: str) -> None:
    gen = torch.Generator("cuda").manual_seed(0)
    rows = []
    for label, (k, n) in SHAPES.items():
        x = torch.randint(-127, 128, (TOKENS, k), generator=gen, device="cuda", dtype=torch.int8)
        weight = torch.randint(-127, 128, (n, k), generator=gen, device="cuda", dtype=torch.int8)  # nn.Linear's [N, K]
        x_bf16, w_bf16 = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        cases = {
            "bf16 matmul (x @ w.t())": lambda: x_bf16 @ w_bf16.t(),
            "int_mm, column-major weight (w.t())": lambda: torch._int_mm(x, weight.t()),
            "int_mm, row-major weight (w.t().contiguous(), as torchao's eager path)":
                lambda: torch._int_mm(x, weight.t().contiguous()),
        }
        reference = cases["int_mm, column-major weight (w.t())"]()
        assert torch.equal(reference, torch._int_mm(x, weight.t().contiguous())), "layouts disagree"
        for case, fn in cases.items():
            ms = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0).median * 1e3
            rows.append({"shape": label, "case": case, "ms": ms, "tops": 2 * TOKENS * k * n / ms / 1e9})
            print(f"{label:32s} {case:72s} {ms:8.3f} ms {rows[-1]['tops']:7.1f} TOPS", flush=True)
    partial = f"{out_path}.partial"
    with open(partial, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)
    os.replace(partial, out_path)  # atomic: a reader never sees half a file


if __name__ == "__main__":
    main(sys.argv[1])
