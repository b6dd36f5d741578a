#!/usr/bin/env bash
# Issue 15 call J, run by device_background.sh (OUT=/tmp/out): plan J on flux-dev-random with
# profiles (flux_fast preset next to fp8_graphs, each with and without the fixed-schedule cache).
source benchmarks/device_setup.sh || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
bash benchmarks/run_plan.sh issue15j benchmarks/plans/h100_issue15_j.yaml 0,1,2,3 1640 bench.profile=true \
  > "$OUT/issue15j.log" 2>&1
tar czf "$OUT/issue15j-profiles.tar.gz" -C /tmp/res/issue15j_run profiles 2>/dev/null
echo done
