"""The Run concept: one model under one bench, the baseline and one or more stacks.

plan (validated, nothing loaded) -> baseline -> for each stack: load a fresh pipeline, apply
and build it (the same path as the Python API), warm-up, timed iterations, fidelity, close ->
result.json + report. With ``build_only`` there is no baseline and each stack stops after its
build: what it made stays in the artifact cache for the runs that measure it.

A stack that fails is recorded with its phase and reason and the run goes on; result.json is
rewritten atomically after every stack and at each phase of one, so nothing measured is lost if
the process dies, and the stack it died in says which phase it had reached. An interrupt (Ctrl-C,
SIGTERM) leaves result.json valid, marked incomplete and interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from fluxopt import plugins
from fluxopt.apply import apply_to_pipeline
from fluxopt.config import measurement_config, recorded_config
from fluxopt.context import StackContext
from fluxopt.energy import EnergyMeter, spent
from fluxopt.environment import capture_environment
from fluxopt.errors import DiskFullError, FluxoptError, signal_arrived
from fluxopt.fidelity import evaluate
from fluxopt.files import file_sha256, save_image_atomic, write_atomic, write_text_atomic
from fluxopt.measure import PROTOCOL, PipelineCaller, Measured, Measurement, Sample, measure, memory_outside_torch
from fluxopt.models import load_pipeline
from fluxopt.plan import RunPlan, plan_run, selected_backends
from fluxopt.record import (INTERRUPTED, RESULT_FILE, Energy, Phase, RunRecord, StackRecord, Status, speedup_of,
                            write_record)
from fluxopt.stack import Stack

log = logging.getLogger("fluxopt")
REFERENCE_FILE = "baseline-reference.pt"  # the baseline's outputs, for a resumed run to judge against
LEAK_WARNING_BYTES = 256 * 2**20  # allocator rounding and cached workspaces stay below this
# How often the record is rewritten while a stack is in progress: a process that ends without
# answering (its machine taken away, SIGKILL) in a phase of minutes (a tuned build) leaves the time
# the stack had run to within this, not only when its last phase began.
HEARTBEAT_S = 30.0


class OverBudget(BaseException):
    """Raised in the main thread when a stack's or the run's time budget runs out (a BaseException,
    like KeyboardInterrupt, so a backend's ``except Exception`` cannot swallow it)."""


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Raise :class:`OverBudget` in the block after ``seconds`` (SIGALRM: the main thread only;
    elsewhere, or with None, no limit)."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise OverBudget

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Run:
    def __init__(self, cfg: DictConfig | Mapping[str, Any], output_dir: Path, stacks: list[Stack] | None = None,
                 provenance: Mapping[str, Any] | None = None,
                 on_phase: Callable[[str, str], None] | None = None,
                 plan: RunPlan | None = None, pipeline: Any = None, resume: RunRecord | None = None):
        """``stacks`` replaces the stacks the config selects (benchmark scripts compare a chosen
        list); ``provenance`` (command line, overrides) is recorded as given; ``on_phase(stack,
        phase)`` is told when each phase starts (progress displays). With ``pipeline`` (and its
        ``plan``), every stack is applied to that pipeline and undone after it, instead of to a
        freshly loaded one: ``fluxopt.benchmark`` on a pipeline the user built. ``resume``: an
        interrupted record of this measurement (:func:`can_resume`), whose baseline and finished
        stacks are kept: only the stacks it lacks are measured."""
        self.cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        self.output_dir = Path(output_dir)
        self.plan: RunPlan = plan or plan_run(self.cfg, stacks)
        self.pipeline = pipeline
        self.resume = resume
        self.provenance = dict(provenance or {})
        self.on_phase = on_phase or (lambda stack, phase: None)
        self.results: list[StackRecord] = []
        self.baseline: StackRecord | None = None
        self.started = datetime.now(timezone.utc).isoformat()
        self.clock_start = time.monotonic()
        self.position = ""  # "stack i/N" while the stacks run
        self.budget = self.plan.config.budget
        self.environment: dict[str, Any] = {}
        self.interrupted = False
        self.device_lost: str | None = None  # why the CUDA context cannot run more stacks
        self.phase = Phase.LOAD  # the phase of the stack in progress, for attributing a failure or interrupt
        # the stack being measured and when it started: on record, as interrupted, from its first phase on
        self.in_progress: tuple[StackRecord, float] | None = None
        # the record's writers (the main thread, the heartbeat) and what they read: the stack in
        # progress and the finished ones change together under it, so no write shows one twice or neither
        self.record_lock = threading.RLock()
        self.closed = False  # the final record is written: the heartbeat writes no more
        self.build_only = bool(self.cfg.get("build_only", False))  # apply and build, measure nothing
        self.run_info: dict[str, Any] = {}  # shared by the plugins' fluxopt_stack_measured calls
        self.hook = plugins.hook(self.plan.config.disabled_plugins)
        self.file_labels: set[str] = {"baseline"}  # names of the stacks' image, profile and log files so far
        self.meter = EnergyMeter(torch.cuda.current_device() if self.plan.device.is_gpu else None)

    # ------------------------------------------------------------------ pipeline
    def _load(self) -> Any:
        if self.pipeline is not None:
            return self.pipeline
        p = self.plan
        return load_pipeline(p.spec, p.device.torch_device, p.dtype, p.cache_dir,
                             path=self.cfg.model.get("path"), revision=self.cfg.model.get("revision"))

    def _measure(self, gen: PipelineCaller, on_phase: Callable[[str], None], outside_before: int | None) -> Measurement:
        """The bench's measurement of ``gen``, the same for the baseline and every stack."""
        p = self.plan
        return measure(gen, p.prompts, p.seed, warmup=p.warmup, iterations=p.iterations, max_time_s=p.max_time_s,
                       target_rse=p.target_rse, meter=self.meter, on_phase=on_phase, outside_before=outside_before)

    def _outside_torch(self) -> int | None:
        return memory_outside_torch() if self.plan.device.is_gpu else None

    def _file_label(self, name: str) -> str:
        """The stack's name for its files, made unique within the run (a plan may measure one stack
        with different options twice): ``name``, then ``name-2``, ``name-3``..."""
        label, n = name, 1
        while label in self.file_labels:
            n += 1
            label = f"{name}-{n}"
        self.file_labels.add(label)
        return label

    def _enter(self, label: str, phase: str) -> None:
        """A phase starts: logged, shown on the progress display with the stack's place in the run
        and the time spent so far (``stack 2/5 compile: build (3 min in)``), and, for a stack, put on
        record (see :meth:`_interrupted`)."""
        log.info("%s: %s", label, phase)
        spent = time.monotonic() - self.clock_start
        where = f"{self.position} {label}" if self.position else label
        self.on_phase(where, f"{phase} ({spent / 60:.0f} min in)" if spent >= 60 else phase)
        if self.in_progress is not None:
            self.write(complete=False)

    def _interrupted(self, result: StackRecord, started: float, unanswered: bool = False) -> StackRecord:
        """``result`` stopped in the current phase, with the time it had run: what the record keeps of
        a stack an interrupt stopped (it is measured again on resume). ``unanswered``: the stack in
        progress as every write shows it until it finishes, so that a process that ends without
        answering (SIGKILL, a crash, a signal some library's handler took) still leaves the phase
        reached and the time spent."""
        elapsed = time.perf_counter() - started
        when = f"after at least {elapsed:.0f} s (the last phase on record)" if unanswered else f"after {elapsed:.0f} s"
        return dataclasses.replace(result, status=Status.FAILED.value, phase=self.phase.value, elapsed_s=elapsed,
                                   reason=f"{INTERRUPTED}{self.phase.value} {when}")

    def _save_images(self, label: str, samples: list[Sample]) -> list[str]:
        if not self.cfg.get("save_images", True):
            return []
        paths = []
        for i, sample in enumerate(samples):
            rel = Path("images") / label / f"{i:02d}_seed{sample.seed}.png"
            pixels = np.nan_to_num(sample.image, nan=0.0).clip(0, 1)
            save_image_atomic(self.output_dir / rel, Image.fromarray((pixels * 255).round().astype(np.uint8)))
            paths.append(str(rel))
        return paths

    @staticmethod
    def _fill(result: StackRecord, m: Measurement, build_j: float | None = None) -> None:
        result.latency = m.latency
        if m.energy_j is not None:
            result.energy = Energy(per_image_j=m.energy_j, warmup_j=m.warmup_energy_j, build_j=build_j)
        result.step_latency = m.step_latency
        result.first_call_s = m.first_call_s
        result.peak_memory_bytes = m.peak_memory_bytes
        result.memory_kind = m.memory_kind

    # ------------------------------------------------------------------ phases
    def measure_baseline(self) -> list[Sample]:
        p = self.plan
        started = time.perf_counter()
        self._enter("baseline", Phase.LOAD.value)
        log.info("baseline: loading %s on %s (%s)", p.spec.name, p.device.name, p.dtype)
        outside_before = self._outside_torch()
        pipe = self._load()
        m = self._measure(PipelineCaller(pipe, p.shapes, p.device), lambda phase: self._enter("baseline", phase),
                          outside_before)
        self.baseline = StackRecord(stack="baseline", backends=[], status=Status.OK.value, lossless=True)
        self._fill(self.baseline, m)
        problem = baseline_problem(m.samples)
        if problem:
            self.baseline.status, self.baseline.phase = Status.FAILED.value, Phase.FIDELITY.value
            self.baseline.reason = (f"{problem}, so no stack can be judged against it; check "
                                    f"bench.guidance_scale={p.shapes.guidance_scale:g}, the prompts and the "
                                    f"model's weights ({self.cfg.model.get('path') or 'model=' + p.spec.name})")
        self._measured("baseline", self.baseline, pipe, PipelineCaller(pipe, p.shapes, p.device), {})
        self.baseline.images = self._save_images("baseline", m.samples)
        if self.baseline.status == Status.OK.value:
            self.baseline.stats["reference"] = save_reference(self.output_dir / REFERENCE_FILE, m.samples)
        self.baseline.elapsed_s = time.perf_counter() - started  # load included, as for a stack
        del pipe
        self._release()
        return m.samples

    def _record_interrupt(self, result: StackRecord, started: float) -> None:
        """The stack an interrupt stopped, on record in place of its in-progress entry."""
        with self.record_lock:
            self.in_progress = None
            self.results.append(self._interrupted(result, started))

    def measure_stack(self, stack: Stack, reference: list[Sample]) -> StackRecord:
        result = StackRecord(stack=stack.name, backends=stack.names, status=Status.OK.value,
                             options=stack.options_dict(), lossless=stack.is_lossless())
        label = self._file_label(stack.name)
        unmet = stack.unmet_requirements(self.plan.device)
        if unmet:
            result.status, result.reason = Status.SKIPPED.value, "; ".join(unmet)
            return result
        if self.device_lost:
            result.status, result.phase = Status.FAILED.value, Phase.LOAD.value
            result.reason = f"not run: the GPU is unusable in this process after an earlier failure ({self.device_lost})"
            return result
        limit, which = self._time_left()
        if limit is not None and limit <= 0:
            result.status, result.phase = Status.FAILED.value, Phase.LOAD.value
            result.reason = f"not run: over the run's budget (budget.run_s={self.budget.run_s:g})"
            return result
        self.phase = Phase.LOAD
        started = time.perf_counter()
        self.in_progress = (result, started)
        allocated_before = torch.cuda.memory_allocated() if self.plan.device.is_gpu else None
        try:
            with _deadline(limit):
                self._apply_build_measure(stack, result, reference, label)
        except OverBudget:
            elapsed = time.perf_counter() - started
            result.status, result.phase = Status.FAILED.value, self.phase.value
            result.reason = f"over budget: stopped during {self.phase.value} after {elapsed:.0f} s ({which})"
            log.warning("stack %s: %s", stack.name, result.reason)
        except KeyboardInterrupt:
            self._record_interrupt(result, started)
            raise
        except DiskFullError:
            raise
        except Exception as exc:  # noqa: BLE001 - any backend failure is recorded, the run goes on
            if signal_arrived():  # the interrupt's consequence, not the backend's failure
                self._record_interrupt(result, started)
                raise KeyboardInterrupt from exc
            result.status, result.phase = Status.FAILED.value, self.phase.value
            if isinstance(exc, torch.OutOfMemoryError):
                result.reason = "out of memory: " + str(exc).splitlines()[0]
            else:
                result.reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            self._log_failure(label, exc)
        finally:  # the stack stays on record as in progress until _stacks puts its result in its place
            result.elapsed_s = time.perf_counter() - started
            try:
                self._release()
            except Exception as exc:  # noqa: BLE001 - a device-side assert poisons the CUDA context
                self.device_lost = f"{stack.name}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                log.error("the GPU is unusable after stack %s; the remaining stacks are recorded as not run",
                          stack.name)
        if allocated_before is not None and not self.device_lost:
            result.left_allocated_bytes = max(0, torch.cuda.memory_allocated() - allocated_before)
            if result.left_allocated_bytes > LEAK_WARNING_BYTES:
                log.warning("stack %s left %.2f GiB allocated after it closed; later stacks' peak memory includes it",
                            stack.name, result.left_allocated_bytes / 2**30)
        if result.latency and self.baseline and self.baseline.latency:
            s = speedup_of(self.baseline.latency, result.latency)
            result.speedup, result.speedup_uncertainty, result.within_noise = s.value, s.uncertainty, s.within_noise
        return result

    def _time_left(self) -> tuple[float | None, str]:
        """Seconds the next stack may take (None: no limit) and which budget sets it."""
        limits = []
        if self.budget.stack_s is not None:
            limits.append((self.budget.stack_s, f"budget.stack_s={self.budget.stack_s:g}"))
        if self.budget.run_s is not None:
            limits.append((self.budget.run_s - (time.monotonic() - self.clock_start), f"budget.run_s={self.budget.run_s:g}"))
        return min(limits, key=lambda item: item[0]) if limits else (None, "")

    def _apply_build_measure(self, stack: Stack, result: StackRecord, reference: list[Sample], label: str) -> None:
        """Load a fresh pipeline, apply and build the stack, measure it and judge its fidelity;
        its images and profile go under ``label``."""
        p = self.plan

        def enter(name: Phase) -> None:
            self.phase = name
            self._enter(stack.name, name.value)

        enter(Phase.LOAD)
        outside_before = self._outside_torch()
        pipe = self._load()
        gen = PipelineCaller(pipe, p.shapes, p.device)
        ctx = StackContext(device=p.device, dtype=p.dtype, model=p.spec, shapes=p.shapes, cache_dir=p.cache_dir,
                           prompts=p.prompts, stack=stack, run_once=lambda: gen(p.prompts[0], p.seed))
        # A fresh pipeline per stack needs no copy of replaced weights; the user's own must get them back.
        build_start = self.meter.read()
        try:
            applied = apply_to_pipeline(pipe, stack, ctx, restorable=self.pipeline is not None,
                                        on_phase=lambda name: enter(Phase(name)))
        except BaseException:  # stopped or failed mid-build: the record keeps where the time went
            result.build_phases_s = dict(ctx.stats.get("build_phases_s", {}))
            raise
        try:
            result.partial = ctx.partial
            result.build_s = applied.build_s
            result.build_phases_s = ctx.stats.pop("build_phases_s", {})
            build_j = spent(build_start, self.meter.read())
            log.info("stack %s: built in %.1f s", stack.name, result.build_s)
            if self.build_only:
                result.stats = ctx.stats
                return
            m = self._measure(gen, lambda name: enter(Phase(name)), outside_before)
            self._fill(result, m, build_j)
            self._measured(label, result, pipe, gen, ctx.stats)
            result.stats = ctx.stats
            enter(Phase.FIDELITY)
            result.images = self._save_images(label, m.samples)
            thresholds = self.cfg.fidelity.lossless if result.lossless else self.cfg.fidelity.lossy
            result.fidelity = evaluate(reference, m.samples, plugins.metrics(), dict(thresholds))
            result.fidelity["model"] = p.spec.name
            result.fidelity["model_trained"] = p.spec.trained
            if not result.fidelity["passed"]:
                result.status, result.reason = Status.FAILED.value, f"fidelity: {result.fidelity['reason']}"
                result.phase = Phase.FIDELITY.value
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.setitimer(signal.ITIMER_REAL, 0)  # the budget never cuts the undo short
            applied.close()  # process-wide state back to what it was before this stack (never cut short)

    def _measured(self, label: str, record: StackRecord, pipe: Any, gen: PipelineCaller, stats: dict[str, Any]) -> None:
        """Let the plugins look at a measured stack while it is still built (the profile ring)."""
        p = self.plan
        self.hook.fluxopt_stack_measured(measured=Measured(
            label=label, record=record, pipe=pipe, generate=lambda on_step: gen(p.prompts[0], p.seed, on_step),
            shapes=p.shapes, device=p.device, output_dir=self.output_dir, config=p.config, stats=stats,
            run_info=self.run_info, enter=lambda phase: self._enter(label, phase)))

    def _log_failure(self, stack_name: str, exc: BaseException) -> None:
        path = self.output_dir / "logs" / f"{stack_name}.log"
        write_text_atomic(path, "".join(traceback.format_exception(exc)))
        log.warning("stack %s failed: %s (traceback in %s)", stack_name, exc, path)

    def _release(self) -> None:
        """Drop compiled graphs and cached memory so the next stack starts clean."""
        torch._dynamo.reset()
        gc.collect()
        if self.plan.device.is_gpu:
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ output
    def record(self, complete: bool) -> RunRecord:
        p = self.plan
        return RunRecord(
            complete=complete, interrupted=self.interrupted, started=self.started,
            finished=datetime.now(timezone.utc).isoformat() if complete else None,
            model={"name": p.spec.name, "trained": p.spec.trained, "dtype": str(p.dtype).removeprefix("torch.")},
            shapes=dataclasses.asdict(p.shapes), prompts=list(p.prompts), seed=p.seed,
            mode="stack" if p.explicit else "bakeoff", build_only=self.build_only,
            requested=[s.name for s in p.stacks], config=recorded_config(self.cfg, self.plan.config),
            provenance=self.provenance, environment=self.environment, profile=dict(self.run_info) or None,
            protocol=PROTOCOL, baseline=self.baseline,
            stacks=[*self.results, *([self._interrupted(*self.in_progress, unanswered=True)] if self.in_progress else [])])

    def write(self, complete: bool) -> RunRecord:
        with self.record_lock:
            record = self.record(complete)
            write_record(self.output_dir / RESULT_FILE, record)
            self.closed = complete
            return record

    def _heartbeat(self, stop: threading.Event) -> None:
        """Every :data:`HEARTBEAT_S` while a stack is in progress, its time so far on record (see
        :meth:`_interrupted`). A beat that fails (a full disk; a plugin changing the run's profile
        data while it is read) is tried again at the next one: the phases' own writes still keep the
        record, so the first failure is logged in one line and none reaches the console as a traceback."""
        failed = False
        while not stop.wait(HEARTBEAT_S):
            with self.record_lock:
                if self.in_progress is None or self.closed:
                    continue
                try:
                    write_record(self.output_dir / RESULT_FILE, self.record(complete=False))
                except Exception as exc:  # noqa: BLE001 - see above
                    (log.debug if failed else log.warning)("the record's heartbeat could not write it: %s", exc)
                    failed = True

    def execute(self) -> RunRecord:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.environment = capture_environment(self.plan.device)
        hook = self.hook
        hook.fluxopt_run_started(config=recorded_config(self.cfg, self.plan.config),
                                 output_dir=str(self.output_dir))
        try:
            if self.resume is not None:
                reference = self._resume_from(self.resume)
            else:
                reference = [] if self.build_only else self.measure_baseline()
            self.write(complete=False)
            if self.baseline is None or self.baseline.status == Status.OK.value:
                self._stacks(reference)
            else:
                log.error("the baseline failed (%s); no stack is measured", self.baseline.reason)
        except KeyboardInterrupt:
            self.interrupted = True
            self.write(complete=False)
            raise
        record = self.write(complete=True)
        hook.fluxopt_run_finished(result=record, output_dir=str(self.output_dir))
        return record

    def _stacks(self, reference: list[Sample]) -> None:
        """Measure the plan's stacks in order (those a resumed record lacks), the record rewritten
        after each and, by the heartbeat, during each."""
        stop = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(stop,), name="fluxopt-record-heartbeat",
                                     daemon=True)
        heartbeat.start()
        try:
            for number, stack in enumerate(self.plan.stacks, 1):
                if number <= len(self.results):
                    continue  # measured by the run this one resumes
                self.position = f"stack {number}/{len(self.plan.stacks)}"
                log.info("stack %s", stack.name)
                result = self.measure_stack(stack, reference)
                with self.record_lock:  # in one step, so that no write shows the stack twice or not at all
                    self.results.append(result)
                    self.in_progress = None
                self.write(complete=False)
                self.hook.fluxopt_stack_finished(result=result, output_dir=str(self.output_dir))
        finally:
            stop.set()
            heartbeat.join()

    def _resume_from(self, previous: RunRecord) -> list[Sample]:
        """Keep ``previous``'s baseline (its outputs read back from the verified reference file) and
        the stacks it finished, in plan order; the provenance says what was kept."""
        reference = load_reference(self.output_dir / REFERENCE_FILE, previous.baseline.stats["reference"])
        self.baseline = previous.baseline
        self.started = previous.started or self.started
        self.run_info = dict(previous.profile or {})
        for planned, done in zip(self.plan.stacks, previous.stacks):
            if done.stack != planned.name or (done.reason or "").startswith(INTERRUPTED):
                break
            self.results.append(done)
        self.provenance["resumed"] = {"baseline_from": previous.started,
                                      "stacks_kept": [s.stack for s in self.results]}
        log.info("resuming: the baseline measured at %s and %d finished stack(s) kept", previous.started,
                 len(self.results))
        return reference


