"""Errors fluxopt raises on purpose: each carries a message meant for the user.

The CLI prints these without a traceback; anything else is a bug (or a backend
failure, which the runner records with its phase instead of crashing).
"""


class FluxoptError(Exception):
    """Base class: the message says what is wrong and what to do about it."""


class ConfigError(FluxoptError):
    """The configuration or the requested stack is invalid (caught before loading a model)."""


class UnavailableError(FluxoptError):
    """A backend cannot run on this machine (missing package, no CUDA, GPU too old...)."""


class ModelLoadError(FluxoptError):
    """The model could not be obtained (no network, wrong path, missing weights)."""
