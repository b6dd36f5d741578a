"""Backend ``aoti``: torch.export + AOTInductor on the tiny model (CPU, end to end through the
CLI: a cold build in the background with ``build_only=true detach=true``, as a user pays a long
build once, then a measuring run that starts warm from the artifact cache), its pieces in
isolation, and the CUDA-graph path on a GPU."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from conftest import SMALL_BF16_ARGS, read_result, run_cli

from fluxopt.fingerprint import module_fingerprint
from fluxopt import Shapes, Stage, StackContext
from fluxopt.errors import ConfigError
from fluxopt.stack import build_stack

AOTI_ARGS = ("+backend=aoti", *SMALL_BF16_ARGS, "bench.iterations=2")
SHAPES = Shapes(height=64, width=64, steps=2, guidance_scale=3.5, max_sequence_length=128)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def aoti():
    from fluxopt_plugins.aoti import AotiBackend, AotiOptions

    return AotiBackend(), AotiOptions


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.xdist_group("aoti_two_runs")  # one worker builds the shared fixture once
def test_aoti_cold_build_in_the_background_builds_and_measures_nothing(aoti_then_default_bakeoff):
    cold = aoti_then_default_bakeoff.cold
    assert cold["build_only"] is True and cold["baseline"] is None and cold["complete"] is True
    (stack,) = cold["stacks"]
    assert stack["stack"] == "aoti" and stack["status"] == "ok", stack
    assert stack["latency"] is None and stack["fidelity"] is None
    phases = stack["build_phases_s"]
    assert phases["export"] > 0 and phases["aoti_compile"] > 0 and phases["load"] > 0
    assert "load_probe" not in phases  # the compiler's probe loaded one of its packages: no second probe
    stats = stack["stats"]
    assert stats["aoti"]["cache_hit"] is False and stats["aoti"]["warm_start"] is False
    assert stats["aoti"]["weights"] == "shared" and stats["aoti"]["cuda_graphs"] is False  # auto: plain weights
    assert stats["aoti"]["released_weight_bytes"] > 0  # the package holds the only copy of the weights
    # eager's rounding of the scaled timestep kept: 0.006 (fusion inside blocks), 0.035 without it
    assert stats["aoti"]["eager_rounding"] is True
    assert stats["aoti"]["self_check"]["transformer_rel_l2"] < 0.015
    assert stats["aoti"]["cxx"] and stats["aoti"]["cxx_reason"]
    assert stats["artifacts"]["aoti"]["built"] is True and stats["artifacts"]["aoti"]["size_bytes"] > 0
    assert Path(stats["artifacts"]["aoti"]["path"], "transformer.pt2").is_file()
    # Inductor's compiled kernels are kept in fluxopt's cache (an interrupted build leaves them to the next)
    assert any(Path(stats["aoti"]["inductor_cache_dir"]).rglob("*.so"))
    assert stats["aoti"]["max_autotune"] is False  # the default; the record says what ran
    assert stats["aoti"]["compiled_twice"] is False  # the compiler the compile started with was confirmed


@pytest.mark.xdist_group("aoti_two_runs")  # one worker builds the shared fixture once
def test_aoti_second_process_loads_the_package_from_the_cache_and_is_lossless(aoti_then_default_bakeoff):
    runs = aoti_then_default_bakeoff
    (c,) = runs.cold["stacks"]
    (w,) = [s for s in runs.bakeoff["stacks"] if s["stack"] == "aoti"]
    assert "Built 1 of 1 stack(s), measured nothing (build_only)" in runs.console
    assert w["status"] == "ok" and w["lossless"] is True and w["fidelity"]["passed"] is True, w
    assert w["fidelity"]["metrics"]["latent_rel_l2"]["worst"] < 0.01  # bf16: 0.004; 0.019 without eager rounding
    assert w["stats"]["aoti"]["cache_hit"] is True and w["stats"]["aoti"]["warm_start"] is True
    assert w["stats"]["artifacts"]["aoti"]["cache_hit"] is True
    assert w["stats"]["artifacts"]["aoti"]["path"] == c["stats"]["artifacts"]["aoti"]["path"]
    assert "export" not in w["build_phases_s"] and "aoti_compile" not in w["build_phases_s"]
    assert w["build_s"] < c["build_s"] / 3, (c["build_s"], w["build_s"])


class _AsFloat(torch.nn.Module):
    """Stands in for FLUX's ``time_proj``, which embeds its input in float32."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()


