#!/usr/bin/env bash
# One device call's measurement, run by device_background.sh (OUT=/tmp/out), parametrised so each
# call needs no script of its own:
#   bash benchmarks/device_measure.sh NAME PLAN INDICES LIMIT_S [MINI_PLAN MINI_LIMIT_S] [-- PRE_COMMAND]
# The plan on flux-dev-random with profiles (result NAME.json, log, profiles tarball), then, if
# given, MINI_PLAN on the trained flux-mini for fidelity (mini-NAME.json). PRE_COMMAND (one string)
# runs first, after setup, with its output in NAME-pre.log.
source benchmarks/device_setup.sh || exit 1
name=$1 plan=$2 only=$3 limit=$4 mini="" mini_limit=400 pre=""
shift 4
if [ $# -ge 2 ] && [ "$1" != "--" ]; then mini=$1 mini_limit=$2; shift 2; fi
if [ "${1:-}" = "--" ]; then pre=$2; fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
if [ -n "$pre" ]; then bash -c "$pre" > "$OUT/$name-pre.log" 2>&1; echo "pre: exit $?"; fi
bash benchmarks/run_plan.sh "$name" "$plan" "$only" "$limit" bench.profile=true > "$OUT/$name.log" 2>&1
tar czf "$OUT/$name-profiles.tar.gz" -C "/tmp/res/${name}_run" profiles 2>/dev/null
if [ -n "$mini" ]; then
  timeout "$mini_limit" python3 benchmarks/gpu_backends.py "$mini" --out "/tmp/res/mini-$name" \
    model=flux-mini save_images=false bench.iterations=3 > "$OUT/mini-$name.log" 2>&1
  cp "/tmp/res/mini-${name}_run/result.json" "$OUT/mini-$name.json" 2>/dev/null
fi
echo done
