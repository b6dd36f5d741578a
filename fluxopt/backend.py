"""The Backend concept: one optimization technique, described well enough to be validated,
ordered and composed before any model is loaded.

A backend is like a torchao technique: an options dataclass plus code that applies it.
Built-in backends (``fluxopt_plugins/``) and third-party ones use exactly this class.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from fluxopt.context import StackContext
from fluxopt.environment import DeviceInfo


class Stage(enum.IntEnum):
    """Where a backend acts; a stack is applied in this order whatever order it was typed in.

    Weights are rewritten before kernels are chosen, caches wrap the blocks before a graph
    is captured, and placement (offload) comes last because it moves the final modules.
    """

    WEIGHTS = 1
    ATTENTION = 2
    CACHE = 3
    GRAPH = 4
    PLACEMENT = 5


# Stages that hold at most one backend, and why.
EXCLUSIVE_STAGES: Mapping[Stage, str] = {
    Stage.GRAPH: "both replace how the transformer is executed (only one graph backend per stack)",
}


@dataclass(frozen=True)
class Package:
    """An optional Python package a backend imports, and how the user gets it."""

    module: str
    install: str  # what to tell the user, e.g. "pip install 'fluxopt[torchao]'"

    def missing(self) -> bool:
        return importlib.util.find_spec(self.module) is None


@dataclass(frozen=True)
class Requirements:
    """What the machine must offer; checked before a model is loaded."""

    gpu: bool = False  # any CUDA or ROCm device
    nvidia: bool = False  # CUDA proper, not ROCm
    rocm: bool = False
    min_compute_capability: tuple[int, int] | None = None
    max_compute_capability: tuple[int, int] | None = None  # kernels built for one architecture family
    packages: tuple[Package, ...] = ()

    def unmet(self, device: DeviceInfo) -> str | None:
        """The first unmet requirement as a sentence for the user, or None."""
        for pkg in self.packages:
            if pkg.missing():
                return f"needs the Python package '{pkg.module}' ({pkg.install})"
        needs_gpu = self.gpu or self.nvidia or self.rocm or self.min_compute_capability
        if needs_gpu and not device.is_gpu:
            kind = "an AMD GPU with ROCm" if self.rocm else "an NVIDIA GPU with CUDA" if self.nvidia else "a GPU"
            return f"needs {kind}; this run is on the CPU ({device.name})"
        if self.nvidia and device.rocm:
            return f"needs an NVIDIA GPU with CUDA; {device.name} runs ROCm"
        if self.rocm and not device.rocm:
            return f"needs an AMD GPU with ROCm; {device.name} is not one"
        if self.min_compute_capability and device.capability and not device.rocm \
                and device.capability < self.min_compute_capability:
            want = ".".join(map(str, self.min_compute_capability))
            have = ".".join(map(str, device.capability))
            return f"needs compute capability >= {want}; {device.name} has {have}"
        if self.max_compute_capability and device.capability and not device.rocm \
                and device.capability > self.max_compute_capability:
            want = ".".join(map(str, self.max_compute_capability))
            have = ".".join(map(str, device.capability))
            return f"needs compute capability <= {want} (its kernels are built for no newer one); {device.name} has {have}"
        return None


class Backend:
    """Base class of every optimization backend.

    Subclasses set the class attributes and implement ``apply``; ``build`` is for work timed
    separately from steady state (compile, export, calibration, engine build).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    options_class: ClassVar[type]
    stage: ClassVar[Stage]
    lossless: ClassVar[bool] = True
    requires: ClassVar[Requirements] = Requirements()
    conflicts: ClassVar[Mapping[str, str]] = {}  # other backend name -> reason
    # Backends sharing a group (e.g. "quantization") are mutually exclusive, for this reason.
    exclusive_group: ClassVar[str | None] = None
    exclusive_reason: ClassVar[str] = ""
    # Acts only between transformer calls, on the host (e.g. through ``ctx.wrap_transformer_call``),
    # never inside one: graph capture, CUDA graphs and fullgraph compilation are unaffected.
    between_steps: ClassVar[bool] = False

    def unmet_requirement(self, options: Any, device: DeviceInfo) -> str | None:
        """Why this backend (with these options) cannot run here, or None."""
        return self.requires.unmet(device)

    def validate_options(self, options: Any) -> None:
        """Refuse option values that their types allow but the backend does not (raise ConfigError)."""

    def incompatibility(self, options: Any, others: Sequence[Any]) -> str | None:
        """Why this backend, with these options, cannot share a stack with ``others`` (a sequence of
        ``fluxopt.stack.StackEntry``; None: it can). For conflicts that depend on options; fixed
        ones go in ``conflicts`` or ``exclusive_group``."""
        return None

    def processes(self, options: Any) -> int:
        """How many processes (one per GPU) the stack needs; more than 1 makes fluxopt relaunch
        itself under torchrun with that many ranks (rank 0 writes the results)."""
        return 1

    def is_lossless(self, options: Any) -> bool:
        """Whether outputs should match the baseline up to float noise (picks the thresholds)."""
        return self.lossless

    def apply(self, pipe: Any, options: Any, ctx: StackContext) -> None:
        """Change ``pipe`` (a FluxPipeline). Every change is undone by ``ctx`` when the stack is
        closed: changes to the pipeline's modules, scheduler and attention processors are
        snapshotted before the stack is applied; process-wide state a backend changes goes
        through ``ctx.enter_context`` / ``ctx.callback`` (Dynamo, Inductor and torch.backends
        flags are also snapshotted)."""
        raise NotImplementedError

    def build(self, pipe: Any, options: Any, ctx: StackContext) -> None:
        """Ahead-of-time work, timed as build time (compile, export, calibration, engine build).
        Default: nothing to build."""

    def cache_key(self, options: Any) -> dict[str, Any]:
        """What identifies this backend's artifacts (options by default)."""
        return dataclasses.asdict(options)

    def __repr__(self) -> str:
        return f"<Backend {self.name} stage={self.stage.name.lower()}>"
