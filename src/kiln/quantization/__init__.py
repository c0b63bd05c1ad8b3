"""Quantization math and pre-quantized checkpoint formats, as plain functions on torch tensors: how a float
tensor becomes a quantized one (build time), how pre-quantized checkpoints are read, and the plain-PyTorch
reference of each quantized matmul.

``weight_only``: INT8 / INT4 weight-only quantization in kiln's packed layouts, and AWQ's scale search.
``fp8``: e4m3 weights (per channel or per tensor), per-token and static activations, the CPU FP8 linear.
The kernels that read these layouts are in ``kiln.kernels.weight_only`` and ``kiln.kernels.fp8``; the readers
of pre-quantized checkpoints (AutoAWQ / GPTQ, ModelOpt / compressed-tensors FP8) are in
``kiln.convert.int_checkpoints`` and ``kiln.convert.fp8_checkpoints``.
"""