@pytest.mark.parametrize("eager_rounding", [True, False])
def test_whole_graph_inductor_keeps_eagers_timestep_only_with_eager_rounding(eager_rounding):
    """The cause of the H100's aoti mismatch: a fused kernel drops eager's bf16 rounding of
    timestep * 1000 (699.2 instead of 700.0) unless the projection's input is rounded explicitly."""
    from fluxopt.kit.eager_rounding import EagerRoundedTimesteps

    proj = EagerRoundedTimesteps(_AsFloat()) if eager_rounding else _AsFloat()

    def embedding_input(t: torch.Tensor) -> torch.Tensor:  # FLUX: scale in the model dtype, then project
        return proj(t.to(torch.bfloat16) * 1000)

    t = torch.tensor([0.7], dtype=torch.bfloat16)
    assert embedding_input(t).item() == 700.0
    torch._dynamo.reset()
    fused = torch.compile(embedding_input, fullgraph=True)(t).item()
    torch._dynamo.reset()
    assert (fused == 700.0) is eager_rounding, fused


def test_self_check_refuses_a_package_that_computes_something_else():
    from fluxopt_plugins.aoti import AotiMismatchError, self_check

    expected = torch.randn(4, 16, dtype=torch.bfloat16)
    assert self_check("transformer", expected + 1e-3 * torch.randn_like(expected), expected, 5e-2) < 5e-2
    with pytest.raises(AotiMismatchError, match=r"relative L2 error of 0\.(4|39).*tolerance 0\.25"):
        self_check("transformer", 1.4 * expected, expected, 0.25)
    with pytest.raises(AotiMismatchError):
        self_check("transformer", torch.full_like(expected, float("nan")), expected, 0.25)


def test_self_check_tolerance_is_looser_only_for_quantized_weights_and_the_user_can_set_it():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from fluxopt_plugins.aoti import (QUANTIZED_SELF_CHECK_TOLERANCE, SELF_CHECK_TOLERANCE, AotiOptions,
                                      self_check_tolerance)

    from fluxopt import compiler_state

    plain = torch.nn.Sequential(torch.nn.Linear(32, 32))
    assert self_check_tolerance(AotiOptions(), plain, torch.bfloat16) == SELF_CHECK_TOLERANCE[torch.bfloat16]
    restore = compiler_state.hold()  # torchao's quantize_ sets Inductor flags for the whole process
    try:
        quantize_(plain, Int8WeightOnlyConfig())
    finally:
        restore()
    assert self_check_tolerance(AotiOptions(), plain, torch.bfloat16) == QUANTIZED_SELF_CHECK_TOLERANCE
    assert QUANTIZED_SELF_CHECK_TOLERANCE < 0.39  # still refuses what the timestep-rounding bug computed
    assert self_check_tolerance(AotiOptions(self_check_tolerance=0.1), plain, torch.bfloat16) == 0.1
    with pytest.raises(ConfigError, match="backend.aoti.self_check_tolerance=1.5 must be between 0 and 1"):
        build_stack({"aoti": {"self_check_tolerance": 1.5}})


