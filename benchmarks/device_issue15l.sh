#!/usr/bin/env bash
# Issue 15 call L, run by device_background.sh (OUT=/tmp/out): plan L on flux-dev-random with
# profiles (a step cache's kept trace, para-attn fbcache thresholds).
source benchmarks/device_setup.sh || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
bash benchmarks/run_plan.sh issue15l benchmarks/plans/h100_issue15_l.yaml 0,1,2,3 900 bench.profile=true \
  > "$OUT/issue15l.log" 2>&1
tar czf "$OUT/issue15l-profiles.tar.gz" -C /tmp/res/issue15l_run profiles 2>/dev/null
echo done
