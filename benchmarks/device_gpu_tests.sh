#!/usr/bin/env bash
# The GPU-marked tests on the GPU machine, run by device_background.sh (OUT=/tmp/out): everything
# but the aoti ones first, then those on their own (a crashing AOTInductor load must not take the
# others' results with it). LPIPS's torchvision is carried in .whl/extra.
extra=$PWD/.whl/extra
source benchmarks/device_setup.sh || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/extra "$extra"/*.whl
PYTHONPATH=/tmp/site:/tmp/extra timeout 330 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu -rs \
  --ignore=tests/test_aoti.py --ignore=tests/test_docs.py tests > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests: exit $?"
PYTHONPATH=/tmp/site:/tmp/extra timeout 420 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu -rs \
  tests/test_aoti.py > "$OUT/gpu-tests-aoti.log" 2>&1
echo "gpu aoti tests: exit $?"
