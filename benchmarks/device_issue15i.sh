#!/usr/bin/env bash
# Issue 15 call I, run by device_background.sh (OUT=/tmp/out): plan I on flux-dev-random with
# profiles (fixed-schedule step cache over fp8 + CUDA graphs, fused QKV under fp8, a lossless
# attempt, flux-fast's recipe as the flux_fast preset).
source benchmarks/device_setup.sh || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
bash benchmarks/run_plan.sh issue15i benchmarks/plans/h100_issue15_i.yaml 0,1,2,3,4,5,6,7 1650 bench.profile=true \
  > "$OUT/issue15i.log" 2>&1
tar czf "$OUT/issue15i-profiles.tar.gz" -C /tmp/res/issue15i_run profiles 2>/dev/null
echo done
