"""Per-module mutation scores from a committed ``mutmut results --all true`` listing.

    mutmut results --all true > docs/results/mutmut-DATE.txt
    python benchmarks/mutation_scores.py docs/results/mutmut-DATE.txt
    python benchmarks/mutation_scores.py --render docs/testing.md [--check]

``--render`` regenerates every block written between ``<!-- mutation: FILE.txt -->`` and
``<!-- end mutation -->`` (``--check``: exit 1 if the file would change). Score = killed (a test
failed, or the mutant timed out) / checked mutants; mutants not checked are counted apart.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

from fluxopt.report import markdown_table

COLUMNS = ("module", "mutants", "killed", "timeout", "survived", "not checked", "score")
DETECTED = ("killed", "timeout")


def counts(listing: str) -> dict[str, collections.Counter]:
    """module -> status -> number, from lines ``    fluxopt.module.x_function__mutmut_N: status``."""
    by_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in listing.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            by_module[".".join(name.split(".")[:2])][status] += 1
    return by_module


def table(path: Path) -> str:
    rows = []
    for module, c in sorted(counts(path.read_text()).items()):
        checked = sum(c.values()) - c["not checked"]
        detected = sum(c[s] for s in DETECTED)
        rows.append({"module": f"`{module}`", "mutants": str(sum(c.values())), "killed": str(c["killed"]),
                     "timeout": str(c["timeout"]), "survived": str(c["survived"]),
                     "not checked": str(c["not checked"]),
                     "score": f"{100 * detected / checked:.0f}%" if checked else "—"})
    return markdown_table(rows, COLUMNS)


BLOCK = re.compile(r"(<!-- mutation: (\S+) -->\n)(.*?)(<!-- end mutation -->)", re.S)


def render(doc: Path) -> str:
    return BLOCK.sub(lambda m: m.group(1) + table(doc.parent / m.group(2)) + "\n" + m.group(4), doc.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a mutmut listing, or with --render a Markdown file")
    parser.add_argument("--render", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if not args.render:
        print(table(args.path))
        return
    new = render(args.path)
    if args.check:
        sys.exit(0 if new == args.path.read_text() else 1)
    args.path.write_text(new)


if __name__ == "__main__":
    main()
