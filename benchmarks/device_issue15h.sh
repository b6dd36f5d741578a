#!/usr/bin/env bash
# Issue 15 call H and issue 16's LPIPS check, run by device_background.sh (OUT=/tmp/out): the GPU
# tests (attention kernel=auto at FLUX.1-dev's shape, CUDA graph runner, LPIPS with torchvision
# carried in .whl/extra), plan H on flux-dev-random with profiles, then the aoti leak probe.
extra=$PWD/.whl/extra
source benchmarks/device_setup.sh || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/extra "$extra"/*.whl
PYTHONPATH=/tmp/site:/tmp/extra timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
  tests/test_attention_auto.py tests/test_metrics.py "tests/test_aoti.py::test_cuda_graph_runner_replays_per_shape" \
  -rs > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests: exit $?"
bash benchmarks/run_plan.sh issue15h benchmarks/plans/h100_issue15_h.yaml 0,1,2,3,4 1000 bench.profile=true \
  > "$OUT/issue15h.log" 2>&1
tar czf "$OUT/issue15h-profiles.tar.gz" -C /tmp/res/issue15h_run profiles 2>/dev/null
timeout 240 python3 benchmarks/aoti_leak_probe.py > "$OUT/aoti-leak.log" 2>&1
echo "leak probe: exit $?"
