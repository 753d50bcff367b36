"""Tests for nanovllm.testing: the tiny Qwen3 checkpoint loads in Hugging Face and is deterministic."""

import json
import pathlib

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, Qwen3ForCausalLM

from nanovllm.testing import main, make_checkpoint

TEXTS = [
    "Hello, world! The KV cache has 256 tokens per block; throughput = 1,234.5 tok/s.",
    "推理引擎把训练好的语言模型变成可以回答请求的服务。你好，世界！",
    "mixed 中英文 text\twith  spaces\nand newlines, émoji 😀, and unseen words: zyxwvut 鑫龘",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_config_and_generation_config(tiny: pathlib.Path) -> None:
    cfg = AutoConfig.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    assert cfg.model_type == "qwen3"
    assert cfg.architectures == ["Qwen3ForCausalLM"]
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim) == (2048, 128, 2, 64)
    assert cfg.tie_word_embeddings is True
    assert cfg.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert cfg.pad_token_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert cfg.bos_token_id is None and tok.bos_token_id is None
    assert len(tok) < cfg.vocab_size
    gen = GenerationConfig.from_pretrained(tiny)
    assert gen.eos_token_id == tok.eos_token_id
    assert not gen.do_sample
    assert set(json.loads((tiny / "generation_config.json").read_text())) == {
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    }


def test_hf_model_loads_and_generates(tiny: pathlib.Path) -> None:
    model, info = Qwen3ForCausalLM.from_pretrained(tiny, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32
    with safe_open(tiny / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert len(names) == 2 + 11 * 2
    tok = AutoTokenizer.from_pretrained(tiny)
    ids = tok(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, :, : len(tok)]
        out = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :]
    assert torch.isfinite(logits).all()
    assert logits.std(-1).min() > 2.0
    top2 = logits.topk(2, -1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
    assert len(out) == 16 and tok.eos_token_id not in out[:4].tolist()
    assert (out < len(tok)).all()


def test_deterministic(tmp_path: pathlib.Path) -> None:
    a = make_checkpoint(tmp_path / "a", seed=3)
    b = make_checkpoint(tmp_path / "b", seed=3)
    c = make_checkpoint(tmp_path / "c", seed=4)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_tokenizer_round_trip(tiny: pathlib.Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny)
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert len(tok.encode("The inference engine")) < len("The inference engine") / 2
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"


def test_chat_template(tiny: pathlib.Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(messages, tokenize=False) == text.removesuffix("<|im_start|>assistant\n")
    assert tok.encode("<|im_start|>")[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_dtype_override_and_cli(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path / "bf16"), "--preset", "tiny", "--seed", "1", "--dtype", "bfloat16"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-mistral"])
def test_untied_preset_writes_lm_head(tmp_path: pathlib.Path, preset: str) -> None:
    with safe_open(make_checkpoint(tmp_path, preset) / "model.safetensors", "pt") as f:
        assert f.get_slice("lm_head.weight").get_shape() == [2048, 128]


def test_moe_preset_stores_experts_one_by_one(tmp_path: pathlib.Path) -> None:
    with safe_open(make_checkpoint(tmp_path, "tiny-qwen3-moe") / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert {f"model.layers.0.mlp.experts.{e}.{p}_proj.weight" for e in range(8) for p in ("gate", "up", "down")} <= names
    assert "model.layers.0.mlp.gate.weight" in names and "model.layers.1.mlp.gate_proj.weight" in names


def test_bad_arguments(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="'huge'.*qwen3-0.6b, qwen3-30b-a3b, qwen3-8b, tiny"):
        make_checkpoint(tmp_path, preset="huge")
    with pytest.raises(ValueError, match="'int8'"):
        make_checkpoint(tmp_path, dtype="int8")
    with pytest.raises(TypeError, match="seed"):
        make_checkpoint(tmp_path, seed="0")  # type: ignore[arg-type]


@pytest.mark.parametrize("preset, billions", [
    ("qwen3-0.6b", 0.596), ("qwen3-8b", 8.19), ("qwen2.5-7b", 7.62), ("llama-3.1-8b", 8.03), ("qwen3-30b-a3b", 30.5),
])
def test_real_size_presets_have_the_published_parameter_counts(preset: str, billions: float) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from nanovllm.testing import PRESETS

    config = AutoConfig.for_model(**{k: v for k, v in PRESETS[preset].items() if k != "torch_dtype"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.01)
