#!/usr/bin/env bash
# Retrain and re-evaluate flux-mini (docs/flux-mini.md). Run from the repository root.
#   scripts/flux_mini.sh train   # on a CUDA GPU: ~2 min VAE + ~4.5 min transformer on one H100
#   scripts/flux_mini.sh eval    # on any device (CPU: ~3 min): docs/results/flux-mini-*.json + docs/images
#   scripts/flux_mini.sh ship    # copy runs/flux-mini/full/pipeline into the package (fluxopt_plugins/flux_mini/weights)
# The step counts are those of the shipped run (fluxopt_plugins/flux_mini/weights/train_config.json);
# replace them with --vae-seconds/--dit-seconds to fit another GPU's time budget.
set -euo pipefail
RUN=${RUN:-runs/flux-mini}
case "${1:-}" in
  train)
    python -m fluxopt.zoo.flux_mini.train --out "$RUN/vae" --vae-only --vae-steps 1680
    python -m fluxopt.zoo.flux_mini.train --out "$RUN/full" --resume "$RUN/vae/pipeline" --dit-steps 2867
    ;;
  eval)
    python -m fluxopt.zoo.flux_mini.evaluate ${WEIGHTS:+--weights "$WEIGHTS"} --out docs/results --images docs/images
    ;;
  ship)
    rm -rf fluxopt_plugins/flux_mini/weights && cp -r "$RUN/full/pipeline" fluxopt_plugins/flux_mini/weights
    mv fluxopt_plugins/flux_mini/weights/loss.csv docs/results/flux-mini-loss.csv
    python -c 'from fluxopt_plugins.flux_mini import write_checksums; write_checksums()'
    cp "$RUN/full/loss.png" docs/images/flux-mini-loss.png
    ;;
  *) echo "usage: $0 train|eval|ship" >&2; exit 2 ;;
esac