# ---------------------------------------------------------------------------------- pieces
def test_load_probe_turns_a_crashing_loader_into_an_error(monkeypatch, tmp_path):
    """A loader that segfaults (as every package did on the H100's torch 2.11.0+cu130) fails the
    stack with the signal's name instead of killing the process."""
    import fluxopt_plugins.aoti as aoti_module

    monkeypatch.setattr(aoti_module, "PROBE_CODE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(aoti_module.AotiLoadError, match="killed by SIGSEGV.*use backend=compile"):
        aoti_module.probe_load(tmp_path / "transformer.pt2")


# A fresh process counts Inductor's per-ISA test builds while it loads a package, with fluxopt's
# load_package (argv[2] == "fluxopt") or with torch's aoti_load_package, and runs the package.
_COUNT_ISA_CHECKS = """
import sys
from pathlib import Path

import torch
from torch._inductor import cpu_vec_isa

checked, real = [], cpu_vec_isa.VecISA.check_build
cpu_vec_isa.VecISA.check_build = lambda self, code: checked.append(str(self)) or real(self, code)
if sys.argv[2] == "fluxopt":
    from fluxopt_plugins.aoti import load_package
    model = load_package(Path(sys.argv[1]), None, "", single_threaded=False)
else:
    model = torch._inductor.aoti_load_package(sys.argv[1])
print(len(checked), cpu_vec_isa.valid_vec_isa_list.cache_info().currsize, float(model(torch.ones(2, 4)).sum()))
"""


def test_loading_a_package_checks_no_cpu_isa(tmp_path):
    """aoti_load_package checks each CPU vector ISA by building and loading a test library (in
    torch 2.11, a child process importing torch for each: 42 s of a warm aoti build on the H200),
    only to word an advisory warning. fluxopt's load skips that description of the host, computes
    what the package computes, and leaves Inductor's ISA list to the first compile that needs it."""
    import os
    import subprocess
    import sys

    linear = torch.nn.Linear(4, 4)
    with torch.no_grad():
        linear.weight.fill_(0.5)
        linear.bias.fill_(0.25)
    program = torch.export.export(linear, (torch.ones(2, 4),), strict=False)
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "p.pt2"))
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_VEC_ISA_OK"}

    def load(loader: str) -> tuple[int, int, float]:
        proc = subprocess.run([sys.executable, "-c", _COUNT_ISA_CHECKS, path, loader], capture_output=True,
                              text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        checks, cached, total = proc.stdout.split()[-3:]
        return int(checks), int(cached), float(total)

    as_torch_does = load("torch")
    assert as_torch_does[2] == 18.0  # 2 x 4 outputs of 4 * 0.5 + 0.25
    if as_torch_does[0] == 0:
        pytest.skip("this CPU offers Inductor no vector ISA to check")
    assert load("fluxopt") == (0, 0, 18.0)


def test_a_torch_whose_loader_takes_other_arguments_loads_through_the_public_function(monkeypatch, tmp_path):
    import fluxopt_plugins.aoti as aoti_module

    def other_signature(*args):
        raise TypeError("__init__(): incompatible constructor arguments")

    monkeypatch.setattr(torch._C._aoti, "AOTIModelPackageLoader", other_signature)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path, run_single_threaded: (path, run_single_threaded))
    assert aoti_module.open_package(tmp_path / "p.pt2", True) == (str(tmp_path / "p.pt2"), True)


def test_load_probe_reports_an_unloadable_package(tmp_path):
    from fluxopt_plugins.aoti import AotiLoadError, probe_load

    bad = tmp_path / "transformer.pt2"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(AotiLoadError, match="exited with 1: .*Error"):
        probe_load(bad)


def test_aoti_is_a_graph_backend_that_conflicts_with_compile_and_trt():
    backend, _ = aoti()
    assert backend.stage is Stage.GRAPH and backend.is_lossless(None)
    assert "trt_fp8" in backend.conflicts
    with pytest.raises(ConfigError, match="cannot be combined"):
        build_stack(["aoti", "compile"])


