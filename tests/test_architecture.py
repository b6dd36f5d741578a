"""The architecture written down in pyproject.toml ([tool.importlinter]) holds: the kernel's
layers under independent rings, plugins importing only fluxopt's public API, the core naming no
plugin; no module of fluxopt has an import cycle (counting every import statement, lazy ones
too; names imported only for type hints never run); and docs/architecture.md draws every module there is."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent


def test_import_linter_contracts_hold():
    proc = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _imports(path: Path, package: str) -> set[str]:
    found = set()
    tree = ast.parse(path.read_text())
    for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]:
        block.body = []  # names for type hints only: never imported when the module runs
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg import submodule`` imports the submodule (the package only to reach it)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
            if not any(f"{node.module}.{alias.name}" in MODULE_NAMES for alias in node.names):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith(package + ".")}


def _modules() -> dict[str, Path]:
    """Every module of fluxopt (rings' packages by their package name), the package root aside."""
    found = {}
    for path in (REPO / "fluxopt").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if len(parts) > 1:
            found[".".join(parts)] = path
    return found


MODULE_NAMES = set(_modules())


def test_core_has_no_import_cycle():
    modules = _modules()
    graph = {m: {i for i in _imports(p, "fluxopt") if i in modules and i != m} for m, p in modules.items()}
    visiting, done, cycle = set(), set(), []

    def visit(node: str, path: list[str]) -> None:
        if node in done or cycle:
            return
        if node in visiting:
            cycle.extend(path[path.index(node):] + [node])
            return
        visiting.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, path + [nxt])
        visiting.discard(node)
        done.add(node)

    for module in sorted(graph):
        visit(module, [module])
    assert not cycle, " -> ".join(cycle)


def test_the_architecture_page_names_every_module():
    """A module added without a place in docs/architecture.md fails here (flux_mini, the trained
    model's training code, is documented in docs/flux-mini.md)."""
    import re

    page = (REPO / "docs" / "architecture.md").read_text()
    names = {m.removeprefix("fluxopt.").replace(".", "/") for m in _modules() if not m.startswith("fluxopt.zoo.flux_mini")}
    missing = sorted(n for n in names if not re.search(rf"(?<![\w/]){re.escape(n)}(?![\w/])", page))
    assert not missing, f"docs/architecture.md does not name {missing}"


KERNEL_CODE_LINES = 4000


def _code_lines(path: Path) -> int:
    """Lines that hold code as pygount (the SLOC counter built on pygments) counts them: not blank,
    not a comment, not a docstring."""
    from pygount import SourceAnalysis  # a test extra, absent where only the GPU tests run (benchmarks/device.sh)

    return SourceAnalysis.from_file(str(path), "fluxopt").code_count


def test_the_kernel_stays_small():
    """The kernel (fluxopt's top-level modules) holds at most KERNEL_CODE_LINES lines of code: a
    feature that is not the measurement spine belongs in a ring. Docstrings and comments are not
    counted, so that saying why never competes with the limit."""
    sizes = {p.name: _code_lines(p) for p in sorted((REPO / "fluxopt").glob("*.py"))}
    total = sum(sizes.values())
    largest = ", ".join(f"{name} {n}" for name, n in sorted(sizes.items(), key=lambda kv: -kv[1])[:5])
    assert total <= KERNEL_CODE_LINES, f"the kernel holds {total} lines of code (largest: {largest})"


def test_code_lines_skip_docstrings_comments_and_blanks(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""Module\ndocstring."""\n\n# a comment\nimport os\n\n\ndef f():\n    """Why."""\n'
                      '    return os.sep  # trailing comment\n\n\nclass C:\n    """Doc."""\n    x = "not a docstring"\n')
    assert _code_lines(module) == 5
