"""The built-in backends: torchao quantization, step caches, fuse_qkv, channels_last,
attention kernels, offload and bitsandbytes NF4.

Validation runs everywhere (DeviceInfo stand-ins for the GPUs); the CPU-capable backends run
end to end on the tiny model; the GPU-only ones are marked ``gpu``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import read_result, run_cli

from fluxopt import Shapes, StackContext
from fluxopt.environment import DeviceInfo
from fluxopt.errors import ConfigError
from fluxopt.stack import build_stack, check_names, lookup_backend, parse_options

CPU = DeviceInfo(type="cpu", name="test cpu")
H100 = DeviceInfo(type="cuda", name="H100", capability=(9, 0))
A100 = DeviceInfo(type="cuda", name="A100", capability=(8, 0))
MI300 = DeviceInfo(type="cuda", name="MI300X", rocm=True, capability=(9, 4))
STEPS = 6
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def unmet(name: str, device: DeviceInfo, **options) -> str | None:
    backend = lookup_backend(name)
    return backend.unmet_requirement(parse_options(backend, options), device)


def tiny_pipe():
    from fluxopt.serving import load_model

    pipe = load_model("tiny", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0):
    with torch.inference_mode():
        return pipe("a red circle above a blue square", height=64, width=64, num_inference_steps=STEPS,
                    output_type="np", generator=torch.Generator().manual_seed(seed)).images


def apply(pipe, selection):
    from fluxopt.serving import apply_stack

    return apply_stack(pipe, selection, height=64, width=64, steps=STEPS, build=False)


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize("name, options, device, expected", [
    ("torchao_fp8", {}, CPU, "needs an NVIDIA GPU with CUDA; this run is on the CPU (test cpu)"),
    ("torchao_fp8", {}, A100, "needs compute capability >= 8.9; A100 has 8.0"),
    ("torchao_fp8", {}, MI300, "needs an NVIDIA GPU with CUDA; MI300X runs ROCm"),
    ("torchao_fp8", {"granularity": "tensor"}, H100, None),
    ("torchao_fp8", {"kernel_preference": "torch"}, H100, None),
    ("torchao_fp8_weight_only", {}, A100, "needs compute capability >= 8.9; A100 has 8.0"),
    ("torchao_int8", {}, CPU, None),
    ("torchao_int8_dynamic", {}, CPU, None),
    ("torchao_int4", {}, CPU, "needs an NVIDIA GPU with CUDA; this run is on the CPU (test cpu)"),
    ("offload", {}, CPU, "needs a GPU; this run is on the CPU (test cpu)"),
    ("offload", {"mode": "sequential"}, H100, None),
    ("fbcache", {}, CPU, None),
    ("fuse_qkv", {}, CPU, None),
    ("channels_last", {}, CPU, None),
    ("attention", {"kernel": "native"}, CPU, None),
    ("attention", {"kernel": "_native_cudnn"}, CPU, "needs an NVIDIA GPU with CUDA; this run is on the CPU (test cpu)"),
    ("attention", {"kernel": "_native_cudnn"}, MI300, "needs an NVIDIA GPU with CUDA; MI300X runs ROCm"),
    ("attention", {"kernel": "_native_cudnn"}, H100, None),
    ("attention", {"kernel": "_native_flash"}, CPU, "needs a GPU; this run is on the CPU (test cpu)"),
    ("attention", {"kernel": "flex"}, CPU, "needs a GPU; this run is on the CPU (test cpu)"),
] + [(name, {}, CPU, None) for name in ("taylorseer", "magcache", "fastercache", "pab", "seacache")])
def test_requirements_on_each_device(name, options, device, expected):
    assert unmet(name, device, **options) == expected


@pytest.mark.parametrize("name, options, module, hint", [
    ("fbcache", {"implementation": "para_attn"}, "para_attn", "pip install 'fluxopt[para-attn]'"),
    ("bnb_nf4", {}, "bitsandbytes", "pip install 'fluxopt[bnb]'"),
    ("attention", {"kernel": "sage"}, "sageattention", "pip install sageattention"),
    ("attention", {"kernel": "_flash_3"}, "flash_attn_interface", "FlashAttention-3"),
    ("attention", {"kernel": "flash"}, "flash_attn", "flash-attn"),
    ("attention", {"kernel": "aiter_fa2_hub"}, "kernels", "pip install 'kernels>=0.12'"),
    ("torchao_int4", {"packing_format": "plain"}, "mslk", "pip install 'fluxopt[mslk]'"),
    ("torchao_fp8", {"kernel_preference": "mslk"}, "mslk", "pip install 'fluxopt[mslk]'"),
])
def test_missing_optional_package_names_it_and_how_to_install(name, options, module, hint, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec  # hide the package even where it is installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == module else find_spec(n, *a))
    reason = unmet(name, H100, **options)
    assert reason.startswith(f"needs the Python package '{module}'") and hint in reason


def test_package_of_another_implementation_is_not_required():
    """para_attn is checked only when that implementation is chosen; int4's default packing needs no mslk."""
    assert unmet("fbcache", H100, implementation="diffusers") is None
    assert unmet("torchao_int4", H100) is None


def _mslk_installed(monkeypatch, installed: bool) -> None:
    """mslk present or absent whatever this machine has (every other package present)."""
    from fluxopt_plugins.torchao_quant import MSLK

    monkeypatch.setattr(type(MSLK), "missing", lambda self: not installed if self is MSLK else False)


