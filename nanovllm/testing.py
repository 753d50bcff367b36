"""Deterministic maker of Hugging Face-format checkpoints with random weights, for every supported family.

Used by the tests (fp32 ``tiny*`` presets: Qwen3, Qwen2 with yarn, Llama with llama3 rope,
Mistral, Qwen3-MoE; ``tiny-trained``, a Qwen3 trained for a few seconds on the built-in text so
that it completes its sentences, for example.py and end-to-end tests) and by GPU benchmarks (real shapes with random bf16 weights: ``qwen3-0.6b``,
``qwen3-8b``, ``qwen2.5-7b``, ``llama-3.1-8b``, ``qwen3-30b-a3b``). Everything is built locally:
a byte-level BPE tokenizer trained on a small built-in text, ``config.json``,
``generation_config.json`` and the safetensors weights, written by transformers' own model
class. The same preset and seed always give byte-identical files. With ``weights=False``
(``--config-only``) only the config, generation config and tokenizer are written, in a second
even for a real-size preset: the engine runs such a folder with ``load_format="dummy"``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

from nanovllm.testing_training import deterministic_cpu, train_to_recite

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD_TOKEN_ID = 0  # The BPE trainer gives the special tokens the first ids, in this order.
EOS_TOKEN_ID = 2

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_QWEN_COMMON = {
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "use_cache": True,
    "use_sliding_window": False,
    "sliding_window": None,
    "bos_token_id": None,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": PAD_TOKEN_ID,
}
_QWEN3 = {**_QWEN_COMMON, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
_QWEN2 = {**_QWEN_COMMON, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
_QWEN3_MOE = {**_QWEN_COMMON, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "norm_topk_prob": True}
_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "rms_norm_eps": 1e-5,
    "bos_token_id": None,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": PAD_TOKEN_ID,
}
_MISTRAL = {**_LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
del _MISTRAL["attention_bias"], _MISTRAL["mlp_bias"]
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
# The tiny presets' shape: small enough for fp32 CPU tests, with GQA (4 query heads, 2 KV heads).
_TINY = {
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "max_window_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}
# Tiny long-context presets scale rope past an original context of 64 tokens (tests run beyond it).
TINY_ORIGINAL_CONTEXT = 64

PRESETS: dict[str, dict] = {
    "tiny": {**_QWEN3, **_TINY},
    "tiny-trained": {**_QWEN3, **_TINY},
    "tiny-qwen2": {
        **_QWEN2, **_TINY, "tie_word_embeddings": False,
        "max_position_embeddings": 8 * TINY_ORIGINAL_CONTEXT,
        "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": TINY_ORIGINAL_CONTEXT},
    },
    "tiny-llama": {
        **_LLAMA, **_TINY, "head_dim": 32, "rope_theta": 10000.0,
        "rope_scaling": {**_LLAMA3_ROPE, "original_max_position_embeddings": TINY_ORIGINAL_CONTEXT},
    },
    "tiny-mistral": {**_MISTRAL, **_TINY, "tie_word_embeddings": False, "rope_theta": 10000.0, "sliding_window": 4096},
    "tiny-qwen3-moe": {
        **_QWEN3_MOE, **_TINY, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
        "decoder_sparse_step": 1, "mlp_only_layers": [1],
    },
    "qwen3-0.6b": {
        **_QWEN3, "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "max_window_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    },
    "qwen3-8b": {
        **_QWEN3, "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
        "max_window_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "qwen2.5-7b": {
        **_QWEN2, "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "max_window_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "llama-3.1-8b": {
        **_LLAMA, "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "rope_scaling": {**_LLAMA3_ROPE, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "qwen3-30b-a3b": {
        **_QWEN3_MOE, "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_hidden_layers": 48, "max_window_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": 40960, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
}

# Presets trained on TRAINING_TEXT (steps, peak learning rate) from transformers' own initialisation,
# instead of random weights: they complete the text's sentences (about 10 s on one CPU thread).
TRAINED_PRESETS: dict[str, tuple[int, float]] = {"tiny-trained": (60, 5e-3)}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Target size of the trained BPE vocabulary (special tokens included); below every preset's vocab_size.
_BPE_VOCAB_SIZE = 1900
# Init scales (see _init_weights): the std of the final logits over the vocabulary, the noise
# on RMSNorm weights around 1, the gain of the projections that write into the residual stream,
# and the scale of the q/k RMSNorm weights (sharper attention makes outputs depend on context).
_LOGIT_STD = 4.0
_NORM_NOISE = 0.1
_RESIDUAL_GAIN = 4.0
_QK_NORM_SCALE = 2.0
# Embedding rows the tokenizer never produces are shrunk so the model practically never emits them.
_UNUSED_ROW_SCALE = 0.05
# Std of the biases (Qwen2's q/k/v) and gain of the MoE router (its logits' std over the experts).
_BIAS_STD = 0.1
_ROUTER_GAIN = 2.0
# Elements generated per step when filling a tensor, to bound fp32 scratch memory.
_CHUNK_ELEMENTS = 1 << 24

TRAINING_TEXT = """\
An inference engine turns a trained language model into a service that answers requests.
The engine loads the weights, reads the prompt, and produces one token at a time.
Each new token depends on every token before it, so the engine keeps a key-value cache.
The KV cache stores the keys and values of past tokens; without it, every step would recompute the whole prompt.
Memory for the cache is split into fixed-size blocks, for example 256 tokens per block.
A block table maps the logical positions of a sequence to physical blocks on the GPU.
When two requests share the same prefix, they can share the same blocks: this is called prefix caching.
The scheduler decides which sequences run in the next step.
During prefill, the engine processes the whole prompt in one forward pass.
During decode, it processes a single new token for each running sequence.
If the cache runs out of free blocks, the scheduler preempts a sequence and frees its blocks.
Batching many sequences together keeps the GPU busy and raises the throughput.
Throughput is measured in tokens per second; latency is measured in milliseconds.
A small model with 0.6 billion parameters fits easily on one GPU with 80 GB of memory.
Greedy decoding always picks the token with the highest probability.
Sampling draws the next token from the distribution, shaped by the temperature, top-k and top-p.
With temperature 0.7 the output is more varied; with temperature 0 it becomes greedy.
The model stops when it emits the end-of-sequence token or reaches max_tokens.
Rotary position embeddings rotate the queries and keys by an angle that grows with the position.
RMSNorm divides each vector by its root mean square and multiplies it by a learned weight.
Grouped-query attention lets several query heads share one key head and one value head.
The feed-forward block uses SiLU: down(silu(gate(x)) * up(x)).
CUDA graphs capture the decode step once and replay it with very little CPU overhead.
Tensor parallelism splits each weight matrix across 2, 4 or 8 GPUs.
Numbers: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096.
More numbers: 3.14159, 2.71828, 1e-6, 100%, 42 tokens, 1,000,000 requests, 12:30, 2024-05-17.
Punctuation: commas, periods. Questions? Answers! Quotes "like this" and 'like that'; (parentheses) [brackets] {braces}.
Symbols: + - * / = < > & | ^ ~ # @ $ % _ \\ ` ...
Code: def forward(self, x): return self.lm_head(self.norm(x))
Code: for i in range(len(tokens)): print(i, tokens[i])
Code: if seq.is_finished and not seq.ignore_eos: scheduler.free(seq)
Hello, world! How are you today? I am fine, thank you.
The quick brown fox jumps over the lazy dog. The dog sleeps in the warm sun.
Once upon a time, there was a small engine that wanted to run a very large model.
It read the config, counted the layers, and allocated the cache before the first request arrived.
Users sent prompts in English, in Chinese, and sometimes in code.
The engine answered them all, one token after another, until the end of the text.
Write a short poem about the sea. Explain how attention works. List three prime numbers: 2, 3, 5.
What is the capital of France? Paris is the capital of France.
Tokens are pieces of text: words, parts of words, spaces, digits and symbols.
A byte-level tokenizer can encode any string, because every byte has its own token.
Merges join frequent pairs of bytes into longer tokens, such as "the", "ing" and " engine".
推理引擎把训练好的语言模型变成可以回答请求的服务。
引擎先加载权重，再读取提示词，然后一次生成一个词元。
每个新的词元都依赖之前的所有词元，所以引擎需要保存键值缓存。
键值缓存被切分成固定大小的块，例如每块二百五十六个词元。
块表把序列的逻辑位置映射到显卡上的物理块。
当两个请求有相同的前缀时，它们可以共享同样的缓存块，这叫做前缀缓存。
调度器决定下一步运行哪些序列。
在预填充阶段，引擎一次处理整个提示词；在解码阶段，每个序列只处理一个新词元。
如果缓存块不够用，调度器会抢占一个序列并释放它的块。
把很多序列放在一起批处理，可以让显卡保持忙碌，提高吞吐量。
吞吐量用每秒词元数来衡量，延迟用毫秒来衡量。
贪心解码总是选择概率最高的词元；采样则根据温度从分布中抽取下一个词元。
当模型输出结束符或者达到最大长度时，生成就会停止。
旋转位置编码按照位置旋转查询向量和键向量。
分组查询注意力让多个查询头共享同一个键头和值头。
今天天气很好，我们去公园散步吧。你好，世界！你今天过得怎么样？
我喜欢读书、写代码和听音乐。这个问题很有意思，我们一起来想一想。
中国的首都是北京，法国的首都是巴黎。一年有十二个月，一周有七天。
数字：一、二、三、四、五、六、七、八、九、十、百、千、万、亿。
小明有三个苹果，小红给了他两个，现在他一共有五个苹果。
请用一句话解释什么是人工智能。人工智能是让机器像人一样思考和学习的技术。
大语言模型可以写文章、翻译句子、回答问题，也可以帮助程序员写代码。
学而时习之，不亦说乎？有朋自远方来，不亦乐乎？
春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。
床前明月光，疑是地上霜。举头望明月，低头思故乡。
这台服务器有八块显卡，每块显卡有八十吉字节的显存。
模型有二十八层，每层有十六个注意力头和八个键值头。
“引号”、《书名号》、（括号）、【方括号】……还有——破折号。
User: 你好！ Assistant: 你好，有什么可以帮你的吗？
User: Please translate "inference engine" into Chinese. Assistant: 推理引擎。
User: 请把“键值缓存”翻译成英文。 Assistant: KV cache.
"""


def _check_choice(name: str, value: object, choices: dict) -> None:
    """Raise ValueError naming ``value`` when it is not one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid values: {', '.join(sorted(choices))}")


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE on TRAINING_TEXT and return it serialised (tokenizer.json text)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    return tokenizer.to_str()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Return the checkpoint tokenizer: byte-level BPE with ChatML special tokens and template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )


