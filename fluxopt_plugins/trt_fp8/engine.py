"""TensorRT engine build and runtime for the exported transformer (phase 3 of ``trt_fp8``).

Build: the ONNX file is parsed into a *strongly typed* network (types come from the graph: the
FP8/INT8 Q/DQ decide the GEMM precisions, nothing is left to the builder's precision flags),
one optimization profile covers batch 1..max at the bench resolution, the builder optimization
level is an option, and a timing cache shared by all builds for this TensorRT version and GPU
is loaded before and written back after the build.

Runtime: ``TrtTransformer`` executes the engine on torch's current CUDA stream, binding torch
tensors by address (``set_tensor_address`` + ``execute_async_v3``); it stands in for
``FluxTransformer2DModel.forward`` and returns what that returns. With ``cuda_graph`` the
enqueue is captured once per input shape into a CUDA graph and replayed.

Nothing here runs without ``tensorrt`` and an NVIDIA GPU; tests/test_trt_fp8.py skips it then.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

ENGINE_FILE = "transformer.plan"


def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt.__version__


def _logger() -> Any:
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def build_engine(onnx_path: Path, engine_path: Path, profile_shapes: Mapping[str, tuple[tuple[int, ...], ...]],
                 optimization_level: int = 3, timing_cache: Path | None = None,
                 workspace_bytes: int | None = None) -> dict[str, Any]:
    """Build and serialize an engine; ``profile_shapes`` maps input name -> (min, opt, max) shapes."""
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # by path: external weight data is found next to it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache_blob = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        lo, opt, hi = profile_shapes[name]
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    _write_atomic(engine_path, bytes(serialized))
    if timing_cache is not None:
        _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return {"engine_size_bytes": engine_path.stat().st_size, "timing_cache_entries_loaded": bool(cache_blob)}


def _torch_dtype(trt_dtype: Any) -> torch.dtype:
    import tensorrt as trt

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool, trt.int8: torch.int8}
    return table[trt_dtype]


class TrtTransformer:
    """Runs a serialized engine in place of ``FluxTransformer2DModel.forward``."""

    def __init__(self, engine_path: Path, cuda_graph: bool = False):
        import tensorrt as trt

        self.runtime = trt.Runtime(_logger())
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {engine_path} (other TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        # The engine's own inputs: the exporter drops graph inputs the model does not read.
        self.input_names = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        (self.output_name,) = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {name: _torch_dtype(self.engine.get_tensor_dtype(name))
                       for name in (*self.input_names, self.output_name)}
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}

    def _bind(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = torch.empty(shape, dtype=self.dtypes[self.output_name], device="cuda")
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        return out

    def _execute(self) -> None:
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def run(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        inputs = {n: inputs[n].to(device="cuda", dtype=self.dtypes[n]).contiguous() for n in self.input_names}
        if not self.cuda_graph:
            out = self._bind(inputs)
            self._execute()
            return out
        key = tuple((n, tuple(t.shape)) for n, t in inputs.items())
        if key not in self._graphs:
            static = {n: t.clone() for n, t in inputs.items()}
            out = self._bind(static)
            self._execute()  # TensorRT needs one enqueue before capture (lazy initialisation)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._execute()
            self._graphs[key] = (graph, static, out)
        graph, static, out = self._graphs[key]
        for n, t in inputs.items():
            static[n].copy_(t)
        graph.replay()
        return out.clone()

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                pooled_projections: torch.Tensor | None = None, timestep: torch.Tensor | None = None,
                img_ids: torch.Tensor | None = None, txt_ids: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, joint_attention_kwargs: Any = None,
                controlnet_block_samples: Any = None, controlnet_single_block_samples: Any = None,
                return_dict: bool = True, controlnet_blocks_repeat: bool = False) -> Any:
        """Same signature and return value as ``FluxTransformer2DModel.forward``."""
        if controlnet_block_samples is not None or controlnet_single_block_samples is not None:
            raise NotImplementedError("trt_fp8: the engine has no ControlNet inputs")
        if joint_attention_kwargs and joint_attention_kwargs.get("scale", 1.0) != 1.0:
            raise NotImplementedError("trt_fp8: LoRA scales cannot change a built engine")
        values = {"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states,
                  "pooled_projections": pooled_projections, "timestep": timestep, "img_ids": img_ids,
                  "txt_ids": txt_ids, "guidance": guidance}
        if img_ids is not None and img_ids.ndim == 3:  # deprecated batched ids, as diffusers accepts them
            values["img_ids"] = img_ids[0]
        if txt_ids is not None and txt_ids.ndim == 3:
            values["txt_ids"] = txt_ids[0]
        out = self.run({n: values[n] for n in self.input_names}).to(hidden_states.dtype)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


def install(transformer: torch.nn.Module, runner: TrtTransformer, free_weights: bool = True) -> None:
    """Route ``transformer(...)`` to the engine, keeping the module (config, dtype, cache_context) the
    pipeline relies on; optionally release its weights (the engine holds its own copy)."""
    transformer.forward = runner.forward  # nn.Module.__call__ dispatches to the instance attribute
    transformer._fluxopt_trt = runner
    if free_weights:
        with torch.no_grad():
            for p in transformer.parameters():
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        torch.cuda.empty_cache()
