"""The scene engine's core, shared by every way a scene is run (``cdkd.scene.engine`` for class rasters,
``cdkd.scene.instances`` for objects, ``cdkd.scene.blocks`` on a cluster, ``cdkd.scene.predict`` over dask):

* ``options``: ``SegmentOptions`` and what follows from them before any work (tiling, buffers, cache);
* ``source``: a checked scene, read in windows by many threads;
* ``pipeline``: reading ahead, batching across window rows, blending rows in the canonical order;
* ``writer`` and ``pyramid``: finished rows to chunk files with their overviews, then one COG;
* ``runstate``: an output's files, its lock, its fingerprint and the checkpoint a ``--resume`` continues;
* ``report``: progress, notices and the report a run writes;
* ``areas``: the ground area of a class raster's classes (its legend: ``cdkd.data.classraster``).
"""
