"""Does a closed aoti stack leave GPU memory allocated, and who holds it?

    python benchmarks/aoti_leak_probe.py [model=flux-dev-random] [--size 1024] [--steps 28]

The bake-off loads a fresh pipeline per stack, applies the stack without a snapshot and drops
the pipeline after closing it. On the H100 (2026-11-25, call F) every stack measured after an
aoti stack with ``weights=shared`` had ~22 GiB more peak memory: one transformer's weights.
This does the same as the bake-off (``restorable=False``, close, drop the pipeline), with and
without CUDA graphs, and prints, as one JSON line per case, the GPU memory allocated before
loading, with the stack applied and after it was dropped, and the CUDA tensors of at least
64 MiB that Python objects still reference (with their referrers' types): none while memory
stays allocated means the holder is outside Python (the AOTInductor runtime).
The aoti package comes from the artifact cache when a bake-off built it with the same shapes.
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

import fluxopt

BIG = 64 * 2**20


def allocated() -> int:
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def python_held_cuda_tensors() -> list[dict]:
    found = []
    for obj in gc.get_objects():
        try:
            if not (isinstance(obj, torch.Tensor) and obj.is_cuda and obj.untyped_storage().nbytes() >= BIG):
                continue
        except Exception:  # noqa: BLE001 - tensor subclasses, freed storages
            continue
        referrers = sorted({type(r).__name__ for r in gc.get_referrers(obj) if r is not found})
        found.append({"shape": list(obj.shape), "bytes": obj.untyped_storage().nbytes(), "referrers": referrers})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flux-dev-random")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    args = parser.parse_args()
    for cuda_graphs in (True, False):
        start = allocated()
        pipe = fluxopt.load_model(args.model, device="cuda", dtype="bfloat16")
        loaded = allocated()
        stack = {"aoti": {"max_autotune": False, "tuning_flags": False, "weights": "shared", "probe_load": False,
                          "cuda_graphs": cuda_graphs}}
        applied = fluxopt.apply_stack(pipe, stack, height=args.size, width=args.size, steps=args.steps,
                                      restorable=False)
        with_stack = allocated()
        applied.close()
        closed = allocated()
        del pipe, applied
        dropped = allocated()
        held = python_held_cuda_tensors() if dropped - start > BIG else []
        print(json.dumps({"cuda_graphs": cuda_graphs, "gib": {
            name: round((value - start) / 2**30, 2) for name, value in
            (("loaded", loaded), ("applied", with_stack), ("closed", closed), ("dropped", dropped))},
            "python_held_big_cuda_tensors": held[:20], "n_python_held": len(held)}), flush=True)


if __name__ == "__main__":
    main()
