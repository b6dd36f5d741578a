"""fluxopt: find which optimization stack makes FLUX fastest on your hardware, then use it.

This module is the public API: serving code uses ``apply_stack`` and ``benchmark`` (and ``load_model``,
``available_backends``); plugins (built-in ones in ``fluxopt_plugins`` and third-party ones)
import everything they need from here and nothing else (an import-linter contract checks it).
"""

from fluxopt.api import AppliedStack, apply_stack, available_backends, load_model
from fluxopt.artifacts import INDUCTOR
from fluxopt.backend import EXCLUSIVE_STAGES, Backend, Package, Requirements, Stage
from fluxopt.benchmarking import benchmark
from fluxopt.compiler_state import RECIPE_INDUCTOR_FLAGS, validate_inductor_flags
from fluxopt.context import StackContext
from fluxopt.cuda_graphs import CudaGraphRunner, TransformerForward
from fluxopt.eager_rounding import keep_eager_timestep_rounding
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

__all__ = [
    "DTYPES", "EXCLUSIVE_STAGES", "INDUCTOR", "RECIPE_INDUCTOR_FLAGS", "AppliedStack", "Backend", "ConfigError", "CudaGraphRunner", "TransformerForward",
    "DeviceInfo", "FluxoptError", "GenerationDefaults", "Metric", "ModelLoadError", "ModelSpec", "Package",
    "Preset", "Requirements", "Sample", "Shapes", "RunRecord", "StackContext", "StackRecord", "Stage", "UnavailableError", "__version__",
    "apply_stack", "available_backends", "benchmark", "file_sha256", "has_subclass_weights", "hookimpl", "keep_eager_timestep_rounding", "load_model", "module_fingerprint",
    "private_dir", "read_record", "transformer_inputs", "validate_inductor_flags", "verify_checksums",
]
