"""Every change is undoable: applying a stack is all-or-nothing, and closing it returns the
pipeline to bit-identical output and identical module structure, for every backend that runs
on a CPU, alone and composed. Also the API's refusals of wrong pipelines and wrong options."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import fluxopt
from fluxopt import ConfigError

STEPS = 2
KW = dict(height=64, width=64, steps=STEPS, max_sequence_length=64)
EAGER = {"backend": "eager", "cache": False}  # Dynamo without Inductor's C++ build: the undo is what is tested

# Every backend that runs on a CPU, with options that keep the test fast.
CPU_STACKS = {
    "compile": {"compile": {**EAGER, "regional": False}},
    "compile-regional": {"compile": {**EAGER, "regional": True}},
    "fuse_qkv": {"fuse_qkv": {}},
    "channels_last": {"channels_last": {}},
    "torchao_int8": {"torchao_int8": {}},
    "torchao_int8_dynamic": {"torchao_int8_dynamic": {}},
    "bnb_nf4": {"bnb_nf4": {}},
    "attention": {"attention": {"kernel": "_native_math"}},
    "fbcache": {"fbcache": {"residual_diff_threshold": 0.5}},
    "taylorseer": {"taylorseer": {"cache_interval": 2, "disable_cache_before_step": 1}},
    "magcache": {"magcache": {}},
    "fastercache": {"fastercache": {}},
    "pab": {"pab": {"spatial_attention_timestep_skip_range": [0.0, 1000.0]}},
    "seacache": {"seacache": {}},
    "fuse_qkv+compile": {"fuse_qkv": {}, "compile": {**EAGER, "regional": True}},
    "torchao_int8+fbcache": {"torchao_int8": {}, "fbcache": {"residual_diff_threshold": 0.5}},
    "channels_last+taylorseer+compile": {"channels_last": {}, "taylorseer": {"cache_interval": 2},
                                         "compile": {**EAGER, "regional": False, "fullgraph": False}},
}


def generate(pipe) -> np.ndarray:
    out = pipe(prompt="a red circle", height=64, width=64, num_inference_steps=STEPS, guidance_scale=3.5,
               max_sequence_length=64, generator=torch.Generator("cpu").manual_seed(1), output_type="np")
    return out.images[0]


def structure(pipe) -> list:
    """What a stack may change: every module's type, children, parameters (type, dtype, shape,
    layout), hooks and instance-level overrides, the attention processors and the scheduler."""
    rows = []
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component)
        for name, m in module.named_modules():
            params = [(n, type(p).__name__, str(p.dtype), tuple(p.shape), p.stride(), str(p.device))
                      for n, p in itertools.chain(m.named_parameters(recurse=False), m.named_buffers(recurse=False))]
            hooks = [len(getattr(m, attr)) for attr in ("_forward_hooks", "_forward_pre_hooks")]
            overrides = sorted(k for k in ("forward", "decode", "cache_context", "_compiled_call_impl",
                                           "_diffusers_hook", "_hf_hook", "fused_projections") if k in vars(m))
            processor = getattr(m, "processor", None)
            rows.append((component, name, type(m).__name__, params, hooks, overrides,
                         type(processor).__name__ if processor is not None else None,
                         getattr(processor, "_attention_backend", None)))
    rows.append(sorted(k for k in vars(pipe.scheduler) if k == "step"))
    rows.append(sorted(vars(pipe)))
    return rows


@pytest.fixture
def pipe():
    return fluxopt.load_model("tiny", device="cpu")


@pytest.mark.parametrize("name", sorted(CPU_STACKS))
def test_close_restores_output_and_structure(pipe, name):
    reference, before = generate(pipe), structure(pipe)
    with fluxopt.apply_stack(pipe, CPU_STACKS[name], **KW) as applied:
        assert structure(pipe) != before or name == "attention", "the stack changed nothing observable"
        generate(pipe)
    assert applied.closed
    assert structure(pipe) == before
    np.testing.assert_array_equal(generate(pipe), reference)
    torch._dynamo.reset()


def test_a_failed_apply_leaves_nothing_behind(pipe, monkeypatch):
    """The build's warm-up generation fails (inside the pipeline's call) after fuse_qkv changed the
    pipe and compile set a process-wide Inductor flag."""
    import torch._inductor.config as inductor_config

    reference, before, flags = generate(pipe), structure(pipe), inductor_config.save_config()
    stack = {"fuse_qkv": {}, "compile": {**EAGER, "inductor_config": {"max_autotune": True}}}

    def broken(*args, **kwargs):
        raise ValueError("the warm-up generation failed")

    with monkeypatch.context() as patch:
        patch.setattr(type(pipe), "__call__", broken)
        with pytest.raises(ValueError, match="warm-up generation failed"):
            fluxopt.apply_stack(pipe, stack, height=64, width=64, steps=STEPS, max_sequence_length=64)
    assert structure(pipe) == before and inductor_config.save_config() == flags
    np.testing.assert_array_equal(generate(pipe), reference)
    torch._dynamo.reset()


def test_applying_twice_is_refused_and_reapplying_after_close_is_clean(pipe):
    applied = fluxopt.apply_stack(pipe, {"taylorseer": {}}, build=False, **KW)
    hooks = structure(pipe)
    with pytest.raises(ConfigError, match="already has the stack 'taylorseer' applied"):
        fluxopt.apply_stack(pipe, {"fuse_qkv": {}}, **KW)
    applied.close()
    again = fluxopt.apply_stack(pipe, {"taylorseer": {}}, build=False, **KW)
    assert structure(pipe) == hooks  # no doubled hooks
    again.close()


def _compile(transformer):
    transformer.compile()


def _first_block_cache(transformer):
    from diffusers.hooks import FirstBlockCacheConfig

    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))


def _int8_weights(transformer):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(transformer, Int8WeightOnlyConfig())


@pytest.mark.parametrize("change, named", [
    (lambda t: t.fuse_qkv_projections(), "fused QKV projections"),
    (_compile, "torch.compile"),
    (_first_block_cache, r"diffusers hooks \(fbc_"),
    (_int8_weights, r"quantized \(tensor-subclass\) weights"),
], ids=["fused_qkv", "compile", "hooks", "quantized"])
def test_optimizations_made_outside_fluxopt_are_detected(pipe, change, named):
    """Applying a stack over optimizations fluxopt did not make would measure (and later undo)
    something else: each kind is refused, and named."""
    change(pipe.transformer)
    with pytest.raises(ConfigError, match=f"optimized outside fluxopt \\({named}"):
        fluxopt.apply_stack(pipe, ["channels_last"], **KW)


@pytest.mark.parametrize("thing, message", [
    (torch.nn.Sequential(torch.nn.Linear(2, 2)), "got Sequential with no transformer"),
    (type("DiTPipeline", (), {"transformer": torch.nn.Linear(2, 2)})(), "got DiTPipeline with Linear"),
])
def test_only_flux_pipelines_are_accepted(thing, message):
    with pytest.raises(ConfigError, match=message):
        fluxopt.apply_stack(thing, ["fuse_qkv"], **KW)


@pytest.mark.parametrize("backends, message", [
    ({"fbcache": 0.2}, "options for backend 'fbcache' must be a mapping"),
    (None, "backends is None"),
    ([], "the stack is empty"),
    ({"compile": {"inductor_config": {"max_autotune": "lots"}}}, r"max_autotune='lots' must be a bool"),
    ({"compile": {"inductor_config": {"max_autotune": False, "cpu_gpu_bw": True}}}, r"cpu_gpu_bw=True must be a float"),
    ({"compile": {"regional": "yes"}}, r"backend.compile.regional='yes' is not a valid bool"),
    ({"fbcache": {"residual_diff_threshold": "0.1"}}, r"residual_diff_threshold='0.1' is not a valid float"),
    ({"fbcache": {"treshold": 0.1}}, "has no option 'treshold'"),
    ({3: {}}, "backend names are strings"),
])
def test_api_refuses_bad_stacks_before_touching_the_pipe(pipe, backends, message):
    before = structure(pipe)
    with pytest.raises(ConfigError, match=message):
        fluxopt.apply_stack(pipe, backends, **KW)
    assert structure(pipe) == before


def test_a_single_name_is_one_backend(pipe):
    with fluxopt.apply_stack(pipe, "fuse_qkv", **KW) as applied:
        assert applied.stack.names == ["fuse_qkv"]
        assert any(getattr(m, "fused_projections", False) for m in pipe.transformer.modules())


def test_api_refuses_bad_shapes(pipe):
    with pytest.raises(ConfigError, match="bench.height=70 is not allowed: a multiple of 16"):
        fluxopt.apply_stack(pipe, "fuse_qkv", height=70, width=64)
    with pytest.raises(ConfigError, match="bench.steps=0 is not allowed"):
        fluxopt.apply_stack(pipe, "fuse_qkv", steps=0)
    with pytest.raises(ConfigError, match="bench.max_sequence_length=600 is not allowed"):
        fluxopt.apply_stack(pipe, "fuse_qkv", max_sequence_length=600)


def test_a_throwaway_pipeline_keeps_no_original_weights_alive(pipe):
    """The runner applies stacks with restorable=False: replaced weights must be freed, or the
    measured peak memory counts them (a snapshot once kept 24 GB of bf16 weights next to the
    fp8 ones on the H100: 36 GiB instead of 14)."""
    import gc
    import weakref

    from fluxopt import plugins  # noqa: F401 - registry
    from fluxopt.apply import apply_to_pipeline
    from fluxopt.context import StackContext
    from fluxopt.environment import detect_device
    from fluxopt.shapes import Shapes
    from fluxopt.stack import build_stack

    linear = pipe.transformer.transformer_blocks[0].attn.to_q
    original = weakref.ref(linear.weight)
    ctx = StackContext(device=detect_device("cpu"), dtype=torch.float32, model=None, cache_dir=None,
                       shapes=Shapes(64, 64, STEPS, 3.5, 64))
    applied = apply_to_pipeline(pipe, build_stack({"torchao_int8": {}}), ctx, build=False, restorable=False)
    gc.collect()
    assert original() is None
    applied.close()  # process-wide state only: this pipeline is meant to be thrown away
    with pytest.raises(ConfigError, match="quantized"):  # and a second stack on it is refused
        fluxopt.apply_stack(pipe, {"torchao_int8": {}}, build=False, **KW)
    fresh = fluxopt.load_model("tiny", device="cpu")
    kept = weakref.ref(fresh.transformer.transformer_blocks[0].attn.to_q.weight)
    with fluxopt.apply_stack(fresh, {"torchao_int8": {}}, build=False, **KW):
        gc.collect()
        assert kept() is not None  # restorable: the original waits (in host memory) to be put back


def _any(pipe, predicate) -> bool:
    return any(predicate(m) for m in pipe.transformer.modules())


EFFECTS = {  # what each backend must visibly do to the model while applied
    "fuse_qkv": lambda p: _any(p, lambda m: hasattr(m, "to_qkv")) and hasattr(p.vae.decoder.mid_block.attentions[0],
                                                                            "to_qkv"),
    "channels_last": lambda p: all(m.weight.is_contiguous(memory_format=torch.channels_last)
                                   for m in p.vae.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.ndim == 4),
    "torchao_int8": lambda p: _any(p, lambda m: isinstance(m, torch.nn.Linear) and type(m.weight).__name__ != "Parameter"
                                   or isinstance(m, torch.nn.Linear) and type(m.weight.data).__name__ != "Tensor"),
    "compile-regional": lambda p: all(getattr(b, "_compiled_call_impl", None) is not None
                                      for b in p.transformer.transformer_blocks),
    "compile": lambda p: p.transformer._compiled_call_impl is not None,
    "taylorseer": lambda p: _any(p, lambda m: getattr(m, "_diffusers_hook", None) is not None
                                 and "taylorseer" in " ".join(m._diffusers_hook.hooks)),
    "fbcache": lambda p: _any(p, lambda m: getattr(m, "_diffusers_hook", None) is not None
                              and any("fbc" in name for name in m._diffusers_hook.hooks)),
    "bnb_nf4": lambda p: _any(p, lambda m: type(m).__name__ == "Linear4bit"),
}


@pytest.mark.parametrize("name", sorted(EFFECTS))
def test_each_backend_visibly_changes_the_model_and_close_removes_it(pipe, name):
    effect = EFFECTS[name]
    assert not effect(pipe)
    with fluxopt.apply_stack(pipe, CPU_STACKS[name], build=False, **KW):
        assert effect(pipe), f"{name} applied but its effect is not on the model"
    assert not effect(pipe)


def test_process_wide_settings_a_backend_changes_behind_the_context_are_restored(pipe, monkeypatch):
    """A backend (a third-party one, or a library it calls) that flips Inductor and torch.backends
    settings directly, not through the stack's context: close still puts them back."""
    import torch._inductor.config as inductor_config

    from fluxopt.stack import lookup_backend

    backend_class = type(lookup_backend("channels_last"))
    original_apply = backend_class.apply
    def settings():
        return (inductor_config.epilogue_fusion, torch.backends.cudnn.benchmark,
                torch.backends.cuda.flash_sdp_enabled())

    before = settings()

    def misbehaving_apply(self, pipe, options, ctx):
        original_apply(self, pipe, options, ctx)
        inductor_config.epilogue_fusion = not before[0]
        torch.backends.cudnn.benchmark = not before[1]
        torch.backends.cuda.enable_flash_sdp(not before[2])  # an attention kernel switch

    monkeypatch.setattr(backend_class, "apply", misbehaving_apply)
    with fluxopt.apply_stack(pipe, ["channels_last"], build=False, **KW):
        assert all(now != then for now, then in zip(settings(), before, strict=True))
    assert settings() == before


