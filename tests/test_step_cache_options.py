"""The diffusers step caches' options: each bound is accepted at its edge and refused just past
it, and each option reaches the diffusers config it is meant for (a dropped or swapped option
would silently run the cache with diffusers' default)."""

from __future__ import annotations

import types

import pytest
import torch

from fluxopt import Shapes
from fluxopt.errors import ConfigError
from fluxopt.stack import build_stack, lookup_backend, parse_options

CTX = types.SimpleNamespace(shapes=Shapes(height=64, width=64, steps=7, guidance_scale=3.5, max_sequence_length=32),
                            stats={})


@pytest.mark.parametrize("name, accepted, refused", [
    ("taylorseer", {"cache_interval": 1}, {"cache_interval": 0}),
    ("taylorseer", {"max_order": 0}, {"max_order": -1}),
    ("taylorseer", {"disable_cache_before_step": 0}, {"disable_cache_before_step": -1}),
    ("magcache", {"threshold": 0.0}, {"threshold": -0.01}),
    ("magcache", {"max_skip_steps": 0}, {"max_skip_steps": -1}),
    ("magcache", {"retention_ratio": 0.0}, {"retention_ratio": -0.01}),
    ("magcache", {"retention_ratio": 1.0}, {"retention_ratio": 1.01}),
    ("magcache", {"mag_ratios": [1.0, 0.9]}, {"mag_ratios": [1.0]}),
    ("fastercache", {"spatial_attention_block_skip_range": 2}, {"spatial_attention_block_skip_range": 1}),
    ("fastercache", {"spatial_attention_timestep_skip_range": [-1.0, 1000.0]},
     {"spatial_attention_timestep_skip_range": [-1.0, 1000.5]}),
    ("pab", {"spatial_attention_block_skip_range": 2}, {"spatial_attention_block_skip_range": 1}),
    ("pab", {"spatial_attention_timestep_skip_range": [100.0, 100.5]},
     {"spatial_attention_timestep_skip_range": [100.0, 100.0]}),
    ("seacache", {"threshold": 0.0}, {"threshold": -0.01}),
    ("seacache", {"power_exp": 0.01}, {"power_exp": 0.0}),
    ("seacache", {"retention_steps": 0}, {"retention_steps": -1}),
    ("seacache", {"cache_end_steps": 0}, {"cache_end_steps": -1}),
    ("seacache", {"max_consecutive_cached": 0}, {"max_consecutive_cached": -1}),
    ("seacache", {"residual_order": 0}, {"residual_order": 2}),
])
def test_each_bound_is_accepted_at_its_edge_and_refused_past_it(name, accepted, refused):
    assert build_stack({name: accepted}).names == [name]
    with pytest.raises(ConfigError, match=rf"^backend\.{name}[.:]"):  # the message starts with the setting
        build_stack({name: refused})


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_int4_group_sizes_torchao_supports_are_accepted(group_size):
    assert build_stack({"torchao_int4": {"group_size": group_size}}).names == ["torchao_int4"]
    with pytest.raises(ConfigError, match=r"^backend\.torchao_int4\.group_size must be 32, 64, 128 or 256"):
        build_stack({"torchao_int4": {"group_size": group_size + 1}})


def test_a_bad_dtype_names_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        build_stack({"taylorseer": {"taylor_factors_dtype": "float8"}})
    assert str(err.value) == ("backend.taylorseer.taylor_factors_dtype='float8' is not one of "
                              "bfloat16, float16, float32")


def _config(name, pipe=None, **options):
    backend = lookup_backend(name)
    return backend.config(pipe, parse_options(backend, options), CTX)


def test_taylorseer_options_reach_its_config():
    cfg = _config("taylorseer", cache_interval=3, disable_cache_before_step=2, disable_cache_after_step=20,
                  max_order=2, taylor_factors_dtype="float32", use_lite_mode=True)
    assert (cfg.cache_interval, cfg.disable_cache_before_step, cfg.disable_cache_after_step, cfg.max_order,
            cfg.taylor_factors_dtype, cfg.use_lite_mode) == (3, 2, 20, 2, torch.float32, True)


def test_magcache_options_reach_its_config_and_the_ratios_are_labelled():
    CTX.stats.clear()
    cfg = _config("magcache", threshold=0.1, max_skip_steps=4, retention_ratio=0.3, mag_ratios=[1.0, 0.9, 0.8])
    assert (cfg.threshold, cfg.max_skip_steps, cfg.retention_ratio, cfg.num_inference_steps, cfg.calibrate) == \
        (0.1, 4, 0.3, 7, False)
    assert CTX.stats["magcache_ratios"] == "user-supplied"
    assert cfg.mag_ratios is not None and len(cfg.mag_ratios) == 7  # interpolated to the bench's steps
    assert _config("magcache", calibrate=True).calibrate is True
    assert CTX.stats["magcache_ratios"] == "diffusers FLUX_MAG_RATIOS (calibrated on FLUX.1-dev)"


def test_fastercache_and_pab_options_reach_their_configs():
    pipe = types.SimpleNamespace(current_timestep=640)
    cfg = _config("fastercache", pipe, spatial_attention_block_skip_range=3,
                  spatial_attention_timestep_skip_range=[10.0, 700.0], attention_weight=0.25,
                  is_guidance_distilled=False)
    assert (cfg.spatial_attention_block_skip_range, cfg.spatial_attention_timestep_skip_range,
            cfg.attention_weight_callback(None), cfg.current_timestep_callback(), cfg.is_guidance_distilled) == \
        (3, (10.0, 700.0), 0.25, 640, False)
    cfg = _config("pab", pipe, spatial_attention_block_skip_range=4, spatial_attention_timestep_skip_range=[50.0, 600.0])
    assert (cfg.spatial_attention_block_skip_range, cfg.spatial_attention_timestep_skip_range,
            cfg.current_timestep_callback()) == (4, (50.0, 600.0), 640)


def test_seacache_options_reach_its_config():
    pipe = types.SimpleNamespace(transformer=types.SimpleNamespace(cache_context=lambda name, **kw: None),
                                 scheduler=types.SimpleNamespace())
    cfg = _config("seacache", pipe, threshold=0.3, residual_order=0, retention_steps=2, cache_end_steps=3,
                  max_consecutive_cached=4, power_exp=2.5)
    assert (cfg.threshold, cfg.residual_order, cfg.retention_steps, cfg.cache_end_steps, cfg.max_consecutive_cached,
            cfg.power_exp) == (0.3, 0, 2, 3, 4, 2.5)
