"""Load safetensors shards into a model through each parameter's `weight_loader`."""
from __future__ import annotations

import os
from glob import glob

import torch
from safetensors import safe_open
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter of shape {tuple(param.shape)}")
    param.data.copy_(loaded)


def _expected_parts(model: nn.Module) -> set[tuple[str, object]]:
    """Every (parameter, shard) pair a complete checkpoint must fill."""
    mapping = getattr(model, "packed_modules_mapping", {})
    shards: dict[str, list[object]] = {}
    for packed, shard_id in mapping.values():
        shards.setdefault(packed, []).append(shard_id)
    expected = set()
    for name, _ in model.named_parameters():
        for shard_id in shards.get(name.split(".")[-2], [None]):
            expected.add((name, shard_id))
    return expected


def _target(name: str, mapping: dict[str, tuple[str, object]]) -> tuple[str, object]:
    for checkpoint_name, (packed, shard_id) in mapping.items():
        if f".{checkpoint_name}." in name:
            return name.replace(f".{checkpoint_name}.", f".{packed}."), shard_id
    return name, None


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
    mapping = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters())
    tied = getattr(model, "tie_word_embeddings", False)
    loaded: set[tuple[str, object]] = set()
    for file in files:
        with safe_open(file, "pt", "cpu") as f:
            for name in f.keys():
                if tied and name == "lm_head.weight":
                    continue
                target, shard_id = _target(name, mapping)
                param = params.get(target)
                if param is None:
                    raise ValueError(f"unexpected tensor {name!r} in {file!r}: the model has no parameter {target!r}")
                weight_loader = getattr(param, "weight_loader", default_weight_loader)
                tensor = f.get_tensor(name)
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