def test_changes_registered_on_the_context_are_undone_on_close(pipe, monkeypatch):
    """What a backend registers on the stack's context (an attribute set on an object outside
    the pipeline, an undo callback) is undone on close, newest first."""
    from fluxopt.stack import lookup_backend

    backend_class = type(lookup_backend("channels_last"))
    original_apply = backend_class.apply
    outside = type("Outside", (), {})()
    undone = []

    def registering_apply(self, pipe, options, ctx):
        original_apply(self, pipe, options, ctx)
        ctx.set_attr("outside flag", outside, "flag", True)
        ctx.callback("first", lambda: undone.append("first"))
        ctx.callback("second", lambda: undone.append("second"))

    monkeypatch.setattr(backend_class, "apply", registering_apply)
    with fluxopt.apply_stack(pipe, ["channels_last"], build=False, **KW):
        assert outside.flag is True and undone == []
    assert not hasattr(outside, "flag") and undone == ["second", "first"]


def test_the_context_restores_an_existing_attribute_exits_contexts_and_survives_a_failing_undo():
    """Mutation-testing gaps: an attribute the object already had gets its old value back (not
    removed); an entered context manager is exited; one failing undo does not stop the others,
    and its error is the one raised."""
    import contextlib

    from fluxopt.context import StackContext

    ctx = StackContext.__new__(StackContext)
    ctx._undo = []
    holder = type("Holder", (), {})()
    holder.mode = "original"
    ctx.set_attr("mode", holder, "mode", "changed")
    events = []

    @contextlib.contextmanager
    def scoped():
        events.append("enter")
        yield "value"
        events.append("exit")

    assert ctx.enter_context("scoped", scoped()) == "value"

    def failing():
        raise RuntimeError("this undo failed")

    ctx.callback("failing", failing)
    ctx.callback("last", lambda: events.append("last undo"))
    assert holder.mode == "changed"
    with pytest.raises(RuntimeError, match="this undo failed"):
        ctx.undo()
    assert events == ["enter", "last undo", "exit"] and holder.mode == "original"


