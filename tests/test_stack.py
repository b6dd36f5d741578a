"""Stack resolution and validation happen before any model is loaded."""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Optional

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
        # declares its conflict with a backend of an earlier stage (it comes second in the stack)
        _backend("t_late", Stage.GRAPH, conflicts={"t_quant_a": "late conflict reason"}),
        _backend("t_picky", Stage.CACHE, incompatibility=lambda self, options, others:
                 "not with t_weights" if any(o.name == "t_weights" for o in others) else None),
        _backend("t_multi", Stage.ATTENTION, options_class=TypedOptions, processes=lambda self, options: options.count,
                 unmet_requirement=lambda self, options, device: "needs flag=false" if options.flag else None),
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


def test_a_conflict_declared_by_the_later_backend_is_refused(test_backends):
    with pytest.raises(ConfigError, match="backends 't_quant_a' and 't_late' cannot be combined: late conflict reason"):
        build_stack(["t_late", "t_quant_a"])


def test_a_backend_may_refuse_the_others_it_is_stacked_with(test_backends):
    with pytest.raises(ConfigError) as err:
        build_stack(["t_picky", "t_weights"])
    assert str(err.value) == "backend 't_picky' cannot be used in this stack: not with t_weights"
    assert build_stack(["t_picky", "t_quant_a"]).names == ["t_quant_a", "t_picky"]


def test_the_stack_needs_as_many_processes_as_its_hungriest_backend(test_backends):
    from fluxopt.stack import Stack

    assert Stack(()).processes() == 1  # the baseline
    assert build_stack(["t_cache"]).processes() == 1
    assert build_stack({"t_multi": {"count": 4}, "t_cache": None}).processes() == 4  # asked with its options


def test_requirements_may_depend_on_the_options(test_backends):
    assert build_stack({"t_multi": {"flag": True}}).unmet_requirements(H100) == ["t_multi needs flag=false"]
    assert build_stack({"t_multi": {"flag": False}}).unmet_requirements(H100) == []


def test_unmet_requirements_name_each_backend_and_why(test_backends):
    stack = build_stack(["t_gpu", "t_cache"])
    assert stack.unmet_requirements(CPU) == ["t_gpu needs a GPU; this run is on the CPU (test cpu)"]
    assert stack.unmet_requirements(A100) == ["t_gpu needs compute capability >= 8.9; A100 has 8.0"]
    assert stack.unmet_requirements(H100) == []


def test_the_unknown_backend_message_suggests_one_close_name():
    from fluxopt.stack import unknown_backend_message

    assert unknown_backend_message("compil", ["compiled", "compile", "aoti"]) == \
        "unknown backend 'compil'. Did you mean 'compile'? Known backends: aoti, compile, compiled."
    assert unknown_backend_message("zzz", ["b", "a"]) == "unknown backend 'zzz'. Known backends: a, b."


def test_a_preset_takes_no_options_and_its_backends_options_must_be_mappings():
    with pytest.raises(ConfigError) as err:
        build_stack({"fp8_graphs": {"regional": True}})
    assert str(err.value).startswith("preset 'fp8_graphs' takes no options of its own; set its backends' options "
                                     "instead (backend.torchao_fp8.<option>, backend.compile.<option>")
    with pytest.raises(ConfigError, match="options for backend 'compile' must be a mapping"):
        build_stack({"fp8_graphs": None, "compile": "fast"})


def test_options_are_described_with_their_types_whether_annotations_are_strings_or_types():
    import dataclasses as dc

    from fluxopt.stack import describe_options

    required = dc.make_dataclass("Required", [("name", str)])
    assert describe_options(required) == "name: str = '???'"  # no default: shown as required
    real = dc.make_dataclass("Real", [("flag", bool, dc.field(default=False)),
                                      ("ratios", list[float], dc.field(default_factory=lambda: [0.5])),
                                      ("limit", Optional[int], dc.field(default=None))])
    assert describe_options(real) == "flag: bool = False, ratios: list[float] = [0.5], limit: Optional[int] = None"
    assert describe_options(TypedOptions).startswith("flag: bool = False, count: int = 1")  # string annotations


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


@dataclass
class TypedOptions:
    flag: bool = False
    count: int = 1
    ratio: float = 0.5
    label: str = "a"
    ratios: list[float] = field(default_factory=list)
    limit: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)
    anything: Any = None
    items: list = field(default_factory=list)  # a bare list: any items
    stage: Stage = Stage.WEIGHTS  # a type fluxopt does not check itself: OmegaConf converts and checks it


TYPED = _backend("t_typed", Stage.WEIGHTS, options_class=TypedOptions)


@pytest.mark.parametrize("key, value", [
    ("flag", True), ("count", 3), ("ratio", 2), ("ratio", 0.25), ("label", "b"), ("ratios", [1, 0.5]),
    ("ratios", []), ("limit", None), ("limit", 7), ("extra", {"a": 1}), ("anything", "x"), ("anything", [1]),
    ("items", [1, "a"]), ("stage", Stage.CACHE),
])
def test_a_value_of_the_declared_type_is_kept_as_given(key, value):
    assert getattr(parse_options(TYPED, {key: value}), key) == value


@pytest.mark.parametrize("key, value, allowed", [
    ("flag", "yes", "bool"), ("flag", 1, "bool"),  # no coercion: OmegaConf would read "yes" as True
    ("count", True, "int"), ("count", 1.5, "int"), ("count", "3", "int"),
    ("ratio", False, "float"), ("ratio", "0.1", "float"),
    ("label", 1, "str"), ("label", None, "str"),
    ("ratios", 0.5, "list[float]"), ("ratios", ["a"], "list[float]"), ("ratios", [True], "list[float]"),
    ("limit", "x", "Optional[int]"), ("limit", 1.5, "Optional[int]"),
    ("extra", [1], "dict[str, Any]"),
])
def test_a_value_of_another_type_is_refused_naming_setting_value_and_type(key, value, allowed):
    with pytest.raises(ConfigError) as err:
        parse_options(TYPED, {key: value})
    assert str(err.value) == f"backend.t_typed.{key}={value!r} is not a valid {allowed}"


@pytest.mark.parametrize("key, value", [("ratio", float("inf")), ("ratio", float("nan")),
                                        ("ratios", [0.5, float("-inf")])])
def test_numbers_must_be_finite_in_lists_too(key, value):
    with pytest.raises(ConfigError, match=f"backend.t_typed.{key}=.* numbers must be finite"):
        parse_options(TYPED, {key: value})


def test_a_type_fluxopt_does_not_check_is_left_to_omegaconf():
    assert parse_options(TYPED, {"stage": "CACHE"}).stage is Stage.CACHE
    with pytest.raises(ConfigError) as err:
        parse_options(TYPED, {"stage": "NOWHERE"})
    assert str(err.value).startswith("invalid options for backend 't_typed': Invalid value 'NOWHERE', expected one "
                                     "of [WEIGHTS, ATTENTION, CACHE, GRAPH, PLACEMENT]. Valid options: flag: bool")


def test_a_misspelt_option_gets_the_closest_name_and_only_then():
    with pytest.raises(ConfigError) as err:
        parse_options(TYPED, {"ration": 0.1})
    assert str(err.value).startswith("backend 't_typed' has no option 'ration'. Did you mean 'ratio'? Valid options: ")
    assert "flag: bool = False, count: int = 1, ratio: float = 0.5, label: str = 'a', ratios: list[float] = []" \
        in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_options(TYPED, {"zzzzzz": 1})
    assert str(err.value).startswith("backend 't_typed' has no option 'zzzzzz'. Valid options: flag: bool")


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
