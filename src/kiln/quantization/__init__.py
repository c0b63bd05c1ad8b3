"""Quantization math and pre-quantized checkpoint formats, as plain functions on torch tensors.

``weight_only``: INT8 / INT4 weight-only quantization in kiln's packed layouts, and AWQ's scale search.
``checkpoint_formats``: AutoAWQ and GPTQ checkpoints read and repacked into those layouts.
The matmuls that read the layouts are in ``kiln.kernels.weight_only``.
"""
