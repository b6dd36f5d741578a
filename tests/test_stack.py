"""Stack resolution and validation happen before any model is loaded."""

from __future__ import annotations

import types
from dataclasses import dataclass

import pytest

from fluxopt.backend import Backend, Package, Requirements, Stage
from fluxopt.environment import DeviceInfo
from fluxopt.errors import ConfigError
from fluxopt.hookspecs import hookimpl
from fluxopt.stack import build_stack, parse_options

CPU = DeviceInfo(type="cpu", name="test cpu")
H100 = DeviceInfo(type="cuda", name="H100", capability=(9, 0))
A100 = DeviceInfo(type="cuda", name="A100", capability=(8, 0))
MI300 = DeviceInfo(type="cuda", name="MI300X", rocm=True, capability=(9, 4))


@dataclass
class NoOptions:
    pass


def _backend(name: str, stage: Stage, **attrs) -> Backend:
    cls = type(f"B_{name}", (Backend,), {"name": name, "stage": stage, "options_class": NoOptions,
                                           "apply": lambda self, pipe, o, ctx: None, **attrs})
    return cls()


@pytest.fixture
def test_backends(register_plugin):
    plugin = types.SimpleNamespace()
    specs = [
        _backend("t_weights", Stage.WEIGHTS, conflicts={"t_cache": "test conflict reason"}),
        _backend("t_cache", Stage.CACHE),
        _backend("t_graph", Stage.GRAPH),
        _backend("t_gpu", Stage.WEIGHTS, requires=Requirements(gpu=True, min_compute_capability=(8, 9))),
        _backend("t_quant_a", Stage.WEIGHTS, exclusive_group="t_quant", exclusive_reason="one quantizer only"),
        _backend("t_quant_b", Stage.WEIGHTS, exclusive_group="t_quant", exclusive_reason="one quantizer only"),
    ]
    plugin.fluxopt_backends = hookimpl(lambda: specs)
    register_plugin(plugin, "test-backends")
    return specs


def test_stack_is_ordered_by_stage_not_by_command_line(test_backends):
    stack = build_stack(["compile", "t_cache"])
    assert stack.names == ["t_cache", "compile"]
    assert stack.name == "t_cache+compile"


def test_unknown_backend_lists_known_and_close_match():
    with pytest.raises(ConfigError) as err:
        build_stack(["compil"])
    assert "Did you mean 'compile'" in str(err.value)
    assert "Known backends:" in str(err.value) and "compile" in str(err.value)


def test_two_graph_backends_are_refused(test_backends):
    with pytest.raises(ConfigError, match="'t_graph' and 'compile'|'compile' and 't_graph'"):
        build_stack(["compile", "t_graph"])


def test_declared_conflict_is_refused_with_its_reason_either_direction(test_backends):
    with pytest.raises(ConfigError, match="test conflict reason"):
        build_stack(["t_cache", "t_weights"])


def test_backends_of_one_exclusive_group_are_refused(test_backends):
    with pytest.raises(ConfigError, match="'t_quant_a' and 't_quant_b' cannot be combined: one quantizer only"):
        build_stack(["t_quant_a", "t_quant_b"])
    assert build_stack(["t_quant_a", "t_cache"]).names == ["t_quant_a", "t_cache"]


def test_duplicate_backend_is_refused():
    with pytest.raises(ConfigError, match="listed twice"):
        build_stack(["compile", "compile"])


def test_options_typo_and_wrong_type_list_valid_keys():
    from fluxopt.stack import lookup_backend

    compile_backend = lookup_backend("compile")
    with pytest.raises(ConfigError) as err:
        parse_options(compile_backend, {"mdoe": "max-autotune"})
    assert "Valid options:" in str(err.value) and "mode: str" in str(err.value)
    with pytest.raises(ConfigError, match="regional"):
        parse_options(compile_backend, {"regional": "sometimes"})


def test_option_values_are_validated():
    with pytest.raises(ConfigError, match="not one of"):
        build_stack({"compile": {"mode": "ludicrous"}})


@pytest.mark.parametrize("device, expected", [
    (CPU, "needs a GPU; this run is on the CPU (test cpu)"),
    (A100, "needs compute capability >= 8.9; A100 has 8.0"),
    (H100, None),
])
def test_requirements_explain_what_is_missing(device, expected):
    req = Requirements(gpu=True, min_compute_capability=(8, 9))
    assert req.unmet(device) == expected


def test_rocm_and_nvidia_requirements():
    assert "ROCm" in Requirements(rocm=True).unmet(H100)
    assert Requirements(rocm=True).unmet(MI300) is None
    assert "NVIDIA" in Requirements(nvidia=True).unmet(MI300)


def test_missing_package_names_the_package_and_how_to_install():
    req = Requirements(packages=(Package("no_such_module_xyz", "pip install 'fluxopt[xyz]'"),))
    assert req.unmet(H100) == "needs the Python package 'no_such_module_xyz' (pip install 'fluxopt[xyz]')"
