"""Load safetensors shards into a model through each parameter's `weight_loader`.

The model maps checkpoint names to its parameters (`weight_target`: stacked q/k/v, gate/up,
experts); parameters that several checkpoint tensors fill list their parts in `shard_ids`.
Weight loaders get a `CheckpointTensor`, so a tensor-parallel rank reads only its slice.
"""
from __future__ import annotations

import os
from glob import glob

import torch
from safetensors import safe_open
from torch import nn


class CheckpointTensor:
    """One tensor of an open safetensors file, read on demand (`narrow` reads only that part)."""

    def __init__(self, handle: object, name: str) -> None:
        self._slice = handle.get_slice(name)
        self.shape = torch.Size(self._slice.get_shape())

    def size(self, dim: int) -> int:
        return self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if not 0 <= start <= start + length <= self.shape[dim]:
            raise ValueError(f"rows/columns [{start}, {start + length}) along dim {dim} are outside a tensor of shape {tuple(self.shape)}")
        return self._slice[(slice(None),) * dim + (slice(start, start + length),)]

    def read(self) -> torch.Tensor:
        return self._slice[:]


def materialize(loaded: torch.Tensor | CheckpointTensor) -> torch.Tensor:
    return loaded.read() if isinstance(loaded, CheckpointTensor) else loaded


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor | CheckpointTensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter of shape {tuple(param.shape)}")
    param.data.copy_(materialize(loaded))


def _expected_parts(model: nn.Module) -> set[tuple[str, object]]:
    """Every (parameter, shard) pair a complete checkpoint must fill."""
    return {(name, shard_id) for name, param in model.named_parameters() for shard_id in getattr(param, "shard_ids", (None,))}


def load_model(model: nn.Module, path: str) -> None:
    """Copy every tensor of `path/*.safetensors` into `model`.

    Raises FileNotFoundError when there are no shards, and ValueError naming the tensor when a
    checkpoint tensor has no parameter or does not fit it, or a parameter (or shard of a packed
    one) is never filled.
    A checkpoint's `lm_head.weight` is ignored when the model ties it to the embedding.
    """
    files = sorted(glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path!r}")
    params = dict(model.named_parameters())
    tied = getattr(model, "tie_word_embeddings", False)
    loaded: set[tuple[str, object]] = set()
    for file in files:
        with safe_open(file, "pt", "cpu") as f:
            for name in f.keys():
                if tied and name == "lm_head.weight":
                    continue
                target, shard_id = model.weight_target(name)
                param = params.get(target)
                if param is None:
                    raise ValueError(f"unexpected tensor {name!r} in {file!r}: the model has no parameter {target!r}")
                weight_loader = getattr(param, "weight_loader", default_weight_loader)
                tensor = CheckpointTensor(f, name)
                try:
                    if shard_id is None:
                        weight_loader(param, tensor)
                    else:
                        weight_loader(param, tensor, shard_id)
                except (ValueError, RuntimeError) as e:  # RuntimeError: narrowing a tensor that is too small
                    raise ValueError(f"tensor {name!r} of shape {tuple(tensor.shape)} in {file!r} does not fit parameter {target!r}: {e}") from e
                loaded.add((target, shard_id))
    missing = sorted(f"{name}" + (f" (shard {shard!r})" if shard is not None else "") for name, shard in _expected_parts(model) - loaded)
    if missing:
        raise ValueError(f"checkpoint {path!r} is missing tensors for: {', '.join(missing)}")