@pytest.mark.parametrize("options, message", [
    ({"weights": "mmap"}, "weights"),
    ({"min_resolution": 100}, "multiple of 16"),
    ({"min_resolution": 1024, "max_resolution": 512}, "smaller than"),
    ({"inductor_config": {"no_such_flag": 1}}, "unknown Inductor"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        build_stack({"aoti": options})


@pytest.mark.parametrize("quantizer", ["torchao_fp8", "torchao_int8", "bnb_nf4"])
def test_shared_weights_with_a_quantizer_are_refused_before_loading(quantizer):
    with pytest.raises(ConfigError, match=f"weights=shared cannot bind the quantized weights of {quantizer}"):
        build_stack({quantizer: {}, "aoti": {"weights": "shared"}})
    assert build_stack({quantizer: {}, "aoti": {"weights": "embedded"}}).names == [quantizer, "aoti"]


def test_dynamic_range_must_cover_the_bench_shapes():
    backend, options_class = aoti()
    options = options_class(dynamic=True, min_resolution=256, max_resolution=512)
    from fluxopt.environment import detect_device

    ctx = StackContext(device=detect_device("cpu"), dtype=torch.float32, model=None, shapes=SHAPES,
                       cache_dir=Path("/nonexistent"))
    with pytest.raises(ConfigError, match="16 image tokens, outside the dynamic range 256..1024"):
        backend.apply(None, options, ctx)


def test_example_inputs_follow_the_pipeline(tiny_pipe):
    from fluxopt import transformer_inputs as example_inputs

    inputs = example_inputs(tiny_pipe.transformer, SHAPES, torch.device("cpu"), torch.float32)
    cfg = tiny_pipe.transformer.config
    assert inputs["hidden_states"].shape == (1, 16, cfg.in_channels)
    assert inputs["encoder_hidden_states"].shape == (1, 128, cfg.joint_attention_dim)
    assert inputs["pooled_projections"].shape == (1, cfg.pooled_projection_dim)
    assert inputs["img_ids"].shape == (16, 3) and inputs["txt_ids"].shape == (128, 3)
    assert inputs["guidance"].dtype == torch.float32 and inputs["timestep"].shape == (1,)
    with torch.no_grad():  # what the transformer accepts as is
        out = tiny_pipe.transformer(**inputs, return_dict=False)[0]
    assert out.shape == inputs["hidden_states"].shape


def test_forward_adapter_matches_the_transformer_interface():
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    from fluxopt import TransformerForward

    expected = {"hidden_states": torch.zeros(1, 4, 8), "timestep": torch.zeros(1),
                "guidance": torch.zeros(1), "img_ids": torch.zeros(4, 3), "txt_ids": torch.zeros(2, 3),
                "encoder_hidden_states": torch.zeros(1, 2, 8), "pooled_projections": torch.zeros(1, 8)}
    seen = {}

    def run(**inputs):
        seen.update(inputs)
        return inputs["hidden_states"] + 1

    forward = TransformerForward(run, dtypes={k: v.dtype for k, v in expected.items()}, device=torch.device("cpu"))
    call = {**expected, "guidance": torch.zeros(1, dtype=torch.float64), "txt_ids": torch.zeros(1, 2, 3)}
    out = forward(**call, joint_attention_kwargs=None, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and torch.equal(out[0], torch.ones(1, 4, 8))
    assert seen["guidance"].dtype == torch.float32 and seen["txt_ids"].shape == (2, 3)
    assert isinstance(forward(**expected), Transformer2DModelOutput)
    with pytest.raises(NotImplementedError, match="joint_attention_kwargs"):
        forward(**expected, joint_attention_kwargs={"scale": 0.5})
    with pytest.raises(ValueError, match="needs 'guidance'"):
        forward(**{**expected, "guidance": None})
    fallback_calls = []
    with_fallback = TransformerForward(run, fallback=lambda **kw: fallback_calls.append(kw) or "eager")
    assert with_fallback(**expected, joint_attention_kwargs={"scale": 0.5}) == "eager"  # LoRA scale: not graphed
    assert fallback_calls[0]["joint_attention_kwargs"] == {"scale": 0.5}


def test_closing_releases_the_package_whoever_still_holds_the_forward():
    """A loaded package holds the weights bound to it: on close the forwards that wrapped it drop
    it, so a reference someone kept to the forward cannot keep the weights alive."""
    import weakref

    from fluxopt import TransformerForward
    from fluxopt_plugins.aoti import AotiVaeDecode, release_packages

    class Package:  # stands in for a loaded AOTInductor package
        def __call__(self, **inputs):
            return inputs["hidden_states"]

    package = Package()
    alive = weakref.ref(package)
    forward = TransformerForward(package, what="aoti")
    decode = AotiVaeDecode(package, torch.float32, torch.device("cpu"))
    del package
    release_packages(forward, decode, None)
    assert alive() is None
    with pytest.raises(RuntimeError, match="released when its stack closed"):
        forward(hidden_states=torch.ones(1))


def test_a_package_given_live_weights_lets_go_of_them_when_dropped(tmp_path):
    """weights=shared on the H100 left one transformer's weights (22 GiB) allocated after the
    stack closed: the AOTInductor runtime keeps a reference to every tensor bound zero-copy
    (user_managed=True). The package now takes a copy it owns; once it is dropped, the live
    weight's storage has no more owners than before it was loaded (with the zero-copy binding
    this count stays one higher, checked with torch 2.13 on the CPU)."""
    import gc

    from fluxopt_plugins.aoti import load_package

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(1024, 1024)

        def forward(self, x):
            return self.inner(x)

    model, x = Wrapper(), torch.randn(2, 1024)
    program = torch.export.export(model, (x,), strict=False)
    path = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / "p.pt2"), inductor_configs={"aot_inductor.package_constants_in_so": False})
    del program
    gc.collect()

    def owners() -> int:
        return torch._C._storage_Use_Count(model.inner.weight.untyped_storage()._cdata)

    before = owners()
    compiled = load_package(Path(path), model.inner, "inner", single_threaded=False)
    torch.testing.assert_close(compiled(x), model(x))
    del compiled
    gc.collect()
    assert owners() == before


def test_fingerprint_sees_weight_rewrites_and_values_only_when_asked():
    from fluxopt.zoo.tiny import build_tiny_pipeline

    transformer = build_tiny_pipeline().transformer
    structure, values = module_fingerprint(transformer, False), module_fingerprint(transformer, True)
    with torch.no_grad():
        next(transformer.parameters()).add_(1.0)
    assert module_fingerprint(transformer, False) == structure
    assert module_fingerprint(transformer, True) != values
    transformer.fuse_qkv_projections()
    assert module_fingerprint(transformer, False) != structure


def test_fingerprint_is_the_same_in_every_process():
    """diffusers orders the VAE config's ``_use_default_values`` by the string-hash seed: a
    fingerprint over it keyed the same VAE differently in each process (flux_fast rebuilt its
    package in a second process on the H200)."""
    from fluxopt.zoo.tiny import build_tiny_pipeline

    vae = build_tiny_pipeline().vae
    assert len(vae.config["_use_default_values"]) > 1
    before = module_fingerprint(vae, True)
    vae._internal_dict = type(vae._internal_dict)(
        {**vae._internal_dict, "_use_default_values": vae.config["_use_default_values"][::-1]})
    assert module_fingerprint(vae, True) == before
    vae._internal_dict = type(vae._internal_dict)({**vae._internal_dict, "scaling_factor": 1.0})
    assert module_fingerprint(vae, True) != before  # a public config entry still counts


# ---------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@gpu
def test_cuda_graph_runner_replays_per_shape():
    from fluxopt import CudaGraphRunner

    weight = torch.randn(8, 8, device="cuda")
    calls = []

    def fn(x):
        calls.append(x.shape)
        return torch.relu(x @ weight)

    runner = CudaGraphRunner(fn)
    a, b = torch.randn(4, 8, device="cuda"), torch.randn(4, 8, device="cuda")
    out_a, out_b = runner(x=a), runner(x=b)
    assert torch.allclose(out_a, torch.relu(a @ weight)) and torch.allclose(out_b, torch.relu(b @ weight))
    assert out_a.data_ptr() != out_b.data_ptr()  # outputs are clones, not the static buffer
    assert len(calls) == 2 and len(runner.graphs) == 1  # warm-up + capture, then replays only
    c = torch.randn(6, 8, device="cuda")
    assert torch.allclose(runner(x=c), torch.relu(c @ weight)) and len(runner.graphs) == 2
    held = torch.cuda.memory_allocated()
    runner.release()  # what a closing stack does: graphs, static buffers and fn are dropped
    assert not runner.graphs and torch.cuda.memory_allocated() < held
    with pytest.raises(RuntimeError, match="released when its stack closed"):
        runner(x=a)


@pytest.mark.gpu
@gpu
def test_aoti_on_gpu_with_cuda_graphs(tmp_path):
    proc = run_cli(*AOTI_ARGS, "device=cuda", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (stack,) = read_result(tmp_path)["stacks"]
    assert stack["status"] == "ok" and stack["fidelity"]["passed"], stack
    assert stack["stats"]["aoti"]["cuda_graphs"] is True


@pytest.mark.parametrize("options, expected", [
    ({}, {"max_autotune": False}),
    ({"max_autotune": True}, {"max_autotune": True}),
    ({"tuning_flags": True}, {"max_autotune": False, "coordinate_descent_tuning": True, "epilogue_fusion": False}),
    ({"max_autotune": True, "inductor_config": {"max_autotune": False}}, {"max_autotune": False}),
])
def test_autotuning_and_the_recipe_flags_are_off_unless_asked(options, expected):
    """The default builds in minutes: no GEMM autotuning, no coordinate descent; each is one option
    away, and inductor_config has the last word."""
    from fluxopt_plugins.aoti import AotiOptions, inductor_configs

    configs = inductor_configs(AotiOptions(**options), "embedded")
    assert {k: configs.get(k) for k in expected} == expected
    if not options.get("tuning_flags"):
        assert "coordinate_descent_tuning" not in configs


def test_a_disk_too_small_for_the_packages_is_refused_before_the_export(fluxopt_cache, tmp_path, monkeypatch):
    """A full disk fails deep in torch's archive writer and aborts the process from a destructor (seen
    writing a full-size package): the space is checked first, with what is needed and what to do."""
    import shutil as real_shutil

    import fluxopt
    from fluxopt_plugins import aoti

    pipe = fluxopt.load_model("tiny", device="cpu")
    need = aoti.SPACE_MARGIN_BYTES + aoti.EMBEDDED_COPIES * aoti.weight_bytes(pipe.transformer)
    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(aoti.shutil, "disk_usage", lambda path: usage._replace(free=need - 1))
    monkeypatch.setattr(aoti, "_export", lambda *a, **k: pytest.fail("exported although the disk is too small"))
    monkeypatch.setattr(aoti, "choose_compiler", lambda configured, verify: (configured, None))  # not under test
    with pytest.raises(fluxopt.ConfigError, match=rf"aoti needs about 2\.\d\d GiB free to write its packages \(weights "
                                                  rf"embedded\), the disk holding {fluxopt_cache} has .*weights=shared"):
        fluxopt.apply_stack(pipe, {"aoti": {"weights": "embedded"}}, height=64, width=64, steps=2)
    assert aoti.weight_bytes(pipe.transformer) == sum(p.numel() * p.element_size() for p in pipe.transformer.parameters()) \
        + sum(b.numel() * b.element_size() for b in pipe.transformer.buffers())


def test_quantized_weights_are_counted_as_stored_and_embedded_by_default():
    """A quantized weight is a tensor subclass whose logical dtype is bf16: counted by what it
    stores (int8 data and scales), the space check asks for what the package needs. Such weights
    cannot be bound at load time, so ``auto`` embeds them."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from fluxopt_plugins import aoti

    from fluxopt import compiler_state

    module = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False)).to(torch.bfloat16)
    bf16 = aoti.weight_bytes(module)
    restore = compiler_state.hold()  # torchao sets Inductor flags process-wide; later tests must not see them
    try:
        quantize_(module, Int8WeightOnlyConfig())
    finally:
        restore()
    assert 0.5 * bf16 < aoti.weight_bytes(module) < 0.6 * bf16  # one byte per element plus a scale per row
    assert aoti.resolve_weights("auto", quantized=True) == "embedded"
    assert aoti.resolve_weights("auto", quantized=False) == "shared"
    assert aoti.resolve_weights("embedded", quantized=False) == "embedded"


def test_the_package_compiles_beside_the_compiler_probe_and_again_when_the_probe_rejects_its_compiler(
        fluxopt_cache, monkeypatch, caplog):
    """The compile starts with the compiler the probe most likely confirms (the other aoti tests:
    confirmed, compiled once); a rejected guess costs a second compile with the compiler the probe
    chose, and only that package goes on to be loaded."""
    import fluxopt
    from fluxopt_plugins import aoti

    monkeypatch.setattr(aoti, "likely_compiler", lambda configured: "rejected-c++")
    monkeypatch.setattr(aoti, "choose_compiler", lambda configured, verify: ("accepted-g++", "chosen by the test"))
    compilers = []

    def compile_and_package(program, package_path, inductor_configs):  # no C++ compile: not under test
        compilers.append(inductor_configs["cpp.cxx"][1])
        Path(package_path).write_bytes(b"a package built by " + compilers[-1].encode())
        return package_path

    class Loaded(Exception):
        pass

    def probe_load(path):
        raise Loaded(path.read_text())

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_and_package)
    monkeypatch.setattr(aoti, "probe_load", probe_load)
    pipe = fluxopt.load_model("tiny", device="cpu")
    with pytest.raises(Loaded, match="^a package built by accepted-g\\+\\+$"):
        fluxopt.apply_stack(pipe, {"aoti": {"probe_load": True}}, height=64, width=64, steps=2)
    assert compilers == ["rejected-c++", "accepted-g++"]
    assert "the probe rejected rejected-c++" in caplog.text


def test_a_build_stopped_mid_compile_keeps_no_reference_to_the_weights_and_stops_its_probes(monkeypatch, tmp_path):
    """torch keeps the last graph it traced for export, and through it the exported module, in a
    module-level map, and the compiler probe's thread outlives a failed build: on the H200 a stack
    stopped mid-build left its transformer's 22 GiB allocated for every later stack. Neither holds
    the pipeline once the build has ended, however it ended; and the probe's processes (minutes of
    C++ compiling) are stopped with it, not left running beside the next stacks, their verdict
    not cached."""
    import gc
    import weakref

    import psutil

    import fluxopt
    import fluxopt_plugins._libstdcxx as libstdcxx

    monkeypatch.setenv("FLUXOPT_CACHE_DIR", str(tmp_path))  # no cached verdict: the probe runs
    monkeypatch.setattr(libstdcxx, "BUILD_CHILD", "import time; time.sleep(300)  # fluxopt-probe-under-test")

    from torch._inductor.codecache import AotCodeCompiler

    def stopped(*args, **kwargs):
        raise RuntimeError("stopped during the compile")

    # traced and lowered as for real, stopped where the C++ compile would start
    monkeypatch.setattr(AotCodeCompiler, "compile", stopped)
    pipe = fluxopt.load_model("tiny", device="cpu")
    weight = weakref.ref(pipe.transformer.transformer_blocks[0].attn.to_q.weight)
    try:
        fluxopt.apply_stack(pipe, {"aoti": {}}, height=64, width=64, steps=2)
    except RuntimeError as exc:  # not kept: its traceback would hold the pipeline
        assert "stopped during the compile" in str(exc)
    del pipe
    gc.collect()
    assert weight() is None

    def probes() -> list[psutil.Process]:
        found = []
        for child in psutil.Process().children(recursive=True):
            try:
                if "fluxopt-probe-under-test" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.Error:
                pass
        return found

    deadline = time.monotonic() + 10
    while probes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not probes()
    assert not list(tmp_path.glob("artifacts/aoti_compiler_check/*/manifest.json"))
