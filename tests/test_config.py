"""The one validation of every setting (``fluxopt.config.run_config``), called directly: each rule
refuses just past its boundary with one message naming the setting, and accepts the boundary."""

from __future__ import annotations

import pytest

from fluxopt.config import MAX_SEED, BenchConfig, FidelityConfig, RunConfig, run_config
from fluxopt.errors import ConfigError

REFUSED = [
    ({"bench": {"seed": -1}}, "bench.seed=-1 is not allowed: an integer between 0 and 9223372036854775807"),
    ({"bench": {"seed": MAX_SEED + 1}}, f"bench.seed={MAX_SEED + 1} is not allowed"),
    ({"bench": {"warmup": -1}}, "bench.warmup=-1 is not allowed: an integer >= 0"),
    ({"bench": {"iterations": 0}}, "bench.iterations=0 is not allowed: an integer >= 1"),
    ({"bench": {"steps": 0}}, "bench.steps=0 is not allowed: an integer >= 1"),
    ({"bench": {"height": 8}}, "bench.height=8 is not allowed: a multiple of 16 between 16 and 8192"),
    ({"bench": {"height": 8208}}, "bench.height=8208 is not allowed"),
    ({"bench": {"width": 40}}, "bench.width=40 is not allowed: a multiple of 16"),
    ({"bench": {"guidance_scale": -0.5}}, "bench.guidance_scale=-0.5 is not allowed: a finite number >= 0"),
    ({"bench": {"guidance_scale": float("inf")}}, "bench.guidance_scale=inf is not allowed"),
    ({"bench": {"max_sequence_length": 0}}, "bench.max_sequence_length=0 is not allowed: an integer between 1 and 512"),
    ({"bench": {"max_sequence_length": 513}}, "bench.max_sequence_length=513 is not allowed"),
    ({"bench": {"prompts": []}}, "bench.prompts=[] is not allowed: a non-empty list of strings"),
    ({"bench": {"prompts": ["ok", " "]}}, "bench.prompts has ' ': every prompt must be a non-empty string"),
    ({"fidelity": {"lossy": {"psnr": 100.5}}}, "fidelity.lossy.psnr=100.5 is not allowed: psnr is at most 100"),
    ({"fidelity": {"lossless": {"ssim": 1.01}}}, "ssim is at most 1, so a threshold of 1.01 can never pass"),
    ({"fidelity": {"lossy": {"latent_rel_l2": -0.01}}}, "latent_rel_l2 is at least 0, so a threshold of -0.01"),
    ({"fidelity": {"lossy": {"psnr": float("nan")}}}, "fidelity.lossy.psnr=nan is not allowed: a finite number"),
    ({"fidelity": {"lossless": {"ssmi": 0.9}}}, "fidelity.lossless.ssmi: unknown metric. Did you mean 'ssim'?"),
    ({"fidelity": {"lossless": {"lpips": 0.1}}}, "fidelity.lossless.lpips=0.1 is not allowed: lpips cannot be computed"),
    ({"device": "gpu"}, "device='gpu' is not one of auto, cpu, cuda"),
    ({"bench": {"sed": 1}}, "Key 'sed' not in 'BenchConfig'"),
    ({"bench": {"iterations": "many"}}, "bench.iterations"),
]


@pytest.mark.parametrize(("settings", "message"), REFUSED, ids=[m for _, m in REFUSED])
def test_each_rule_refuses_with_one_line_naming_the_setting(settings, message):
    with pytest.raises(ConfigError) as info:
        run_config(settings)
    assert message in str(info.value) and "\n" not in str(info.value)


ACCEPTED = [
    {"bench": {"seed": 0}}, {"bench": {"seed": MAX_SEED}}, {"bench": {"warmup": 0, "iterations": 1, "steps": 1}},
    {"bench": {"height": 16, "width": 8192}}, {"bench": {"guidance_scale": 0}},
    {"bench": {"max_sequence_length": 1}}, {"bench": {"max_sequence_length": 512}},
    {"fidelity": {"lossy": {"psnr": 100.0, "ssim": 1.0, "latent_rel_l2": 0.0}}},
    {"fidelity": {"lossless": {"ssim": -1.0}}}, {"device": "cuda"}, {"device": "cpu"},
]


@pytest.mark.parametrize("settings", ACCEPTED, ids=str)
def test_each_boundary_is_allowed(settings):
    assert isinstance(run_config(settings), RunConfig)


def test_thresholds_are_set_on_top_of_the_defaults_not_instead_of_them():
    config = run_config({"fidelity": {"lossless": {"psnr": 40.0}}})
    assert config.fidelity.lossless == {"psnr": 40.0, "ssim": 0.95, "latent_rel_l2": 0.05}


@pytest.mark.parametrize(("kind", "message"), [("missing", "does not exist"), ("file", "is a file"),
                                               ("empty", "is not a diffusers checkpoint")])
