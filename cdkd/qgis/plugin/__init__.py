"""The cdkd Processing provider for QGIS (installed as the plugin ``cdkd_processing`` by ``cdkd qgis install``).

Only the standard library and QGIS are imported here and in the modules below: QGIS's Python has no torch, so
the algorithms run the user's ``cdkd`` executable (``runner``) instead of importing cdkd.
"""


def classFactory(iface):  # noqa: N802 (the name QGIS calls)
    """QGIS's entry point for a plugin (GUI and qgis_process alike)."""
    from .plugin import CdkdPlugin

    return CdkdPlugin(iface)
