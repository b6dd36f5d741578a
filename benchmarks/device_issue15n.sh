#!/usr/bin/env bash
# Issue 15 call N, run by device_background.sh (OUT=/tmp/out): plan N on flux-dev-random with
# profiles (static fp8 with and without coordinate-descent tuning).
source benchmarks/device_setup.sh || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
bash benchmarks/run_plan.sh issue15n benchmarks/plans/h100_issue15_n.yaml 0,1,2 1500 bench.profile=true \
  > "$OUT/issue15n.log" 2>&1
tar czf "$OUT/issue15n-profiles.tar.gz" -C /tmp/res/issue15n_run profiles 2>/dev/null
echo done