def _fill_normal(tensor: torch.Tensor, std: float, gen: torch.Generator, mean: float = 0.0) -> None:
    """Fill ``tensor`` in place with N(mean, std^2), row-chunk by row-chunk from ``gen`` (bounded fp32 scratch)."""
    rows = tensor.view(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.view(1, -1)
    step = max(1, _CHUNK_ELEMENTS // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step]
        chunk.copy_(torch.empty(chunk.shape, dtype=torch.float32).normal_(mean, std, generator=gen))


def _init_weights(model: torch.nn.Module, seed: int, num_tokens: int) -> None:
    """Fill an HF model's parameters in place with random weights that make a usable test model.

    Projections reading a normalised input get std 1/sqrt(fan_in); those writing into the residual
    stream (o_proj, down_proj, experts' down projections) get _RESIDUAL_GAIN times that, so the
    layers outweigh the input embedding and the model does not merely echo its input. The vocab
    matrices make the final logits spread with std of about _LOGIT_STD; rows the tokenizer never
    produces are shrunk. RMSNorm weights are 1 plus noise (q/k norms scaled by _QK_NORM_SCALE for
    sharper attention); biases and the MoE router are noise large enough to matter.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        data, fan_in = param.data, param.shape[-1]
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            _fill_normal(data, _LOGIT_STD / math.sqrt(fan_in), gen)
            data[num_tokens:] *= _UNUSED_ROW_SCALE
        elif name.endswith("norm.weight"):
            scale = _QK_NORM_SCALE if name.endswith(("q_norm.weight", "k_norm.weight")) else 1.0
            _fill_normal(data, scale * _NORM_NOISE, gen, mean=scale)
        elif name.endswith("bias"):
            _fill_normal(data, _BIAS_STD, gen)
        elif name.endswith("mlp.gate.weight"):
            _fill_normal(data, _ROUTER_GAIN / math.sqrt(fan_in), gen)
        else:
            gain = _RESIDUAL_GAIN if "o_proj" in name or "down_proj" in name else 1.0
            _fill_normal(data, gain / math.sqrt(fan_in), gen)


def build_config(cfg: dict) -> PretrainedConfig:
    """transformers' config for a preset dict (its torch_dtype is the dtype the model is built in)."""
    return AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "torch_dtype"})


def build_model(cfg: dict, dtype: torch.dtype, seed: int, num_tokens: int) -> torch.nn.Module:
    """transformers' own model class for ``cfg`` with random weights, each allocated once (built on
    the meta device, then given storage and filled in place)."""
    config = build_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _init_weights(model, seed, num_tokens)
    return model


def build_trained_model(cfg: dict, seed: int, tokenizer: PreTrainedTokenizerFast, steps: int, lr: float) -> torch.nn.Module:
    """transformers' own model class for ``cfg``, initialised its own way from ``seed``, then trained on
    TRAINING_TEXT's lines (each one sequence ending in EOS), deterministically on one CPU thread."""
    config = build_config(cfg)
    lines = [tokenizer.encode(line) + [EOS_TOKEN_ID] for line in TRAINING_TEXT.splitlines() if line.strip()]
    with deterministic_cpu(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        train_to_recite(model, lines, PAD_TOKEN_ID, steps, lr)
    return model.to(DTYPES[cfg["torch_dtype"]])


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def make_checkpoint(
    path: str | os.PathLike, preset: str = "tiny", seed: int = 0, dtype: str | None = None, eos_token_ids: list[int] | None = None,
    weights: bool = True,
) -> pathlib.Path:
    """Write a checkpoint folder (config, generation config, tokenizer, weights) to ``path``.

    ``preset`` is a key of PRESETS; ``dtype`` ("float32", "bfloat16" or "float16") overrides the
    preset's torch_dtype; ``eos_token_ids`` (default: the tokenizer's) go to generation_config.json.
    The weights are written by transformers' own model class (``save_pretrained``, shards of at
    most 4 GB); with ``weights=False`` none are written and config.json is the one they would come
    with (for ``load_format="dummy"``). Returns the folder path. Same arguments give byte-identical files (for a trained
    preset: on the same CPU and torch build, as floating-point training depends on both).
    """
    _check_choice("preset", preset, PRESETS)
    if dtype is not None:
        _check_choice("dtype", dtype, DTYPES)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    cfg = dict(PRESETS[preset])
    if dtype is not None:
        cfg["torch_dtype"] = dtype

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out, save_jinja_files=False)
    if not weights:
        config = build_config(cfg)
        config.dtype = DTYPES[cfg["torch_dtype"]]
        config.save_pretrained(out)
    elif preset in TRAINED_PRESETS:
        build_trained_model(cfg, seed, tokenizer, *TRAINED_PRESETS[preset]).save_pretrained(out, max_shard_size="4GB")
    else:
        build_model(cfg, DTYPES[cfg["torch_dtype"]], seed, len(tokenizer)).save_pretrained(out, max_shard_size="4GB")
    eos = EOS_TOKEN_ID if eos_token_ids is None else list(eos_token_ids)
    _write_json(out / "generation_config.json", {"bos_token_id": None, "eos_token_id": eos, "pad_token_id": PAD_TOKEN_ID})
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m nanovllm.testing DIR [--preset P] [--seed N] [--dtype D] [--config-only]``."""
    parser = argparse.ArgumentParser(prog="python -m nanovllm.testing", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="output folder (created if missing)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="override the preset's torch_dtype")
    parser.add_argument("--config-only", action="store_true", help="no weights: config, generation config and tokenizer (for load_format='dummy')")
    args = parser.parse_args(argv)
    print(make_checkpoint(args.dir, args.preset, args.seed, args.dtype, weights=not args.config_only))


if __name__ == "__main__":
    main()