def _quantize_on_h100(backend, options, monkeypatch):
    """The options ``backend.quantize`` hands torchao's quantization (not run), and the stack's stats."""
    from types import SimpleNamespace

    from fluxopt_plugins import torchao_quant

    used, pipe, ctx = [], object(), SimpleNamespace(device=H100, stats={})

    def quantize(self, given_pipe, options, given_ctx):
        assert given_pipe is pipe and given_ctx is ctx
        used.append(options)

    monkeypatch.setattr(torchao_quant._TorchaoBackend, "quantize", quantize)
    backend.quantize(pipe, options, ctx)
    return used, ctx.stats


@pytest.mark.parametrize("device, mslk_installed, expected", [
    (H100, True, "preshuffled"), (H100, False, "tile_packed_to_4d"), (A100, True, "tile_packed_to_4d"),
    (MI300, True, "tile_packed_to_4d"), (CPU, True, "tile_packed_to_4d"),
])
def test_int4_auto_packing_takes_mslk_kernels_on_hopper_only(device, mslk_installed, expected, monkeypatch):
    from fluxopt_plugins.torchao_quant import resolve_int4_packing

    _mslk_installed(monkeypatch, mslk_installed)
    assert resolve_int4_packing("auto", device) == expected
    assert resolve_int4_packing("plain", device) == "plain"  # a packing asked for by name is kept


@pytest.mark.parametrize("mslk_installed, packing", [(True, "preshuffled"), (False, "tile_packed_to_4d")])
def test_int4_quantizes_with_the_packing_auto_chose_and_records_it(mslk_installed, packing, monkeypatch, caplog):
    from fluxopt_plugins.torchao_quant import TorchaoInt4, TorchaoInt4Options

    _mslk_installed(monkeypatch, mslk_installed)
    used, stats = _quantize_on_h100(TorchaoInt4(), TorchaoInt4Options(), monkeypatch)
    assert [o.packing_format for o in used] == [packing] and stats["torchao_int4"] == {"packing_format": packing}
    assert ("mslk is not installed" in caplog.text) is (not mslk_installed)


@pytest.mark.parametrize("device, granularity, mslk_installed, expected", [
    (H100, "row", True, "mslk"), (H100, "row", False, "torch"), (H100, "tensor", True, "torch"),
    (A100, "row", True, "torch"), (MI300, "row", True, "torch"), (CPU, "row", True, "torch"),
])
def test_fp8_auto_kernels_are_mslks_where_torchao_would_take_them(device, granularity, mslk_installed, expected,
                                                                   monkeypatch):
    from fluxopt_plugins.torchao_quant import TorchaoFp8Options, resolve_fp8_kernels

    _mslk_installed(monkeypatch, mslk_installed)
    assert resolve_fp8_kernels(TorchaoFp8Options(granularity=granularity), device) == expected
    for named in ("torch", "mslk"):  # kernels asked for by name are kept
        assert resolve_fp8_kernels(TorchaoFp8Options(kernel_preference=named), device) == named


@pytest.mark.parametrize("options, granularity", [
    ({"kernel_preference": "mslk"}, "PerRow"), ({"kernel_preference": "torch", "granularity": "tensor"}, "PerTensor"),
    ({"granularity": "tensor"}, "PerTensor"),
])
def test_fp8_kernels_and_granularity_reach_torchaos_config(options, granularity):
    from torchao.quantization.quantize_.common import KernelPreference

    from fluxopt_plugins.torchao_quant import TorchaoFp8

    stack = build_stack({"torchao_fp8": options})  # accepted as given
    config = TorchaoFp8().make_config(stack.entries[0].options)
    assert [type(g).__name__ for g in config.granularity] == [granularity] * 2  # activations, weights
    assert config.kernel_preference == KernelPreference(options.get("kernel_preference", "auto"))


def test_fp8_mslk_kernels_need_hopper_and_mslk(monkeypatch):
    ada = DeviceInfo(type="cuda", name="L4", capability=(8, 9))
    _mslk_installed(monkeypatch, True)
    assert unmet("torchao_fp8", H100, kernel_preference="mslk") is None
    assert unmet("torchao_fp8", ada, kernel_preference="mslk") == "needs compute capability >= 9.0; L4 has 8.9"
    assert unmet("torchao_fp8", ada) is None  # auto takes torch's kernels there


@pytest.mark.parametrize("mslk_installed, kernels", [(True, "mslk"), (False, "torch")])
def test_fp8_quantizes_with_the_kernels_auto_chose_and_records_them(mslk_installed, kernels, monkeypatch):
    from torchao.quantization.quantize_.common import KernelPreference

    from fluxopt_plugins.torchao_quant import TorchaoFp8, TorchaoFp8Options

    _mslk_installed(monkeypatch, mslk_installed)
    used, stats = _quantize_on_h100(TorchaoFp8(), TorchaoFp8Options(), monkeypatch)
    assert [o.kernel_preference for o in used] == [kernels] and stats["torchao_fp8"] == {"kernel_preference": kernels}
    assert TorchaoFp8().make_config(used[0]).kernel_preference == KernelPreference(kernels)


def test_aiter_needs_rocm_when_its_package_is_there(monkeypatch):
    from fluxopt.backend import Package

    monkeypatch.setattr(Package, "missing", lambda self: False)
    assert unmet("attention", H100, kernel="aiter_fa2_hub") == "needs an AMD GPU with ROCm; H100 is not one"
    assert unmet("attention", MI300, kernel="aiter_fa2_hub") is None
    assert unmet("attention", A100, kernel="_sage_qk_int8_pv_fp8_cuda") == "needs compute capability >= 8.9; A100 has 8.0"


@pytest.mark.parametrize("pair", [
    ("fbcache", "magcache"), ("taylorseer", "pab"), ("seacache", "fastercache"),
    ("torchao_int8", "torchao_fp8"), ("bnb_nf4", "torchao_int4"),
])
def test_two_caches_or_two_quantizations_are_refused(pair):
    with pytest.raises(ConfigError, match="cannot be combined"):
        build_stack(list(pair))


