"""A run's or a sweep's report as one self-contained HTML file (``report.html`` in a run's
directory, ``summary.html`` in a sweep's): a sortable table, speed against fidelity, the images
of every stack beside the baseline's with a heat map of their difference, and the profiled step's
breakdown where a stack was profiled.

Self-contained means no network and no other file: the plot is inline SVG, images are PNG data
URIs (downscaled), the sorting is a few lines of inline script. The figures are the records', read
through the one reader.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fluxopt.files import write_text_atomic
from fluxopt.record import RunRecord, StackRecord
from fluxopt.sweep import Collected, collect, run_name, verdict_of

THUMBNAIL_PX = 256  # images are embedded at most this wide and high
HTML_RUN = "report.html"
HTML_SWEEP = "summary.html"

_SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th, column) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0];
    var ascending = th.getAttribute("data-order") !== "asc";
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-order"); });
    th.setAttribute("data-order", ascending ? "asc" : "desc");
    function key(row) {
      var cell = row.cells[column], value = cell.getAttribute("data-value");
      if (value === null) { return cell.textContent.trim().toLowerCase(); }
      return value === "" ? null : parseFloat(value);
    }
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === y) { return 0; }
      if (x === null) { return 1; }   /* empty cells last, either way */
      if (y === null) { return -1; }
      return (x < y ? -1 : 1) * (ascending ? 1 : -1);
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
th[data-order="asc"]::after { content: " \\25B2"; } th[data-order="desc"]::after { content: " \\25BC"; }
td:first-child, th:first-child { text-align: left; }
tr.failed td { color: #a00; }
.grid td { text-align: center; vertical-align: top; font-size: 0.8em; border: none; }
.grid img { display: block; margin: 2px auto; }
.bar { display: flex; height: 18px; width: 600px; border: 1px solid #999; }
.bar span { display: block; height: 100%; }
.legend span { display: inline-block; padding: 0 6px; margin-right: 4px; font-size: 0.8em; }
"""

_CATEGORY_COLOURS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f")


@dataclass
class Row:
    """One measured stack in the table, with the run it belongs to."""

    label: str
    run: RunRecord
    stack: StackRecord


def _rows(records: list[RunRecord], root: Path) -> list[Row]:
    """Every stack of every record; in a sweep each named after its job's directory."""
    many = len(records) > 1 or not (root / "result.json").is_file()
    rows = []
    for record in records:
        prefix = f"{run_name(record, root)}: " if many else ""
        for s in ([record.baseline] if record.baseline else []) + list(record.stacks):
            rows.append(Row(prefix + s.stack, record, s))
    return rows


def _cell(text: str, value: float | None = None, numeric: bool = False) -> str:
    if not numeric:
        return f"<td>{html.escape(text)}</td>"
    shown = "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(float(value))
    return f'<td data-value="{shown}">{html.escape(text)}</td>'


def _num(value: float | None, spec: str, unit: str = "") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{unit}"


def _fidelity_metric(rows: list[Row]) -> str | None:
    names = {m for r in rows for m in ((r.stack.fidelity or {}).get("metrics") or {})}
    return "psnr" if "psnr" in names else min(names, default=None)


