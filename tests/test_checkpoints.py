"""Real checkpoints: a local FLUX.1-schnell directory gets schnell's defaults (4 steps,
no guidance) whatever model name loads it, and the built-in ``flux-schnell-random`` has
schnell's shapes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_result, run_cli

from fluxopt import plugins
from fluxopt.models import DEV_DEFAULTS, SCHNELL_DEFAULTS, checkpoint_defaults


def _checkpoint(tmp_path, config):
    (tmp_path / "transformer").mkdir(parents=True)
    (tmp_path / "transformer" / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize(("config", "expected"), [
    ({"guidance_embeds": False}, (4, 0.0, 256)),
    ({"guidance_embeds": True}, (28, 3.5, 512)),
    ({"num_layers": 19}, None),   # no guidance_embeds: the spec's own defaults
    ("{not json", None),          # unreadable: the spec's defaults; loading names the damaged file
])
def test_local_checkpoint_decides_the_defaults(tmp_path, config, expected):
    spec = plugins.model("flux-dev")
    got = checkpoint_defaults(spec, _checkpoint(tmp_path, config))
    if expected is None:
        assert got == spec.defaults
    else:
        assert (got.steps, got.guidance_scale, got.max_sequence_length) == expected
        assert (got.height, got.width) == (1024, 1024)


def test_no_path_keeps_the_spec_defaults():
    assert checkpoint_defaults(plugins.model("flux-schnell"), None) == SCHNELL_DEFAULTS
    assert checkpoint_defaults(plugins.model("flux-dev"), "/nonexistent") == DEV_DEFAULTS


def test_flux_schnell_random_has_schnell_shapes_and_no_guidance_embedding():
    spec = plugins.model("flux-schnell-random")
    assert spec.defaults == SCHNELL_DEFAULTS and not spec.trained
    pipe = spec.factory(torch.device("meta"), torch.bfloat16)  # shapes only, no memory
    cfg = pipe.transformer.config
    assert cfg.guidance_embeds is False and (cfg.num_layers, cfg.num_single_layers) == (19, 38)
    assert plugins.model("flux-dev-random").factory(torch.device("meta"), torch.bfloat16).transformer.config.guidance_embeds


def test_a_local_schnell_directory_runs_with_schnell_defaults(tmp_path):
    from fluxopt.zoo.tiny import TINY_CLIP, TINY_T5, TINY_TRANSFORMER, TINY_VAE, assemble_flux_pipeline

    checkpoint = tmp_path / "schnell-like"
    pipe = assemble_flux_pipeline(TINY_CLIP, TINY_T5, {**TINY_TRANSFORMER, "guidance_embeds": False}, TINY_VAE, 0)
    pipe.save_pretrained(str(checkpoint), safe_serialization=True)
    run = tmp_path / "run"
    proc = run_cli("model=tiny", f"model.path={checkpoint}", "+backend=fuse_qkv", "bench.iterations=1",
                   "save_images=false", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = read_result(run)
    assert data["shapes"]["guidance_scale"] == 0.0 and data["shapes"]["steps"] == 4  # schnell's, not tiny's 3.5
    assert data["stacks"][0]["status"] == "ok"
