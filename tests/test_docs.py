"""Numbers in the docs come from committed records: every generated table in docs/ is exactly
what benchmarks/results_table.py renders from its JSON today."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted(p for p in [REPO / "README.md", *(REPO / "docs").rglob("*.md")] if "<!-- table:" in p.read_text())


def test_some_doc_has_generated_tables():
    assert DOCS


def _results_table():
    import importlib.util

    spec = importlib.util.spec_from_file_location("results_table", REPO / "benchmarks" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_generated_tables_are_up_to_date(doc):
    assert _results_table().render(doc) == doc.read_text(), \
        f"{doc} is stale: run python benchmarks/results_table.py --render {doc}"


def test_the_kernel_table_lists_each_profiled_stacks_kernels_and_shortens_long_names():
    table = _results_table()
    kernels = [{"name": "nvjet_tst_192x192", "category": "gemm", "ms": 4.25, "launches": 3},
               {"name": "void cutlass::Kernel<" + "x" * 200 + "|y>", "category": "gemm", "ms": 1.0, "launches": 1}]
    result = {"baseline": {"stack": "baseline", "profile": {"top_kernels": kernels[:1]}},
              "stacks": [{"stack": "fp8_max", "profile": {"top_kernels": kernels}}, {"stack": "eager", "profile": None}]}
    rows = table.kernel_rows({"runs": [{"result": result}]})
    assert [(r["stack"], r["ms"], r["launches"]) for r in rows] == [("baseline", "4.25", "3"), ("fp8_max", "4.25", "3"),
                                                                    ("fp8_max", "1.00", "1")]
    long = rows[2]["kernel"]
    assert len(long) == table.KERNEL_SHOWN + 2 and long.endswith("…`") and "|" not in long


def test_stacks_that_would_read_alike_also_show_the_options_they_differ_in():
    table = _results_table()
    compile_options = {"regional": True, "cuda_graphs": True, "inductor_config": {}}
    stacks = [{"stack": "compile", "options": {"compile": compile_options}},
              {"stack": "compile", "options": {"compile": {**compile_options, "inductor_config": {"triton.enable_pdl": True}}}},
              {"stack": "fuse_qkv+compile", "options": {"fuse_qkv": {"vae": False}, "compile": compile_options}}]
    assert table.stack_labels(stacks) == [
        "compile(regional=True, cuda_graphs=True, inductor_config={})",
        "compile(regional=True, cuda_graphs=True, inductor_config={'triton.enable_pdl': True})",
        "fuse_qkv(); compile(regional=True, cuda_graphs=True)"]


def test_the_time_table_counts_the_time_before_the_record_started_where_the_record_has_it():
    table = _results_table()
    stacks = [{"stack": "baseline", "status": "ok", "elapsed_s": 30.0},
              {"stack": "compile", "status": "ok", "elapsed_s": 60.0}]
    result = {"started": "2026-12-04T10:00:12+00:00", "baseline": stacks[0], "stacks": stacks[1:],
              "provenance": {"process_started": "2026-12-04T10:00:00+00:00"}}
    rows = table.time_rows({"runs": [{"result": result}]})
    assert [(r["stack"], r["wall (s)"], r["done at (min)"]) for r in rows] == [
        ("(process start: imports, config)", "12.0", "0.2"), ("baseline", "30.0", "0.7"), ("compile", "60.0", "1.7")]
    del result["provenance"]  # an older record: the stacks alone, from the record's start
    assert [r["done at (min)"] for r in table.time_rows({"runs": [{"result": result}]})] == ["0.5", "1.5"]


@pytest.mark.parametrize("kind", [None, "profile", "kernels", "build", "time"])
def test_every_table_refuses_an_edited_record(kind, tmp_path):
    record = json.loads((REPO / "docs/results/2026-12-03-h200-fp8-max-kernels/result.json").read_text())
    record["stacks"][0]["speedup"] = 9.9
    (tmp_path / "result.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="was edited: .*speedup 9.9"):
        _results_table().table(tmp_path / "result.json", kind)


def test_a_table_reads_a_record_from_its_directory():
    record = REPO / "docs/results/2026-12-03-h200-int4"
    table = _results_table()
    assert table.table(record, "time") == table.table(record / "result.json", "time")


def test_the_command_that_regenerates_the_tables_checks_them():
    readme = REPO / "README.md"
    proc = subprocess.run([sys.executable, "benchmarks/results_table.py", "--render", "--check", str(readme)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_backend_catalog_in_docs_is_generated_from_the_code():
    """docs/backends.md's backend table and option list equal ``python -m fluxopt.report.catalog``'s
    output (the table header names the machine's CPU, which differs between machines)."""
    from fluxopt.report.catalog import BEGIN, END, render

    text = (REPO / "docs" / "backends.md").read_text()
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    generated = render("cpu")
    assert block.split("\n", 1)[1] == generated.split("\n", 1)[1], \
        "docs/backends.md is stale: python -m fluxopt.report.catalog --device cpu --render docs/backends.md"


def test_mutation_scores_in_docs_come_from_the_committed_listing():
    doc = REPO / "docs" / "testing.md"
    assert "<!-- mutation: " in doc.read_text()
    proc = subprocess.run([sys.executable, "benchmarks/mutation_scores.py", "--render", "--check", str(doc)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, f"{doc} is stale: run python benchmarks/mutation_scores.py --render {doc}"


def test_mutation_scores_count_each_status():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from mutation_scores import counts

    listing = ("    fluxopt.a.x_f__mutmut_1: killed\n    fluxopt.a.x_f__mutmut_2: survived\n"
               "    fluxopt.a.xǁCǁm__mutmut_1: timeout\n    fluxopt.b.x_g__mutmut_1: not checked\n")
    assert counts(listing) == {"fluxopt.a": {"killed": 1, "survived": 1, "timeout": 1},
                               "fluxopt.b": {"not checked": 1}}


def test_the_readmes_replayed_saving_is_what_the_replay_prints():
    """The README's estimate of what bench=full's target_rse and single warm-up save comes from
    benchmarks/replay_measurement.py on the record it names; the figures in the text are the
    script's output today."""
    record = REPO / "docs" / "results" / "2026-12-03-h200-default-cold-4" / "result.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "replay_measurement.py"), str(record),
                           "--warmup", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    *stacks, summary = proc.stdout.strip().splitlines()
    # stacks stopped, minutes; warm-up calls, minutes; first calls within 3 % (its "3" skipped)
    numbers = re.findall(r"\d+(?:\.\d+)?", summary)
    readme = " ".join((REPO / "README.md").read_text().split())
    assert (f"{numbers[0]} of its {len(stacks)} timed stacks would have stopped after 3 or 4 calls, taking "
            f"{numbers[1]} minutes off, and {numbers[2]} warm-up calls fewer would take {numbers[3]} more") in readme
    assert f"in that run {numbers[4]} of the {len(stacks)} first calls were already within 3 %" in readme
