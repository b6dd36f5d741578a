"""Bad input, as a new user types it: every case ends before any model loads, with exit status 2
(1 for a stack this machine cannot run), one line on stderr that names the setting and the
value, no traceback, and nothing written or deleted. Run in-process through ``fluxopt.cli.main``
(the same code path as ``python -m fluxopt``), so the table stays fast."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

CASES = [
    # (command line, exit status, text the one error line must contain)
    ("bench.height=0", 2, "bench.height=0 is not allowed"),
    ("bench.height=-64", 2, "bench.height=-64 is not allowed"),
    ("bench.height=70", 2, "bench.height=70 is not allowed: a multiple of 16"),
    ("bench.width=8208", 2, "bench.width=8208 is not allowed"),
    ("bench.height=8192 bench.width=8192", 2, "needs an estimated"),
    ("bench.warmup=-5", 2, "bench.warmup=-5 is not allowed"),
    ("bench.iterations=0", 2, "bench.iterations=0 is not allowed"),
    ("bench.iterations=-1", 2, "bench.iterations=-1 is not allowed"),
    ("bench.iterations=lots", 2, "bench.iterations=lots"),
    ("bench.steps=0", 2, "bench.steps=0 is not allowed"),
    ("bench.seed=-1", 2, "bench.seed=-1 is not allowed"),
    ("bench.guidance_scale=-1", 2, "bench.guidance_scale=-1.0 is not allowed"),
    ("bench.guidance_scale=nan", 2, "bench.guidance_scale=nan is not allowed"),
    ("bench.max_sequence_length=600", 2, "bench.max_sequence_length=600 is not allowed"),
    ("bench.max_sequence_length=0", 2, "bench.max_sequence_length=0 is not allowed"),
    ("bench.prompts=[]", 2, "bench.prompts=[] is not allowed"),
    ("bench.prompts=['']", 2, "every prompt must be a non-empty string"),
    ("bench=huge", 2, "Could not find 'bench/huge' Available options in 'bench': full quick"),
    ("+backend=[compile,fbcache", 2, "cannot parse the argument '+backend=[compile,fbcache'"),
    ("+backend=[]", 2, "the stack is empty"),
    ("+backend=nope", 2, "unknown backend 'nope'"),
    ("+backend=compil", 2, "Did you mean 'compile'?"),
    ("+backend=compile,fbcache", 2, "is a sweep (several values); add -m"),
    ("devcie=cpu", 2, "unknown setting 'devcie'. Did you mean 'device'?"),
    ("device=tpu", 2, "device='tpu' is not one of auto, cpu, cuda"),
    ("model=nope", 2, "model='nope' is not a known model"),
    ("model.dtype=int8", 2, "model.dtype='int8' is not one of"),
    ("save_images=maybe", 2, "save_images=maybe: Value 'maybe' is not a valid bool"),
    ("+backend=compile backend.compile.mode=fast", 2, "backend.compile.mode='fast' is not one of"),
    ("+backend=compile backend.compile.regonal=true", 2, "has no option 'regonal'. Did you mean 'regional'?"),
    ("+backend=compile backend.compile.regional=maybe", 2, "backend.compile.regional=maybe"),
    ("+backend=compile +backend.compile.inductor_config.max_autotune=lots", 2, "max_autotune='lots' must be a bool"),
    ("+backend=compile +backend.compile.inductor_config.no_such_flag=1", 2, "unknown Inductor option 'no_such_flag'"),
    ("+backend=compile backend.compile.inductor_config={max_autotune:true}", 2,
     "To append to your config use +backend.compile.inductor_config"),
    ("+backend=compile backend.fbcache.residual_diff_threshold=0.1", 2, "which this command does not select"),
    ("+backend=[aoti,compile]", 2, "cannot be combined"),
    ("+backend=[torchao_int8,bnb_nf4]", 2, "cannot be combined"),
    ("+backend=[fbcache,taylorseer]", 2, "cannot be combined"),
    ("+backend=[offload,compile] backend.offload.mode=sequential", 2, "mode=sequential"),
    # the pair is compatible with the mode given (not the default's): judged once options are composed
    ("+backend=[offload,compile] backend.offload.mode=model backend.compile.regional=maybe", 2,
     "backend.compile.regional=maybe"),
    ("+backend=[fbcache,compile] backend.compile.cuda_graphs=true", 2, "cuda_graphs=true replays one fixed graph"),
    ("+backend=fbcache backend.fbcache.residual_diff_threshold=-1", 2, "residual_diff_threshold must be >= 0"),
    ("+backend=fbcache backend.fbcache.implementation=magic", 2, "implementation='magic' is not one of"),
    ("+backend=taylorseer backend.taylorseer.cache_interval=0", 2, "cache_interval >= 1"),
    ("+backend=aoti backend.aoti.weights=sometimes", 2, "weights='sometimes' is not one of"),
    ("+backend=aoti backend.aoti.min_resolution=100", 2, "min_resolution=100 must be a multiple of 16"),
    ("+backend=attention backend.attention.kernel=fastest", 2, "kernel='fastest' is not one of"),
    ("+backend=torchao_int4 backend.torchao_int4.group_size=7", 2, "group_size must be 32, 64, 128 or 256"),
    ("+backend=torchao_fp8", 1, "torchao_fp8 needs an NVIDIA GPU with CUDA"),
    ("fidelity.lossy.psnr=high", 2, "fidelity.lossy.psnr=high"),
    ("+fidelity.lossless.nope=3", 2, "fidelity.lossless.nope: unknown metric"),
    ("cache.dir=/proc/fluxopt", 2, "cache.dir=/proc/fluxopt is not usable"),
    ("hydra.run.dir=afile/run", 2, "hydra.run.dir=afile/run is not usable"),
    ("-m bench.iterations=3,0,2", 2, "bench.iterations=0 is not allowed"),
    ("-m +backend=[compile,fixed_cache],[fixed_cache,fuse_qkv] backend.fixed_cache.interval=3", 2,
     "sets an option of 'fixed_cache', which only the swept +backend=... selects"),
    ("+backend=[fixed_cache,compile] backend.fixed_cache.order=2", 2, "backend.fixed_cache.order=2 is not one of 0, 1"),
    ("+backend=[flux_fast,fp8_graphs]", 2, "is in two presets of the stack"),
    ("--config-path /nonexistent --config-name config", 2, "--config-path=/nonexistent is not a directory"),
    # values that fail only after a model loaded, or never pass: refused first
    ("bench.seed=18446744073709551616", 2, "bench.seed=18446744073709551616 is not allowed: an integer between 0"),
    ("bench.seed=9223372036854775808", 2, "bench.seed=9223372036854775808 is not allowed"),
    ("-m bench.seed=0,18446744073709551616", 2, "bench.seed=18446744073709551616 is not allowed"),
    ("bench.max_sequence_length=100000", 2, "bench.max_sequence_length=100000 is not allowed"),
    ("bench.guidance_scale=inf", 2, "bench.guidance_scale=inf is not allowed"),
    ("bench.steps=-3", 2, "bench.steps=-3 is not allowed"),
    ("bench.width=0", 2, "bench.width=0 is not allowed"),
    ("bench.prompts=cat", 2, "bench.prompts"),
    ("device=gpu", 2, "device='gpu' is not one of auto, cpu, cuda"),
    ("fidelity.lossless.ssim=5", 2, "fidelity.lossless.ssim=5.0 is not allowed: ssim is at most 1"),
    ("fidelity.lossy.psnr=101", 2, "a threshold of 101 can never pass"),
    ("fidelity.lossy.latent_rel_l2=-0.1", 2, "latent_rel_l2 is at least 0"),
    ("fidelity.lossless.psnr=inf", 2, "fidelity.lossless.psnr=inf is not allowed: a finite number"),
    ("+fidelity.lossless.lpips=0.1", 2, "lpips cannot be computed here"),
    ("+fidelity.lossless.psrn=30", 2, "unknown metric. Did you mean 'psnr'?"),
    ("model.path=/nonexistent/flux", 2, "model.path=/nonexistent/flux does not exist"),
    ("model.path=afile", 2, "model.path=afile is a file"),
    ("model.path=.", 2, "model.path=. is not a diffusers checkpoint"),
    ("+backend=trt_fp8 backend.trt_fp8.stop_after=never", 2, "stop_after='never' is not one of"),
]


def run_main(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    from fluxopt import cli

    monkeypatch.setattr(sys, "argv", ["fluxopt", *argv])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    return stop.value.code, capsys.readouterr().err


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("line, status, text", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_before_anything_loads(line, status, text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file where a directory is expected")
    before = listing(tmp_path)
    import fluxopt.cli  # noqa: F401 - import everything first: patch the names the runner really calls
    import fluxopt.models
    import fluxopt.runner

    def loaded(*args, **kwargs):
        pytest.fail("a model was loaded")

    monkeypatch.setattr(fluxopt.models, "load_pipeline", loaded)
    monkeypatch.setattr(fluxopt.runner, "load_pipeline", loaded)
    monkeypatch.delenv("FLUXOPT_INVOCATION", raising=False)
    code, err = run_main(line.split(" "), monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == status, err
    assert len(lines) == 1 and lines[0].startswith("fluxopt: error: "), err
    assert text in lines[0], lines[0]
    assert "Traceback" not in err
    assert listing(tmp_path) == before  # nothing written, nothing deleted


def test_the_table_is_large_enough():
    assert len(CASES) >= 75


def test_report_of_a_missing_directory_names_it(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "fluxopt.cli.report", str(tmp_path / "nope")], capture_output=True,
                          text=True, env={**os.environ})
    assert proc.returncode == 2 and f"directory={tmp_path / 'nope'} is not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr
