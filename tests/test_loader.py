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
from nanovllm.config import Config
from nanovllm.layers.fused_moe import SparseMoeBlock, select_experts
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.testing import make_checkpoint
from nanovllm.utils.loader import fill_dummy_weights, load_model

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


# ---- load_format="dummy": a folder with config.json and tokenizer only -------------------------


@pytest.fixture(scope="module")
def config_only_moe(tmp_path_factory) -> str:
    return str(make_checkpoint(tmp_path_factory.mktemp("moe-config-only"), "tiny-qwen3-moe", weights=False))


def test_config_only_folder_has_the_checkpoints_config_and_no_weights(config_only_moe, tmp_path):
    full = make_checkpoint(tmp_path / "full", "tiny-qwen3-moe")
    folder = pathlib.Path(config_only_moe)
    assert not list(folder.glob("*.safetensors*"))
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (folder / name).read_text() == (full / name).read_text(), name


def test_auto_on_a_folder_without_weights_names_it(config_only_moe):
    with pytest.raises(ValueError, match=f"{config_only_moe}.*no \\*.safetensors.*load_format='dummy'"):
        make_llm(config_only_moe)
    with pytest.raises(ValueError, match="load_format must be one of"):
        Config(config_only_moe, load_format="random")


def test_dummy_fill_is_seeded_finite_and_spread(tiny_model):
    def filled(seed: int) -> dict[str, torch.Tensor]:
        model = build(tiny_model)
        fill_dummy_weights(model, seed)
        return dict(model.named_parameters())

    first, again, other = filled(0), filled(0), filled(1)
    for name, param in first.items():
        assert torch.isfinite(param).all() and param.std() > 0, name
        assert torch.equal(param, again[name]), name
        assert not torch.equal(param, other[name]), name
    assert first["model.norm.weight"].min() > 0.5 and first["model.layers.0.mlp.down_proj.weight"].abs().max() < 0.1


def routed_experts(llm) -> list[torch.Tensor]:
    """Records, per MoE layer and forward, the experts the router picks (a hook on each router)."""
    picks: list[torch.Tensor] = []
    for block in llm.model_runner.model.modules():
        if isinstance(block, SparseMoeBlock):
            block.gate.register_forward_hook(lambda m, args, logits, k=block.top_k: picks.append(select_experts(logits, k, True)[1]))
    return picks


def test_dummy_bf16_generates_finite_logits_through_48_layers_and_routes_to_every_expert(config_only_moe, tmp_path):
    deep = tmp_path / "deep"
    shutil.copytree(config_only_moe, deep)
    config = json.loads((deep / "config.json").read_text())
    config.update(num_hidden_layers=48, max_window_layers=48, mlp_only_layers=[])
    (deep / "config.json").write_text(json.dumps(config))
    prompts = [[3 + (7 * i + 13 * j) % 1800 for j in range(5 + i % 7)] for i in range(32)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    runs = []
    for _ in range(2):
        llm = make_llm(str(deep), load_format="dummy", dtype="bfloat16")
        picks = routed_experts(llm)
        runs.append(llm.generate(prompts, params, use_tqdm=False))
        llm.exit()
    assert [o["token_ids"] for o in runs[0]] == [o["token_ids"] for o in runs[1]]
    assert len({tuple(o["token_ids"]) for o in runs[0]}) > 16
    logprobs = torch.tensor([lp.logprob for o in runs[0] for step in o["logprobs"] for lp in step.values()])
    assert torch.isfinite(logprobs).all() and logprobs.std() > 0
    decode_picks = [ids for ids in picks if ids.shape[0] == len(prompts)]
    assert len(decode_picks) == 48 * 5
    # As uniform routing would: each expert gets about 1/8 of the picks, and every router spreads its 32 tokens.
    loads = torch.stack([torch.bincount(ids.flatten(), minlength=8) for ids in decode_picks])
    share = loads.sum(0) / loads.sum()
    assert share.min() > 0.09 and share.max() < 0.16, share
    assert (loads > 0).sum(1).min() >= 6 and loads.max() <= 20, loads


def test_dummy_tensor_parallel_gloo(config_only_moe):
    prompts = [[5, 17, 300, 42, 7], list(range(3, 60))]
    llm = make_llm(config_only_moe, load_format="dummy", tensor_parallel_size=2)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    llm.exit()
    assert [len(o["token_ids"]) for o in outputs] == [4, 4]
