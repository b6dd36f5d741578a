#!/usr/bin/env bash
# Issue 15 deliverable 5 on the GPU machine (device tool, OUT set): the same stack built by two
# processes in a row sharing one artifact cache; the second's build time is the warm start.
#   bash benchmarks/device_warm_start.sh [STACK]      (default: the fp8_graphs preset)
stack=${1:-fp8_graphs}
source benchmarks/device_setup.sh || exit 1
for run in cold warm; do
  timeout 280 python3 -m fluxopt model=flux-dev-random bench=full "+backend=$stack" bench.warmup=0 bench.iterations=1 \
    save_images=false "bench.prompts=['a photo of a red fox in the snow']" "hydra.run.dir=/tmp/res/warm-start-$run" \
    > "$OUT/warm-start-$run.log" 2>&1
  echo "$run: exit $?"
  cp "/tmp/res/warm-start-$run/result.json" "$OUT/warm-start-$run.json"
done
