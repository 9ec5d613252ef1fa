"""The plugin object QGIS starts: it registers the cdkd Processing provider, and nothing else."""

from __future__ import annotations

from qgis.core import QgsApplication

from .provider import CdkdProvider


class CdkdPlugin:
    """``initProcessing`` is what qgis_process calls; the desktop calls ``initGui``, which does the same."""

    def __init__(self, iface) -> None:  # noqa: ANN001 (QgisInterface, None in qgis_process)
        self.iface = iface
        self.provider: CdkdProvider | None = None

    def initProcessing(self) -> None:  # noqa: N802
        if self.provider is None:
            self.provider = CdkdProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802
        self.initProcessing()

    def unload(self) -> None:
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
