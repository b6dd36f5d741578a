#!/usr/bin/env bash
# Issue 15, call C on the GPU machine (.whl carried): the AOTInductor load check with the
# configured and the chosen C++ compiler, then plan C (stack 1, aoti, only if the chosen
# compiler's packages load). Results are written into $OUT as they are produced.
source benchmarks/device_setup.sh || exit 1
python3 benchmarks/aoti_load_check.py --device cuda 2>&1 | grep -v Warning | grep -v "return cls" | tee "$OUT/aoti_load_check.txt"
only=0
[ "${PIPESTATUS[0]}" = 0 ] && only=0,1
timeout 470 python3 benchmarks/gpu_backends.py benchmarks/plans/h100_issue15_c.yaml --only "$only" --out "$OUT/issue15c" \
  model=flux-dev-random bench=full "bench.prompts=['a photo of a red fox in the snow']" bench.warmup=0 \
  save_images=false bench.iterations=2 2>&1 | grep -v "should be kept in float32" | tail -40
