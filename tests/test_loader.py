"""Checkpoint loading: every tensor lands in its (packed) parameter; bad checkpoints fail naming the tensor."""
from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from conftest import make_llm

from nanovllm import SamplingParams
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.utils.loader import load_model

Q_DIM, KV_DIM, HIDDEN, INTER = 4 * 64, 2 * 64, 128, 256


@pytest.fixture(scope="module")
def weights(tiny_model) -> dict[str, torch.Tensor]:
    return load_file(pathlib.Path(tiny_model) / "model.safetensors")


def variant(tiny_model: str, folder: pathlib.Path, shards: list[dict[str, torch.Tensor]], **config_changes: object) -> str:
    """A copy of the tiny checkpoint folder with other weights (one file per shard) and config."""
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        config.update(config_changes)
        (folder / "config.json").write_text(json.dumps(config))
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"))
    else:
        index = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name))
            index.update(dict.fromkeys(shard, name))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return str(folder)


def build(path: str) -> Qwen3ForCausalLM:
    model = Qwen3ForCausalLM(AutoConfig.from_pretrained(path), 64)
    for param in model.parameters():
        param.data.fill_(float("nan"))
    return model


def loaded(path: str) -> Qwen3ForCausalLM:
    model = build(path)
    load_model(model, path)
    return model


def assert_matches_checkpoint(model: Qwen3ForCausalLM, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for i in range(2):
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        qkv = torch.cat([weights[attn + f"{x}_proj.weight"] for x in "qkv"])
        assert torch.equal(params[attn + "qkv_proj.weight"], qkv)
        gate_up = torch.cat([weights[mlp + "gate_proj.weight"], weights[mlp + "up_proj.weight"]])
        assert torch.equal(params[mlp + "gate_up_proj.weight"], gate_up)
    for name, tensor in weights.items():
        if name in params:
            assert torch.equal(params[name], tensor), name
    assert all(not p.isnan().any() for p in model.parameters())


def test_every_tensor_lands_in_its_parameter(tiny_model, weights):
    model = loaded(tiny_model)
    assert_matches_checkpoint(model, weights)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("name, part", [
    ("model.layers.1.self_attn.k_proj.weight", "qkv_proj.weight (shard 'k')"),
    ("model.layers.0.mlp.up_proj.weight", "gate_up_proj.weight (shard 1)"),
    ("model.norm.weight", "model.norm.weight"),
    ("model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.q_norm.weight"),
])
def test_missing_tensor(tiny_model, weights, tmp_path, name, part):
    path = variant(tiny_model, tmp_path / "ckpt", [{k: v for k, v in weights.items() if k != name}])
    with pytest.raises(ValueError, match="missing") as info:
        loaded(path)
    assert part in str(info.value)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.extra_proj.weight", "model.layers.2.input_layernorm.weight", "lm_head.bias"])
def test_unexpected_tensor(tiny_model, weights, tmp_path, name):
    path = variant(tiny_model, tmp_path / "ckpt", [{**weights, name: torch.zeros(HIDDEN)}])
    with pytest.raises(ValueError, match=f"unexpected tensor '{name}'"):
        loaded(path)


@pytest.mark.parametrize("name, shape", [
    ("model.norm.weight", (HIDDEN - 1,)),
    ("model.layers.0.self_attn.k_norm.weight", (HIDDEN,)),
    ("model.layers.0.self_attn.q_proj.weight", (Q_DIM, HIDDEN + 1)),
    ("model.layers.0.self_attn.k_proj.weight", (KV_DIM - 64, HIDDEN)),
    ("model.layers.1.self_attn.v_proj.weight", (KV_DIM, 2 * HIDDEN)),
    ("model.layers.1.mlp.gate_proj.weight", (INTER // 2, HIDDEN)),
    ("model.layers.1.mlp.down_proj.weight", (HIDDEN, INTER - 1)),
    ("model.embed_tokens.weight", (2047, HIDDEN)),
    ("model.layers.0.self_attn.q_proj.weight", (Q_DIM + 64, HIDDEN)),
    ("model.layers.1.mlp.down_proj.weight", (HIDDEN, INTER + 8)),
])
def test_wrong_shape_names_the_tensor(tiny_model, weights, tmp_path, name, shape):
    path = variant(tiny_model, tmp_path / "ckpt", [{**weights, name: torch.zeros(shape)}])
    with pytest.raises(ValueError, match=name):
        loaded(path)


def test_no_weights(tiny_model, tmp_path):
    path = variant(tiny_model, tmp_path / "ckpt", [{}])
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        loaded(path)


def test_sharded_checkpoint_loads_the_same(tiny_model, weights, tmp_path):
    names = sorted(weights)
    shards = [{k: weights[k] for k in names[::2]}, {k: weights[k] for k in names[1::2]}]
    assert any(".q_proj." in k for k in shards[0]) and any(".k_proj." in k for k in shards[1]), "a packed parameter spans both shards"
    path = variant(tiny_model, tmp_path / "sharded", shards)
    assert_matches_checkpoint(loaded(path), weights)
    prompts = [[5, 17, 300, 42, 7], list(range(3, 80))]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    original = make_llm(tiny_model, num_kvcache_blocks=64).generate(prompts, params, use_tqdm=False)
    sharded = make_llm(path, num_kvcache_blocks=64).generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in sharded] == [o["token_ids"] for o in original]


def test_tied_model_ignores_a_checkpoint_lm_head(tiny_model, weights, tmp_path):
    stray = torch.randn_like(weights["model.embed_tokens.weight"])
    path = variant(tiny_model, tmp_path / "ckpt", [{**weights, "lm_head.weight": stray}])
    model = loaded(path)
    assert_matches_checkpoint(model, weights)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, weights["model.embed_tokens.weight"])


def test_untied_model_needs_its_own_lm_head(tiny_model, weights, tmp_path):
    head = torch.randn_like(weights["model.embed_tokens.weight"])
    path = variant(tiny_model, tmp_path / "untied", [{**weights, "lm_head.weight": head}], tie_word_embeddings=False)
    model = loaded(path)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, head)
    assert torch.equal(model.model.embed_tokens.weight, weights["model.embed_tokens.weight"])
    missing = variant(tiny_model, tmp_path / "untied_missing", [weights], tie_word_embeddings=False)
    with pytest.raises(ValueError, match="missing tensors for: lm_head.weight"):
        loaded(missing)
