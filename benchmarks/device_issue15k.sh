#!/usr/bin/env bash
# Issue 15 call K, run by device_background.sh (OUT=/tmp/out): plan K on flux-dev-random with
# profiles and the GPU clock (lossless and fp8 graphs, the fixed cache, para-attn fbcache).
source benchmarks/device_setup.sh || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
bash benchmarks/run_plan.sh issue15k benchmarks/plans/h100_issue15_k.yaml 0,1,2,3,4,5 1500 bench.profile=true \
  > "$OUT/issue15k.log" 2>&1
tar czf "$OUT/issue15k-profiles.tar.gz" -C /tmp/res/issue15k_run profiles 2>/dev/null
echo done
