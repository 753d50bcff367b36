"""Triton GPU kernels: paged KV-cache store, paged attention (prefill/varlen and decode), fused
per-layer elementwise work, one-pass sampling. Imported only on CUDA."""