def _table(rows: list[Row], metric: str | None) -> str:
    head = ["stack", "status", "speedup", "per step (ms)", "build (s)", "peak memory (GiB)",
            f"worst {metric}" if metric else "fidelity", "gate", "J/image"]
    out = ['<table class="sortable" id="results"><thead><tr>'
           + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        s = r.stack
        step = s.step_latency.median * 1e3 if s.step_latency else None
        peak = s.peak_memory_bytes / 2**30 if s.peak_memory_bytes else None
        worst = s.worst(metric) if metric else None
        energy = s.energy.median_j if s.energy else None
        gate = "—" if s.is_baseline or s.fidelity is None else ("pass" if s.passed_gate else "fail")
        status = s.status + (f": {s.reason}" if s.reason else "")
        out.append(f'<tr class="{"failed" if s.status == "failed" else s.status}">'
                   + _cell(r.label) + _cell(status)
                   + _cell(_num(s.speedup, ".2f", "x"), s.speedup, True) + _cell(_num(step, ".4g"), step, True)
                   + _cell(_num(s.build_s, ".1f"), s.build_s, True) + _cell(_num(peak, ".2f"), peak, True)
                   + _cell(_num(worst, ".4g"), worst, True) + _cell(gate)
                   + _cell(_num(energy, ".0f"), energy, True) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _plot_svg(rows: list[Row], metric: str | None) -> str:
    """Speedup against the worst prompt's fidelity metric, one point per stack (inline SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r.label, r.stack.speedup, r.stack.worst(metric), r.stack.passed_gate) for r in rows
              if not r.stack.is_baseline and r.stack.speedup is not None and metric and r.stack.worst(metric) is not None]
    if not points:
        return "<p>No stack has both a speedup and a fidelity value to plot.</p>"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, x, y, passed in points:
        y = min(y, 100.0) if math.isfinite(y) else 100.0
        ax.scatter([x], [y], color="#2a7" if passed else "#c33", zorder=3)
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("speedup against the baseline")
    ax.set_ylabel(f"worst prompt's {metric}")
    ax.set_title("speed against fidelity (green: passed its gate)")
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]


def _png_uri(pixels: np.ndarray) -> str:
    from PIL import Image

    image = Image.fromarray(pixels)
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _heat_map(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """|a - b| averaged over colour channels, as an RGB heat map (``scale``: the value shown brightest)."""
    from matplotlib import colormaps

    diff = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(axis=2) / max(scale, 1.0)
    return (colormaps["magma"](np.clip(diff, 0.0, 1.0))[..., :3] * 255).astype(np.uint8)


def _load(run_dir: Path, rel: str) -> np.ndarray | None:
    from PIL import Image

    path = run_dir / rel
    return np.asarray(Image.open(path).convert("RGB")) if path.is_file() else None


def _image_grid(rows: list[Row]) -> str:
    """Per prompt: the baseline, then each stack with its difference from its own run's baseline.
    The heat maps share one scale (the largest mean-channel difference in the report)."""
    cells: list[tuple[str, list[np.ndarray | None], list[tuple[np.ndarray, np.ndarray] | None]]] = []
    baseline_shown = False
    for r in rows:
        if not r.stack.images:
            continue
        run_dir = r.run.path.parent if r.run.path else Path(".")
        images = [_load(run_dir, rel) for rel in r.stack.images]
        if r.stack.is_baseline:
            if not baseline_shown:
                cells.append((r.label, images, [None] * len(images)))
                baseline_shown = True
            continue
        base = [_load(run_dir, rel) for rel in (r.run.baseline.images if r.run.baseline else [])]
        cells.append((r.label, images, [(img, ref) if img is not None and ref is not None and img.shape == ref.shape
                                        else None for img, ref in zip(images, base)]))
    if not cells:
        return "<p>No images were saved (save_images=false).</p>"
    scale = max([float(np.abs(img.astype(np.float32) - ref.astype(np.float32)).mean(axis=2).max())
                 for _, _, pairs in cells for pair in pairs if pair is not None for img, ref in [pair]] or [1.0])
    prompts = rows[0].run.prompts
    n = max(len(images) for _, images, _ in cells)
    out = ['<table class="grid" id="images"><tr><th></th>'
           + "".join(f"<th>{html.escape(label)}</th>" for label, _, _ in cells) + "</tr>"]
    for i in range(n):
        prompt = prompts[i] if i < len(prompts) else f"image {i}"
        out.append(f"<tr><td>{html.escape(prompt[:60])}</td>")
        for label, images, pairs in cells:
            img = images[i] if i < len(images) else None
            cell = (f'<img alt="{html.escape(label)}, prompt {i}" src="{_png_uri(img)}">' if img is not None
                    else "missing")
            pair = pairs[i] if i < len(pairs) else None
            if pair is not None:
                cell += (f'<img alt="{html.escape(label)} minus baseline, prompt {i}" class="heat" '
                         f'src="{_png_uri(_heat_map(pair[0], pair[1], scale))}">difference')
            out.append(f"<td>{cell}</td>")
        out.append("</tr>")
    out.append("</table>")
    out.append(f"<p>Heat maps: mean absolute difference over colour channels; brightest = {scale:.0f} of 255.</p>")
    return "\n".join(out)


def _profile_bars(rows: list[Row]) -> str:
    profiled = [r for r in rows if r.stack.profile and r.stack.profile.get("breakdown_ms")]
    if not profiled:
        return ""
    categories = list(dict.fromkeys(c for r in profiled for c in r.stack.profile["breakdown_ms"]))
    colour = {c: _CATEGORY_COLOURS[i % len(_CATEGORY_COLOURS)] for i, c in enumerate(categories)}
    out = ["<h2>Profiled step</h2>", '<p class="legend">' + "".join(
        f'<span style="background:{colour[c]}">{html.escape(c)}</span>' for c in categories) + "</p>",
        '<table id="profiles">']
    for r in profiled:
        p = r.stack.profile
        parts = dict(p["breakdown_ms"])
        if p.get("gpu_idle_ms"):
            parts["GPU idle"] = p["gpu_idle_ms"]
            colour.setdefault("GPU idle", "#ddd")
        total = max(p.get("wall_ms") or 0.0, sum(parts.values())) or 1.0
        bar = "".join(f'<span title="{html.escape(c)}: {ms:.2f} ms" style="width:{100 * ms / total:.2f}%;'
                      f'background:{colour[c]}"></span>' for c, ms in parts.items() if ms > 0)
        copies = p.get("device_to_host_copies")
        waits = f", {copies} copies to the host" if copies else ""  # the host waits for each: idle GPU follows
        out.append(f'<tr><td>{html.escape(r.label)}</td><td>{total:.1f} ms{waits}</td>'
                   f'<td><div class="bar">{bar}</div></td></tr>')
    out.append("</table>")
    return "\n".join(out)


def _verdict(found: Collected, root: Path, single: bool) -> str:
    """The verdict the exit status gave, from the same rule: a run's ``RunRecord.failures``, a
    sweep's ``verdict_of`` (which also names the results it could not use), every reason listed."""
    reasons = found.records[0].failures() if single and found.records else verdict_of(root, found).reasons()
    if not reasons:
        return "<h2>Verdict</h2><p>Passed (exit status 0).</p>"
    return (f"<h2>Verdict</h2><p>Failed (non-zero exit status), {len(reasons)} reason(s):</p><ul>"
            + "".join(f"<li>{html.escape(why)}</li>" for why in reasons) + "</ul>")


def render_html(found: Collected, root: Path, title: str, single: bool = False) -> str:
    """``single``: ``root`` is one run's directory (its verdict is its record's), else a sweep's."""
    rows = _rows(found.records, root)
    metric = _fidelity_metric(rows)
    first = found.records[0] if found.records else None
    where = (f"{html.escape(str(first.model.get('name')))} on {html.escape(first.device)}, "
             f"{first.shapes.get('width')}x{first.shapes.get('height')}, {first.shapes.get('steps')} steps") if first else ""
    unusable = ("<h2>Not used</h2><ul>" + "".join(f"<li>{html.escape(u)}</li>" for u in found.unusable) + "</ul>"
                if found.unusable else "")
    command = (first.provenance.get("command") if first else None) or ""
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>", f"<p>{where}</p>",
        f"<p><code>{html.escape(command)}</code></p>" if command else "",
        _verdict(found, root, single),
        "<h2>Results</h2><p>Click a column to sort.</p>", _table(rows, metric),
        "<h2>Speed and fidelity</h2>", _plot_svg(rows, metric),
        "<h2>Images</h2>", _image_grid(rows), _profile_bars(rows), unusable,
        f"<script>{_SORT_SCRIPT}</script>", "</body></html>"])


def write_html(directory: Path, found: Collected | None = None) -> Path:
    """``report.html`` for a run's directory, ``summary.html`` for a sweep's (or any directory
    holding several runs), written atomically."""
    directory = Path(directory)
    found = found if found is not None else collect(directory)
    single = (directory / "result.json").is_file()
    path = directory / (HTML_RUN if single else HTML_SWEEP)
    title = f"fluxopt {'run' if single else 'sweep'}: {directory.name}"
    write_text_atomic(path, render_html(found, directory, title, single))
    return path
