"""A fork server for the suite's ``python -m fluxopt`` processes.

Each CLI test runs fluxopt in a process of its own, as a user would; most of such a process's
life on a CPU is importing torch, diffusers and transformers (about 7 of the 10 s a small run
takes). This server imports those libraries once, never fluxopt, and forks a child per command:
the child takes the command's working directory, environment, ``sys.path`` and argv and runs
``fluxopt`` as ``python -m fluxopt`` would (``runpy``), in a process of its own with its own exit
status, output and signals. Only libraries that read nothing from the environment the tests
change are imported here; a command whose environment differs from the server's in anything
but the variables in :data:`FORWARDED` is not sent here (:func:`runs_here`).

Run as ``python _fork_server.py``: it first answers with the environment it started with and what
its imports set (or, from :func:`fork_hazard`, why it cannot serve, and exits); then one JSON
request per line on stdin (argv, env, cwd, stdout and stderr file paths), and for each a line with
the child's pid, then one with its exit status.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback

# What a test may set for a command that still runs here: read by fluxopt and its plugins at run
# time, never by the libraries imported below. Inductor reads its cache directory when it compiles
# and sets _TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR before it loads each compiled library (a worker
# that compiled has both set); pytest names the test running; the terminal size is read when rich prints.
FORWARDED = ("FLUXOPT_", "PYTHONPATH", "HYDRA_FULL_ERROR", "TORCHINDUCTOR_CACHE_DIR", "_TORCHINDUCTOR_PYOBJECT_",
             "PYTEST_CURRENT_TEST", "COLUMNS", "LINES")

# The libraries a fluxopt run imports, heaviest first (none of them fluxopt's).
PRELOAD = ("torch", "torch._dynamo", "torch._inductor.compile_fx", "torch.export", "diffusers",
           "diffusers.pipelines.flux.pipeline_flux", "diffusers.models.transformers.transformer_flux",
           "transformers.models.clip.modeling_clip", "transformers.models.t5.modeling_t5", "torchao.quantization",
           "hydra", "hydra.core.config_store", "hydra._internal.utils", "omegaconf", "numpy", "PIL.Image", "rich.console",
           "pluggy", "safetensors.torch", "scipy.ndimage", "skimage.metrics", "matplotlib", "onnxruntime", "sympy")


def runs_here(env: dict[str, str], server_env: dict[str, str], set_by_imports: dict[str, str]) -> bool:
    """Whether a command with ``env`` can run in a child of a server started with ``server_env``
    whose imports then set ``set_by_imports`` (the child keeps those: they describe its process)."""
    keys = set(env) | set(server_env)
    return all(env.get(k) == server_env.get(k) for k in keys
               if not k.startswith(FORWARDED) and k not in set_by_imports)


def fork_hazard() -> str | None:
    """Why a forked child could not run fluxopt as a new interpreter would, or None. A library that
    touches the GPU when imported leaves this process with a CUDA context, which a forked child
    cannot use: its first CUDA call fails with "Cannot re-initialize CUDA in forked subprocess".
    Such a server serves nothing, and every command gets a new interpreter."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "importing the libraries initialized CUDA, which a forked child cannot use"
    return None


def _child(request: dict) -> None:
    """In the forked child: become ``python -m fluxopt ARGV`` in the request's directory and environment."""
    os.setpgid(0, 0)  # a group of its own, as the test kills it and what it started on a timeout
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    null = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # what the libraries set when this process imported them (a function's address for Inductor's
    # C++ wrappers...) holds for this process, not for the one that sent the request
    os.environ.update({k: v for k, v in SET_BY_IMPORTS.items() if not (k.startswith(FORWARDED) and k in request["env"])})
    # python -m puts the working directory first, then $PYTHONPATH, then the installation's paths
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.getcwd(), *extra, *[p for p in INSTALLATION_PATH if p not in extra]]
    sys.argv = ["fluxopt", *request["argv"]]
    code = 0
    try:
        runpy.run_module("fluxopt", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what python would print for an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - a closed stream has nothing left to write
                pass
    os._exit(code)


SET_BY_IMPORTS: dict[str, str] = {}  # environment variables the preloaded libraries set

# sys.path without the script's directory and the server's own $PYTHONPATH
INSTALLATION_PATH = [p for p in sys.path[1:] if p not in os.environ.get("PYTHONPATH", "").split(os.pathsep)]


def serve() -> None:
    started_with = dict(os.environ)  # importing torch sets TORCHINDUCTOR_CACHE_DIR; a child starts without it
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001, S112 - a library not installed is imported by nobody
            continue
    SET_BY_IMPORTS.update({k: v for k, v in os.environ.items() if started_with.get(k) != v})
    reply = sys.stdout
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # libraries' import-time warnings: a child's own go to its file
    hazard = fork_hazard()
    print(json.dumps({"env": started_with, "set_by_imports": SET_BY_IMPORTS, "hazard": hazard}), file=reply,
          flush=True)
    if hazard:
        return
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), file=reply, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=reply, flush=True)


if __name__ == "__main__":
    serve()
