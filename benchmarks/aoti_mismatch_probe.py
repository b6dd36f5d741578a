"""Where does the AOTInductor package of FLUX stop computing the eager function? (issue 15)

On the H100, aoti on flux-dev-random loads (system g++) but its self-check finds a relative L2
error of 0.51 against eager, while Inductor's regional compile matches (48 dB). This builds a
FLUX transformer of full width and FLUX.1-dev shapes at 1024x1024 (1 double + 1 single block,
random weights, bf16) and compares each stage against eager on the same inputs:

  export      torch.export's program run eagerly (graph capture only)
  compile     torch.compile(fullgraph) of the whole transformer (Inductor JIT, same graph)
  aoti        AOTInductor package, weights embedded
  export_decomposed   the exported program after core-ATen decompositions, run eagerly
  aoti_math / aoti_emulate_casts   the same with one thing changed

    python benchmarks/aoti_mismatch_probe.py [--double N --single M] > probe.json
    python benchmarks/aoti_mismatch_probe.py --tiny    # CPU dry run of the script itself
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


class Graph(torch.nn.Module):
    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance):
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                                txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]


def inputs(device: torch.device, dtype: torch.dtype, side: int = 1024, text: int = 4096,
           pooled: int = 768) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h = w = side // 16
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return {"hidden_states": torch.randn(1, h * w, 64, generator=g).to(device, dtype),
            "encoder_hidden_states": torch.randn(1, 512, text, generator=g).to(device, dtype),
            "pooled_projections": torch.randn(1, pooled, generator=g).to(device, dtype),
            "timestep": torch.tensor([0.7], device=device, dtype=dtype),
            "img_ids": ids.reshape(-1, 3).to(device, dtype),
            "txt_ids": torch.zeros(512, 3, device=device, dtype=dtype),
            "guidance": torch.tensor([3.5], device=device, dtype=dtype)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="small widths on the CPU, float32")
    parser.add_argument("--stages", default="export,export_decomposed,compile,aoti,aoti_math,aoti_emulate_casts",
                        help="comma-separated stages to run")
    args = parser.parse_args()
    import torch._inductor.cpp_builder as builder

    from fluxopt_plugins._libstdcxx import choose_compiler, packages_load

    work = Path(tempfile.mkdtemp())
    cxx, why = choose_compiler(builder.get_cpp_compiler(), verify=lambda cs: {c: v[:2] for c, v in packages_load(cs, work).items()})
    torch._inductor.config.cpp.cxx = (None, cxx)
    torch.manual_seed(0)
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        model = FluxTransformer2DModel(num_layers=args.double, num_single_layers=args.single, guidance_embeds=True,
                                       num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
                                       pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
        x = inputs(device, dtype, side=128, text=32, pooled=32)
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        model = FluxTransformer2DModel(num_layers=args.double, num_single_layers=args.single, guidance_embeds=True)
        x = inputs(device, dtype)
    model = model.to(device, dtype).eval()
    graph = Graph(model)
    report: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "cxx": cxx, "why": why,
                    "blocks": [args.double, args.single], "rel_l2_vs_eager": {}, "seconds": {}}
    with torch.no_grad():
        eager = graph(**x)
        again = graph(**x)
    report["rel_l2_vs_eager"]["eager_repeat"] = rel_l2(again, eager)

    wanted = set(args.stages.split(","))

    def stage(name, fn):
        if name not in wanted:
            return
        start = time.perf_counter()
        try:
            with torch.no_grad():
                out = fn()
            report["rel_l2_vs_eager"][name] = rel_l2(out, eager)
        except Exception as exc:  # noqa: BLE001 - a probe: record and go on
            report["rel_l2_vs_eager"][name] = f"{type(exc).__name__}: {str(exc)[:300]}"
        report["seconds"][name] = round(time.perf_counter() - start, 1)
        print(json.dumps({name: report["rel_l2_vs_eager"][name]}), file=sys.stderr, flush=True)

    with torch.no_grad():
        program = torch.export.export(graph, (), x, strict=False)
    stage("export", lambda: program.module()(**x))
    stage("export_decomposed", lambda: program.run_decompositions().module()(**x))
    stage("compile", lambda: torch.compile(graph, fullgraph=True)(**x))
    tmp = Path(tempfile.mkdtemp())

    def aoti(name: str, prog, configs=None):
        path = torch._inductor.aoti_compile_and_package(prog, package_path=str(tmp / f"{name}.pt2"),
                                                        inductor_configs=configs or {})
        return torch._inductor.aoti_load_package(path)(**x)

    stage("aoti", lambda: aoti("aoti", program))

    def math_program():
        with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
            return torch.export.export(graph, (), x, strict=False)

    stage("aoti_math", lambda: aoti("aoti_math", math_program()))
    stage("aoti_emulate_casts", lambda: aoti("aoti_emul", program, {"emulate_precision_casts": True}))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
