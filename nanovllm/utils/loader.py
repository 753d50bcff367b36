"""Load safetensors shards into a model through each parameter's `weight_loader`.

The model maps checkpoint names to its parameters (`weight_target`: stacked q/k/v, gate/up,
experts); parameters that several checkpoint tensors fill list their parts in `shard_ids`.
Weight loaders get a `CheckpointTensor`, so a tensor-parallel rank reads only its slice.
`load_format="dummy"` reads no file: `fill_dummy_weights` gives every parameter random values.
"""
from __future__ import annotations

import math
import os
import zlib
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

    Precondition: the folder has shards (Config checks it). Raises ValueError naming the tensor when a
    checkpoint tensor has no parameter or does not fit it, or a parameter (or shard of a packed
    one) is never filled.
    A checkpoint's `lm_head.weight` is ignored when the model ties it to the embedding.
    """
    files = sorted(glob(os.path.join(path, "*.safetensors")))
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


# Dummy weights: RMSNorm weights in 1 +- _DUMMY_NORM_NOISE, biases in +- _DUMMY_BIAS, the rest in +- 1/sqrt(fan_in).
_DUMMY_NORM_NOISE = 0.1
_DUMMY_BIAS = 0.1


def fill_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Fill every parameter in place with uniform random values, on its own device (no file is read).

    For benchmarks of a model's shape (vLLM's load_format="dummy"). The scales keep bf16 activations
    O(1) through any depth and make the MoE router's logits spread (std about 0.6), so tokens reach
    many experts: 1-D weights (RMSNorm) 1 +- 0.1, biases +- 0.1, matrices (embeddings, projections,
    router, experts) +- 1/sqrt(fan_in), fan_in being the last dimension. Each parameter's generator
    is seeded from `seed` and its name, so the values do not depend on the order of the parameters
    and tensor-parallel ranks fill their replicated parameters alike.
    """
    for name, param in model.named_parameters():
        gen = torch.Generator(param.device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        if name.endswith("bias"):
            low, high = -_DUMMY_BIAS, _DUMMY_BIAS
        elif param.dim() == 1:
            low, high = 1 - _DUMMY_NORM_NOISE, 1 + _DUMMY_NORM_NOISE
        else:
            high = 1 / math.sqrt(param.shape[-1])
            low = -high
        param.data.uniform_(low, high, generator=gen)
