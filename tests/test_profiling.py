"""The profile's arithmetic, which a CPU can check though only a GPU profile uses it all:
kernel categories from real kernel names, busy and idle time from overlapping intervals, the
analytic floor, and the floor of an average step under a step cache."""

from __future__ import annotations

import pytest

from fluxopt.profile import steps as profiling


@pytest.mark.parametrize("kernel, expected", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "gemm"),
    ("triton_tem_fused_addmm_gelu_0", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("triton_red_fused__to_copy_abs_amax_clamp_0", "quantize"),
    ("triton_per_fused__fused_rms_norm__scaled_dot_product_0", "norm_elementwise"),  # named after absorbed ops
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "norm_elementwise"),
    ("Memset (Device)", "other"),
])
def test_kernels_fall_in_their_categories(kernel, expected):
    assert profiling.category(kernel) == expected


def test_busy_time_counts_overlapping_kernels_once_and_the_rest_is_idle():
    events = [("sm90_xmma_gemm", 4000.0, 0.0, 4000.0),         # 4 ms GEMM
              ("flash_fwd_kernel", 3000.0, 3000.0, 6000.0),     # overlaps the GEMM by 1 ms
              ("triton_poi_fused_add_0", 1000.0, 8000.0, 9000.0)]
    result = profiling.breakdown(events, wall_s=0.010, gpu=True)
    assert result["breakdown_ms"] == {"gemm": 4.0, "attention": 3.0, "quantize": 0.0, "norm_elementwise": 1.0,
                                      "other": 0.0}
    assert result["busy_ms"] == pytest.approx(7.0) and result["gpu_idle_ms"] == pytest.approx(3.0)
    assert result["kernels"] == 3 and result["wall_ms"] == pytest.approx(10.0)
    assert [(k["name"], k["category"], k["ms"]) for k in result["top_kernels"]] == [
        ("sm90_xmma_gemm", "gemm", 4.0), ("flash_fwd_kernel", "attention", 3.0),
        ("triton_poi_fused_add_0", "norm_elementwise", 1.0)]
    assert result["device_to_host_copies"] == 0
    cpu = profiling.breakdown([("aten::mm", 2000.0, 0.0, 5000.0), ("aten::add", 500.0, 1000.0, 1500.0)], 0.01, gpu=False)
    assert cpu["busy_ms"] == pytest.approx(2.5) and cpu["gpu_idle_ms"] is None  # self times, no idle on a CPU
    assert cpu["device_to_host_copies"] is None


def test_copies_to_the_host_are_counted_the_other_copies_are_not():
    """The names torch.profiler gives CUDA copies (from an H200 trace of torchao's eager int8 step)."""
    events = [("Memcpy DtoH (Device -> Pinned)", 2.0, 0.0, 2.0), ("Memcpy DtoH (Device -> Pageable)", 3.0, 5.0, 8.0),
              ("Memcpy DtoD (Device -> Device)", 1.0, 9.0, 10.0), ("Memcpy HtoD (Pinned -> Device)", 1.0, 11.0, 12.0),
              ("sm90_xmma_gemm", 4.0, 12.0, 16.0)]
    assert profiling.breakdown(events, wall_s=0.001, gpu=True)["device_to_host_copies"] == 2


def test_top_kernels_sum_each_name_over_its_launches_and_keep_the_largest():
    events = [(f"k{i}", 100.0 * i, 0.0, 1.0) for i in range(1, 21)] + [("k1", 5000.0, 2.0, 3.0), ("x" * 500, 1.0, 4.0, 5.0)]
    top = profiling.breakdown(events, wall_s=1.0, gpu=True)["top_kernels"]
    assert len(top) == profiling.TOP_KERNELS
    assert top[0] == {"name": "k1", "category": "other", "ms": 5.1, "launches": 2}
    assert [k["name"] for k in top[1:3]] == ["k20", "k19"]
    long = profiling.breakdown([("x" * 500, 1.0, 0.0, 1.0)], wall_s=1.0, gpu=True)["top_kernels"][0]["name"]
    assert len(long) == profiling.KERNEL_NAME_CHARS


def test_the_floor_charges_gemm_and_attention_at_the_rate_of_their_precision():
    flops = {"gemm": 60e12, "attention": 20e12}
    ceilings = {"bf16": 800.0, "fp8": 1200.0}  # TFLOP/s
    assert profiling.floor_ms(flops, ceilings, {}) == pytest.approx(100.0)
    assert profiling.floor_ms(flops, ceilings, {"gemm": "fp8"}) == pytest.approx(75.0)
    assert profiling.floor_ms(flops, ceilings, {"attention": "fp8"}) == pytest.approx(75.0 + 50.0 / 3)
    assert profiling.floor_ms(flops, ceilings, {"gemm": "fp8", "attention": "fp8"}) == pytest.approx(200.0 / 3)
    assert profiling.floor_ms(flops, {"bf16": 800.0}, {"gemm": "fp8"}) == pytest.approx(100.0)  # no fp8 rate measured
    assert profiling.floor_ms(flops, {}, {}) is None  # no measured rate (CPU): no floor


def test_a_step_cache_lowers_the_floor_of_an_average_step_by_its_computed_share():
    assert profiling.average_step_floor_ms(60.0, {"steps": 28, "computed_steps": 12}) == pytest.approx(60.0 * 12 / 28)
    assert profiling.average_step_floor_ms(60.0, {"steps": 28, "computed_steps": None}) == 60.0  # counts unknown
    assert profiling.average_step_floor_ms(60.0, None) == 60.0
    assert profiling.average_step_floor_ms(None, {"steps": 28, "computed_steps": 12}) is None
    assert profiling.pct_of_floor(50.0, 0.1) == pytest.approx(50.0)  # 50 ms floor, 100 ms step
    assert profiling.pct_of_floor(None, 0.1) is None and profiling.pct_of_floor(50.0, None) is None


def test_the_floor_at_a_lower_clock_grows_in_proportion():
    """The ceilings ran at 1980 MHz; a stack held at 1650 MHz by the power limit has a floor 1.2x higher."""
    clock = {"sm_mhz_mean": 1650.0}
    assert profiling.floor_at_clock_ms(60.0, 1980.0, clock) == pytest.approx(72.0)
    assert profiling.pct_of_floor(profiling.floor_at_clock_ms(60.0, 1980.0, clock), 0.09) == pytest.approx(80.0)
    assert profiling.floor_at_clock_ms(60.0, None, clock) is None  # ceilings' clock unknown (no NVML)
    assert profiling.floor_at_clock_ms(60.0, 1980.0, None) is None
    assert profiling.floor_at_clock_ms(None, 1980.0, clock) is None


def test_the_clock_of_a_profile_is_read_during_the_step_kept(monkeypatch, tmp_path):
    """The SM clock in a profile comes from the samples taken while the kept step ran, not from
    the whole generation (a step cache's predicted steps leave the GPU idle and its clock up)."""
    import sys
    import time

    from fluxopt.profile import gpu_clock
    from test_gpu_clock import _FakeNvml

    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    monkeypatch.setattr(gpu_clock, "_handle", lambda nvml, index: "GPU-0")
    def generation(on_step):
        for i in range(6):
            time.sleep(0.03)
            on_step(i)

    result = profiling.profile_one_step(generation, steps=6, gpu=False, trace_path=tmp_path / "p.json")
    assert result["step"] == 3
    clock = result["gpu_clock"]
    # ~30 ms of a ~180 ms generation at one sample per 5 ms: a handful, not all of them
    assert 2 <= clock["samples"] <= 12, clock
    assert clock["sm_mhz_max_device"] == 1980.0
