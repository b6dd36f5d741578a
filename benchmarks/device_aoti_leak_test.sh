#!/usr/bin/env bash
# On the GPU machine (device tool, .whl carried): the aoti shared-weights leak test on CUDA, which
# shows that a package given live weights returns its memory and their storages once dropped.
source benchmarks/device_setup.sh || exit 1
timeout 420 python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs \
  "tests/test_aoti.py::test_a_package_given_live_weights_lets_go_of_them_when_dropped" 2>&1 | tail -15
