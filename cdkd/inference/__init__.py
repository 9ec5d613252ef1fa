"""Running a model on tiles, wherever the tiles come from: a scene (``cdkd.scene``), an evaluation set
(``cdkd.evaluation``) or an export's parity check (``cdkd.export``).

* ``runtimes``: one interface over PyTorch, ONNX Runtime and TensorRT (``open_runtime``, ``Runtime``);
  ``detector_runtimes`` the same runtimes for instance models;
* ``tiler``: the fixed-size windows that cover an image (pure planning, no pixels);
* ``blend``, ``rowblend``: the windows' weights and the blender that merges them in one canonical order;
* ``sliding``: whole images in memory through the same plan and blender (evaluation, parity).
"""
