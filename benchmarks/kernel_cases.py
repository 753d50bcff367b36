"""What benchmarks/kernel_sweep.py measures: the attention shapes (cases) with their paged caches, inputs and fp32
reference, the launch configs it tries, and the engine's default config for each case. How the sweep runs (stages,
timing, precompiling, reporting) stays in kernel_sweep.py."""
from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Dims:
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page: int
    max_model_len: int
    dtype: torch.dtype


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int
    num_warps: int
    num_stages: int
    num_splits: int

    def label(self) -> str:
        return f"bn{self.block_n:<4}w{self.num_warps} st{self.num_stages} sp{self.num_splits:<3}"


@dataclass(frozen=True)
class VarlenConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    maxnreg: int | None

    def label(self) -> str:
        return f"bm{self.block_m:<4}bn{self.block_n:<4}w{self.num_warps} st{self.num_stages} reg{self.maxnreg or '-':<4}"


@dataclass
class Result:
    us: float = math.nan
    err: float = math.nan
    status: str = "ok"


@dataclass
class Case:
    """One benchmark shape: query tokens per sequence and KV length per sequence (decode: q_lens all 1)."""

    kind: str
    name: str
    q_lens: list[int]
    seq_lens: list[int]
    results: dict = field(default_factory=dict)
    default: DecodeConfig | VarlenConfig | None = None
    heuristic_splits: int = 1

    @property
    def work(self) -> float:
        """Decode: bytes of K and V read. Prefill: causal attention FLOPs (4 * head_dim per visible
        query-key pair and query head)."""
        if self.kind == "decode":
            return sum(self.seq_lens) * 2 * self.dims.num_kv_heads * self.dims.head_dim * self.dims.dtype.itemsize
        pairs = sum(sum(range(n - q + 1, n + 1)) for q, n in zip(self.q_lens, self.seq_lens))
        return 4.0 * self.dims.head_dim * self.dims.num_q_heads * pairs

    def build(self, dims: Dims, device: torch.device, layers: int, seed: int) -> None:
        """Paged caches ([layers] copies), pages of each sequence scattered over a pool with spare pages;
        every slot no sequence owns is NaN so any read of it shows in the output."""
        self.dims = dims
        gen = torch.Generator().manual_seed(seed)
        page, kvh, d = dims.page, dims.num_kv_heads, dims.head_dim
        blocks = [math.ceil(n / page) for n in self.seq_lens]
        num_blocks = sum(blocks) + sum(blocks) // 4 + 1
        perm = torch.randperm(num_blocks, generator=gen)
        width = max(math.ceil(dims.max_model_len / page), max(blocks))
        bt = torch.full((len(blocks), width), -1, dtype=torch.int32)
        slots, used = [], 0
        for b, (n, nb) in enumerate(zip(self.seq_lens, blocks)):
            ids = perm[used: used + nb]
            used += nb
            bt[b, :nb] = ids.int()
            slots.append((ids[:, None] * page + torch.arange(page)).flatten()[:n])
        slots = torch.cat(slots).to(device)
        shape = (layers, num_blocks, page, kvh, d)
        self.k_pool = torch.full(shape, float("nan"), dtype=dims.dtype, device=device)
        self.v_pool = torch.full(shape, float("nan"), dtype=dims.dtype, device=device)
        dev_gen = torch.Generator(device).manual_seed(seed)
        for pool in (self.k_pool, self.v_pool):
            for layer in range(layers):
                rows = torch.randn(len(slots), kvh, d, generator=dev_gen, device=device)
                pool[layer].view(-1, kvh, d)[slots] = rows.to(dims.dtype)
        tokens = sum(self.q_lens)
        self.q = torch.randn(tokens, dims.num_q_heads, d, generator=dev_gen, device=device).to(dims.dtype)
        self.out = torch.empty_like(self.q)
        self.block_tables = bt.to(device)
        self.seq_lens_t = torch.tensor(self.seq_lens, dtype=torch.int32, device=device)
        cu = [0, *itertools.accumulate(self.q_lens)]
        self.cu_seqlens_q = torch.tensor(cu, dtype=torch.int32, device=device)
        self.layers = layers
        self.scale = d ** -0.5

    def reference(self) -> torch.Tensor:
        """fp32 attention of layer 0 through the block tables (the torch backend's oracle)."""
        from nanovllm.layers.attention import attend

        ref = torch.empty(self.q.shape, dtype=torch.float32, device=self.q.device)
        cu = self.cu_seqlens_q.tolist()
        page = self.dims.page
        for b, n in enumerate(self.seq_lens):
            ids = self.block_tables[b, : math.ceil(n / page)].long()
            k = self.k_pool[0][ids].flatten(0, 1)[:n].float()
            v = self.v_pool[0][ids].flatten(0, 1)[:n].float()
            ref[cu[b]: cu[b + 1]] = attend(self.q[cu[b]: cu[b + 1]].float(), k, v, self.scale)
        return ref

    def launch(self, cfg: DecodeConfig | VarlenConfig, layer: int) -> None:
        from nanovllm.kernels.decode_attention import launch_decode
        from nanovllm.kernels.paged_attention import _launch_varlen

        k, v = self.k_pool[layer], self.v_pool[layer]
        if self.kind == "decode":
            launch_decode(self.q, k, v, self.out, self.seq_lens_t, self.block_tables, self.scale,
                          cfg.num_splits, cfg.block_n, cfg.num_warps, cfg.num_stages)
        else:
            _launch_varlen(self.q, k, v, self.out, self.cu_seqlens_q, self.seq_lens_t, self.block_tables, self.scale,
                           cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.maxnreg)


