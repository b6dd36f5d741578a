"""The Preset concept: a published recipe under one name, a stack with its options.

``+backend=flux_fast`` selects every backend of the preset with the preset's options; later
overrides (``backend.aoti.max_autotune=true``) and further backends (``+backend=[flux_fast,
fixed_cache]``) compose with it as with any stack, and ``apply_stack(pipe, "flux_fast")`` works
the same. Where fluxopt's version of a recipe differs from the original, ``deviations`` says how
and why, so a measurement is never passed off as the original's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    backends: Mapping[str, Mapping[str, Any]]  # backend name -> its options (unset ones: defaults)
    source: str = ""  # where the recipe comes from
    deviations: tuple[str, ...] = field(default_factory=tuple)  # how fluxopt's version differs, and why
