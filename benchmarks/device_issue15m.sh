#!/usr/bin/env bash
# Issue 15 call M, run by device_background.sh (OUT=/tmp/out): plan M on flux-dev-random with
# profiles (static vs dynamic fp8 activation scales), then the same two quantizations on the
# trained flux-mini for fidelity.
source benchmarks/device_setup.sh || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
bash benchmarks/run_plan.sh issue15m benchmarks/plans/h100_issue15_m.yaml 0,1,2 900 bench.profile=true \
  > "$OUT/issue15m.log" 2>&1
tar czf "$OUT/issue15m-profiles.tar.gz" -C /tmp/res/issue15m_run profiles 2>/dev/null
timeout 400 python3 benchmarks/gpu_backends.py benchmarks/plans/flux_mini_fp8_static.yaml --out /tmp/res/mini-fp8 \
  model=flux-mini save_images=false bench.iterations=3 > "$OUT/mini-fp8.log" 2>&1
cp /tmp/res/mini-fp8_run/result.json "$OUT/mini-fp8.json" 2>/dev/null
echo done
