# Source this on the GPU machine (device tool), from the repo root, with .whl carried:
#   source benchmarks/device_setup.sh
# Installs the carried wheels (diffusers, hydra, torchao, modelopt...) and fluxopt itself
# (non-editable, so fluxopt_plugins/ and conf/ are installed as packages) into /tmp/site, then moves
# to a work directory holding tests/, benchmarks/ and examples/ but no fluxopt/ source tree,
# so the installed package is the one imported.
python3 -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --target /tmp/site .whl/*.whl . \
  || return 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 FLUXOPT_CACHE_DIR=/tmp/fluxopt-cache HF_HUB_OFFLINE=1
mkdir -p /tmp/work && cp -r tests benchmarks examples pyproject.toml /tmp/work/ && cd /tmp/work || return 1
python3 - <<'PY'
import torch, diffusers, fluxopt
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(), "diffusers", diffusers.__version__)
PY
