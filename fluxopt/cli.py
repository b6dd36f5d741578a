"""``python -m fluxopt`` / ``fluxopt``: the Hydra application.

Before Hydra composes anything, the command line is checked against the plugin registry, so
an unknown backend, an unknown option or an incompatible pair fails at once with the list
of valid choices, and no model is ever loaded for a doomed run.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override, QuotedString
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fluxopt import distributed, plugins
from fluxopt.config import register_configs, selected_backends
from fluxopt.errors import ConfigError, FluxoptError
from fluxopt.result import RESULT_FILE, SCHEMA_VERSION, keep_previous_result, read_result, write_json_atomic
from fluxopt.stack import build_stack, describe_options, lookup_backend

log = logging.getLogger("fluxopt")


def _stack_choices(value: Any) -> list[list[str]]:
    """Every backend combination an override value asks for (a sweep gives several)."""
    if isinstance(value, ChoiceSweep):
        return [names for item in value.list for names in _stack_choices(item)]
    if isinstance(value, (list, tuple)):
        return [[_text(v) for v in value]]
    return [[_text(value)]]


def _text(value: Any) -> str:
    return value.text if isinstance(value, QuotedString) else str(value)


def _hydra_overrides(argv: list[str]) -> list[Override]:
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    return OverridesParser.create().parse_overrides(args.overrides)


def preflight(argv: list[str]) -> None:
    """Validate backend names, backend options, stack compatibility and the model name."""
    overrides = _hydra_overrides(argv)
    for ov in overrides:
        key = ov.key_or_group
        if key == "hydra/launcher":
            from fluxopt.gpu_pool import check_launcher

            check_launcher(_text(ov.value()))
        elif key == "backend" and not ov.is_delete():
            for names in _stack_choices(ov.value()):
                build_stack(names)  # unknown names and incompatible pairs raise here
        elif key.startswith("backend."):
            parts = key.split(".")
            backend = lookup_backend(parts[1])
            fields = [f.name for f in dataclasses.fields(backend.options_class)]
            if len(parts) > 2 and parts[2] not in fields:
                close = difflib.get_close_matches(parts[2], fields, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"backend '{parts[1]}' has no option '{parts[2]}'.{hint} "
                                  f"Valid options: {describe_options(backend.options_class)}")
        elif key == "model" and not ov.is_delete():
            known = plugins.models()
            for names in _stack_choices(ov.value()):
                for name in names:
                    if name not in known:
                        raise ConfigError(f"unknown model '{name}'. Known models: {', '.join(sorted(known))}")


def _record_unrunnable(cfg: DictConfig, output_dir: Path, exc: FluxoptError) -> None:
    """In a sweep, a job that cannot run still leaves a result, so the summary lists it."""
    selection = selected_backends(cfg)
    status = "skipped" if exc.__class__.__name__ == "UnavailableError" else "failed"
    write_json_atomic(output_dir / RESULT_FILE, {
        "schema_version": SCHEMA_VERSION, "complete": True, "mode": "stack",
        "model": {"name": cfg.model.name}, "config": OmegaConf.to_container(cfg, resolve=True),
        "baseline": None,
        "stacks": [{"stack": "+".join(selection) or "baseline", "backends": list(selection), "status": status,
                    "reason": str(exc), "phase": "validate"}],
    })


def _quiet_library_progress_bars() -> None:
    """Weight-loading bars of diffusers/transformers drown fluxopt's own output."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def run_job(cfg: DictConfig) -> dict[str, Any] | None:
    """The Hydra task: one run in the job's output directory."""
    from fluxopt.report import print_table
    from fluxopt.runner import Run

    _quiet_library_progress_bars()
    hc = HydraConfig.get()
    output_dir = Path(hc.runtime.output_dir)
    previous = read_result(output_dir / RESULT_FILE)
    config = OmegaConf.to_container(cfg, resolve=True)
    if previous is not None:
        if cfg.get("resume", True) and previous.get("config") == config:
            print(f"fluxopt: {output_dir / RESULT_FILE} is complete for this config; skipping (resume=false re-runs)")
            return previous
        if distributed.writes_results():
            keep_previous_result(output_dir)
    if not distributed.writes_results():  # torchrun rank > 0: computes in lock-step, writes nothing here
        try:
            return Run(cfg, distributed.scratch_dir(output_dir)).execute()
        except FluxoptError as exc:
            log.error("rank %s: %s", distributed.rank(), exc)
            return None
    try:
        data = Run(cfg, output_dir).execute()
    except FluxoptError as exc:
        if hc.mode == RunMode.MULTIRUN:
            log.error("job %s: %s", hc.job.num, exc)
            _record_unrunnable(cfg, output_dir, exc)
            return None
        print(f"fluxopt: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print_table(data)
    print(f"results: {output_dir / RESULT_FILE}")
    return data


register_configs()
_hydra_main = hydra.main(version_base="1.3", config_path="pkg://fluxopt.conf", config_name="config")(run_job)


def main() -> None:
    try:
        preflight(sys.argv[1:])
        status = distributed.maybe_relaunch(sys.argv[1:])  # multi-GPU stacks: re-run under torchrun
    except ConfigError as exc:
        print(f"fluxopt: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if status is not None:
        sys.exit(status)
    distributed.init_rank()
    _hydra_main()
