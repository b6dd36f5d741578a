#!/usr/bin/env bash
# Issue 15 deliverable 5 on the GPU machine (device tool, OUT set): the same stack built by two
# processes in a row sharing one artifact cache. The first only builds (build_only=true: what a
# background build pays once); the second measures, and its build time is the warm start.
# Dynamo's recompiles are logged (TORCH_LOGS=recompiles) to show what each build recompiled.
#   bash benchmarks/device_warm_start.sh [STACK] [COLD_LIMIT_S] [WARM]   (default: fp8_graphs, 280, measure)
# WARM=build: the second process only builds too (its build time without the baseline's minute).
stack=${1:-fp8_graphs} cold_limit=${2:-280} warm=${3:-measure}
source benchmarks/device_setup.sh || exit 1
for run in cold warm; do
  extra=() limit=280
  if [ $run = cold ]; then extra=(build_only=true) limit=$cold_limit; fi
  if [ $run = warm ] && [ "$warm" = build ]; then extra=(build_only=true); fi
  TORCH_LOGS=recompiles timeout "$limit" python3 -m fluxopt model=flux-dev-random bench=full "+backend=$stack" \
    bench.warmup=0 bench.iterations=1 save_images=false "bench.prompts=['a photo of a red fox in the snow']" \
    "hydra.run.dir=/tmp/res/warm-start-$run" "${extra[@]}" > "$OUT/warm-start-$run.log" 2>&1
  echo "$run: exit $?"
  cp "/tmp/res/warm-start-$run/result.json" "$OUT/warm-start-$run.json"
done
