"""Quantized weight formats: how a float tensor becomes a quantized one (build time), how pre-quantized
checkpoints are read, and the plain-PyTorch reference of each quantized matmul."""
