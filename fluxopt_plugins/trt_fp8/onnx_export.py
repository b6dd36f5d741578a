"""ONNX export of the ModelOpt-quantized FLUX transformer (phase 2 of ``trt_fp8``).

ModelOpt's fake-quant modules export through the TorchScript exporter (``dynamo=False``), for
which ModelOpt registers symbolics: FP8 quantizers become TensorRT's custom ops
``trt::TRT_FP8QuantizeLinear``/``trt::TRT_FP8DequantizeLinear``, INT8 ones native ONNX
QuantizeLinear/DequantizeLinear. ``finalize_fp8`` then does what ModelOpt's ``FP8QuantExporter``
does (without needing onnx-graphsurgeon): the custom ops become native opset-19+ ONNX
QuantizeLinear/DequantizeLinear with an FP8 E4M3 zero point (``saturate=1``), and each weight's
Q->DQ pair is folded into an FP8 initializer feeding the DQ, so the file holds FP8 weights (4x
smaller than FP32) and TensorRT's strongly typed parser sees explicit FP8 GEMM inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxopt import Shapes


OPSET = 20  # highest the TorchScript exporter emits; >= 19 for FP8 Q/DQ in the default domain
INPUT_NAMES = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids",
               "txt_ids", "guidance")
OUTPUT_NAME = "sample"
BATCHED = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB limit, with headroom
ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
FP8_MAX = 448.0

log = logging.getLogger("fluxopt.trt")


class FluxForExport(torch.nn.Module):
    """Positional-argument view of FluxTransformer2DModel returning the sample tensor."""

    def __init__(self, transformer: torch.nn.Module, with_guidance: bool):
        super().__init__()
        self.transformer = transformer
        self.with_guidance = with_guidance

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                                txt_ids=txt_ids, guidance=guidance if self.with_guidance else None,
                                return_dict=False)[0]


def input_names(transformer: torch.nn.Module) -> tuple[str, ...]:
    return INPUT_NAMES if transformer.config.guidance_embeds else INPUT_NAMES[:-1]


def input_shapes(transformer: torch.nn.Module, shapes: Shapes, batch: int) -> dict[str, tuple[int, ...]]:
    """What FluxPipeline passes the transformer at ``shapes`` (packed latents, padded T5 length)."""
    cfg = transformer.config
    tokens, text = shapes.latent_tokens, shapes.max_sequence_length
    out = {"hidden_states": (batch, tokens, cfg.in_channels),
           "encoder_hidden_states": (batch, text, cfg.joint_attention_dim),
           "pooled_projections": (batch, cfg.pooled_projection_dim), "timestep": (batch,),
           "img_ids": (tokens, 3), "txt_ids": (text, 3)}
    if cfg.guidance_embeds:
        out["guidance"] = (batch,)
    return out


def example_inputs(transformer: torch.nn.Module, shapes: Shapes, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of the right shapes and dtypes (ids as the pipeline builds them)."""
    param = next(transformer.parameters())
    dtype, device = param.dtype, param.device
    gen = torch.Generator().manual_seed(seed)
    sh = input_shapes(transformer, shapes, batch)
    h, w = shapes.height // 16, shapes.width // 16
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    values = {"hidden_states": torch.randn(sh["hidden_states"], generator=gen),
              "encoder_hidden_states": torch.randn(sh["encoder_hidden_states"], generator=gen),
              "pooled_projections": torch.randn(sh["pooled_projections"], generator=gen),
              "timestep": torch.full(sh["timestep"], 0.5), "img_ids": img_ids.reshape(-1, 3),
              "txt_ids": torch.zeros(sh["txt_ids"]), "guidance": torch.full((batch,), shapes.guidance_scale)}
    out = []
    for name in input_names(transformer):
        t = values[name]
        out.append(t.to(device=device, dtype=torch.float32 if name == "guidance" else dtype))
    return tuple(out)


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """aten::rms_norm for the TorchScript exporter (it has none below opset 23): x / sqrt(mean(x^2) + eps) * w."""
    from torch.onnx import symbolic_helper as sh

    shape = sh._get_const(normalized_shape, "is", "normalized_shape")
    eps_value = sh._get_const(eps, "f", "eps") if not sh._is_none(eps) else None
    dtype = x.type().scalarType()
    tdtype = {"Float": torch.float32, "Half": torch.float16, "BFloat16": torch.bfloat16}.get(dtype, torch.float32)
    if eps_value is None:
        eps_value = torch.finfo(tdtype).eps
    axes = g.op("Constant", value_t=torch.tensor([-(i + 1) for i in range(len(shape))], dtype=torch.long))
    two = g.op("Constant", value_t=torch.tensor(2.0, dtype=tdtype))
    mean_sq = g.op("ReduceMean", g.op("Pow", x, two), axes, keepdims_i=1)
    denom = g.op("Sqrt", g.op("Add", mean_sq, g.op("Constant", value_t=torch.tensor(eps_value, dtype=tdtype))))
    out = g.op("Div", x, denom)
    if not sh._is_none(weight):
        out = g.op("Mul", out, weight)
    return out


