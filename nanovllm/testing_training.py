"""A few seconds of deterministic training on CPU, so a tiny checkpoint completes real sentences (the
`tiny-trained` preset of nanovllm.testing): examples and end-to-end tests then show text, not noise."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Lines sorted by length go in this many padded micro-batches (little padding); one optimizer step sees all.
_MICRO_BATCHES = 4


@contextlib.contextmanager
def deterministic_cpu(seed: int) -> Iterator[None]:
    """One thread, deterministic kernels and a private RNG seeded with `seed`; the caller's settings come back after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def _micro_batches(lines: list[list[int]], pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input ids, attention mask, labels with -100 on padding) per group of similar-length lines."""
    ordered = sorted(lines, key=len)
    size = -(-len(ordered) // _MICRO_BATCHES)
    batches = []
    for start in range(0, len(ordered), size):
        group = ordered[start : start + size]
        width = len(group[-1])
        ids = torch.full((len(group), width), pad_id)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, line in enumerate(group):
            ids[i, : len(line)] = torch.tensor(line)
            mask[i, : len(line)] = 1
        batches.append((ids, mask, ids.masked_fill(mask == 0, -100)))
    return batches


def train_to_recite(model: torch.nn.Module, lines: list[list[int]], pad_id: int, steps: int, lr: float) -> float:
    """Train an HF causal LM in place on `lines` (token ids, each a separate sequence from position 0, ending
    in EOS) with AdamW and a one-cycle learning rate, full batch per step. Run it inside `deterministic_cpu`.
    Returns the last step's mean token loss. Runs on the model's device (CPU for the presets; CUDA in GPU tests)."""
    device = next(model.parameters()).device
    batches = [tuple(t.to(device) for t in batch) for batch in _micro_batches(lines, pad_id)]
    num_targets = sum(int((labels[:, 1:] != -100).sum()) for _, _, labels in batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        total = 0.0
        for ids, mask, labels in batches:
            weight = int((labels[:, 1:] != -100).sum()) / num_targets
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss * weight
            loss.backward()
            total += loss.item()
        optimizer.step()
        schedule.step()
    model.eval()
    return total
