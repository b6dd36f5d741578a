"""Picking the stack to use from measured records: the limits a user sets (minimum PSNR, maximum
peak memory) on top of each stack's own fidelity gate, and the command line and Python call that
reproduce the pick. Shared by ``fluxopt-report --best`` and the search sweeper."""

from __future__ import annotations

import dataclasses
import math
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fluxopt.errors import ConfigError
from fluxopt.record import RunRecord, StackRecord

GIB = 2**30


@dataclass(frozen=True)
class Limits:
    """What a stack must meet besides its fidelity gate; None: no limit. Checked when built."""

    min_psnr: float | None = None  # dB, the worst prompt
    max_memory_gib: float | None = None  # peak memory of the stack while generating
    setting_prefix: str = "search."  # how the settings are named in messages ("--" for the report CLI)

    def __post_init__(self) -> None:
        for name in ("min_psnr", "max_memory_gib"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                setting = f"{self.setting_prefix}{name if self.setting_prefix.endswith('.') else name.replace('_', '-')}"
                raise ConfigError(f"{setting}={value!r} is not allowed: a finite number > 0 "
                                  f"({'dB' if name == 'min_psnr' else 'GiB'}), or leave it unset")

    def as_dict(self) -> dict[str, float | None]:
        return {"min_psnr": self.min_psnr, "max_memory_gib": self.max_memory_gib}


def ineligible(stack: StackRecord, limits: Limits, run: RunRecord | None = None) -> str | None:
    """Why this stack record cannot be the pick (None: it can): it must have run whole (not a
    partial build), in a run whose figures were not edited, have a speedup, pass its own fidelity
    gate and meet the limits."""
    if run is not None and run.edited:
        return f"its record was edited ({run.edited[0]})"
    if stack.status != "ok":
        return f"{stack.status}: {stack.reason}"
    if stack.partial:
        return f"a partial build ({stack.partial})"
    if stack.speedup is None:
        return "no speedup measured"
    if not stack.passed_gate:
        return "failed its fidelity gate"
    psnr = stack.worst("psnr")
    if limits.min_psnr is not None and (psnr is None or psnr < limits.min_psnr):
        return f"PSNR {psnr if psnr is None else f'{psnr:.2f}'} dB < min_psnr {limits.min_psnr}"
    peak = stack.peak_memory_bytes
    if limits.max_memory_gib is not None and (peak is None or peak / GIB > limits.max_memory_gib):
        return (f"peak memory {'unknown' if peak is None else f'{peak / GIB:.2f} GiB'} > "
                f"max_memory_gib {limits.max_memory_gib}")
    return None


@dataclass(frozen=True)
class Pick:
    """The chosen stack, with the run it was measured in."""

    stack: StackRecord
    run: RunRecord
    option_defaults: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)  # backend -> defaults

    @property
    def name(self) -> str:
        return self.stack.stack

    @property
    def backends(self) -> list[str]:
        return list(self.stack.backends or self.name.split("+"))

    def options(self) -> dict[str, dict[str, Any]]:
        """Each backend's options that differ from its defaults (what the command must set)."""
        changed: dict[str, dict[str, Any]] = {}
        for name in self.backends:
            given = (self.stack.options or {}).get(name) or {}
            defaults = self.option_defaults.get(name) or {}
            changed[name] = {k: v for k, v in given.items() if k not in defaults or defaults[k] != v}
        return changed

    def command(self) -> str:
        """The ``python -m fluxopt`` line that measures this stack again under the same settings."""
        backends = self.backends
        args = [f"+backend=[{','.join(backends)}]" if len(backends) > 1 else f"+backend={backends[0]}"]
        for name, values in self.options().items():
            args += [f"backend.{name}.{key}={_override_value(value)}" for key, value in values.items()]
        kept = [o for o in self.run.provenance.get("overrides") or []
                if not o.lstrip("+~").startswith(("backend", "hydra", "search"))]
        if not any(o.startswith("model=") for o in kept):
            kept.insert(0, f"model={self.run.model.get('name')}")
        return shlex.join(["python", "-m", "fluxopt", *args, *kept])

    def python(self) -> str:
        """The serving-code call that applies this stack to your own pipeline."""
        shapes = self.run.shapes
        stack = {name: values for name, values in self.options().items()}
        shape_args = ", ".join(f"{k}={shapes[k]!r}" for k in ("height", "width", "steps", "guidance_scale",
                                                           "max_sequence_length")
                               if shapes.get(k) is not None)
        return (f"import fluxopt\n"
                f"applied = fluxopt.apply_stack(pipe, {stack!r}{', ' + shape_args if shape_args else ''})\n"
                f"# ... serve with pipe(...); applied.close() restores the pipeline")


def _override_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def best(runs: Iterable[RunRecord], limits: Limits,
         option_defaults: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Pick | None, list[tuple[str, str]]]:
    """The eligible stack with the highest speedup (each against the baseline of its own run),
    and every other stack with why it was not picked. ``option_defaults`` (backend -> default
    options) keeps the reproducing command to the options that were changed."""
    eligible: list[Pick] = []
    passed_over: list[tuple[str, str]] = []
    for run in runs:
        for stack in run.stacks:
            why = ineligible(stack, limits, run)
            if why is None:
                eligible.append(Pick(stack, run, option_defaults or {}))
            else:
                passed_over.append((stack.stack, why))
    if not eligible:
        return None, passed_over
    eligible.sort(key=lambda p: p.stack.speedup, reverse=True)
    passed_over += [(p.name, f"slower: {p.stack.speedup:.2f}x") for p in eligible[1:]]
    return eligible[0], passed_over