def test_a_local_model_path_must_be_a_checkpoint(tmp_path, kind, message):
    path = tmp_path / "ckpt"
    if kind == "file":
        path.write_text("x")
    elif kind == "empty":
        path.mkdir()
    with pytest.raises(ConfigError, match=f"model.path={path} {message}"):
        run_config({"model": {"path": str(path)}})
    path.unlink() if kind == "file" else None
    (path.mkdir() if kind != "empty" else None)
    (path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    assert run_config({"model": {"path": str(path)}}).model.path == str(path)


@pytest.mark.parametrize(("index", "message"), [
    ('{"_class_name": "StableDiffusionPipeline"}', "is a StableDiffusionPipeline checkpoint, not a FLUX one"),
    ("{}", "is a None checkpoint, not a FLUX one"),
    ("not json", "model_index.json cannot be read"),
    ("[1]", "model_index.json cannot be read"),
])
def test_a_checkpoint_of_another_pipeline_is_refused(tmp_path, index, message):
    (tmp_path / "model_index.json").write_text(index)
    with pytest.raises(ConfigError, match=message):
        run_config({"model": {"path": str(tmp_path)}})


def test_a_hub_id_is_left_to_the_loader():
    assert run_config({"model": {"path": "black-forest-labs/FLUX.1-dev"}}).model.path == "black-forest-labs/FLUX.1-dev"


@pytest.mark.parametrize(("build", "message"), [
    (lambda: BenchConfig(seed=True), "bench.seed=True is not allowed"),
    (lambda: BenchConfig(guidance_scale=True), "bench.guidance_scale=True is not allowed"),
    (lambda: FidelityConfig(lossy={"psnr": True}), "fidelity.lossy.psnr=True is not allowed: a finite number"),
])
def test_a_bool_is_not_a_number(build, message):
    """Hydra's schema turns a bool into 1 before the check; the dataclasses, built directly, see it."""
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        build()


def test_prompts_may_be_a_tuple_but_not_one_string():
    from fluxopt.config import check_prompts

    assert check_prompts("p", ("a", "b")) == ("a", "b")
    with pytest.raises(ConfigError, match="p='ab' is not allowed"):
        check_prompts("p", "ab")


def test_the_error_names_the_key_once():
    with pytest.raises(ConfigError) as info:
        run_config({"bench": {"iterations": "many"}})
    assert str(info.value) == "bench.iterations: Value 'many' of type 'str' could not be converted to Integer"
    with pytest.raises(ConfigError) as info:
        run_config({"fidelity": {"lossless": {"zzzzqq": 1.0}}})
    assert "did you mean" not in str(info.value).lower()  # nothing close: no suggestion


def test_hydras_own_settings_are_not_part_of_the_run_config():
    from omegaconf import OmegaConf

    composed = OmegaConf.create({"hydra": {"run": {"dir": "x"}}, "bench": {"seed": 3}})
    assert run_config(composed).bench.seed == 3


@pytest.mark.parametrize("path", ["~/no-such-fluxopt-checkpoint", "./no-such-dir", "a/b/c", "no-such-dir",
                                  "/no-such-fluxopt-dir"])
def test_anything_but_owner_slash_name_is_a_local_path(path):
    with pytest.raises(ConfigError, match="does not exist"):
        run_config({"model": {"path": path}})


def test_an_existing_owner_slash_name_directory_is_checked_as_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    with pytest.raises(ConfigError, match="model.path=owner/name is not a diffusers checkpoint"):
        run_config({"model": {"path": "owner/name"}})


def test_each_default_is_written_once():
    """A setting's default lives in one place: the config dataclasses (config.py) or a model's
    generation defaults (models.py). Functions that take a bench setting default it to None and
    resolve it there, and no module but config.py writes fidelity thresholds (the run's settings;
    flux_mini's training and evaluation scripts have settings of their own)."""
    import ast
    import dataclasses
    from pathlib import Path

    from fluxopt.config import BenchConfig

    owned = {f.name for f in dataclasses.fields(BenchConfig)} - {"name", "profile"}
    metrics = {"psnr", "ssim", "latent_rel_l2"}
    offenders = []
    for path in sorted((Path(__file__).resolve().parent.parent / "fluxopt").rglob("*.py")):
        if "flux_mini" in path.parts:  # the trained model's training and evaluation scripts: their own settings
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                pairs = list(zip(a.args[len(a.args) - len(a.defaults):], a.defaults))
                pairs += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
                offenders += [f"{path.name}:{node.lineno} {node.name}({arg.arg}=...)" for arg, d in pairs
                              if arg.arg in owned and not (isinstance(d, ast.Constant) and d.value is None)]
            elif isinstance(node, ast.Dict) and path.name != "config.py":
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if keys & metrics and all(isinstance(v, ast.Constant) and isinstance(v.value, float) for v in node.values):
                    offenders.append(f"{path.name}:{node.lineno} fidelity thresholds {sorted(keys)}")
    assert not offenders, offenders
