#!/usr/bin/env bash
# One measurement call on the GPU machine (device tool), from the repo root, with .whl carried:
#   bash benchmarks/device_run.sh NAME PLAN INDICES TIME_LIMIT_S [fluxopt overrides...]
# Installs fluxopt and the carried wheels, prints the machine's identity and the C++ compiler
# check, runs the plan (flux-dev-random, 1024x1024, 28 steps, one prompt, bench.profile=true),
# and copies result.json, the log and the profiles (tar.gz) to $OUT.
set -u
name=$1 plan=$2 only=$3 limit=$4
shift 4
source benchmarks/device_setup.sh || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
python3 - <<'PY'
import torch, torch._inductor.config as c, torch._inductor.cpp_builder as b
from fluxopt_plugins._libstdcxx import choose_compiler, loaded_libstdcxx
print("inductor cpp.cxx", c.cpp.cxx, "->", b.get_cpp_compiler(), "| loaded", loaded_libstdcxx())
print("choice:", choose_compiler(b.get_cpp_compiler()))
PY
set -o pipefail
bash benchmarks/run_plan.sh "$name" "$plan" "$only" "$limit" bench.profile=true "$@" 2>&1 | tee "$OUT/$name.log"
rc=$?
tar czf "$OUT/$name-profiles.tar.gz" -C "/tmp/res/${name}_run" profiles 2>/dev/null
exit $rc
