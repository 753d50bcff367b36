"""Triton GPU kernels: paged KV-cache store, paged attention (varlen, decode), fused per-layer
elementwise work, the MoE grouped GEMM, one-pass sampling. Imported only on CUDA."""
