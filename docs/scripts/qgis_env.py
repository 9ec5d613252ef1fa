"""Headless PyQGIS for the scripts here: a QGIS application and the cdkd provider loaded from this source tree.

Run the scripts with QGIS's Python (Debian: ``/usr/bin/python3`` with ``python3-qgis``), never cdkd's: the
plugin is made for QGIS's Python and imports nothing from cdkd.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO / "cdkd" / "qgis" / "plugin"


def start_qgis(plugin_dir: Path = PLUGIN_DIR):
    """A QgsApplication without a display, with Processing and the cdkd provider from ``plugin_dir`` (this
    source tree's plugin, or one that ``cdkd qgis install`` put in a profile)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from qgis.core import QgsApplication

    QgsApplication.setPrefixPath("/usr", True)
    app = QgsApplication([], False)
    app.initQgis()
    sys.path.append("/usr/share/qgis/python/plugins")  # Processing itself (Debian's path)
    from processing.core.Processing import Processing

    Processing.initialize()
    plugin = load_plugin(plugin_dir)
    provider = plugin.provider.CdkdProvider()
    QgsApplication.processingRegistry().addProvider(provider)
    return app, provider


def load_plugin(plugin_dir: Path = PLUGIN_DIR):
    """The plugin folder as the package ``cdkd_processing``, as QGIS imports it once installed."""
    spec = importlib.util.spec_from_file_location("cdkd_processing", Path(plugin_dir) / "__init__.py",
                                                  submodule_search_locations=[str(plugin_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["cdkd_processing"] = module
    spec.loader.exec_module(module)
    importlib.import_module("cdkd_processing.provider")
    importlib.import_module("cdkd_processing.styles")
    return module
