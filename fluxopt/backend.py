"""The Backend concept: one optimization technique, described well enough to be validated,
ordered and composed before any model is loaded.

A backend is like a torchao technique: an options dataclass plus code that applies it.
Built-in backends (``plugins/``) and third-party ones use exactly this class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib.util
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from diffusers import FluxPipeline

    from fluxopt.environment import DeviceInfo
    from fluxopt.models import ModelSpec
    from fluxopt.stack import Stack, StackEntry


log = logging.getLogger("fluxopt.build")


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
        return None


@dataclass(frozen=True)
class Shapes:
    """The generation settings a backend may specialise on (export, engines, calibration)."""

    height: int
    width: int
    steps: int
    guidance_scale: float
    max_sequence_length: int
    batch_size: int = 1

    @property
    def latent_tokens(self) -> int:
        """Packed image tokens the FLUX transformer sees (8x VAE, 2x2 patches)."""
        return (self.height // 16) * (self.width // 16)


@dataclass
class StackContext:
    """What a backend may use while it is applied and built.

    Global state a backend changes (Inductor flags, torch backends switches) must be entered
    through ``exit_stack`` so it is restored after the stack is measured and cannot leak
    into the next one.
    """

    device: DeviceInfo
    dtype: torch.dtype
    model: ModelSpec | None  # None when applied to a user's own pipeline
    shapes: Shapes
    cache_dir: Path
    exit_stack: contextlib.ExitStack
    prompts: tuple[str, ...] = ()
    stack: Stack | None = None  # the whole stack being applied (backends may adapt to the others)
    run_once: Callable[[], Any] | None = None  # one pipeline call at the bench shapes
    stats: dict[str, Any] = field(default_factory=dict)

    def artifact(self, backend: str, key: Mapping[str, Any], build: Callable[[Path], None]) -> Path:
        """A cache directory holding what ``build(tmp_dir)`` writes, built once per key.

        The key is completed with the model, shapes, dtype, device and library versions, so an
        entry made for another GPU or version is never reused. Every load verifies the entry's
        manifest (key, sha256 of every file, owner and permissions); a corrupt, partial or
        foreign entry is logged, recorded as ``stats["artifacts"][backend]["rebuilt"]`` and
        rebuilt. ``stats["artifacts"][backend]`` also says ``cache_hit``, ``built``,
        ``verify_s``, ``build_s`` and ``size_bytes``.
        """
        from fluxopt.artifacts import stack_artifact

        return stack_artifact(self, backend, key, build)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Time a named build phase (calibration, export, engine build...) into ``stats``."""
        if self.device.is_gpu:
            torch.cuda.synchronize()
        log.info("%s: started", phase)  # logged as it happens: a run killed mid-build still shows its phases
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.is_gpu:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            phases = self.stats.setdefault("build_phases_s", {})
            phases[phase] = phases.get(phase, 0.0) + elapsed
            log.info("%s: %.1f s", phase, elapsed)


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

    def unmet_requirement(self, options: Any, device: DeviceInfo) -> str | None:
        """Why this backend (with these options) cannot run here, or None."""
        return self.requires.unmet(device)

    def validate_options(self, options: Any) -> None:
        """Refuse option values that their types allow but the backend does not (raise ConfigError)."""

    def incompatibility(self, options: Any, others: Sequence[StackEntry]) -> str | None:
        """Why this backend, with these options, cannot share a stack with ``others`` (None: it can).
        For conflicts that depend on options; fixed ones go in ``conflicts`` or ``exclusive_group``."""
        return None

    def is_lossless(self, options: Any) -> bool:
        """Whether outputs should match the baseline up to float noise (picks the thresholds)."""
        return self.lossless

    def apply(self, pipe: FluxPipeline, options: Any, ctx: StackContext) -> None:
        raise NotImplementedError

    def build(self, pipe: FluxPipeline, options: Any, ctx: StackContext) -> None:
        """Ahead-of-time work, timed as build time. Default: nothing to build."""

    def cache_key(self, options: Any) -> dict[str, Any]:
        """What identifies this backend's artifacts (options by default)."""
        return dataclasses.asdict(options)

    def __repr__(self) -> str:
        return f"<Backend {self.name} stage={self.stage.name.lower()}>"
