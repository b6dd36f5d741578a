"""Per-module mutation scores from a committed ``mutmut results --all true`` listing.

    mutmut results --all true > docs/results/mutmut-DATE.txt
    python benchmarks/mutation_scores.py docs/results/mutmut-DATE.txt
    python benchmarks/mutation_scores.py --render docs/testing.md [--check]

``--render`` regenerates every block written between ``<!-- mutation: FILE.txt -->`` and
``<!-- end mutation -->`` (``--check``: exit 1 if the file would change). Score = killed (a test
failed, or the mutant timed out) / checked mutants; mutants not checked are counted apart.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

from results_table import markdown_cli

from fluxopt.report.tables import markdown_table

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
    markdown_cli(__doc__, "a mutmut listing", lambda args: table(args.path), render)


if __name__ == "__main__":
    main()
