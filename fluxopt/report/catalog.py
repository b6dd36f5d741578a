"""``python -m fluxopt.report.catalog``: every registered backend and preset, what it needs and whether it can
run on this machine (Markdown, so docs/backends.md is generated from the code itself:
``python -m fluxopt.report.catalog --device cpu --render docs/backends.md`` rewrites its marked block)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fluxopt import plugins
from fluxopt.backend import EXCLUSIVE_STAGES
from fluxopt.environment import detect_device
from fluxopt.files import write_text_atomic
from fluxopt.stack import describe_options


def render(device: str = "auto") -> str:
    info = detect_device(device)
    lines = [f"| backend | stage | lossless | conflicts | on this machine ({info.name}) | description |",
             "|---|---|---|---|---|---|"]
    details = []
    for name, backend in sorted(plugins.backends().items(), key=lambda kv: (kv[1].stage, kv[0])):
        options = backend.options_class()
        reason = backend.unmet_requirement(options, info)
        conflicts = ", ".join(f"{k} ({v})" for k, v in backend.conflicts.items())
        if backend.exclusive_group:
            conflicts = "; ".join(filter(None, [conflicts, f"any other '{backend.exclusive_group}' backend"]))
        if backend.stage in EXCLUSIVE_STAGES:
            conflicts = "; ".join(filter(None, [conflicts, f"any other {backend.stage.name.lower()} backend"]))
        lines.append(f"| `{name}` | {backend.stage.name.lower()} | {'yes' if backend.is_lossless(options) else 'no'} "
                     f"| {conflicts or '—'} | {'available' if reason is None else reason} | {backend.description} |")
        described = describe_options(backend.options_class)
        details.append(f"- `{name}`: {described}" if described else f"- `{name}`: no options")
    presets = ["", "Presets (`+backend=<name>` selects all their backends with these options; "
               "`backend.<backend>.<option>=value` still overrides):", ""]
    for name, preset in sorted(plugins.presets().items()):
        stack = ", ".join(f"{b}({', '.join(f'{k}={v!r}' for k, v in o.items())})" if o else b
                          for b, o in preset.backends.items())
        presets.append(f"- `{name}`: {preset.description}. Stack: {stack}. Source: {preset.source or '—'}.")
        presets.extend(f"  - differs: {d}" for d in preset.deviations)
    return "\n".join(lines + ["", "Options (`backend.<name>.<option>=value`):", ""] + details + presets) + "\n"


BEGIN, END = "<!-- catalog: python -m fluxopt.report.catalog --device cpu -->\n", "<!-- end catalog -->"


def render_into(text: str, catalog: str) -> str:
    """``text`` with the block between the catalog markers replaced by ``catalog``."""
    head, rest = text.split(BEGIN, 1)
    return head + BEGIN + catalog + rest[rest.index(END):]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--render", type=Path, help="rewrite the marked catalog block of this Markdown file")
    args = parser.parse_args()
    catalog = render(args.device)
    if args.render:
        write_text_atomic(args.render, render_into(args.render.read_text(), catalog))
    else:
        print(catalog, end="")


if __name__ == "__main__":
    main()
