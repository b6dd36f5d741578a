"""fluxopt: find which optimization stack makes FLUX fastest on your hardware, then use it."""

from fluxopt.api import apply_stack, available_backends, load_model

__all__ = ["apply_stack", "available_backends", "load_model"]
__version__ = "0.1.0"
