#!/usr/bin/env bash
# Mutation testing of some modules against a test selection of their own, in a scratch copy of
# the checkout, so that pyproject's default selection (the verdict's core) stays as committed.
# Why: mutmut runs, for each mutant, every selected test that executed the mutated function; a
# module such as fluxopt/stack.py is executed by the compile tests of tests/test_undo.py too,
# which made each of its mutants cost over a minute. Its own tests check it directly.
#
#   bash benchmarks/mutmut_scoped.sh OUT.txt "MUTANT_GLOB" TEST_PATH... [-- PYTEST_ARGS...]
#   e.g. bash benchmarks/mutmut_scoped.sh docs/results/mutmut-2026-11-26-stack.txt "fluxopt.stack*" \
#            tests/test_stack.py tests/test_presets.py tests/reliability/test_options_property.py
#
# The scratch copy holds the files git tracks: `git add` a new test file first.
# Writes the lines of `mutmut results --all true` that MUTANT_GLOB selects to OUT.txt; the scratch copy is left in
# /tmp/mutmut-scoped-* for a look at survivors (`cd` there, `mutmut show NAME`).
set -euo pipefail
out=$(realpath -m "$1") glob=$2
shift 2
tests=() args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do tests+=("$1"); shift; done
[ $# -gt 0 ] && shift && args=("$@")
scratch=$(mktemp -d /tmp/mutmut-scoped-XXXX)
git ls-files -z | xargs -0 cp --parents -t "$scratch"
python - "$scratch/pyproject.toml" "${#tests[@]}" "${tests[@]}" "${args[@]}" <<'PY'
import json, re, sys
path, n = sys.argv[1], int(sys.argv[2])
tests, extra = sys.argv[3:3 + n], sys.argv[3 + n:]
text = open(path).read()
text = re.sub(r"pytest_add_cli_args_test_selection = \[.*?\]",
              "pytest_add_cli_args_test_selection = " + json.dumps(tests), text, flags=re.S)
if extra:
    text = re.sub(r"pytest_add_cli_args = \[.*?\]", "pytest_add_cli_args = " + json.dumps(extra), text, flags=re.S)
open(path, "w").write(text)
PY
cd "$scratch"
OMP_NUM_THREADS=1 mutmut run "$glob" || true  # exit status: survivors are results, not errors
mutmut results --all true | python -c "import fnmatch, sys; sys.stdout.writelines(
    l for l in sys.stdin if fnmatch.fnmatch(l.strip().split(':')[0], sys.argv[1]))" "$glob" > "$out"  # MUTANT_GLOB's only
echo "results: $out (scratch copy: $scratch)"
