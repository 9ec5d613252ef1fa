"""Scoring a model on labeled data, whatever runs it (PyTorch, ONNX Runtime, TensorRT): ``semantic`` (mIoU, OA,
mF1 over whole images in the scene engine's windows and blending), ``instance`` (COCO AP over whole images tiled and
joined as scenes are) and ``metrics`` (the confusion matrix and what is read from it)."""
