"""fluxopt's Hydra plugins: Ray and submitit launchers that survive a job whose process dies,
and the ``fluxopt_search`` sweeper (Optuna). Their modules start with ``_`` so that Hydra's
plugin scan, which imports every other module of ``hydra_plugins`` at startup, skips them: it
would print an import error for every engine that is not installed. ``fluxopt.scale.launchers.
register_engine`` imports and registers the one a run's config names. Configs:
``conf/hydra/launcher/fluxopt_*.yaml`` and ``conf/hydra/sweeper/fluxopt_search.yaml``."""
