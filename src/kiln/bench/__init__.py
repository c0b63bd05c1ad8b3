"""``kiln bench``: datasets, offline throughput and latency benchmarks with trtllm-bench-style reports,
a Hugging Face transformers baseline on the same dataset, and latency-throughput plots."""
