"""fluxopt's Hydra configs (installed as the package ``fluxopt.conf``)."""
