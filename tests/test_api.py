"""The serving API: apply a stack to one's own FluxPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fluxopt
from fluxopt.report.catalog import render
from fluxopt.errors import ConfigError, UnavailableError


def _image(pipe) -> np.ndarray:
    out = pipe(prompt="a red circle", height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
               max_sequence_length=64, generator=torch.Generator("cpu").manual_seed(1), output_type="np")
    return out.images[0]


def test_apply_stack_to_own_pipeline_keeps_outputs():
    pipe = fluxopt.load_model("tiny", device="cpu")
    reference = _image(pipe)
    # Dynamo's eager backend: the API's build-now and undo are under test; Inductor's numerics are
    # the CLI compile test's (tests/test_cli.py), at 20 s of C++ on a CPU
    applied = fluxopt.apply_stack(pipe, {"compile": {"regional": True, "backend": "eager"}}, height=64, width=64,
                                  steps=2, max_sequence_length=64)
    assert applied.stack.names == ["compile"]
    assert applied.stats["build_phases_s"]["compile"] > 0  # built eagerly: first request is warm
    breakdown = applied.stats["compile"]["breakdown_s"]  # where the compile time went
    assert breakdown["_compile.compile_inner"] <= applied.stats["build_phases_s"]["compile"]
    np.testing.assert_allclose(_image(pipe), reference, atol=1e-4)
    applied.close()
    torch._dynamo.reset()


def test_apply_stack_refuses_what_cannot_run_here():
    pipe = fluxopt.load_model("tiny", device="cpu")
    with pytest.raises(UnavailableError, match="needs an NVIDIA GPU"):
        fluxopt.apply_stack(pipe, ["torchao_fp8"])
    with pytest.raises(ConfigError, match="Known backends"):
        fluxopt.apply_stack(pipe, ["nope"])


def test_available_backends_and_catalog_agree():
    available = fluxopt.available_backends("cpu")
    assert available["compile"] is None
    assert "GPU" in available["torchao_fp8"]
    table = render("cpu")
    for name, reason in available.items():
        assert f"`{name}`" in table
        assert ("available" if reason is None else reason) in table
