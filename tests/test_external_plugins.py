"""A third-party plugin is installed, discovered through its entry point, and selected from any
directory: its options dataclass is its Hydra config, nothing is copied into fluxopt."""

from __future__ import annotations

import subprocess
import sys

from conftest import read_result, run_cli


def test_example_plugin_runs_from_a_directory_outside_the_checkout(tmp_path, plugin_env):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli("+backend=vae_tiling", "backend.vae_tiling.tile_size=64", "bench.iterations=1",
                   "hydra.run.dir=run", env=plugin_env, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = elsewhere / "run"
    (stack,) = read_result(run_dir)["stacks"]
    # the plugin's metric and event hook ran too
    assert "max_abs_diff" in stack["fidelity"]["metrics"]
    assert (run_dir / "example-events.csv").read_text().startswith("vae_tiling,ok,")
    assert stack["stack"] == "vae_tiling" and stack["status"] == "ok"
    assert stack["options"]["vae_tiling"] == {"tiling": True, "slicing": True, "tile_size": 64}
    assert stack["lossless"] is False  # the plugin declared it lossy: lossy thresholds apply
    assert stack["fidelity"]["metrics"]["psnr"]["threshold"] == 20.0


def test_plugin_option_validation_uses_its_dataclass(tmp_path, plugin_env):
    proc = run_cli("+backend=vae_tiling", "backend.vae_tiling.tile_size=30", f"hydra.run.dir={tmp_path}",
                   env=plugin_env)
    assert proc.returncode == 2
    assert "tile_size=30 must be a multiple of 8" in proc.stderr


def test_plugin_is_listed_with_its_distribution(plugin_env):
    code = ("from fluxopt import plugins; pm = plugins.get_plugin_manager();"
            "print(sorted(d.project_name for _, d in pm.list_plugin_distinfo()));"
            "print('vae_tiling' in plugins.backends())")
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, **plugin_env},
                         capture_output=True, text=True, check=True).stdout
    assert "fluxopt-example-plugin" in out and "True" in out


def test_without_the_plugin_its_backend_is_unknown(tmp_path):
    proc = run_cli("+backend=vae_tiling", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "unknown backend 'vae_tiling'" in proc.stderr


MISSPELT = '''
from fluxopt import hookimpl

@hookimpl
def fluxopt_backend():  # typo: the hook is fluxopt_backends
    return []
'''


def test_a_misspelt_hook_is_refused_naming_the_plugin(tmp_path, monkeypatch):
    import pytest

    from fluxopt import ConfigError, plugins

    (tmp_path / "typo_plugin.py").write_text(MISSPELT)
    monkeypatch.syspath_prepend(str(tmp_path))
    real = plugins.builtin_plugin_modules
    monkeypatch.setattr(plugins, "builtin_plugin_modules", lambda: [*real(), "typo_plugin"])
    plugins.get_plugin_manager.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"typo_plugin.*fluxopt_backend.*Known hooks: fluxopt_backends"):
            plugins.get_plugin_manager()
    finally:
        monkeypatch.undo()
        plugins.get_plugin_manager.cache_clear()


def test_a_plugin_model_is_selected_by_name_from_outside_the_checkout(tmp_path, plugin_env):
    """Models are in Hydra's ConfigStore, built from the registered specs: a plugin's model needs
    no YAML file anywhere to be ``model=<name>``, and its generation defaults apply."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli("model=tiny-square", "+backend=fuse_qkv", "bench.iterations=1", "save_images=false",
                   "hydra.run.dir=run", env=plugin_env, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_result(elsewhere / "run")
    assert result["model"]["name"] == "tiny-square"
    assert (result["shapes"]["height"], result["shapes"]["width"], result["shapes"]["steps"]) == (32, 32, 2)
    assert result["stacks"][0]["status"] == "ok"


def test_without_the_plugin_its_model_is_unknown(tmp_path):
    proc = run_cli("model=tiny-square", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert "model='tiny-square' is not a known model" in proc.stderr and len(proc.stderr.splitlines()) == 1
