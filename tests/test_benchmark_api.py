"""``fluxopt.benchmark`` on a pipeline built in the test (issue 16): the CLI's record, stacks
really applied and undone, bad input refused before anything runs."""

from __future__ import annotations

import json

import pytest
import torch

import fluxopt
from fluxopt.errors import ConfigError

SMALL = {"height": 64, "width": 64, "steps": 2, "warmup": 0, "iterations": 2, "prompts": ["a red cube", "a tree"]}


def _latents(pipe):
    with torch.inference_mode():
        return pipe(prompt="a red cube", height=64, width=64, num_inference_steps=2, output_type="latent",
                    generator=torch.Generator("cpu").manual_seed(3)).images


def test_benchmark_measures_stacks_on_the_users_pipeline_and_leaves_it_as_it_was(tmp_path):
    pipe = fluxopt.load_model("tiny", device="cpu")
    before = _latents(pipe)
    result = fluxopt.benchmark(pipe, ["fuse_qkv", {"channels_last": {}, "fbcache": {}}], output_dir=tmp_path,
                               name="my flux", trained=False, **SMALL)
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))  # the CLI's record
    assert result["complete"] and result["model"]["name"] == "my flux" and result["mode"] == "bakeoff"
    assert result["prompts"] == SMALL["prompts"] and result["shapes"]["steps"] == 2
    assert result["baseline"]["status"] == "ok" and result["baseline"]["latency"]["n"] == 2
    stacks = {s["stack"]: s for s in result["stacks"]}
    assert set(stacks) == {"fuse_qkv", "channels_last+fbcache"}
    for s in stacks.values():
        assert s["status"] == "ok" and s["speedup"] > 0 and s["fidelity"]["passed"]
        assert len(s["fidelity"]["metrics"]["psnr"]["per_prompt"]) == 2  # both prompts judged
    assert not getattr(pipe.transformer.transformer_blocks[0].attn, "fused_projections", False)  # undone
    assert torch.equal(_latents(pipe), before)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"stacks": "compile"}, "stacks is a list of stacks"),
    ({"stacks": [["fbcache", "taylorseer"]]}, "cannot be combined"),
    ({"stacks": ["fuse_qkv"], "iterations": 0}, "iterations=0 is not allowed"),
    ({"stacks": ["fuse_qkv"], "height": 60}, "multiples of 16"),
    ({"stacks": ["fuse_qkv"], "fidelity": {"losless": {"psnr": 30}}}, "'losless' is not allowed"),
])
def test_benchmark_refuses_bad_input_before_running(tiny_pipe, tmp_path, kwargs, message):
    kwargs = dict(kwargs)  # the parameter is shared by every run of this test
    with pytest.raises(ConfigError, match=message):
        fluxopt.benchmark(tiny_pipe, kwargs.pop("stacks"), output_dir=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
