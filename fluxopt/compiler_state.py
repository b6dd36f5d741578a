"""Process-wide settings that optimization stacks change: Dynamo's, Inductor's and functorch's
config, torch.backends switches, matmul precision. A stack snapshots them before it is applied
and loads them back when it closes, so a flag one stack (or a library it calls) sets can never
change the compile time or kernels of the next one.

Also the one home of Inductor flag validation and of the flux-fast recipe's tuning flags.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from fluxopt.errors import ConfigError

# The flux-fast recipe's Inductor tuning flags.
RECIPE_INDUCTOR_FLAGS = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
}

_BACKEND_FLAGS: tuple[tuple[Any, str], ...] = (
    (torch.backends.cudnn, "benchmark"),
    (torch.backends.cudnn, "deterministic"),
    (torch.backends.cudnn, "allow_tf32"),
    (torch.backends.cuda.matmul, "allow_tf32"),
    (torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction"),
    (torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction"),
)
_SDP_SWITCHES = ("flash", "mem_efficient", "math", "cudnn")


def _configs() -> dict[str, Any]:
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    return {"dynamo": dynamo_config, "inductor": inductor_config, "functorch": functorch_config}


def read_state() -> dict[tuple[str, ...], Any]:
    """Every process-wide setting a stack may change, one entry per setting."""
    state: dict[tuple[str, ...], Any] = {}
    for name, config in _configs().items():
        for key, value in config.get_config_copy().items():
            state[("config", name, key)] = value
    for i, (owner, attr) in enumerate(_BACKEND_FLAGS):
        if hasattr(owner, attr):
            state[("flag", str(i), attr)] = getattr(owner, attr)
    for name in _SDP_SWITCHES:
        if hasattr(torch.backends.cuda, f"{name}_sdp_enabled"):
            state[("sdp", name)] = getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
    state[("matmul_precision",)] = torch.get_float32_matmul_precision()
    state[("default_dtype",)] = torch.get_default_dtype()
    return state


def _write(key: tuple[str, ...], value: Any) -> None:
    kind = key[0]
    if kind == "config":
        _configs()[key[1]].load_config({key[2]: value})
    elif kind == "flag":
        setattr(_BACKEND_FLAGS[int(key[1])][0], key[2], value)
    elif kind == "sdp":
        getattr(torch.backends.cuda, f"enable_{key[1]}_sdp")(value)
    elif kind == "matmul_precision":
        torch.set_float32_matmul_precision(value)
    else:
        torch.set_default_dtype(value)


def _differs(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except Exception:  # noqa: BLE001 - values without a usable ==: compare identity
        return a is not b


def config_key(config: Any, key: str) -> tuple[str, ...]:
    """The :func:`read_state` key of ``key`` in the torch config module ``config``."""
    name = next(n for n, c in _configs().items() if c is config)
    return ("config", name, key)


class Hold:
    """The process-wide settings as they were when one stack was applied, among the other stacks
    holding settings in this process (on other pipelines). Releasing it (calling it) puts back
    what this stack changed, whatever order the stacks close in: a setting that a stack applied
    later also claims stays in force, and that stack restores the value from before both.

    A stack claims the settings that differ once it is applied and built, and the ones it set
    through its context (even to a value already in force). The last stack to close restores
    everything to how it found it, side effects of libraries included."""

    _open: list[Hold] = []  # stacks holding process-wide changes, oldest first

    def __init__(self) -> None:
        self.before = read_state()
        self.claimed: set[tuple[str, ...]] | None = None
        self.owner: Callable[[], Any] | None = None  # a weak reference to the applied stack, once there is one
        Hold._prune()
        Hold._open.append(self)

    @classmethod
    def _prune(cls) -> None:
        """Forget holds whose applied stack was dropped without being closed: it can never close,
        so it must not keep the others from restoring what they found."""
        cls._open[:] = [h for h in cls._open if h.owner is None or h.owner() is not None]

    def settle(self, claimed: set[tuple[str, ...]] = frozenset()) -> None:
        """The stack is applied: record which settings it claims."""
        now = read_state()
        self.claimed = {k for k, v in now.items() if _differs(v, self.before.get(k))} | set(claimed)

    def __call__(self) -> None:
        Hold._prune()
        if self not in Hold._open:
            return
        if self.claimed is None:
            self.settle()
        later = Hold._open[Hold._open.index(self) + 1:]
        if not later:
            current = read_state()
            for key, before in self.before.items():
                if _differs(current.get(key), before):
                    _write(key, before)
        else:
            for key in self.claimed:
                before = self.before.get(key)
                for h in later:
                    h.before[key] = before  # it found this stack's value; it must restore the one before
                    if key in (h.claimed or ()):
                        break  # a later stack holds the setting: it stays in force until that one closes
                else:
                    _write(key, before)
        Hold._open.remove(self)


def hold() -> Hold:
    """Capture the process-wide settings before a stack changes them; call the result to restore."""
    return Hold()


def validate_inductor_flags(setting: str, flags: Mapping[str, Any]) -> None:
    """Refuse unknown Inductor options and values of the wrong type before they reach torch
    (``torch._inductor.config`` would store ``max_autotune="lots"`` without complaint)."""
    import torch._inductor.config as inductor_config

    if not isinstance(flags, Mapping):
        raise ConfigError(f"{setting} must be a mapping of torch._inductor.config options, got {flags!r}")
    defaults = inductor_config.get_config_copy()
    for key, value in flags.items():
        if key not in defaults:
            raise ConfigError(f"{setting} has the unknown Inductor option {key!r} (see torch._inductor.config)")
        current = defaults[key]
        expected = type(current)
        if current is None or isinstance(value, expected) and not (expected is not bool and isinstance(value, bool)):
            continue
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        raise ConfigError(f"{setting}.{key}={value!r} must be a {expected.__name__} "
                          f"(torch._inductor.config.{key} is {current!r})")