def save_reference(path: Path, samples: list[Sample]) -> dict[str, str]:
    """The baseline's outputs, written atomically; returns what the record keeps to verify them."""
    payload = {"prompts": [s.prompt for s in samples], "seeds": [s.seed for s in samples],
               "images": [torch.from_numpy(np.ascontiguousarray(s.image)) for s in samples],
               "latents": [s.latents for s in samples]}
    write_atomic(path, lambda handle: torch.save(payload, handle))
    return {"file": path.name, "sha256": file_sha256(path)}


def load_reference(path: Path, recorded: Mapping[str, str]) -> list[Sample]:
    """The baseline's outputs saved by :func:`save_reference`, after their sha256 was checked."""
    if not reference_intact(path, recorded):
        raise FluxoptError(f"{path}: the baseline's saved outputs are missing or do not match the record")
    data = torch.load(path, weights_only=True)
    return [Sample(prompt, seed, image.numpy(), latents)
            for prompt, seed, image, latents in zip(data["prompts"], data["seeds"], data["images"], data["latents"])]


def can_resume(previous: RunRecord, config: Mapping[str, Any], output_dir: Path) -> bool:
    """Whether an unfinished ``previous`` record of the same measurement can be continued: made under
    this measurement protocol, its baseline completed and its saved outputs are there, unchanged
    (sha256 against the record)."""
    baseline = previous.baseline
    return bool(config.get("resume", True) and not previous.complete and not previous.edited
                and previous.protocol == PROTOCOL and not previous.build_only
                and baseline is not None and baseline.status == Status.OK.value
                and measurement_config(previous.config) == measurement_config(config)
                and reference_intact(output_dir / REFERENCE_FILE, (baseline.stats or {}).get("reference")))


