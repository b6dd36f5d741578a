"""Training and evaluation of ``flux-mini``, the small FluxPipeline fluxopt ships (its runtime
side, the model spec and the weights, is the plugin ``fluxopt_plugins.flux_mini``).

Nothing here is imported when fluxopt runs a benchmark: ``train`` makes the weights
(``scripts/flux_mini.sh``), ``evaluate`` measures them, ``dataset`` and ``model`` are shared by
both. See docs/flux-mini.md.
"""