def _register_symbolics() -> None:
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, OPSET)


def torch_export(transformer: torch.nn.Module, shapes: Shapes, path: Path, batch: int = 1) -> None:
    """TorchScript ONNX export with the batch axis dynamic (TensorRT profiles pick its range)."""
    import modelopt.torch.quantization  # noqa: F401  (registers the quantizer symbolics)

    _register_symbolics()
    names = input_names(transformer)
    dynamic_axes = {n: {0: "batch"} for n in names if n in BATCHED}
    dynamic_axes[OUTPUT_NAME] = {0: "batch"}
    module = FluxForExport(transformer, transformer.config.guidance_embeds).eval()
    with torch.inference_mode():
        torch.onnx.export(module, example_inputs(transformer, shapes, batch), str(path), dynamo=False,
                          opset_version=OPSET, input_names=list(names), output_names=[OUTPUT_NAME],
                          dynamic_axes=dynamic_axes, do_constant_folding=True)


# ------------------------------------------------------------------ FP8 graph rewrite
def _constant_protos(model: Any) -> dict[str, Any]:
    """Name -> TensorProto of every initializer and Constant output (converted only when used:
    a 12B-parameter graph holds tens of GB of them)."""
    protos = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    protos[node.output[0]] = attr.t
    return protos


def _to_float32(proto: Any) -> torch.Tensor | None:
    """A float TensorProto (bf16 included) as a float32 torch tensor; None for other types."""
    import ml_dtypes
    from onnx import numpy_helper

    array = numpy_helper.to_array(proto)
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16).float()
    if array.dtype.kind != "f":
        return None
    return torch.from_numpy(np.array(array, dtype=np.float32))


def finalize_fp8(model: Any) -> dict[str, int]:
    """Rewrite TRT custom FP8 Q/DQ ops to native ONNX ones and fold weight Q/DQ into FP8 weights (in place)."""
    import onnx
    from onnx import helper

    graph = model.graph
    zp_name = "fluxopt_fp8_zero_point"
    graph.initializer.append(helper.make_tensor(zp_name, onnx.TensorProto.FLOAT8E4M3FN, [], [0.0]))
    consts = _constant_protos(model)
    consumers = Counter(i for n in graph.node for i in n.input)
    producers = {o: n for n in graph.node for o in n.output}
    removed, folded, q_outputs = set(), 0, set()
    for node in graph.node:
        if node.domain != "trt" or node.op_type not in ("TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"):
            continue
        is_q = node.op_type == "TRT_FP8QuantizeLinear"
        node.domain, node.op_type = "", "QuantizeLinear" if is_q else "DequantizeLinear"
        node.input.append(zp_name)
        if is_q:
            node.attribute.append(helper.make_attribute("saturate", 1))
            q_outputs.add(node.output[0])
    # TorchScript typed the custom Q outputs as uint8; native FP8 Q outputs are float8e4m3fn.
    for vi in graph.value_info:
        if vi.name in q_outputs:
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT8E4M3FN
    # Weight folding: Q(const weight) -> DQ  becomes  FP8 initializer -> DQ.
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain != "":
            continue
        q = producers.get(node.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in consts or consumers[q.output[0]] != 1:
            continue
        if q.input[1] not in consts:
            continue
        weight, scale = _to_float32(consts[q.input[0]]), _to_float32(consts[q.input[1]])
        if weight is None or scale is None:
            continue
        # torch's cast (round to nearest even, multi-threaded) is what ModelOpt's fake quant uses.
        fp8 = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        name = q.input[0] + "_fp8"
        tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT8E4M3FN, dims=list(fp8.shape),
                                  raw_data=fp8.view(torch.uint8).numpy().tobytes())
        graph.initializer.append(tensor)
        node.input[0] = name
        removed.add(id(q))
        folded += 1
    nodes = [n for n in graph.node if id(n) not in removed]
    _prune(graph, nodes)
    return {"weights_folded_to_fp8": folded}


