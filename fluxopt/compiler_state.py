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


def _configs() -> list[Any]:
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    return [dynamo_config, inductor_config, functorch_config]


def snapshot() -> Callable[[], None]:
    """Capture the process-wide settings now; the returned function puts them back exactly."""
    configs = [(c, c.get_config_copy()) for c in _configs()]
    flags = [(owner, name, getattr(owner, name)) for owner, name in _BACKEND_FLAGS if hasattr(owner, name)]
    sdp = {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in _SDP_SWITCHES
           if hasattr(torch.backends.cuda, f"{name}_sdp_enabled")}
    precision = torch.get_float32_matmul_precision()
    default_dtype = torch.get_default_dtype()

    def restore() -> None:
        for config, saved in configs:
            config.load_config(saved)
        for owner, name, value in flags:
            setattr(owner, name, value)
        for name, enabled in sdp.items():
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(enabled)
        torch.set_float32_matmul_precision(precision)
        torch.set_default_dtype(default_dtype)

    return restore


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
