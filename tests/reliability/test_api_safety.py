"""The Python API as safe as the CLI: the same refusals before anything runs, only measurements
that ran whole and passed are applied from a result, process-wide state restored exactly whatever
order stacks on different pipelines close in, and pipelines sharing modules never both hold a stack."""

from __future__ import annotations

import json

import _records as records
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fluxopt
from fluxopt import ConfigError
from fluxopt.record import write_record

KW = dict(height=64, width=64, steps=2, max_sequence_length=64)
EAGER = {"backend": "eager", "cache": False}


def test_benchmark_refuses_an_output_dir_that_is_a_file(tiny_pipe, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="output_dir=.*afile is not usable: .*is a file"):
        fluxopt.benchmark(tiny_pipe, ["fuse_qkv"], output_dir=tmp_path / "afile", **KW)


@pytest.mark.parametrize(("stack", "why"), [
    (records.stack("fuse_qkv", 1.5, status="failed", reason="build: boom"), "cannot be applied: failed: build: boom"),
    (records.stack("fuse_qkv", 1.5, psnr=10.0), "cannot be applied: failed: fidelity"),
    (records.stack("fuse_qkv", 1.5, partial="stop_after=onnx"), "cannot be applied: a partial build"),
])
def test_apply_stack_from_a_result_applies_only_what_ran_whole_and_passed(tiny_pipe, tmp_path, stack, why):
    write_record(tmp_path / "result.json", records.run([stack]))
    with pytest.raises(ConfigError, match=why):
        fluxopt.apply_stack(tiny_pipe, tmp_path, stack="fuse_qkv")


def test_apply_stack_from_a_result_refuses_an_edited_record(tiny_pipe, tmp_path):
    path = tmp_path / "result.json"
    write_record(path, records.run([records.stack("fuse_qkv", 1.5)]))
    data = json.loads(path.read_text())
    data["stacks"][0]["speedup"] = 9.0
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="its record was edited"):
        fluxopt.apply_stack(tiny_pipe, tmp_path, stack="fuse_qkv")


def test_apply_stack_from_a_result_takes_the_passing_record_and_its_measured_shapes(tiny_pipe, tmp_path):
    failed = records.stack("fuse_qkv", 3.0, status="failed", reason="run: boom")
    write_record(tmp_path / "a" / "result.json", records.run([failed]))
    write_record(tmp_path / "b" / "result.json", records.run(
        [records.stack("fuse_qkv", 1.3)], shapes={**KW, "guidance_scale": 3.5}))
    with fluxopt.apply_stack(tiny_pipe, tmp_path, stack="fuse_qkv") as applied:
        assert str(tmp_path / "b" / "result.json") in applied.source and "1.30x" in applied.source
        shapes = applied.ctx.shapes
    assert (shapes.max_sequence_length, shapes.height, shapes.steps) == (64, 64, 2)  # measured, not the defaults


def test_process_wide_flags_are_restored_whatever_order_stacks_on_two_pipelines_close(tmp_path):
    import torch._inductor.config as inductor_config

    first, second = fluxopt.load_model("tiny", device="cpu"), fluxopt.load_model("tiny", device="cpu")
    before = inductor_config.save_config()
    a = fluxopt.apply_stack(first, {"compile": {**EAGER, "inductor_config": {"max_autotune": True}}}, build=False, **KW)
    b = fluxopt.apply_stack(second, {"compile": {**EAGER, "inductor_config": {"max_autotune": True,
                                                                              "epilogue_fusion": False}}},
                            build=False, **KW)
    a.close()  # first opened, first closed: b's flags stay in force while b is applied
    assert inductor_config.max_autotune is True and inductor_config.epilogue_fusion is False
    b.close()
    assert inductor_config.save_config() == before
    torch._dynamo.reset()


def test_a_pipeline_sharing_modules_with_one_that_holds_a_stack_is_refused(tiny_pipe):
    from diffusers import FluxImg2ImgPipeline

    other = FluxImg2ImgPipeline.from_pipe(tiny_pipe)
    with fluxopt.apply_stack(tiny_pipe, "fuse_qkv", build=False, **KW):
        with pytest.raises(ConfigError, match=r"shares its \w+ with another pipeline \(FluxPipeline at 0x[0-9a-f]+\) "
                                              r"that holds the stack 'fuse_qkv'"):
            fluxopt.apply_stack(other, "fuse_qkv", build=False, **KW)
    with fluxopt.apply_stack(other, "fuse_qkv", build=False, **KW):  # free again once closed
        pass


FLAGS = [{"max_autotune": True}, {"max_autotune": True, "epilogue_fusion": False},
         {"coordinate_descent_tuning": True, "epilogue_fusion": False}]


@pytest.fixture(scope="module")
def three_pipes():
    return [fluxopt.load_model("tiny", device="cpu") for _ in FLAGS]


@settings(max_examples=12, deadline=None)
@given(order=st.permutations(range(len(FLAGS))))
def test_any_closing_order_keeps_open_stacks_flags_and_ends_where_it_began(three_pipes, order):
    """Stacks on three pipelines set overlapping Inductor flags; closed in any order, every flag a
    still-open stack set stays in force, and the last close restores the process exactly."""
    import torch._inductor.config as inductor_config

    before = inductor_config.save_config()
    applied = [fluxopt.apply_stack(pipe, {"compile": {**EAGER, "inductor_config": flags}}, build=False, **KW)
               for pipe, flags in zip(three_pipes, FLAGS, strict=True)]
    open_ = set(range(len(FLAGS)))
    for i in order:
        applied[i].close()
        open_.discard(i)
        for j in open_:
            for key, value in FLAGS[j].items():
                assert getattr(inductor_config, key) == value, (order, i, j, key)
    assert inductor_config.save_config() == before
    torch._dynamo.reset()
