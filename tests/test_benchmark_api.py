"""``fluxopt.benchmark`` on a pipeline built in the test: the CLI's record, stacks
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
    record = fluxopt.benchmark(pipe, ["fuse_qkv", {"channels_last": {}, "fbcache": {}}], output_dir=tmp_path,
                               name="my flux", trained=False, **SMALL)
    result = json.loads(json.dumps(record.to_json()))
    assert json.loads((tmp_path / "result.json").read_text()) == result  # the CLI's record
    assert fluxopt.read_record(tmp_path / "result.json").edited == []
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
    ({"stacks": ["fuse_qkv"], "iterations": 0}, "bench.iterations=0 is not allowed"),
    ({"stacks": ["fuse_qkv"], "height": 60}, "bench.height=60 is not allowed: a multiple of 16"),
    ({"stacks": ["fuse_qkv"], "fidelity": {"losless": {"psnr": 30}}}, "Key 'losless' not in 'FidelityConfig'"),
    # the same rules as the command line's, before anything runs (these once failed mid-run or not at all)
    ({"stacks": ["fuse_qkv"], "prompts": "cat"}, "bench.prompts='cat' is not allowed: a non-empty list"),
    ({"stacks": ["fuse_qkv"], "fidelity": {"lossless": {"psrn": 30}}}, "unknown metric. Did you mean 'psnr'"),
    ({"stacks": ["fuse_qkv"], "fidelity": {"lossless": {"ssim": 5}}}, "can never pass"),
    ({"stacks": ["fuse_qkv"], "fidelity": 3}, "fidelity=3 is not allowed"),
    ({"stacks": ["fuse_qkv"], "max_sequence_length": 100000}, "bench.max_sequence_length=100000 is not allowed"),
    ({"stacks": ["fuse_qkv"], "seed": 2**64}, "bench.seed=18446744073709551616 is not allowed"),
    ({"stacks": ["fuse_qkv"], "seed": -1}, "bench.seed=-1 is not allowed"),
    ({"stacks": ["fuse_qkv"], "warmup": -1}, "bench.warmup=-1 is not allowed"),
    ({"stacks": ["fuse_qkv"], "max_time_s": 0}, "bench.max_time_s=0.0 is not allowed"),
    ({"stacks": ["fuse_qkv"], "target_rse": 2}, "bench.target_rse=2.0 is not allowed: a fraction between 0 and 1"),
    ({"stacks": ["fuse_qkv"], "guidance_scale": float("nan")}, "bench.guidance_scale=nan is not allowed"),
])
def test_benchmark_refuses_bad_input_before_running(tiny_pipe, tmp_path, kwargs, message):
    kwargs = dict(kwargs)  # the parameter is shared by every run of this test
    with pytest.raises(ConfigError, match=message):
        fluxopt.benchmark(tiny_pipe, kwargs.pop("stacks"), output_dir=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
