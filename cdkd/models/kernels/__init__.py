"""Fused GPU kernels beside the plain PyTorch forms they replace (chosen by device in one place each):

* :mod:`cdkd.models.kernels.selective_scan_triton`: Mamba's selective scan in Triton, forward and backward
  (reference: :mod:`cdkd.models.ssm_scan`, dispatched by ``ssm_scan.selective_scan``);
* :mod:`cdkd.models.kernels.sam_attention`: SAM's attention with its decomposed relative-position bias through
  fused attention, without the N x N score matrix (reference: segment-anything's ``Attention``).

Kernels are tested against their references on the CPU (Triton's interpreter, ``TRITON_INTERPRET=1``); their
timings live in ``bench/``.
"""