def test_build_time_is_the_builds_wall_time(pipe):
    import time

    start = time.perf_counter()
    with fluxopt.apply_stack(pipe, ["fuse_qkv"], **KW) as applied:
        elapsed = time.perf_counter() - start
    assert 0 < applied.build_s <= elapsed


def test_an_integer_is_a_valid_value_for_a_float_inductor_flag():
    from fluxopt.compiler_state import validate_inductor_flags

    validate_inductor_flags("backend.compile.inductor_config", {"cpu_gpu_bw": 50, "max_autotune": False})


def test_closing_a_compiled_stack_drops_dynamos_entries_so_a_long_lived_process_never_hits_the_recompile_limit():
    """Dynamo keeps compiled entries per code object (a block class's forward), across pipelines:
    once a process has compiled more pipelines than the recompile limit (8), a fullgraph compile
    fails, unless each close drops its entries."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from fluxopt.serving import apply_stack, load_model
    from fluxopt_plugins.compile import CompileOptions, compiled_code

    for regional in (True, False):
        options = {**EAGER, "regional": regional, "fullgraph": True}
        pipe = load_model("tiny", device="cpu")
        codes = compiled_code(pipe, CompileOptions(**options))
        with apply_stack(pipe, {"compile": options}, **KW):  # built: one generation compiles
            assert any(_debug_get_cache_entry_list(code) for code in codes)
        assert not any(_debug_get_cache_entry_list(code) for code in codes)
