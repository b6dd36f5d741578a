"""fluxopt's Hydra plugins: Ray and submitit launchers that survive a job whose process dies,
and the ``fluxopt_search`` sweeper (Optuna). Hydra finds them in the ``hydra_plugins`` namespace;
their configs are ``conf/hydra/launcher/fluxopt_*.yaml`` and ``conf/hydra/sweeper/fluxopt_search.yaml``."""
