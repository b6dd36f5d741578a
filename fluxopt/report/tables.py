"""Presenting results: the console table and ``report.md`` of one run.

Rows are built from ``result.json`` content only, so a report can always be regenerated
from the files a run left behind.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fluxopt.files import write_text_atomic
from fluxopt.record import LatencyStats, RunRecord, StackRecord, Status

COLUMNS = ("stack", "status", "latency (s)", "per step (ms)", "speedup", "build (s)", "first call (s)",
           "peak mem (GiB)", "J/image", "avg W", "steps skipped", "PSNR", "SSIM", "latent err", "fidelity")


def _fmt(value: Any, spec: str = ".3g") -> str:
    return "—" if value is None else format(value, spec)


def speedup_text(r: StackRecord, within: bool | None = None) -> str:
    """A speedup with its 1-sigma uncertainty, marked when it is noise or from a partial build."""
    if r.is_baseline:
        return "1 (ref)"
    if r.speedup is None:
        return "—"
    noise = r.within_noise if within is None else within
    return (f"{r.speedup:.2f}" + (f" ± {r.speedup_uncertainty:.2f}" if r.speedup_uncertainty else "")
            + (" (noise)" if noise else "") + (" (partial build)" if r.partial else ""))


def planned_iterations(record: RunRecord) -> int | None:
    """The timed calls the run's bench asked for (a stack over ``bench.max_time_s``, or precise
    enough for ``bench.target_rse``, got fewer)."""
    return (record.config.get("bench") or {}).get("iterations")


def latency_text(lat: LatencyStats | None, planned: int | None = None) -> str:
    """Median ± std, with the number of timed calls where it is fewer than ``planned`` (or one)."""
    if not lat:
        return "—"
    text = f"{lat.median:.3f} (n=1)" if lat.std is None else f"{lat.median:.3f} ± {lat.std:.3f}"
    return text + (f" (n={lat.n})" if lat.std is not None and planned and lat.n < planned else "")


def stack_row(r: StackRecord, planned: int | None = None) -> dict[str, str]:
    """One table row from a stack's record (baseline or stack); ``planned``: the timed calls the
    bench asked for, so a latency over fewer says how many."""
    lat, step, fid = r.latency, r.step_latency, r.fidelity or {}

    def metric(name: str, spec: str) -> str:
        worst = r.worst(name)
        return "—" if worst is None else _fmt(worst, spec)

    if r.is_baseline:
        verdict = "reference" if r.status == "ok" else "FAIL"
    elif fid:
        verdict = "pass" if fid.get("passed") else "FAIL"
    else:
        verdict = "—"
    status = r.status if not r.reason or r.status == "ok" else (
        f"{r.status} ({r.phase}): {r.reason}" if r.phase else f"{r.status}: {r.reason}")
    if r.partial:
        status += f" (partial build: {r.partial})"
    cache = (r.stats or {}).get("cache") or {}
    skipped = "—" if not cache else (
        f"{cache['skipped_steps']}/{cache['steps']}" if cache.get("skipped_steps") is not None else "n/a")
    if cache.get("attention_calls"):  # TaylorSeer, FasterCache, PAB reuse attention outputs, not whole steps
        skipped += f" (attention reused {cache['attention_reused']}/{cache['attention_calls']})"
    return {
        "stack": r.stack,
        "steps skipped": skipped,
        "status": status,
        "latency (s)": latency_text(lat, planned),
        "per step (ms)": "—" if not step else f"{step.median * 1e3:.1f}",
        "speedup": speedup_text(r),
        "build (s)": _fmt(r.build_s, ".1f"),
        "first call (s)": _fmt(r.first_call_s, ".3f"),
        "peak mem (GiB)": _fmt(None if r.peak_memory_bytes is None else r.peak_memory_bytes / 2**30, ".2f"),
        "J/image": _fmt(r.energy and r.energy.median_j, ".0f"),
        "avg W": _fmt(r.energy and r.energy.average_w(r.latency), ".0f"),
        "PSNR": metric("psnr", ".1f"),
        "SSIM": metric("ssim", ".3f"),
        "latent err": metric("latent_rel_l2", ".2e"),
        "fidelity": verdict,
    }


def not_run_reason(record: RunRecord) -> str:
    """Why a requested stack of ``record`` has no measurement."""
    if record.baseline is not None and record.baseline.status != "ok":
        return "not run: the baseline failed"
    if record.job_crash:
        return f"not run (job process died: {record.job_crash})"
    if record.interrupted:
        return "not run (the job was interrupted)"
    # written after every stack: an unfinished record that no signal marked is what a job left
    # when it was stopped without warning (its machine gone, SIGKILL)
    return "not run (the job ended before it)" if not record.complete else "not run"


def not_run(record: RunRecord) -> list[str]:
    """Requested stacks the record has no measurement of (interrupted, crashed, baseline failed),
    counted by name: a plan may request one stack twice, with other options."""
    measured = Counter(s.stack for s in record.stacks)
    left = []
    for name in record.requested:
        if measured[name]:
            measured[name] -= 1
        else:
            left.append(name)
    return left


def distinct_names(stacks: list[StackRecord]) -> list[str]:
    """Each stack's name, followed where several share it by the options they differ in
    (``fp8_attention.kernel=fa3``), so a plan that measures one stack with other options reads apart."""
    names = []
    for r in stacks:
        twins = [s for s in stacks if s.stack == r.stack]
        differ = sorted(f"{backend}.{key}={value}" for backend, options in r.options.items()
                        for key, value in options.items()
                        if any((t.options.get(backend) or {}).get(key) != value for t in twins))
        names.append(f"{r.stack} ({', '.join(differ)})" if len(twins) > 1 and differ else r.stack)
    return names


def run_rows(record: RunRecord) -> list[dict[str, str]]:
    planned = planned_iterations(record)
    rows = [stack_row(record.baseline, planned)] if record.baseline else []
    for r, name in zip(record.stacks, distinct_names(record.stacks)):
        rows.append({**stack_row(r, planned), "stack": name})
    for name in not_run(record):
        rows.append({**{c: "—" for c in COLUMNS}, "stack": name, "status": not_run_reason(record)})
    return rows


def markdown_table(rows: list[dict[str, str]], columns: tuple[str, ...] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(row.get(c, "").replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)


def fidelity_note(record: RunRecord) -> str:
    model = record.model
    if model.get("trained"):
        return f"Fidelity is measured on `{model['name']}`, a trained model: the numbers say how much image quality moves."
    return (f"Fidelity is measured on `{model['name']}`, which has random weights: the numbers say whether a "
            "backend computes the same function as the baseline, not how images would look on a trained model.")


SHOWN_PACKAGES = ("torch", "diffusers", "transformers", "fluxopt")  # on the lines above the rest


def environment_lines(env: dict[str, Any]) -> list[str]:
    pk = env.get("packages", {})
    dev = env.get("device", {})
    git = env.get("git", {})
    return [
        f"- device: {dev.get('name')} ({dev.get('type')}"
        + (f", sm {dev['compute_capability']}" if dev.get("compute_capability") else "") + ")"
        + (f", driver {env['driver']}" if env.get("driver") else ""),
        f"- torch {pk.get('torch')}, diffusers {pk.get('diffusers')}, transformers {pk.get('transformers')}, "
        f"python {env.get('python')}, CUDA {env.get('cuda_version')}",
        f"- host {env.get('hostname')}, CPU {env.get('cpu')}; fluxopt {pk.get('fluxopt')} "
        f"git {git.get('revision') or 'n/a'}{' (dirty)' if git.get('dirty') else ''}",
        "- other packages: " + (", ".join(f"{name} {version}" for name, version in sorted(pk.items())
                                           if version and name not in SHOWN_PACKAGES) or "none tracked"),
    ]




def search_lines(record: dict[str, Any]) -> list[str]:
    """The search section of a sweep summary: the winner and its command, every trial, then the
    proposals refused before anything ran (not counted as trials)."""
    limits = ", ".join(f"{k} {v}" for k, v in (record.get("limits") or {}).items() if v is not None) or "none"
    best = record.get("best")
    lines = ["## Search", "", f"Objective: {record.get('objective')}; limits: {limits}; "
             f"{len(record.get('trials') or [])} trial(s) over {', '.join(record.get('backends') or [])}; "
             f"{len(record.get('refused') or [])} proposal(s) refused before anything ran.", ""]
    if best:
        lines += [f"**Best: {best['stack']}, {best['speedup']:.2f}x.** Measure it again:", "",
                  f"    {best['command']}", "", "Use it in serving code:", "",
                  *[f"    {line}" for line in best["python"].splitlines()], ""]
    else:
        lines += ["**No trial met its fidelity gate and the limits.**", ""]
    rows = [{"trial": str(t["number"]), "stack": t["stack"], "state": t["state"],
             "speedup": _fmt(t.get("value"), ".2f") if t.get("value") is not None else "—",
             "why not": t.get("reason") or "", "job": "—" if t.get("job") is None else str(t["job"])}
            for t in [*(record.get("trials") or []), *(record.get("refused") or [])]]
    return lines + [markdown_table(rows, ("trial", "stack", "state", "speedup", "why not", "job")), ""]


MEMORY_KINDS = {
    "cuda_max_allocated": "torch.cuda.max_memory_allocated",
    "cuda_max_allocated_and_outside": ("torch.cuda.max_memory_allocated, plus the GPU memory the stack's libraries "
                                       "allocated outside PyTorch's allocator (AOTInductor, TensorRT)"),
}


def timed_calls(bench: dict[str, Any]) -> str:
    """How many timed calls each stack got, as the bench settings say."""
    cuts = []
    if bench.get("max_time_s") is not None:
        cuts.append(f"at least 2 once they took {bench['max_time_s']:g} s: bench.max_time_s")
    if bench.get("target_rse") is not None:
        cuts.append(f"at least 3 once the mean was known to {100 * bench['target_rse']:g} % relative "
                    "standard error: bench.target_rse")
    if not cuts:
        return f"{bench.get('iterations')} timed calls"
    return f"{bench.get('iterations')} timed calls ({'; '.join(cuts)}; n in the table where fewer)"


def render_run_markdown(data: RunRecord) -> str:
    shapes = data.shapes
    memory_kind = data.baseline.memory_kind if data.baseline else None
    lines = [
        f"# fluxopt run: {data.model['name']} ({data.mode})",
        "",
        f"{shapes['height']}x{shapes['width']}, {shapes['steps']} steps, guidance {shapes['guidance_scale']}, "
        f"{len(data.prompts)} prompt(s), seed {data.seed}, dtype {data.model.get('dtype')}. "
        f"Latency: median ± std over {timed_calls(data.config.get('bench') or {})} after warm-up; "
        "speedup = baseline median / stack median (± 1 sigma); '(noise)' marks speedups within 2 sigma of 1. "
        f"Peak memory: {MEMORY_KINDS.get(memory_kind, 'process peak RSS while generating')}.",
        "",
        markdown_table(run_rows(data)),
        "",
        "## Verdict",
        *verdict_lines(data),
        "",
        "## Fidelity",
        fidelity_note(data) + " Worst prompt shown; thresholds are in `config.fidelity`.",
        "",
        "## Environment",
        *environment_lines(data.environment),
        "",
    ]
    command = data.provenance.get("command")
    if command:
        lines += ["## Reproduce", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def verdict_lines(data: RunRecord) -> list[str]:
    """The run's verdict as its exit status gave it, from the same rule (``RunRecord.failures``):
    a page read without the console still says whether the run passed, and every reason it did not."""
    failures = data.failures()
    if not failures:
        done = "built" if data.build_only else "ran and passed its gate"
        skipped = sum(s.status == Status.SKIPPED.value for s in data.stacks)  # a bake-off's: reported, not failed
        except_ = f", except {skipped} this machine cannot run (skipped, above)" if skipped else ""
        return [f"Passed (exit status 0): every requested stack {done}{except_}."]
    return [f"Failed (non-zero exit status), {len(failures)} reason(s):", "", *(f"- {why}" for why in failures)]


# The console table: what a person decides on, in at most 120 columns (report.md has every column).
CONSOLE_COLUMNS = ("stack", "status", "per step (ms)", "speedup", "build (s)", "peak mem (GiB)", "PSNR", "fidelity")
CONSOLE_WIDTH = 120


def print_table(data: RunRecord, console: Console | None = None) -> None:
    table = Table(title=f"fluxopt — {data.model['name']} on {data.device}")
    for column in CONSOLE_COLUMNS:
        table.add_column(column, overflow="fold", max_width=40 if column == "status" else None)
    for row in run_rows(data):
        table.add_row(*(escape(row[c]) for c in CONSOLE_COLUMNS))  # "[torchao]" in a reason is not markup
    console = console or Console()
    console.width = min(console.width, CONSOLE_WIDTH) if console.is_terminal else CONSOLE_WIDTH
    console.print(table)


def verdict_sentence(data: RunRecord, output_dir: Path) -> str:
    """One sentence: the fastest stack that passed its gate, its speedup, where the evidence is;
    on a model with random weights or a small model, what its speedups do and do not say."""
    if data.baseline is not None and data.baseline.status != "ok":
        return (f"The baseline failed ({data.baseline.reason}); no stack was measured; full table in "
                f"{Path(output_dir) / 'report.md'}.")
    if data.build_only:
        built = [s for s in data.stacks if s.status == "ok"]
        return (f"Built {len(built)} of {len(data.stacks)} stack(s), measured nothing (build_only): "
                f"what they built is in the artifact cache for the runs that measure them; full table in "
                f"{Path(output_dir) / 'report.md'}.")
    passed = [s for s in data.stacks if s.status == "ok" and s.speedup and not s.partial]
    where = f"images in {Path(output_dir) / 'images'}, full table in {Path(output_dir) / 'report.md'}"
    caveat = "" if data.model.get("trained") else f" ({model_caveat(data)})"
    if not passed:
        return f"No stack passed its fidelity gate faster than the baseline{caveat}; {where}."
    best = max(passed, key=lambda s: s.speedup)
    if best.speedup <= 1.0:
        return (f"No stack that passed its gate was faster than the baseline (best: {best.stack}, "
                f"{best.speedup:.2f}x){caveat}; {where}.")
    noise = " (within the noise)" if best.within_noise else ""
    return f"Fastest stack that passed: {best.stack}, {best.speedup:.2f}x end to end{noise}{caveat}; {where}."


def model_caveat(data: RunRecord) -> str:
    """What an untrained model's numbers say: random weights at full size give real speed but
    fidelity only as "same function"; a small model's speedups do not carry over to FLUX.1."""
    name = data.model["name"]
    if name.endswith("-random"):  # the built-in random-weight models have FLUX.1's full-size shapes
        return (f"{name} has FLUX.1's full-size shapes with random weights: the speedups hold for the real "
                "model at these shapes; fidelity says whether a stack computes the same function, not how "
                "its images would look")
    return (f"{name} is a small model with random weights: its speedups say little about the full-size "
            "FLUX.1 model; measure that with model=flux-dev-random bench=full on a GPU")


def write_run_report(data: RunRecord, output_dir: Path) -> Path:
    path = Path(output_dir) / "report.md"
    write_text_atomic(path, render_run_markdown(data))
    return path