def record_default(case: Case) -> None:
    """The config the engine's entry point launches for this case, recorded instead of launched."""
    from nanovllm.kernels import decode_attention, paged_attention

    seen = {}
    saved = decode_attention.launch_decode, paged_attention.launch_decode, paged_attention._launch_varlen

    def recorder(fn):
        def record(*args, **kwargs):
            seen[fn.__name__] = inspect.signature(fn).bind(*args, **kwargs).arguments
        return record

    decode_attention.launch_decode = paged_attention.launch_decode = recorder(saved[0])
    paged_attention._launch_varlen = recorder(saved[2])
    try:
        k, v = case.k_pool[0], case.v_pool[0]
        if case.kind == "decode":
            decode_attention.paged_attention_decode(case.q, k, v, case.out, case.seq_lens_t, case.block_tables, case.scale)
            a = seen["launch_decode"]
            case.default = DecodeConfig(a["block_n"], a["num_warps"], a["num_stages"], a["num_splits"])
            case.heuristic_splits = a["num_splits"]
        else:
            paged_attention.paged_attention_varlen(case.q, k, v, case.out, case.cu_seqlens_q, case.seq_lens_t,
                                                   case.block_tables, max(case.q_lens), case.scale)
            a = seen["_launch_varlen"]
            case.default = VarlenConfig(a["block_m"], a["block_n"], a["num_warps"], a["num_stages"], a["maxnreg"])
    finally:
        decode_attention.launch_decode, paged_attention.launch_decode, paged_attention._launch_varlen = saved


def make_cases(smoke: bool, only: str | None) -> list[Case]:
    rng = torch.Generator().manual_seed(0)

    def uniform(lo: int, hi: int, n: int) -> list[int]:
        return torch.randint(lo, hi + 1, (n,), generator=rng).tolist()

    if smoke:
        decode = [("b3 U[3,70]", uniform(3, 70, 3))]
        varlen = [("2x12 new", [12, 12], [12, 12]), ("12 after 21 cached", [12], [33]), ("3x5 new", [5] * 3, [5] * 3)]
    else:
        decode = [("b256 U[200,2048]", uniform(200, 2048, 256)), ("b256 ~530", uniform(500, 560, 256)),
                  ("b64 U[100,2048]", uniform(100, 2048, 64)), ("b8 U[100,2048]", uniform(100, 2048, 8))]
        varlen = [("4x2048 new", [2048] * 4, [2048] * 4), ("2048 after 1500 cached", [2048], [3548]),
                  ("256x64 new", [64] * 256, [64] * 256)]
    cases = []
    if only in (None, "decode"):
        cases += [Case("decode", name, [1] * len(lens), lens) for name, lens in decode]
    if only in (None, "varlen"):
        cases += [Case("varlen", name, q, n) for name, q, n in varlen]
    return cases
