"""Numbers in the docs come from committed records: every generated table in docs/ is exactly
what benchmarks/results_table.py renders from its JSON today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted(p for p in [REPO / "README.md", *(REPO / "docs").rglob("*.md")] if "<!-- table:" in p.read_text())


def test_some_doc_has_generated_tables():
    assert DOCS


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_generated_tables_are_up_to_date(doc):
    proc = subprocess.run([sys.executable, "benchmarks/results_table.py", "--render", "--check", str(doc)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"{doc} is stale: run python benchmarks/results_table.py --render {doc}"
