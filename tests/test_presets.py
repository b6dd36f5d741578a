"""Presets: a recipe under one name expands into its backends with its options, everywhere a
stack is named (Hydra's +backend=, the Python API), and composes with overrides and other backends."""

from __future__ import annotations

import types

import pytest

from fluxopt import ConfigError, Preset, hookimpl, plugins
from fluxopt.stack import build_stack


@pytest.mark.parametrize("name", sorted(plugins.presets()))
def test_every_built_in_preset_is_a_valid_stack(name):
    preset = plugins.presets()[name]
    stack = build_stack(name)
    assert sorted(stack.names) == sorted(preset.backends)
    for backend, options in preset.backends.items():
        recorded = stack.options_dict()[backend]
        assert {k: recorded[k] for k in options} == dict(options)


def test_flux_fast_states_where_it_differs_from_the_original():
    preset = plugins.presets()["flux_fast"]
    assert preset.source.startswith("https://github.com/huggingface/flux-fast")
    assert any("Flash Attention 3" in d for d in preset.deviations)
    assert preset.backends["aoti"]["cuda_graphs"] and preset.backends["torchao_fp8"]["granularity"] == "row"
    for option in ("max_autotune", "tuning_flags"):  # on in the original, off here: each says how to restore it
        assert preset.backends["aoti"][option] is False
        assert any(f"backend.aoti.{option}=true" in d for d in preset.deviations), option


def test_a_preset_composes_with_other_backends_and_refuses_options_of_its_own():
    stack = build_stack(["fp8_graphs", "fixed_cache"])
    assert stack.names == ["torchao_fp8", "fixed_cache", "compile"]  # stage order
    with pytest.raises(ConfigError, match="preset 'fp8_graphs' takes no options of its own"):
        build_stack({"fp8_graphs": {"regional": False}})
    tuned = build_stack({"fp8_graphs": None, "compile": {"mode": "max-autotune-no-cudagraphs"}}).options_dict()
    assert tuned["compile"]["mode"] == "max-autotune-no-cudagraphs" and tuned["compile"]["regional"]
    with pytest.raises(ConfigError, match="'compile' is listed twice"):
        build_stack(["compile", "fp8_graphs", "compile"])
    with pytest.raises(ConfigError, match="backend 'torchao_fp8' is in two presets"):
        build_stack(["fp8_graphs", "fp8_graphs"])


def test_hydra_selects_a_preset_and_its_backends_options_still_override(register_plugin):
    from fluxopt.cli import preflight
    from fluxopt.config import register_configs

    plugin = types.ModuleType("cpu_preset")  # runnable here, unlike the built-in fp8 presets
    plugin.fluxopt_presets = hookimpl(lambda: [Preset("cpu_recipe", "test", {"compile": {"regional": True},
                                                                             "fuse_qkv": {"vae": False}})])
    register_plugin(plugin, "cpu_preset")
    register_configs()  # the CLI fills Hydra's ConfigStore when imported, before this plugin existed
    (plan,) = preflight(["+backend=[cpu_recipe,fixed_cache]", "backend.compile.backend=eager",
                         "backend.fixed_cache.interval=3"])
    (stack,) = plan.stacks
    options = stack.options_dict()
    assert stack.names == ["fuse_qkv", "fixed_cache", "compile"]
    assert options["compile"]["regional"] and not options["fuse_qkv"]["vae"]  # from the preset
    assert options["compile"]["backend"] == "eager"  # the override wins
    assert options["fixed_cache"]["interval"] == 3


def test_a_misspelt_preset_is_suggested():
    with pytest.raises(ConfigError, match="Did you mean 'flux_fast'"):
        build_stack("flux_fats")


def test_a_preset_named_like_a_backend_is_refused(register_plugin):
    plugin = types.ModuleType("clashing_preset")
    plugin.fluxopt_presets = hookimpl(lambda: [Preset("compile", "shadows a backend", {"compile": {}})])
    register_plugin(plugin, "clashing_preset")
    with pytest.raises(ConfigError, match="the preset 'compile' has the name of a backend"):
        plugins.presets()
