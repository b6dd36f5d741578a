#!/usr/bin/env bash
# One measurement on the GPU machine, after `source benchmarks/device_setup.sh`:
#   bash benchmarks/run_plan.sh NAME PLAN INDICES TIME_LIMIT_S [fluxopt overrides...]
# flux-dev-random at 1024x1024, 28 steps, one prompt, 2 timed generations per stack, against a
# bf16 baseline measured in the same process. result.json is rewritten after every stack, so a
# run stopped by its time limit still returns the stacks it finished; it is copied to $OUT/NAME.json.
name=$1 plan=$2 only=$3 limit=$4
shift 4
timeout "$limit" python3 benchmarks/gpu_backends.py "$plan" --only "$only" --out "/tmp/res/$name" \
  model=flux-dev-random bench=full "bench.prompts=['a photo of a red fox in the snow']" bench.warmup=0 \
  save_images=false bench.iterations=2 "$@"
rc=$?
cp "/tmp/res/${name}_run/result.json" "$OUT/$name.json" 2>/dev/null || echo "$name: no result.json"
echo "$name: exit $rc"
exit $rc
