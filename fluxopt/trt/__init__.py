"""TensorRT FP8 (or INT8 SmoothQuant) for the FLUX transformer, in three separable phases.

``quantize``     ModelOpt post-training quantization: fake-quant modules calibrated by running
                 the pipeline (runs anywhere torch runs, CPU included).
``onnx_export``  TorchScript ONNX export of the fake-quantized transformer, rewritten to native
                 ONNX FP8 QuantizeLinear/DequantizeLinear with FP8 weights (runs anywhere).
``engine``       TensorRT build (strongly typed network, optimization profile, timing cache)
                 and the runtime module that replaces the transformer's forward (needs
                 ``tensorrt`` and an NVIDIA GPU).

The backend that strings them together is ``plugins/trt_fp8.py``; docs/tensorrt.md explains
the choices.
"""