def _prune(graph: Any, nodes: list[Any]) -> None:
    """Keep ``nodes`` minus those whose outputs nobody reads, and only the initializers still read."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in nodes for i in n.input} | outputs
        live = [n for n in nodes if any(o in used for o in n.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    del graph.node[:]
    graph.node.extend(nodes)
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def finalize_int8(model: Any) -> dict[str, int]:
    """INT8 Q/DQ are exported as native ONNX ops already; nothing to rewrite."""
    return {"weights_folded_to_fp8": 0}


# ------------------------------------------------------------------ inspection
@dataclasses.dataclass
class QdqSummary:
    quantize: int = 0
    dequantize: int = 0
    fp8_quantize: int = 0
    fp8_dequantize: int = 0
    int8_quantize: int = 0
    int8_dequantize: int = 0
    layers: tuple[str, ...] = ()  # module paths of the Linear layers fed by a DQ


def _node_module(node_name: str) -> str:
    """'/transformer/transformer_blocks.0/attn/to_q/input_quantizer/QuantizeLinear' -> 'transformer_blocks.0.attn.to_q'."""
    parts = [p for p in node_name.split("/") if p]
    if parts and parts[0] == "transformer":
        parts = parts[1:]
    parts = [p for p in parts if not p.endswith("_quantizer")][:-1]
    return ".".join(parts)


def summarize_qdq(model: Any) -> QdqSummary:
    """Count Q/DQ nodes by element type and list the layers they quantize."""
    import onnx

    elem = {i.name: i.data_type for i in model.graph.initializer}
    for node in model.graph.node:  # zero points may come from Constant or Cast nodes (INT8 export)
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value":
                elem[node.output[0]] = attr.t.data_type
            elif node.op_type == "Cast" and attr.name == "to":
                elem[node.output[0]] = attr.i
    s = QdqSummary()
    layers = set()
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = elem.get(node.input[2]) if len(node.input) > 2 else None
        if node.op_type == "DequantizeLinear" and zp is None:
            zp = elem.get(node.input[0])
        kind = "fp8" if zp == onnx.TensorProto.FLOAT8E4M3FN else "int8" if zp in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) else None
        if node.op_type == "QuantizeLinear":
            s.quantize += 1
            if kind:
                setattr(s, f"{kind}_quantize", getattr(s, f"{kind}_quantize") + 1)
        else:
            s.dequantize += 1
            if kind:
                setattr(s, f"{kind}_dequantize", getattr(s, f"{kind}_dequantize") + 1)
            layers.add(_node_module(node.name))
    s.layers = tuple(sorted(layers))
    return s


# ------------------------------------------------------------------ the whole phase
def save_model(model: Any, path: Path) -> None:
    """Save ``model`` at ``path``; weights go to an external data file when they approach 2 GiB."""
    import onnx

    size = sum(len(i.raw_data) for i in model.graph.initializer)
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024, convert_attribute=True)
    else:
        onnx.save_model(model, str(path))


def export_quantized(transformer: torch.nn.Module, shapes: Shapes, out_dir: Path, quant_format: str,
                     batch: int = 1) -> dict[str, Any]:
    """Export, rewrite and save the quantized transformer as ``out_dir/model.onnx``; check it by path."""
    import onnx

    out_dir = Path(out_dir)
    raw = out_dir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def progress(step: str) -> None:  # the export of a full-size model takes minutes: say where it is
        log.info("onnx export: %s done at %.1f s", step, time.perf_counter() - start)

    torch_export(transformer, shapes, raw / ONNX_FILE, batch)
    progress("torch.onnx.export")
    model = onnx.load(str(raw / ONNX_FILE), load_external_data=True)
    info = finalize_fp8(model) if quant_format == "fp8" else finalize_int8(model)
    progress("Q/DQ rewrite")
    path = out_dir / ONNX_FILE
    save_model(model, path)
    del model
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()
    progress("save")
    onnx.checker.check_model(str(path))  # by path: works for models with external data (> 2 GiB)
    progress("onnx.checker")
    summary = summarize_qdq(onnx.load(str(path), load_external_data=False))
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.name.startswith("model.onnx"))
    return {"onnx_path": str(path), "onnx_size_bytes": size, "opset": OPSET,
            "qdq_nodes": summary.quantize + summary.dequantize,
            "fp8_qdq_nodes": summary.fp8_quantize + summary.fp8_dequantize,
            "int8_qdq_nodes": summary.int8_quantize + summary.int8_dequantize, **info}
