"""Every change a backend makes is named, filed under that backend (``applied.changes``, shown by
``repr(applied)``), and an options object is a handle on its backend: ``apply_stack(pipe,
[CompileOptions(...), FBCacheOptions(...)])`` works beside the string form."""

from __future__ import annotations

import pytest

import fluxopt
from fluxopt.apply import apply_to_pipeline
from fluxopt.context import StackContext
from fluxopt.environment import detect_device
from fluxopt.shapes import Shapes
from fluxopt.snapshot import PipelineSnapshot
from fluxopt.stack import build_stack
from fluxopt_plugins.compile import CompileOptions
from fluxopt_plugins.fbcache import FBCacheOptions
from fluxopt_plugins.torchao_quant import TorchaoOptions

SHAPES = Shapes(height=64, width=64, steps=2, guidance_scale=3.5, max_sequence_length=32)
EAGER = {"backend": "eager", "cache": False}  # torch.compile's machinery without Inductor's C++ build

# Every backend the CPU can apply (a stack of one each); compile and a cache together to check filing.
CPU_STACKS = [{"fuse_qkv": {}}, {"channels_last": {}}, {"fbcache": {}}, {"taylorseer": {}}, {"magcache": {}},
              {"fixed_cache": {}}, {"compile": {**EAGER, "regional": False}}, {"compile": EAGER},
              {"attention": {"kernel": "native"}}, {"fbcache": {}, "compile": {**EAGER, "regional": False}}]


@pytest.mark.parametrize("selection", CPU_STACKS, ids=lambda s: "+".join(s))
def test_every_backend_that_changes_the_pipeline_names_its_changes(selection, tmp_path):
    """The snapshot (the safety net) restores whatever differs after applying; every backend that made
    a difference has at least one named change in the journal, filed under its own name."""
    pipe = fluxopt.load_model("tiny", device="cpu")
    stack = build_stack(selection)
    before = PipelineSnapshot(pipe)
    ctx = StackContext(device=detect_device("cpu"), dtype=pipe.dtype, model=None, shapes=SHAPES, cache_dir=tmp_path,
                       stack=stack, run_once=lambda: None)
    applied = apply_to_pipeline(pipe, stack, ctx, build=False)
    try:
        differs = [c for c in before.changed() if not c.endswith("._fluxopt_stack")]
        assert differs, "the stack changed nothing the snapshot would restore"
        named = applied.changes
        assert set(named) <= set(stack.names), named  # filed under the stack's own backends
        for name in stack.names:
            assert named.get(name), f"{name} changed {differs} but named no change: {named}"
        assert all(n.startswith(tuple(f"{b}: " for b in stack.names)) for n in ctx.changes)  # each says whose
    finally:
        applied.close()
    assert [c for c in before.changed() if not c.endswith("._fluxopt_stack")] == []


def test_options_objects_are_handles_and_repr_shows_the_changes(tiny_pipe):
    with fluxopt.apply_stack(tiny_pipe, [CompileOptions(**EAGER, regional=True), FBCacheOptions(residual_diff_threshold=0.2)],
                             height=64, width=64, steps=2, build=False) as applied:
        assert applied.stack.name == "fbcache+compile"
        assert applied.stack.options_dict()["fbcache"]["residual_diff_threshold"] == 0.2
        assert set(applied.changes) == {"fbcache", "compile"}
        text = repr(applied)
        assert "fbcache: diffusers' first-block cache hooks on the transformer, the scheduler's steps counted" in text
        assert "; compile: Inductor flags, the repeated blocks compiled (regional)>" in text
    assert "(closed)" in repr(applied) and applied.changes == {}


def test_an_options_class_shared_by_backends_must_be_named():
    with pytest.raises(fluxopt.ConfigError, match="options class of torchao_fp8_weight_only, torchao_int8"):
        build_stack([TorchaoOptions()])
    assert build_stack({"torchao_int8": TorchaoOptions()}).name == "torchao_int8"


def test_an_object_that_is_no_backend_options_is_refused():
    import dataclasses

    @dataclasses.dataclass
    class NotOptions:
        x: int = 1

    with pytest.raises(fluxopt.ConfigError, match="NotOptions is not the options class of any registered backend"):
        build_stack([NotOptions()])
