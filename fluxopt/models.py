"""The ModelSpec concept: how to obtain a FluxPipeline, and the generation defaults its
authors use. Specs are registered through the ``fluxopt_models`` hook (the built-in ones by the
model zoo, ``fluxopt.zoo``)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fluxopt.artifacts import ArtifactCache
from fluxopt.errors import ConfigError, ModelLoadError
from fluxopt.files import file_sha256
from fluxopt.shapes import DTYPES


@dataclass(frozen=True)
class GenerationDefaults:
    steps: int
    guidance_scale: float
    height: int
    width: int
    max_sequence_length: int
    prompts: tuple[str, ...] = ()  # prompts the model understands (empty: fluxopt's defaults)


@dataclass(frozen=True)
class ModelSpec:
    """A model fluxopt can benchmark.

    Exactly one of ``hub_id`` (loaded with ``from_pretrained``), ``local_builder`` (writes a
    checkpoint directory once, then loaded with ``from_pretrained``) or ``factory`` (builds the
    pipeline directly on the device) says where the weights come from.
    """

    name: str
    description: str
    defaults: GenerationDefaults
    hub_id: str | None = None
    local_builder: Callable[[Path], None] | None = None
    local_version: int = 1
    factory: Callable[[torch.device, torch.dtype], Any] | None = None
    trained: bool = True  # random weights: fidelity numbers say nothing about image quality


# FLUX.1-dev: guidance-distilled, 28 steps; FLUX.1-schnell: timestep-distilled, 4 steps, no guidance.
DEV_DEFAULTS = GenerationDefaults(steps=28, guidance_scale=3.5, height=1024, width=1024, max_sequence_length=512)
SCHNELL_DEFAULTS = GenerationDefaults(steps=4, guidance_scale=0.0, height=1024, width=1024, max_sequence_length=256)


def checkpoint_defaults(spec: ModelSpec, path: str | None) -> GenerationDefaults:
    """The generation defaults for ``spec`` loaded from ``path``: a local FLUX.1-schnell directory
    (its transformer has no guidance embedding) gets schnell's 4 steps and no guidance whatever
    model name it is loaded under, a FLUX.1-dev directory dev's; otherwise the spec's own."""
    if not path or not (Path(path) / "transformer" / "config.json").is_file():
        return spec.defaults
    try:
        config = json.loads((Path(path) / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return spec.defaults  # loading reports the damaged checkpoint with its file name
    if not isinstance(config, dict) or "guidance_embeds" not in config:
        return spec.defaults
    base = SCHNELL_DEFAULTS if not config["guidance_embeds"] else DEV_DEFAULTS
    keep = spec.defaults
    return dataclasses.replace(base, height=keep.height, width=keep.width, prompts=keep.prompts,
                               max_sequence_length=min(base.max_sequence_length, keep.max_sequence_length))


def local_model_dir(spec: ModelSpec, cache_dir: Path) -> Path:
    """The verified checkpoint fluxopt built for ``spec`` (built now if absent; rebuilt if an
    existing one is corrupt, truncated or incomplete: every file's sha256 is checked)."""
    key = {"model": spec.name, "version": spec.local_version}
    return ArtifactCache(cache_dir).get("model", key, spec.local_builder).path


def verify_checksums(directory: Path, checksums: dict[str, str], what: str) -> None:
    """Compare every file of a checkpoint fluxopt did not build itself with its recorded sha256
    (fluxopt cannot rebuild those, so it names the bad file instead)."""
    for rel, digest in sorted(checksums.items()):
        path = directory / rel
        if not path.is_file():
            raise ModelLoadError(f"{what}: {path} is missing; reinstall fluxopt (pip install --force-reinstall)")
        if file_sha256(path) != digest:
            raise ModelLoadError(f"{what}: {path} is corrupt (sha256 differs from the one shipped); "
                                 "reinstall fluxopt (pip install --force-reinstall)")


def _bad_weight_file(directory: Path) -> str | None:
    """The first safetensors file below ``directory`` that cannot be opened, for the error message."""
    from safetensors import safe_open

    for path in sorted(directory.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    handle.get_slice(name)
        except Exception as exc:  # noqa: BLE001 - any failure to read names the file
            return f"{path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def load_pipeline(spec: ModelSpec, device: torch.device, dtype: torch.dtype, cache_dir: Path,
                  path: str | None = None, revision: str | None = None):
    """Load ``spec`` onto ``device`` in ``dtype``; ``path`` overrides where weights come from
    (a local directory or another hub id)."""
    from diffusers import FluxPipeline

    if spec.factory is not None and path is None:
        return spec.factory(device, dtype)
    if path is None and spec.local_builder is not None:
        source = str(local_model_dir(spec, cache_dir))
    else:
        source = path or spec.hub_id
    if source is None:
        raise ModelLoadError(f"model '{spec.name}' has no weights source; pass model.path=<dir or hub id>")
    try:
        pipe = FluxPipeline.from_pretrained(source, dtype=dtype, revision=revision)
    except Exception as exc:  # noqa: BLE001 - every loading failure becomes one message naming the source
        if Path(source).is_dir():
            bad = _bad_weight_file(Path(source))
            detail = bad or f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            raise ModelLoadError(f"could not load model '{spec.name}' from the directory {source}: {detail}") from None
        hint = ("it is not a local directory and could not be fetched from the Hugging Face Hub "
                "(no network, not in the HF cache, or a gated model without a login). Download it where "
                f"the Hub is reachable (`hf download {source}`) and pass model.path=<that directory>, "
                "or set HF_HOME to a cache that holds it")
        raise ModelLoadError(f"could not load model '{spec.name}' from '{source}': {hint}. "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return pipe.to(device)


def resolve_dtype(name: str, is_gpu: bool) -> torch.dtype:
    """``auto`` is bf16 on GPU and fp32 on CPU (bf16 matmuls on CPU are slow and imprecise)."""
    if name == "auto":
        return torch.bfloat16 if is_gpu else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]
