"""A third-party plugin is installed, discovered through its entry point, and its own Hydra
config is found: nothing is copied into fluxopt."""

from __future__ import annotations

import subprocess
import sys

from conftest import read_result, run_cli


def test_example_plugin_backend_selected_with_its_own_config(tmp_path, plugin_env):
    proc = run_cli("+backend=vae_tiling", "backend.vae_tiling.tile_size=64", "bench.iterations=1",
                   f"hydra.run.dir={tmp_path}", env=plugin_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (stack,) = read_result(tmp_path)["stacks"]
    assert stack["stack"] == "vae_tiling" and stack["status"] == "ok"
    assert stack["options"]["vae_tiling"] == {"tiling": True, "slicing": True, "tile_size": 64}
    assert stack["lossless"] is False  # the plugin declared it lossy: lossy thresholds apply
    assert stack["fidelity"]["metrics"]["psnr"]["threshold"] == 20.0


def test_plugin_option_validation_uses_its_dataclass(tmp_path, plugin_env):
    proc = run_cli("+backend=vae_tiling", "backend.vae_tiling.tile_size=30", f"hydra.run.dir={tmp_path}",
                   env=plugin_env)
    assert proc.returncode == 2
    assert "tile_size must be a multiple of 8" in proc.stderr


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
