"""cdkd in QGIS: a Processing provider (``plugin/``, a QGIS plugin) and the code that installs it (``install``).

The plugin runs inside QGIS's Python, which has no torch: it imports nothing from cdkd and runs the user's own
``cdkd`` executable as a subprocess (``plugin/runner.py``). ``install`` copies it into a QGIS profile (or a ZIP
for QGIS's "Install from ZIP") and records which ``cdkd`` to call.
"""

from cdkd.qgis.install import (
    PLUGIN_NAME,
    InstallResult,
    cdkd_command,
    install_plugin,
    plugin_source,
    profiles_root,
    zip_plugin,
)

__all__ = [
    "PLUGIN_NAME",
    "InstallResult",
    "cdkd_command",
    "install_plugin",
    "plugin_source",
    "profiles_root",
    "zip_plugin",
]
