"""A restorable snapshot of a pipeline's structure, so closing a stack puts the pipeline back
exactly as it was, whatever the libraries a backend called did to it.

Backends change pipelines through library calls fluxopt does not control (torchao's
``quantize_`` swaps weights, ``fuse_qkv_projections`` adds modules and processors,
``compile_repeated_blocks`` sets compiled call implementations, diffusers' ``enable_cache``
and accelerate's offload install hooks and forward overrides, attention backends mutate
processors). All of these land in one of three places, which the snapshot records:

* every module's ``__dict__``: submodule, parameter and buffer tables, hook tables, forward
  overrides, compiled-call slots, attributes such as ``fused_projections``;
* the ``__dict__`` of the plain objects those modules and the pipeline hold (attention
  processors, the scheduler): processors are mutated in place by attention backends;
* every parameter's and buffer's data tensor: ``module.to(...)`` and memory-format changes
  swap ``param.data`` in place, keeping the Parameter object.

Restoring puts the saved dictionaries back and re-points every tensor at its original data.
Originals that a backend replaced are kept alive by the snapshot; on a GPU they are moved to
host memory after the stack is applied (``offload_replaced``), so keeping the pipeline
restorable does not cost GPU memory.
"""

from __future__ import annotations

import copy
import types
from typing import Any

import torch

_CONTAINERS = (dict, list, set)
_MISSING = object()


def _copy_dict(d: dict[str, Any]) -> dict[str, Any]:
    """One level deeper than a shallow copy: hook tables and submodule tables are dicts mutated
    in place, so they are copied too."""
    return {k: copy.copy(v) if isinstance(v, _CONTAINERS) else v for k, v in d.items()}


def _plain_objects(obj: Any) -> list[Any]:
    """Non-module, non-tensor objects with state held directly by ``obj`` (processors...)."""
    found = []
    for value in vars(obj).values():
        if isinstance(value, (torch.nn.Module, torch.Tensor, type, types.FunctionType, types.MethodType)):
            continue
        if hasattr(value, "__dict__"):
            found.append(value)
    return found


class PipelineSnapshot:
    """What :meth:`restore` needs to return ``pipe`` to its state at construction time."""

    def __init__(self, pipe: Any):
        self.dicts: list[tuple[Any, dict[str, Any]]] = []
        self.tensors: list[list[Any]] = []  # [owner module, table, name, tensor object, original data, device]
        seen: set[int] = set()
        roots = [pipe, *[c for c in getattr(pipe, "components", {}).values() if c is not None]]
        for root in roots:
            objects = root.modules() if isinstance(root, torch.nn.Module) else [root]
            for obj in objects:
                self._record(obj, seen)
                for plain in _plain_objects(obj):
                    self._record(plain, seen)
            if isinstance(root, torch.nn.Module):
                for owner in root.modules():
                    for table in ("_parameters", "_buffers"):
                        for name, t in vars(owner)[table].items():
                            if t is not None and id(t) not in seen:
                                seen.add(id(t))
                                self.tensors.append([owner, table, name, t, t.data, t.device])

    def _record(self, obj: Any, seen: set[int]) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        try:
            state = vars(obj)
        except TypeError:
            return
        self.dicts.append((obj, _copy_dict(state)))

    def offload_replaced(self) -> None:
        """Move originals the pipeline no longer uses to host memory, so keeping it restorable
        costs no GPU memory: a tensor object a backend swapped out (quantized weights) is pointed
        at a host copy; data swapped inside a live tensor (``module.to``) is kept as a host copy."""
        for entry in self.tensors:
            owner, table, name, tensor, data, _ = entry
            if data.device.type == "cpu":
                continue
            if vars(owner)[table].get(name) is not tensor:  # the object itself was replaced
                entry[4] = data.to("cpu")
                tensor.data = entry[4]
            elif not _same_storage(tensor, data):
                entry[4] = data.to("cpu")

    def changed(self) -> list[str]:
        """What :meth:`restore` would put back now: ``Type.attribute`` for every attribute added,
        removed or replaced (in a container too: hooks, submodules), and every tensor whose data changed."""
        found = set()
        for obj, state in self.dicts:
            live = vars(obj)
            for key in set(live) | set(state):
                old, new = state.get(key, _MISSING), live.get(key, _MISSING)
                if isinstance(old, dict) and isinstance(new, dict):
                    differs = old.keys() != new.keys() or any(old[k] is not new[k] for k in old)
                elif isinstance(old, (list, set)) and type(new) is type(old):
                    differs = len(old) != len(new) or any(a is not b for a, b in zip(old, new))
                else:
                    differs = old is not new
                if differs:
                    found.add(f"{type(obj).__name__}.{key}")
        for owner, table, name, tensor, data, _ in self.tensors:
            if vars(owner)[table].get(name) is not tensor or not _same_storage(tensor, data):
                found.add(f"{type(owner).__name__}.{name}")
        return sorted(found)

    def restore(self) -> None:
        for obj, state in self.dicts:
            live = vars(obj)
            live.clear()
            live.update(_copy_dict(state))
        for _, _, _, tensor, data, device in self.tensors:
            if not _same_storage(tensor, data):
                tensor.data = data.to(device)


def _same_storage(tensor: torch.Tensor, data: torch.Tensor) -> bool:
    try:
        live = tensor.data
        return (live.device == data.device and live.dtype == data.dtype and live.shape == data.shape
                and live.stride() == data.stride() and live.untyped_storage().data_ptr()
                == data.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return False