def reference_intact(path: Path, recorded: Mapping[str, str] | None) -> bool:
    return bool(recorded) and path.is_file() and file_sha256(path) == recorded.get("sha256")


def baseline_problem(samples: list[Sample]) -> str | None:
    """Why the baseline's outputs cannot be a reference (None: they can): non-finite values, or an
    image with a single colour (guidance or weights that blow up saturate every pixel)."""
    bad = [s.prompt for s in samples if not (np.isfinite(s.image).all() and torch.isfinite(s.latents).all())]
    if bad:
        return f"the baseline's outputs are non-finite (NaN/inf) for prompt(s) {bad}"
    flat = [s.prompt for s in samples if float(np.ptp(s.image)) == 0.0]
    if flat:
        return f"the baseline's images are a single colour for prompt(s) {flat}"
    return None


def can_reuse(previous: RunRecord, config: Mapping[str, Any]) -> bool:
    """Whether ``previous`` (the record already in the output directory) stands for a run of
    ``config`` (resume): it completed, nothing in it failed or was edited, and it measured the same
    thing (``measurement_config``: not output paths, ``resume`` or verbosity). ``resume=false`` never reuses."""
    return bool(config.get("resume", True) and previous.complete and not previous.failures()
                and measurement_config(previous.config) == measurement_config(config))


def job_record(cfg: DictConfig, provenance: Mapping[str, Any], refused: BaseException | None = None,
               status: Status = Status.FAILED) -> RunRecord:
    """The record of a job that measured nothing: refused before it ran (``refused``, recorded as
    its stack's failure with ``status``), or whose process died before writing one (the caller
    marks the crash). Written so that a sweep's summary lists the job."""
    selection = list(selected_backends(cfg))
    name = "+".join(selection) or "baseline"
    config = OmegaConf.to_container(cfg, resolve=False)
    config.pop("hydra", None)
    record = RunRecord(model={"name": str(cfg.model.name)}, mode="stack", requested=[name], config=config,
                       provenance=dict(provenance), complete=refused is not None)
    if refused is not None:
        reason = str(refused) if isinstance(refused, FluxoptError) else f"{type(refused).__name__}: {refused}"
        record.stacks.append(StackRecord(stack=name, backends=selection, status=status.value, reason=reason,
                                         phase=Phase.VALIDATE.value))
    return record
