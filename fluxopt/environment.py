"""What machine a run happened on: the device it targets and everything needed to reproduce it."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from fluxopt.errors import ConfigError
from fluxopt.version import __version__, git_revision

# Distributions whose versions decide what a backend does; recorded with every result. The kernel
# libraries (the last line) count as much as the frameworks: whether one is installed changes which
# kernels a stack runs (torchao's float8 per row takes mslk's where it is installed).
TRACKED_PACKAGES = (
    "fluxopt", "torch", "diffusers", "transformers", "accelerate", "torchao", "nvidia-modelopt",
    "tensorrt", "onnx", "onnxruntime", "para-attn", "bitsandbytes", "triton", "hydra-core",
    "omegaconf", "pluggy", "numpy", "scikit-image", "safetensors",
    "mslk-cuda", "nvidia-cudnn-frontend", "fa3-fwd", "flash-attn", "sageattention", "xformers", "kernels",
)

# Set by fluxopt.scale.gpu_pool in a pooled sweep job: which GPU slot it holds (JSON).
GPU_ASSIGNMENT_ENV = "FLUXOPT_GPU_ASSIGNMENT"
# One id per `fluxopt` command, inherited by its job processes: a sweep's verdict covers the jobs
# this command ran, not older jobs in the same directory.
INVOCATION_ENV = "FLUXOPT_INVOCATION"
# Set in ranks fluxopt launched under torchrun; NVLink multicast stays off there.
LAUNCHED_ENV = "FLUXOPT_TORCHRUN"
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class DeviceInfo:
    """The device a run targets, as far as backend requirements care."""

    type: str  # "cpu" or "cuda" (ROCm GPUs also appear as "cuda" in torch)
    name: str
    rocm: bool = False
    capability: tuple[int, int] | None = None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type)

    @property
    def is_gpu(self) -> bool:
        return self.type == "cuda"


def detect_device(requested: str = "auto") -> DeviceInfo:
    """Resolve ``device=auto|cpu|cuda`` to a concrete device, with a clear error if CUDA is missing."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={requested!r} is not one of auto, cpu, cuda")
    use_cuda = torch.cuda.is_available() if requested == "auto" else requested == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device=cuda was requested but torch sees no CUDA/ROCm GPU on this machine "
                          "(use device=cpu or device=auto)")
    if not use_cuda:
        return DeviceInfo(type="cpu", name=_cpu_name())
    return DeviceInfo(
        type="cuda",
        name=torch.cuda.get_device_name(),
        rocm=torch.version.hip is not None,
        capability=tuple(torch.cuda.get_device_capability()),
    )


@lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions() -> dict[str, str | None]:
    """Installed version of each tracked distribution (None when absent)."""
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.strip().splitlines()[0] if out.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def gpu_assignment() -> dict[str, Any] | None:
    """The GPU-pool slot of the current sweep job (set by ``fluxopt.scale.gpu_pool``), or None."""
    raw = os.environ.get(GPU_ASSIGNMENT_ENV)
    return json.loads(raw) if raw else None


def launch_info(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Rank / world size of a torchrun launch (None outside torchrun), with the multicast switches."""
    env = os.environ if env is None else env
    if "LOCAL_RANK" not in env and LAUNCHED_ENV not in env:
        return None
    return {"rank": int(env.get("RANK", "0")), "local_rank": int(env.get("LOCAL_RANK", "0")),
            "world_size": int(env.get("WORLD_SIZE", "1")), **{k: env.get(k) for k in MULTICAST_OFF}}


def scheduler_info() -> dict[str, Any] | None:
    """Which engine ran this job and with what: the Ray node, task and assigned resources, or
    the submitit/SLURM job. None when run directly (or by joblib: see ``gpu_assignment``)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ctx = ray.get_runtime_context()
        if ctx.worker.mode == ray.WORKER_MODE:
            return {"engine": "ray", "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                    "task_id": ctx.get_task_id(), "resources": ctx.get_assigned_resources(),
                    "accelerator_ids": {k: v for k, v in ctx.get_accelerator_ids().items() if v}, "pid": os.getpid()}
    submitit = sys.modules.get("submitit")
    if submitit is not None:
        try:
            job = submitit.JobEnvironment()
        except RuntimeError:  # not inside a submitit job
            return None
        return {"engine": f"submitit-{job.cluster}", "job_id": job.job_id, "hostname": job.hostname,
                "global_rank": job.global_rank, "num_tasks": job.num_tasks, "pid": os.getpid()}
    return None


def capture_environment(device: DeviceInfo) -> dict[str, Any]:
    """Everything recorded next to the numbers so a result can be reproduced and compared."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": package_versions(),
        "git": git_revision(),
        "fluxopt_version": __version__,
        "device": {"type": device.type, "name": device.name},
        "cuda_version": torch.version.cuda,
        "rocm_version": torch.version.hip,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        # GPU pool slot of a parallel sweep job (fluxopt/scale/gpu_pool.py) and torchrun rank, when any.
        "gpu_assignment": gpu_assignment(),
        "distributed": launch_info(),
        "scheduler": scheduler_info(),
    }
    if device.is_gpu:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["device"].update({
            "compute_capability": ".".join(map(str, device.capability or ())),
            "total_memory_gib": round(props.total_memory / 2**30, 2),
            "multiprocessors": props.multi_processor_count,
            "rocm": device.rocm,
        })
        env["driver"] = _nvidia_driver()
    return env


def in_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a rank launched by torchrun (by fluxopt or by the user)."""
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env or LAUNCHED_ENV in env


def rank(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    return int(env.get("RANK", "0"))


def writes_results(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process writes result files: always outside torchrun, rank 0 inside."""
    return rank(env) == 0


def scratch_dir(output_dir: Path) -> Path:
    """Where a rank that writes no results runs its job (what it writes there is discarded)."""
    return Path(tempfile.mkdtemp(prefix=f"fluxopt-rank{rank()}-{Path(output_dir).name[:40]}-"))
