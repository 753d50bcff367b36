"""Triton GPU kernels: paged KV-cache store and paged attention (prefill/varlen and decode)."""
