#!/usr/bin/env bash
# Issue 15, call D on the GPU machine (.whl carried): the AOTInductor load check (configured vs
# chosen C++ compiler), then aoti on flux-dev-random if the chosen compiler's packages load.
source benchmarks/device_setup.sh || exit 1
python3 benchmarks/aoti_load_check.py --device cuda 2>&1 | grep -v Warning | grep -v "return cls" | tee "$OUT/aoti_load_check.txt"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
timeout 420 python3 benchmarks/gpu_backends.py benchmarks/plans/h100_issue15_c.yaml --only 1 --out "$OUT/issue15d" \
  model=flux-dev-random bench=full "bench.prompts=['a photo of a red fox in the snow']" bench.warmup=0 \
  save_images=false bench.iterations=1 2>&1 | grep -v "should be kept in float32" | tail -30
