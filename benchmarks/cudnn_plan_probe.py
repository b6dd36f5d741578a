"""Where the first call of ``fp8_attention``'s cuDNN kernel spends its time, and whether a
serialized plan spares a new process that cost. In the warm bake-off the stack's first generation
took about twice its steady one with every other cache warm, and the cuDNN graph is built in every
process: if ``graph.serialize()`` carries the built plan (for cuDNN's runtime-compiled attention
kernels, the compiled code), the artifact cache could keep it across processes.

    python benchmarks/cudnn_plan_probe.py OUT_DIR

At FLUX.1-dev's attention shape (1024x1024: 4096 image + 512 text tokens, 24 heads of 128), in
this process: the graph's build (``_CudnnGraphs._build``), the same build again (what cuDNN keeps
in-process), and the first and second execution. Then a new interpreter deserializes the built
graph and executes it once: its times, and whether its output equals this process's bit for bit.
Writes OUT_DIR/cudnn_plan_probe.json (and the plan and tensors it hands the second process).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from fluxopt.files import write_json_atomic
from fluxopt_plugins._fp8_attention_kernels import _GRAPHS, P_SCALE, cudnn_frontend_version, quantize_per_tensor

SHAPE = (1, 4608, 24, 128)
SCALE = SHAPE[-1] ** -0.5


def _timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    torch.cuda.synchronize()
    return value, time.perf_counter() - start


def _pack(uids: dict[str, int], inputs: dict[str, torch.Tensor], out: torch.Tensor) -> dict[int, torch.Tensor]:
    """The variant pack of ``cudnn_fp8_attention``, keyed by the tensors' numbers."""
    one = lambda value: torch.full((1, 1, 1, 1), value, dtype=torch.float32, device="cuda")  # noqa: E731
    by_name = {"q": inputs["q"], "k": inputs["k"], "v": inputs["v"], "descale_q": inputs["dq"],
               "descale_k": inputs["dk"], "descale_v": inputs["dv"], "descale_s": one(1.0 / P_SCALE),
               "scale_s": one(P_SCALE), "scale_o": 1.0 / inputs["dv"], "o": out, "amax_s": one(0.0), "amax_o": one(0.0)}
    return {uids[name]: tensor for name, tensor in by_name.items()}


def build_here(out_dir: Path) -> dict:
    gen = torch.Generator("cuda").manual_seed(0)
    (q, dq), (k, dk), (v, dv) = (quantize_per_tensor(torch.randn(*SHAPE, generator=gen, device="cuda",
                                                                 dtype=torch.bfloat16)) for _ in range(3))
    inputs = {"q": q, "k": k, "v": v, "dq": dq, "dk": dk, "dv": dv}
    device = torch.device("cuda", torch.cuda.current_device())
    handle = _GRAPHS.handle(device)  # the library's load and the handle stay out of the times below
    (graph, t, constants), build_s = _timed(lambda: _GRAPHS._build(*SHAPE, SCALE, device, handle, uids=True))
    _, rebuild_s = _timed(lambda: _GRAPHS._build(*SHAPE, SCALE, device, handle, uids=True))
    uids = {name: uid for uid, name in enumerate(t, start=1)}
    out = torch.empty(SHAPE, dtype=q.dtype, device="cuda")
    pack = _pack(uids, inputs, out)
    _, first_s = _timed(lambda: graph.execute(pack, constants["workspace"], handle=handle))
    _, second_s = _timed(lambda: graph.execute(pack, constants["workspace"], handle=handle))
    times = {"build_s": build_s, "rebuild_s": rebuild_s, "first_execute_s": first_s, "second_execute_s": second_s}
    try:
        payload = bytes(graph.serialize())
    except Exception as exc:  # noqa: BLE001 - the answer is that this plan does not serialize
        return {**times, "serialize_error": f"{type(exc).__name__}: {exc}"}
    (out_dir / "plan.bin").write_bytes(payload)
    torch.save({"inputs": {name: x.cpu() for name, x in inputs.items()}, "out": out.cpu(), "uids": uids},
               out_dir / "tensors.pt")
    return {**times, "serialized_bytes": len(payload)}


def load_elsewhere(out_dir: Path) -> dict:
    """In a new interpreter: the plan deserialized and executed once, against this process's output."""
    import cudnn

    saved = torch.load(out_dir / "tensors.pt")
    inputs = {name: x.cuda() for name, x in saved["inputs"].items()}
    handle = _GRAPHS.handle(torch.device("cuda", torch.cuda.current_device()))
    graph = cudnn.pygraph(handle=handle)
    _, deserialize_s = _timed(lambda: graph.deserialize(handle, (out_dir / "plan.bin").read_bytes()))  # (handle, data)
    workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device="cuda")
    out = torch.empty(SHAPE, dtype=inputs["q"].dtype, device="cuda")
    _, first_s = _timed(lambda: graph.execute(_pack(saved["uids"], inputs, out), workspace, handle=handle))
    return {"deserialize_s": deserialize_s, "first_execute_s": first_s,
            "bitwise_equal": bool(torch.equal(out.cpu().view(torch.uint8), saved["out"].view(torch.uint8)))}


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn_frontend": cudnn_frontend_version()[0], "cudnn": cudnn_frontend_version()[1],
              "shape": list(SHAPE), "this_process": build_here(out)}
    if "serialized_bytes" in record["this_process"]:
        child = subprocess.run([sys.executable, __file__, "--load", str(out)], capture_output=True, text=True)
        record["new_process"] = (json.loads(child.stdout.strip().splitlines()[-1]) if child.returncode == 0
                                 else {"error": child.stderr.strip().splitlines()[-3:] or [f"exit {child.returncode}"]})
    write_json_atomic(out / "cudnn_plan_probe.json", record)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--load"]:
        print(json.dumps(load_elsewhere(Path(sys.argv[2]))))
    else:
        main(sys.argv[1])
