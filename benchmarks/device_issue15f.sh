#!/usr/bin/env bash
# Issue 15 call F and issue 16's schnell check, run by device_background.sh (OUT=/tmp/out):
# plan F on flux-dev-random (baseline + 5 stacks, profiles), then flux-schnell-random through the
# CLI at 1024x1024 with the model's own step count and guidance.
source benchmarks/device_setup.sh || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv
bash benchmarks/run_plan.sh issue15f benchmarks/plans/h100_issue15_f.yaml 0,1,2,3,4 1150 bench.profile=true \
  > "$OUT/issue15f.log" 2>&1
tar czf "$OUT/issue15f-profiles.tar.gz" -C /tmp/res/issue15f_run profiles 2>/dev/null
timeout 400 python3 -m fluxopt model=flux-schnell-random bench.height=1024 bench.width=1024 bench.iterations=2 \
  "bench.prompts=['a photo of a red fox in the snow']" save_images=false +backend=compile \
  backend.compile.regional=true hydra.run.dir=/tmp/res/schnell > "$OUT/schnell.log" 2>&1
echo "schnell: exit $?"
cp /tmp/res/schnell/result.json "$OUT/schnell.json"
