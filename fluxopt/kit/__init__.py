"""The backend kit: helpers that several backends share (CUDA graph capture of the transformer,
eager's timestep rounding inside compiled graphs). Backends reach them through the public API
(``fluxopt.CudaGraphRunner``, ``fluxopt.keep_eager_timestep_rounding``); the kernel does not use them.
"""
