"""The process as a user's shell sees it: a signal at any moment, including the first seconds
while torch is still importing, ends in one line and exit 130; a broken or misspelt installed
plugin is one line naming it and exit 2, whatever fluxopt command runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _wait_until_caught(pid: int, sig: int, timeout: float = 60.0) -> None:
    """Until process ``pid`` has a handler for ``sig`` (Linux's /proc/<pid>/status, SigCgt): the
    moment fluxopt's own handlers are in, before which the interpreter is still starting and any
    Python program dies of SIGTERM."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
        if caught >> (sig - 1) & 1:
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} installed no handler for signal {sig} in {timeout} s")


@pytest.mark.parametrize("delay", ["handlers in", 1.5])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_in_the_first_seconds_is_one_line_and_exit_130(tmp_path, sig, delay):
    """Whether it lands while torch imports (as soon as fluxopt's handlers are in) or once the run
    started: exit 130, no traceback, and the last line says so."""
    if delay == "handlers in" and not Path("/proc/self/status").exists():
        pytest.skip("needs Linux's /proc to see when the handlers are in")
    proc = subprocess.Popen([sys.executable, "-m", "fluxopt", "bench.iterations=1"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if delay == "handlers in":
        _wait_until_caught(proc.pid, signal.SIGTERM)  # fluxopt.__main__ installs it after SIGINT's
    else:
        time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("fluxopt: error: interrupted"), err[-2000:]


def _installed_plugin(root: Path, dist: str, module: str, source: str) -> dict[str, str]:
    """A distribution with a ``fluxopt`` entry point, importable from ``root`` (as pip would leave it)."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[fluxopt]\n{module} = {module}\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


BROKEN = "raise ImportError('needs a package that is not installed')\n"
MISSPELT = "from fluxopt import hookimpl\n\n@hookimpl\ndef fluxopt_backend():\n    return []\n"


@pytest.mark.parametrize(("source", "says", "command"), [
    (BROKEN, "the plugin 'broken_plugin' (broken_plugin) of fluxopt-broken 0.1 failed to import: ImportError: "
             "needs a package that is not installed", ["-m", "fluxopt", "bench.iterations=1"]),
    (MISSPELT, "plugin fluxopt-broken 0.1: unknown hook 'fluxopt_backend'", ["-m", "fluxopt.cli.report", ".", "--best"]),
], ids=["broken-cli", "misspelt-report"])
def test_a_bad_installed_plugin_is_one_line_naming_it_and_exit_2(tmp_path, source, says, command):
    env = _installed_plugin(tmp_path, "fluxopt-broken", "broken_plugin", source)
    proc = subprocess.run([sys.executable, *command], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert says in lines[0], lines[0]


def test_an_interrupt_from_inside_an_exec_string_still_exits_130(tmp_path):
    """An interrupt that lands in code run by ``exec`` of a string (dataclasses build their methods
    so, at import) leaves CPython's unhandled-interrupt mark set; under ``python -m`` the process
    then died by SIGINT (status -2) after printing its one line. Here a plugin's import raises the
    KeyboardInterrupt from inside an exec'd string, as such a signal would."""
    source = "exec('raise KeyboardInterrupt')\n"
    env = _installed_plugin(tmp_path, "fluxopt-interrupted", "interrupted_plugin", source)
    proc = subprocess.run([sys.executable, "-m", "fluxopt", "bench.iterations=1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and lines[-1].startswith("fluxopt: error: interrupted"), proc.stderr[-2000:]


def test_a_signal_noted_while_starting_is_answered_once_the_cli_takes_over(monkeypatch, capsys):
    """fluxopt.__main__'s noting handler stays until the CLI installs its own; a signal noted in
    between ends the command before anything runs, one line and exit 130."""
    import fluxopt.cli as cli

    monkeypatch.setattr(cli, "_main", lambda argv: pytest.fail("the command ran after the signal"))
    monkeypatch.setattr(cli, "OUTCOME", cli.Outcome())
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exited:
            cli.main(noted=[signal.SIGTERM])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert exited.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == ["fluxopt: error: interrupted"]


def test_an_error_a_signal_causes_inside_a_library_ends_as_the_interrupt(monkeypatch, capsys):
    """A signal can land inside a library whose cleanup then raises an error of its own (seen:
    OmegaConf building a config, "'NoneType' object has no attribute '_invalidate_flags_cache'",
    exit 2). That error is the interrupt's consequence: one line, exit 130."""
    import fluxopt.cli as cli
    import fluxopt.errors as errors
    from fluxopt.errors import ConfigError

    def preflight(argv):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in here
        except KeyboardInterrupt:
            raise ConfigError("bench: 'NoneType' object has no attribute '_invalidate_flags_cache'") from None
        raise AssertionError("no signal arrived")

    monkeypatch.setattr(cli, "preflight", preflight)
    monkeypatch.setattr(cli, "OUTCOME", cli.Outcome())
    monkeypatch.setattr(errors, "_signals", [])
    monkeypatch.setattr(sys, "argv", ["fluxopt"])
    monkeypatch.setenv(cli.INVOCATION_ENV, "test")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exited:
            cli.main()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    err = capsys.readouterr().err
    assert exited.value.code == 130, err
    assert err.strip().splitlines()[-1].startswith("fluxopt: error: interrupted"), err


@pytest.mark.parametrize("signalled", [True, False])
def test_a_backend_error_after_a_signal_ends_the_run_as_interrupted(monkeypatch, tmp_path, signalled):
    """Inside a stack the same rule holds: an error raised once a signal has arrived stops the run
    as interrupted (the stack recorded with the phase it reached, the rest not run); without a
    signal the error is the stack's failure and the run goes on."""
    import json

    from hydra import compose, initialize_config_module

    import fluxopt.errors as errors
    from fluxopt.config import register_configs
    from fluxopt.runner import Run
    from fluxopt.stack import build_stack

    monkeypatch.setattr(errors, "_signals", [])
    real = Run._apply_build_measure

    def failing(self, stack, result, reference, label):
        if stack.name == "fuse_qkv":
            if signalled:
                errors.note_signal(signal.SIGTERM)
            raise RuntimeError("a library's cleanup failed")
        return real(self, stack, result, reference, label)

    monkeypatch.setattr(Run, "_apply_build_measure", failing)
    register_configs()
    with initialize_config_module(config_module="fluxopt.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["bench.iterations=1", "bench.steps=2", "save_images=false"])
    run = Run(cfg, tmp_path, stacks=[build_stack("fuse_qkv"), build_stack("channels_last")])
    if signalled:
        with pytest.raises(KeyboardInterrupt):
            run.execute()
        data = json.loads((tmp_path / "result.json").read_text())
        assert data["complete"] is False and data["interrupted"] is True
        assert [s["stack"] for s in data["stacks"]] == ["fuse_qkv"]
        assert data["stacks"][0]["reason"].startswith("interrupted during ")
    else:
        data = run.execute().to_json()
        assert [(s["stack"], s["status"]) for s in data["stacks"]] == [("fuse_qkv", "failed"), ("channels_last", "ok")]
        assert data["stacks"][0]["reason"] == "RuntimeError: a library's cleanup failed"
