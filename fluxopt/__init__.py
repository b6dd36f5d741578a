"""fluxopt: find which optimization stack makes FLUX fastest on your hardware, then use it.

This module is the public API: serving code uses ``apply_stack`` and ``benchmark`` (and ``load_model``,
``available_backends``); plugins (built-in ones in ``fluxopt_plugins`` and third-party ones)
import everything they need from here and nothing else (an import-linter contract checks it).
"""

import importlib
from typing import TYPE_CHECKING, Any

# Where each public name lives. Imported on first use (PEP 562), so that ``import fluxopt`` is
# instant: ``python -m fluxopt`` answers Ctrl-C and SIGTERM before torch and diffusers load, and a
# plugin importing one name does not pay for the rest.
_PUBLIC = {
    "AppliedStack": "fluxopt.serving",
    "apply_stack": "fluxopt.serving",
    "available_backends": "fluxopt.serving",
    "load_model": "fluxopt.serving",
    "INDUCTOR": "fluxopt.artifacts",
    "EXCLUSIVE_STAGES": "fluxopt.backend",
    "Backend": "fluxopt.backend",
    "Package": "fluxopt.backend",
    "Requirements": "fluxopt.backend",
    "Stage": "fluxopt.backend",
    "benchmark": "fluxopt.bakeoff",
    "RECIPE_INDUCTOR_FLAGS": "fluxopt.compiler_state",
    "validate_inductor_flags": "fluxopt.compiler_state",
    "StackContext": "fluxopt.context",
    "CudaGraphRunner": "fluxopt.kit.cuda_graphs",
    "TransformerForward": "fluxopt.kit.cuda_graphs",
    "keep_eager_timestep_rounding": "fluxopt.kit.eager_rounding",
    "DeviceInfo": "fluxopt.environment",
    "ConfigError": "fluxopt.errors",
    "FluxoptError": "fluxopt.errors",
    "ModelLoadError": "fluxopt.errors",
    "UnavailableError": "fluxopt.errors",
    "Metric": "fluxopt.fidelity",
    "file_sha256": "fluxopt.files",
    "private_dir": "fluxopt.files",
    "has_subclass_weights": "fluxopt.fingerprint",
    "module_fingerprint": "fluxopt.fingerprint",
    "hookimpl": "fluxopt.hookspecs",
    "Sample": "fluxopt.measure",
    "GenerationDefaults": "fluxopt.models",
    "ModelSpec": "fluxopt.models",
    "verify_checksums": "fluxopt.models",
    "Preset": "fluxopt.preset",
    "RunRecord": "fluxopt.record",
    "StackRecord": "fluxopt.record",
    "read_record": "fluxopt.record",
    "DTYPES": "fluxopt.shapes",
    "Shapes": "fluxopt.shapes",
    "transformer_inputs": "fluxopt.shapes",
    "__version__": "fluxopt.version",
}

if TYPE_CHECKING:
    from fluxopt.serving import AppliedStack, apply_stack, available_backends, load_model
    from fluxopt.artifacts import INDUCTOR
    from fluxopt.backend import EXCLUSIVE_STAGES, Backend, Package, Requirements, Stage
    from fluxopt.bakeoff import benchmark
    from fluxopt.compiler_state import RECIPE_INDUCTOR_FLAGS, validate_inductor_flags
    from fluxopt.context import StackContext
    from fluxopt.kit.cuda_graphs import CudaGraphRunner, TransformerForward
    from fluxopt.kit.eager_rounding import keep_eager_timestep_rounding
    from fluxopt.environment import DeviceInfo
    from fluxopt.errors import ConfigError, FluxoptError, ModelLoadError, UnavailableError
    from fluxopt.fidelity import Metric
    from fluxopt.files import file_sha256, private_dir
    from fluxopt.fingerprint import has_subclass_weights, module_fingerprint
    from fluxopt.hookspecs import hookimpl
    from fluxopt.measure import Sample
    from fluxopt.models import GenerationDefaults, ModelSpec, verify_checksums
    from fluxopt.preset import Preset
    from fluxopt.record import RunRecord, StackRecord, read_record
    from fluxopt.shapes import DTYPES, Shapes, transformer_inputs
    from fluxopt.version import __version__


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fluxopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = [
    "DTYPES", "EXCLUSIVE_STAGES", "INDUCTOR", "RECIPE_INDUCTOR_FLAGS", "AppliedStack", "Backend", "ConfigError", "CudaGraphRunner", "TransformerForward",
    "DeviceInfo", "FluxoptError", "GenerationDefaults", "Metric", "ModelLoadError", "ModelSpec", "Package",
    "Preset", "Requirements", "Sample", "Shapes", "RunRecord", "StackContext", "StackRecord", "Stage", "UnavailableError", "__version__",
    "apply_stack", "available_backends", "benchmark", "file_sha256", "has_subclass_weights", "hookimpl", "keep_eager_timestep_rounding", "load_model", "module_fingerprint",
    "private_dir", "read_record", "transformer_inputs", "validate_inductor_flags", "verify_checksums",
]
