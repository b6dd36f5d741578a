"""Fingerprints of modules: what decides a compiled or exported graph, so an artifact built for
one module structure (or one set of weights) is never reused for another."""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

import torch


def is_tensor_subclass(t: Any) -> bool:
    """A tensor subclass (torchao quantized weights...), not a plain tensor/parameter/buffer."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter, torch.nn.Buffer)


def module_fingerprint(module: torch.nn.Module, values: bool) -> str:
    """sha256 of class, config, every tensor's name, type, shape and dtype and the attention
    processors; with ``values``, also a sample of every tensor's values (a few elements each,
    gathered in one transfer)."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        # diffusers' private entries (``_use_default_values``: a list made from a set, ordered by the
        # process's string-hash seed; ``_name_or_path``...) say where a config came from, not what
        # the module computes: hashed, they made every key differ between processes
        public = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        h.update(json.dumps(public, sort_keys=True, default=str).encode())
    samples = []
    for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
        h.update(f"{name}|{type(t).__name__}|{type(t.data).__name__}|{tuple(t.shape)}|{t.dtype}\n".encode())
        if values:
            if is_tensor_subclass(t):
                h.update(repr(t).encode()[:4096])
            elif t.numel():
                flat = t.detach().reshape(-1)
                n = min(64, flat.numel())
                # integer positions: a float linspace rounds past the end for tensors over 2**24 elements
                idx = torch.arange(n, device=flat.device) * (flat.numel() - 1) // max(n - 1, 1)
                samples.append(flat[idx].float())
    if samples:
        h.update(torch.cat(samples).cpu().numpy().tobytes())
    processors = getattr(module, "attn_processors", None)
    if isinstance(processors, dict):
        for name, proc in sorted(processors.items()):
            h.update(f"{name}|{type(proc).__qualname__}|{getattr(proc, '_attention_backend', None)}\n".encode())
    return h.hexdigest()[:32]


def has_subclass_weights(module: torch.nn.Module) -> bool:
    return any(is_tensor_subclass(p) for p in itertools.chain(module.parameters(), module.buffers()))
