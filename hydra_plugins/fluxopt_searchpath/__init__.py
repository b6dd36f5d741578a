"""Hydra plugin adding the configs of installed fluxopt plugins to fluxopt's search path."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

FLUXOPT_CONF = "pkg://fluxopt.conf"


class FluxoptPluginConfigs(SearchPathPlugin):
    """Appends each fluxopt plugin's ``fluxopt_config_path()`` (only for the fluxopt app)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if not any(entry.path == FLUXOPT_CONF for entry in search_path.get_path()):
            return
        from fluxopt.plugins import config_paths

        for path in config_paths():
            search_path.append(provider="fluxopt-plugin", path=path)
