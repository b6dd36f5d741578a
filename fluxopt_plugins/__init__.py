"""fluxopt's built-in plugins (installed as the package ``fluxopt_plugins``).

Each module is a plugin of hook implementations using exactly the API a third-party
plugin would: nothing in the core knows any backend by name.
"""
