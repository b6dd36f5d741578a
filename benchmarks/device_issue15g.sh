#!/usr/bin/env bash
# Issue 15 call G, run by device_background.sh (OUT=/tmp/out): plan G on flux-dev-random.
source benchmarks/device_setup.sh || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv
bash benchmarks/run_plan.sh issue15g benchmarks/plans/h100_issue15_g.yaml 0,1,2 900 bench.profile=true \
  > "$OUT/issue15g.log" 2>&1
tar czf "$OUT/issue15g-profiles.tar.gz" -C /tmp/res/issue15g_run profiles 2>/dev/null