def test_composable_stack_is_in_stage_order():
    stack = build_stack({"offload": {"mode": "model"}, "compile": {}, "fbcache": {}, "attention": {},
                         "torchao_int8": {}, "fuse_qkv": {}})
    assert stack.names == ["torchao_int8", "fuse_qkv", "attention", "fbcache", "compile", "offload"]
    assert not stack.is_lossless()
    assert build_stack(["fuse_qkv", "channels_last", "attention"]).is_lossless()


@pytest.mark.parametrize("selection, message", [
    ({"torchao_fp8": {"granularity": "col"}}, "granularity='col' is not one of row, tensor"),
    ({"torchao_fp8": {"kernel_preference": "cutlass"}}, "kernel_preference='cutlass' is not one of auto, torch, mslk"),
    ({"torchao_fp8": {"kernel_preference": "mslk", "granularity": "tensor"}},
     "kernel_preference=mslk needs granularity=row"),
    ({"torchao_int8": {"min_features": -1}}, "min_features must be >= 0"),
    ({"torchao_int4": {"packing_format": "zip"}}, "packing_format='zip' is not one of"),
    ({"fbcache": {"implementation": "teacache"}}, "implementation='teacache' is not one of diffusers, para_attn"),
    ({"fbcache": {"residual_diff_threshold": -0.1}}, "residual_diff_threshold must be >= 0"),
    ({"attention": {"kernel": "flash3"}}, "kernel='flash3' is not one of"),
    ({"offload": {"mode": "disk"}}, "mode='disk' is not one of auto, group, model, sequential"),
    ({"offload": {"mode": "group", "group_type": "layer"}}, "group_type='layer' is not one of block_level, leaf_level"),
    ({"offload": {"mode": "group", "blocks_per_group": 0}}, "blocks_per_group=0 must be >= 1"),
    ({"offload": {"mode": "group", "group_type": "block_level", "blocks_per_group": 2}},
     "blocks_per_group=2 must be 1 with use_stream=true"),
    ({"offload": {"mode": "group", "group_type": "leaf_level", "blocks_per_group": 2}},
     "blocks_per_group=2 applies to group_type=block_level only; this stack has group_type=leaf_level"),
    ({"offload": {"mode": "model", "use_stream": False}}, "use_stream=False applies to mode=group only"),
    ({"offload": {"mode": "sequential", "group_type": "leaf_level"}},
     "group_type=leaf_level applies to mode=group only; this stack has mode=sequential"),
    ({"offload": {"blocks_per_group": 2}}, "blocks_per_group=2 must be 1 with use_stream=true"),
    ({"fastercache": {"spatial_attention_timestep_skip_range": [-1, 1001]}}, "must end at or below 1000"),
    ({"pab": {"spatial_attention_timestep_skip_range": [800, 100]}}, "low < high"),
    ({"taylorseer": {"taylor_factors_dtype": "fp8"}}, "taylor_factors_dtype='fp8' is not one of"),
    ({"seacache": {"residual_order": 2}}, "residual_order must be 0 or 1"),
    ({"magcache": {"mag_ratios": [1.0]}}, "one ratio per step"),
    ({"bnb_nf4": {"components": ["vae"]}}, "non-empty subset of transformer, text_encoder_2"),
])
def test_option_values_are_validated(selection, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build_stack(selection)


@pytest.mark.parametrize("name, typo", [("fbcache", "threshold"), ("torchao_int8", "skip_modules"),
                                         ("attention", "backend"), ("pab", "skip_range")])
def test_option_typos_list_the_valid_options(name, typo):
    with pytest.raises(ConfigError, match="Valid options:"):
        build_stack({name: {typo: 1}})


def test_attention_losslessness_depends_on_the_kernel():
    backend = lookup_backend("attention")
    assert backend.is_lossless(parse_options(backend, {"kernel": "_native_cudnn"}))
    assert not backend.is_lossless(parse_options(backend, {"kernel": "sage"}))
    assert not backend.is_lossless(parse_options(backend, {"kernel": "_sage_qk_int8_pv_fp8_cuda"}))


# ---------------------------------------------------------------------------- torchao on CPU
def _quantized(param) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(param, TorchAOBaseTensor)


def test_torchao_int8_quantizes_selected_linears_and_leaves_skipped_ones():
    import torch._inductor.config as inductor_config

    from fluxopt_plugins.torchao_quant import TORCHAO_INDUCTOR_FLAGS

    pipe = tiny_pipe()
    reference = generate(pipe)
    off = {k: False for k in TORCHAO_INDUCTOR_FLAGS}  # what torchao would set: off, whatever ran before
    with inductor_config.patch(off):
        applied = apply(pipe, {"torchao_int8": {}})
        assert {k: inductor_config.get_config_copy()[k] for k in TORCHAO_INDUCTOR_FLAGS} == off  # not set globally
    skip = parse_options(lookup_backend("torchao_int8"), {}).skip
    linears = {fqn: m for fqn, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    skipped = {fqn for fqn in linears if any(fqn == p or fqn.startswith(p + ".") for p in skip)}
    assert skipped and len(skipped) < len(linears)
    for fqn, module in linears.items():
        assert _quantized(module.weight) == (fqn not in skipped), fqn
    assert applied.stats["quantized_linears"] == {"torchao_int8": {"quantized": len(linears) - len(skipped),
                                                                   "linears": len(linears)}}
    assert list(applied.stats["build_phases_s"]) == ["quantize"]
    assert "compute_precision" not in applied.stats  # int8 weights, bf16 matmuls: the floor stays bf16
    out = generate(pipe)
    assert out.shape == reference.shape and abs(out - reference).max() > 0  # really changed numerics
    assert abs(out - reference).mean() < 0.1


def test_torchao_leaves_inductor_flags_alone_unless_asked_and_then_only_for_the_stack():
    """torchao's configs set coordinate-descent tuning process-wide by default (minutes of compile
    on the H100, leaking into later stacks); fluxopt turns that off and scopes it as an option."""
    import torch._inductor.config as inductor_config

    before = inductor_config.save_config()
    apply(tiny_pipe(), {"torchao_int8": {}}).close()
    assert inductor_config.save_config() == before and not inductor_config.coordinate_descent_tuning
    applied = apply(tiny_pipe(), {"torchao_int8": {"inductor_tuning": True}})
    assert inductor_config.coordinate_descent_tuning and inductor_config.force_fuse_int_mm_with_mul
    applied.close()
    assert inductor_config.save_config() == before


def test_compiler_state_snapshot_restores_flags_set_behind_its_back():
    """Whatever a stack's libraries set globally is undone when the stack closes."""
    import torch._inductor.config as inductor_config

    from fluxopt import compiler_state

    before = inductor_config.save_config()
    restore = compiler_state.hold()
    inductor_config.coordinate_descent_tuning = True
    torch._dynamo.config.cache_size_limit = 3
    torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark
    restore()
    assert inductor_config.save_config() == before and torch._dynamo.config.cache_size_limit != 3


def test_torchao_min_features_skips_small_layers():
    pipe = tiny_pipe()
    sizes = sorted({min(m.in_features, m.out_features) for m in pipe.transformer.modules()
                    if isinstance(m, torch.nn.Linear)})
    threshold = sizes[-1]  # only the widest layers qualify
    apply(pipe, {"torchao_int8_dynamic": {"min_features": threshold, "skip": [], "skip_modulation": False}})
    for fqn, m in pipe.transformer.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert _quantized(m.weight) == (min(m.in_features, m.out_features) >= threshold), fqn
    generate(pipe)
    with pytest.raises(ConfigError, match="selects no Linear layer"):
        apply(tiny_pipe(), {"torchao_int8": {"min_features": sizes[-1] + 1}})


@pytest.mark.parametrize("column_major", [True, False])
def test_torchao_int8_dynamic_swaps_safe_int_mm_by_name_and_close_restores_it(column_major):
    from torchao.kernel import intmm

    torchao_own = intmm.safe_int_mm
    pipe = tiny_pipe()
    with apply(pipe, {"torchao_int8_dynamic": {"column_major_weight": column_major}}) as applied:
        swapped = [c for c in applied.changes["torchao_int8_dynamic"] if "safe_int_mm" in c]
        assert (intmm.safe_int_mm is not torchao_own) == column_major
        assert len(swapped) == column_major
        generate(pipe)  # the CPU never reaches safe_int_mm (torchao's CPU path), the swap must not break it
    assert intmm.safe_int_mm is torchao_own


@pytest.mark.parametrize("skip_modulation", [True, False])
def test_torchao_int8_dynamic_leaves_the_modulation_linears_bf16_unless_told(skip_modulation):
    """The AdaLayerNorm Linears (one GEMM row per image) stay bf16 by default, and only they."""
    from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle

    from fluxopt_plugins.torchao_quant import modulation_linears

    pipe = tiny_pipe()
    blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    modulation = {f"{fqn}.linear" for fqn, m in pipe.transformer.named_modules()
                  if isinstance(m, (AdaLayerNormZero, AdaLayerNormZeroSingle))}
    assert modulation_linears(pipe.transformer) == modulation | {"norm_out.linear"}
    assert len(modulation) == blocks + len(pipe.transformer.transformer_blocks)  # norm1 (+ norm1_context)
    options = {"skip_modulation": skip_modulation}
    default_skip = parse_options(lookup_backend("torchao_int8_dynamic"), options).skip
    applied = apply(pipe, {"torchao_int8_dynamic": options})
    quantized = {fqn for fqn, m in pipe.transformer.named_modules()
                 if isinstance(m, torch.nn.Linear) and _quantized(m.weight)}
    assert quantized and (quantized & modulation == set()) == skip_modulation
    assert modulation <= quantized or skip_modulation
    assert not any(fqn.startswith(tuple(default_skip)) for fqn in quantized)
    assert applied.stats["quantized_linears"]["torchao_int8_dynamic"]["quantized"] == len(quantized)
    generate(pipe)


def _int8(*shape, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8).to(device)


@pytest.mark.parametrize("case", ["cpu", "fake", "row-major"])
def test_column_major_int_mm_leaves_what_cublas_does_not_take_to_torchao(case):
    """Only plain CUDA tensors with a column-major weight take the direct call; everything else,
    the CPU, tracing's fake tensors and a weight already row-major, is torchao's call."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fluxopt_plugins.torchao_quant import column_major_int_mm

    calls = []

    def torchao_own(a, b):
        calls.append((a, b))
        return a.to(torch.int32) @ b.to(torch.int32)

    a, weight = _int8(32, 64), _int8(48, 64, seed=1)
    b = weight.t().contiguous() if case == "row-major" else weight.t()
    if case == "fake":
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            a, b = mode.from_tensor(a), mode.from_tensor(b)
            column_major_int_mm(torchao_own)(a, b)
    else:
        assert torch.equal(column_major_int_mm(torchao_own)(a, b), a.to(torch.int32) @ b.to(torch.int32))
    assert len(calls) == 1 and calls[0][1] is b


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows, outcome", [(4608, "direct"), (16, "torchao")])
def test_column_major_int_mm_on_cuda_passes_the_view_and_matches_torchao(rows, outcome, monkeypatch):
    """The direct call gets the weight's transposed view uncopied and gives torchao's integers; 16
    rows or fewer (``torch._int_mm`` refuses them) stay torchao's, which reaches ``torch._int_mm``
    (through ``out_dtype``) only with its row-major copy."""
    from torchao.kernel import intmm

    from fluxopt_plugins.torchao_quant import column_major_int_mm

    a, weight = _int8(rows, 3072, device="cuda"), _int8(1024, 3072, seed=1, device="cuda")
    expected = intmm.safe_int_mm(a, weight.t())
    seen, int_mm = [], torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda x, y: seen.append(y.is_contiguous()) or int_mm(x, y))
    assert torch.equal(column_major_int_mm(intmm.safe_int_mm)(a, weight.t()), expected)
    if outcome == "direct":
        assert seen == [False]
    else:
        assert False not in seen


@pytest.mark.parametrize("prompts", [[], ["a cat", "  "]])
def test_torchao_fp8_static_needs_calibration_prompts(prompts):
    with pytest.raises(ConfigError, match="calibration_prompts must be a non-empty list of non-empty prompts"):
        build_stack({"torchao_fp8_static": {"calibration_prompts": prompts}})


def test_torchao_fp8_static_calibrates_on_its_own_prompts_and_close_undoes_it(monkeypatch, tmp_path):
    """Through apply_to_pipeline: apply_stack refuses the CPU (fp8 GEMMs need an sm 8.9 GPU), but
    torchao's static float8 tensors also compute on the CPU, so calibration, conversion and undo
    are checked here."""
    from torchao.prototype.quantization.float8_static_quant.prototype_float8_tensor import PrototypeFloat8Tensor

    from fluxopt.apply import apply_to_pipeline
    from fluxopt_plugins.torchao_quant import CALIBRATION_PROMPTS, TORCHAO_INDUCTOR_FLAGS

    pipe = tiny_pipe()
    reference = generate(pipe)
    calls = []
    call = type(pipe).__call__

    def spy(self, *args, **kwargs):
        generator = kwargs.pop("generator")
        calls.append((generator.device.type, generator.initial_seed(), kwargs))
        return call(self, *args, generator=generator, **kwargs)

    stack = build_stack(["torchao_fp8_static"])
    ctx = StackContext(device=CPU, dtype=pipe.transformer.dtype, model=None, cache_dir=tmp_path,
                       shapes=Shapes(height=64, width=64, steps=STEPS, guidance_scale=3.5, max_sequence_length=128))
    import torch._inductor.config as inductor_config

    off = {k: False for k in TORCHAO_INDUCTOR_FLAGS}  # what torchao would set: off, whatever ran before
    monkeypatch.setattr(type(pipe), "__call__", spy)
    with inductor_config.patch(off):
        applied = apply_to_pipeline(pipe, stack, ctx, build=False)
        flags = {k: inductor_config.get_config_copy()[k] for k in TORCHAO_INDUCTOR_FLAGS}
    monkeypatch.undo()
    shapes = {"height": 64, "width": 64, "num_inference_steps": STEPS, "guidance_scale": 3.5, "max_sequence_length": 128,
              "output_type": "latent"}  # the bench's shapes, the calibration prompts and seeds
    assert calls == [("cpu", 1234, {"prompt": CALIBRATION_PROMPTS[0], **shapes}),
                     ("cpu", 1235, {"prompt": CALIBRATION_PROMPTS[1], **shapes})]
    # torchao's configs would set its Inductor flags process-wide: not while the stack is applied either
    assert flags == off
    skip = stack.entries[0].options.skip
    scales = []
    for fqn, m in pipe.transformer.named_modules():
        if isinstance(m, torch.nn.Linear):
            static = isinstance(m.weight, PrototypeFloat8Tensor)
            assert static != any(fqn == p or fqn.startswith(p + ".") for p in skip), fqn
            if static:
                scales.append(float(m.weight.act_quant_scale))
    assert scales and all(0 < s < float("inf") for s in scales) and len(set(scales)) > 1  # one per layer
    assert set(applied.stats["build_phases_s"]) == {"quantize", "calibrate"}
    linears = sum(isinstance(m, torch.nn.Linear) for m in pipe.transformer.modules())
    assert applied.stats["quantized_linears"] == {"torchao_fp8_static": {"quantized": len(scales), "linears": linears}}
    assert applied.stats["compute_precision"] == {"gemm": "fp8"}
    out = generate(pipe)
    assert abs(out - reference).max() > 0 and abs(out - reference).mean() < 0.1
    applied.close()
    assert all(not isinstance(m.weight, PrototypeFloat8Tensor) and type(m) is torch.nn.Linear
               for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear))
    assert (generate(pipe) == reference).all()


def test_bnb_nf4_quantizes_transformer_and_t5_and_composes_with_compile():
    """bitsandbytes >= 0.48 runs NF4 on the CPU, so the whole path is checked here: Linear4bit in
    place of the selected layers, changed-but-close numerics, and regional compile (fullgraph)
    reproducing the eager NF4 output."""
    import bitsandbytes as bnb

    pipe = tiny_pipe()
    reference = generate(pipe)
    applied = apply(pipe, {"bnb_nf4": {}})
    counts = applied.stats["nf4_linears"]
    for component in ("transformer", "text_encoder_2"):
        module = getattr(pipe, component)
        assert counts[component] == sum(isinstance(m, bnb.nn.Linear4bit) for m in module.modules()) > 0
        keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())  # T5's "wo" stays full precision
        left = [fqn for fqn, m in module.named_modules() if type(m) is torch.nn.Linear]
        assert all(fqn.split(".")[-1] in keep for fqn in left), left
    eager = generate(pipe)
    assert abs(eager - reference).max() > 0 and abs(eager - reference).mean() < 0.1
    applied.close()
    pipe = tiny_pipe()
    from fluxopt.serving import apply_stack

    compiled = apply_stack(pipe, {"bnb_nf4": {}, "compile": {"regional": True, "cache": False}},
                           height=64, width=64, steps=STEPS)
    assert compiled.stats["compile"]["fullgraph"] is True
    assert abs(generate(pipe) - eager).max() < 1e-4
    compiled.close()
    torch._dynamo.reset()


# ---------------------------------------------------------------------------- caches on CPU
def test_fbcache_counts_match_the_blocks_that_really_ran(monkeypatch):
    """Independent count: the tail block's class forward, patched before the cache hooks wrap it."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    pipe = tiny_pipe()
    tail = pipe.transformer.single_transformer_blocks[-1]
    ran = []
    original = FluxSingleTransformerBlock.forward

    def counting(self, *args, **kwargs):
        if self is tail:
            ran.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FluxSingleTransformerBlock, "forward", counting)
    applied = apply(pipe, {"fbcache": {"residual_diff_threshold": 0.5}})
    generate(pipe, seed=0)
    generate(pipe, seed=1)
    cache = applied.stats["cache"]
    assert cache["generations"] == 2
    assert cache["steps"] == STEPS and cache["computed_steps"] + cache["skipped_steps"] == STEPS
    assert cache["total"]["computed_steps"] == len(ran) == sum(cache["computed_steps_per_generation"])
    assert cache["total"]["steps"] == 2 * STEPS
    assert 0 < cache["skipped_steps"] < STEPS  # the threshold made some steps skip, not all


def test_fbcache_threshold_zero_computes_everything_and_matches_baseline():
    pipe = tiny_pipe()
    reference = generate(pipe)
    applied = apply(pipe, {"fbcache": {"residual_diff_threshold": 0.0}})
    out = generate(pipe)
    assert applied.stats["cache"]["skipped_steps"] == 0
    assert abs(out - reference).max() < 1e-5


@pytest.mark.parametrize("name, options, level", [
    ("magcache", {"threshold": 1.0}, "steps"),
    ("seacache", {"threshold": 2.0}, "steps"),
    ("taylorseer", {"cache_interval": 2, "disable_cache_before_step": 1, "taylor_factors_dtype": "float32"},
     "attention"),
    ("fastercache", {}, "attention"),
    ("pab", {"spatial_attention_timestep_skip_range": [0, 999]}, "attention"),
])
def test_step_caches_run_and_report_what_they_skipped(name, options, level):
    pipe = tiny_pipe()
    reference = generate(pipe)
    applied = apply(pipe, {name: options})
    out = generate(pipe)
    cache = applied.stats["cache"]
    assert cache["backend"] == name and cache["steps"] == STEPS
    assert cache["computed_steps"] + cache["skipped_steps"] == STEPS
    n_attn = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    if level == "steps":
        assert 0 < cache["skipped_steps"] < STEPS
    else:
        assert cache["skipped_steps"] == 0  # attention-level caches always run the blocks
        assert cache["attention_calls"] == STEPS * n_attn
        assert 0 < cache["attention_reused"] < cache["attention_calls"]
    assert out.shape == reference.shape and abs(out - reference).max() > 0  # the cache changed something


def test_seacache_without_flux_adapter_would_never_skip():
    """Why seacache passes step/sigma into cache_context: without them diffusers runs every step."""
    from diffusers.hooks import SeaCacheConfig

    pipe = tiny_pipe()
    from fluxopt_plugins._cache_probe import ComputeCounter

    from fluxopt import Shapes, StackContext
    from fluxopt.environment import detect_device

    ctx = StackContext(device=detect_device("cpu"), dtype=torch.float32, model=None, cache_dir=Path("."),
                       shapes=Shapes(height=64, width=64, steps=2, guidance_scale=3.5, max_sequence_length=32))
    ComputeCounter(pipe, ctx, "seacache")
    pipe.transformer.enable_cache(SeaCacheConfig(threshold=2.0))
    generate(pipe)
    assert ctx.stats["cache"]["skipped_steps"] == 0


# ---------------------------------------------------------------------------- attention / offload
def test_attention_backend_restores_the_global_default_on_close():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    pipe = tiny_pipe()
    reference = generate(pipe)
    applied = apply(pipe, {"attention": {"kernel": "_native_math"}})
    assert str(_AttentionBackendRegistry._active_backend.value) == "_native_math"
    assert {p._attention_backend.value for p in pipe.transformer.attn_processors.values()} == {"_native_math"}
    assert abs(generate(pipe) - reference).max() < 1e-4
    applied.close()
    assert _AttentionBackendRegistry._active_backend == before


@pytest.mark.parametrize("mode", ["sequential", "group"])
@pytest.mark.parametrize("compiled", ["in place", "wrapped"])
def test_parameter_swapping_offload_refuses_a_compiled_transformer(mode, compiled):
    """Compiled in place (``module.compile()``) or wrapped (``torch.compile(module)``), both lazy:
    nothing is compiled until the first call."""
    pipe = tiny_pipe()
    if compiled == "in place":
        pipe.transformer.compile()
    else:
        pipe.transformer = torch.compile(pipe.transformer)
    backend = lookup_backend("offload")
    ctx = StackContext(device=H100, dtype=torch.float32, model=None, cache_dir=None,
                       shapes=Shapes(height=64, width=64, steps=STEPS, guidance_scale=3.5, max_sequence_length=128))
    with pytest.raises(ConfigError, match=f"{mode} cannot be combined with compile"):
        backend.apply(pipe, parse_options(backend, {"mode": mode}), ctx)


@pytest.mark.parametrize("mode", ["sequential", "group"])
def test_parameter_swapping_offload_with_a_graph_backend_is_refused_before_loading(mode):
    with pytest.raises(ConfigError, match=f"cannot be used in this stack: mode={mode} .*; use backend.offload.mode=model"):
        build_stack({"offload": {"mode": mode}, "compile": {}})
    assert build_stack({"offload": {"mode": "model"}, "compile": {"regional": True}}).names == ["compile", "offload"]


@pytest.mark.parametrize("others, compiled, mode", [
    ({}, False, "group"), ({"compile": {"regional": True}}, False, "model"), ({"aoti": {}}, False, "model"),
    ({"fbcache": {}}, False, "group"), ({}, True, "model"),
])
def test_offload_auto_is_group_offload_alone_and_model_offload_beside_a_graph(others, compiled, mode):
    """Resolved from the stack (a graph backend) or the pipeline (a transformer compiled before),
    applied and recorded; the apply stops at the first offload call (no GPU here)."""
    from fluxopt_plugins.offload import resolve_mode

    stack = build_stack({**others, "offload": {}})
    pipe = tiny_pipe()
    if compiled:
        pipe.transformer.compile()
    assert resolve_mode(stack.entries[-1].options, pipe, stack) == mode
    calls = []
    for method in ("enable_model_cpu_offload", "enable_group_offload"):
        setattr(pipe, method, lambda *a, method=method, **k: calls.append(
            (method, k.get("offload_type"), k.get("device") or k.get("onload_device"), k.get("use_stream"),
             k.get("record_stream"))))
    ctx = StackContext(device=H100, dtype=torch.float32, model=None, cache_dir=None, stack=stack,
                       shapes=Shapes(height=64, width=64, steps=STEPS, guidance_scale=3.5, max_sequence_length=128))
    lookup_backend("offload").apply(pipe, stack.entries[-1].options, ctx)
    cuda = torch.device("cuda")
    assert calls == ([("enable_group_offload", "block_level", cuda, True, True)] if mode == "group"
                     else [("enable_model_cpu_offload", None, cuda, None, None)])
    assert ctx.stats["offload"] == {"mode": mode}
    assert ctx.changes == ["offload: diffusers' group offloading hooks (block_level, streamed)" if mode == "group"
                             else "offload: accelerate's model offload hooks"]


def test_offload_group_options_with_auto_beside_a_graph_are_refused():
    with pytest.raises(ConfigError, match="group_type=leaf_level applies to mode=group, and beside a compiled"):
        build_stack({"offload": {"group_type": "leaf_level"}, "compile": {}})
    assert build_stack({"offload": {"group_type": "leaf_level"}}).names == ["offload"]  # alone: group
    pipe = tiny_pipe()
    pipe.transformer.compile()
    ctx = StackContext(device=H100, dtype=torch.float32, model=None, cache_dir=None,
                       shapes=Shapes(height=64, width=64, steps=STEPS, guidance_scale=3.5, max_sequence_length=128))
    backend = lookup_backend("offload")
    with pytest.raises(ConfigError, match="on a transformer already compiled mode=auto is model"):
        backend.apply(pipe, parse_options(backend, {"group_type": "leaf_level"}), ctx)


def test_names_alone_refuse_only_what_no_option_can_make_compatible():
    check_names(["offload", "compile"])  # whether they combine depends on offload.mode, composed later
    with pytest.raises(ConfigError, match="mode=group swaps"):
        build_stack({"offload": {"mode": "group"}, "compile": {}})
    with pytest.raises(ConfigError, match="'aoti' and 'compile' cannot be combined"):
        check_names(["aoti", "compile"])
    with pytest.raises(ConfigError, match="unknown backend"):
        check_names(["offlaod"])


@pytest.mark.parametrize("options", [
    {"mode": "group", "group_type": "block_level"},  # one block per group, streamed
    {"mode": "group", "group_type": "block_level", "blocks_per_group": 2, "use_stream": False},
])
def test_group_offload_options_diffusers_takes_are_accepted(options):
    assert build_stack({"offload": options}).names == ["offload"]


@pytest.mark.parametrize("group_type, hooked", [("leaf_level", torch.nn.Linear), ("block_level", None)])
def test_group_offload_hooks_each_group_and_close_removes_every_hook(group_type, hooked):
    """diffusers' group offloading, applied on the CPU without streams (the hooks and their undo are
    the same as on a GPU, where the groups also move): leaf_level hooks every Linear, block_level
    each transformer block; the output is unchanged, and close leaves no hook behind."""
    from fluxopt.apply import apply_to_pipeline, foreign_changes

    pipe = tiny_pipe()
    reference = generate(pipe)
    ctx = StackContext(device=CPU, dtype=torch.float32, model=None, cache_dir=None,
                       shapes=Shapes(height=64, width=64, steps=STEPS, guidance_scale=3.5, max_sequence_length=128))
    stack = build_stack({"offload": {"mode": "group", "group_type": group_type, "use_stream": False}})
    applied = apply_to_pipeline(pipe, stack, ctx, build=False)

    def group_hooked(module):
        return "group_offloading" in (getattr(getattr(module, "_diffusers_hook", None), "hooks", None) or {})

    expected = ([m for m in pipe.transformer.modules() if isinstance(m, hooked)] if hooked
                else [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks])
    assert expected and all(group_hooked(m) for m in expected)
    config = expected[0]._diffusers_hook.get_hook("group_offloading").config
    assert (config.onload_device, config.offload_device) == (torch.device("cpu"), torch.device("cpu"))
    assert (config.offload_type.value, config.num_blocks_per_group, config.stream) == \
        (group_type, 1 if group_type == "block_level" else None, None)
    assert applied.changes["offload"] == [f"diffusers' group offloading hooks ({group_type})"]
    assert abs(generate(pipe) - reference).max() == 0
    applied.close()
    assert foreign_changes(pipe.transformer) == []
    assert not any(group_hooked(m) for c in (pipe.transformer, pipe.text_encoder, pipe.vae) for m in c.modules())
    assert abs(generate(pipe) - reference).max() == 0


# ---------------------------------------------------------------------------- CLI end to end
def test_cli_lossless_layout_backends_pass_lossless_fidelity(tmp_path):
    proc = run_cli("+backend=[fuse_qkv,channels_last]", "bench.steps=4", "bench.height=64", "bench.iterations=2",
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (stack,) = read_result(tmp_path)["stacks"]
    assert stack["stack"] == "fuse_qkv+channels_last" and stack["status"] == "ok", stack
    assert stack["lossless"] is True and stack["fidelity"]["passed"] is True
    assert stack["fidelity"]["metrics"]["psnr"]["threshold"] == 30.0


def test_cli_quantized_cached_stack_reports_cache_counts(tmp_path):
    proc = run_cli("+backend=[fbcache,torchao_int8]", "backend.fbcache.residual_diff_threshold=0.5",
                   f"bench.steps={STEPS}", "bench.height=64", "bench.iterations=2", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = read_result(tmp_path)
    (stack,) = data["stacks"]
    assert stack["stack"] == "torchao_int8+fbcache" and stack["status"] == "ok", stack
    assert stack["lossless"] is False and stack["fidelity"]["metrics"]["psnr"]["threshold"] == 20.0
    cache = stack["stats"]["cache"]
    assert cache["computed_steps"] + cache["skipped_steps"] == data["shapes"]["steps"]
    assert cache["skipped_steps"] > 0
    assert cache["total"]["steps"] == cache["generations"] * data["shapes"]["steps"]
    assert stack["stats"]["quantized_linears"]["torchao_int8"]["quantized"] > 0


@pytest.mark.slow
def test_cli_compile_composes_with_fbcache(tmp_path):
    """The cache decision is a graph break: compile picks fullgraph=false by itself (fullgraph=auto).
    Dynamo's decision, so Dynamo's eager backend suffices (Inductor would add 25 s of C++ on a CPU)."""
    proc = run_cli("+backend=[compile,fbcache]", "backend.compile.backend=eager", "backend.fbcache.residual_diff_threshold=0.5",
                   "bench.steps=4", "bench.height=64", "bench.iterations=1", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (stack,) = read_result(tmp_path)["stacks"]
    assert stack["status"] == "ok", stack
    assert stack["stats"]["compile"]["fullgraph"] is False
    cache = stack["stats"]["cache"]
    assert cache["computed_steps"] + cache["skipped_steps"] == 4 and cache["skipped_steps"] > 0
    assert cache["computed_steps"] >= 1  # the first step always runs every block


# ---------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@needs_cuda
def test_torchao_int8_dynamic_composes_with_compile_on_cuda(tmp_path):
    """Compiled, torchao's int8 GEMMs reach ``torch._int_mm`` with nothing to catch its refusal of
    16 rows or fewer: the modulation Linears' one row per image must stay off that path."""
    proc = run_cli("stacks=[{torchao_int8_dynamic:{},compile:{regional:true}}]", "bench.steps=2", "bench.height=128",
                   "bench.iterations=2", "model.dtype=bfloat16", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (stack,) = read_result(tmp_path)["stacks"]
    assert stack["status"] == "ok", stack


@pytest.mark.gpu
@needs_cuda
def test_offload_auto_beside_compile_is_model_offload_on_cuda(tmp_path):
    """The recipe's composition (model offload under regional compile) from offload's default."""
    proc = run_cli("+backend=[compile,offload]", "backend.compile.regional=true", "bench.steps=4", "bench.height=64",
                   "bench.iterations=2", "model.dtype=bfloat16", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (stack,) = read_result(tmp_path)["stacks"]
    assert stack["status"] == "ok" and stack["stats"]["offload"] == {"mode": "model"}, stack


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("selection", [
    {"torchao_fp8": {}}, {"torchao_fp8_weight_only": {}}, {"torchao_int4": {}}, {"torchao_int8": {}},
    {"attention": {"kernel": "_native_cudnn"}}, {"offload": {"mode": "model"}}, {"offload": {"mode": "sequential"}},
    {"offload": {}}, {"offload": {"mode": "group", "group_type": "leaf_level"}},
    {"bnb_nf4": {}}, {"fbcache": {}},
])
def test_gpu_backends_run_on_the_tiny_model(selection, tmp_path):
    from fluxopt.environment import detect_device

    name = next(iter(selection))
    backend = lookup_backend(name)
    reason = backend.unmet_requirement(parse_options(backend, selection[name]), detect_device("cuda"))
    if reason:
        pytest.skip(f"{name} {reason}")
    args = [f"backend.{name}.{k}={v}" for k, v in selection[name].items()]
    proc = run_cli(f"+backend={name}", *args, "bench.steps=4", "bench.height=64", "bench.iterations=2",
                   "model.dtype=bfloat16", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (stack,) = read_result(tmp_path)["stacks"]
    assert stack["status"] == "ok", stack
