"""The user-facing entry point."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.validation import require_text

Conversation = Sequence[Mapping[str, object]]


class LLM(LLMEngine):
    """`LLM(model_dir, **config)`: see `nanovllm.config.Config` for the settings and
    `generate` / `stream` / `chat` for the API."""

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, object] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} messages) or a list of them.

        Each conversation is rendered with the tokenizer's chat template (or `chat_template`);
        `chat_template_kwargs` reach the template (e.g. {"enable_thinking": False} for Qwen3). The
        rendered text is tokenized without adding special tokens (the template has them). Returns one
        RequestOutput per conversation, whose `prompt` is the rendered text.
        """
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer; this LLM was created with skip_tokenizer_init=True")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TypeError(f"messages must be a non-empty list of messages or of conversations, got {messages!r}")
        conversations = [messages] if isinstance(messages[0], Mapping) else list(messages)
        for conversation in conversations:
            if not isinstance(conversation, (list, tuple)) or not all(isinstance(m, Mapping) for m in conversation):
                raise TypeError(f"a conversation must be a list of message dicts, got {conversation!r}")
        texts = [
            self.tokenizer.apply_chat_template(
                list(conversation), chat_template=chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt, **dict(chat_template_kwargs or {}),
            )
            for conversation in conversations
        ]
        for text in texts:
            require_text("a chat message", text)
        prompts = [self.tokenizer.encode(text, add_special_tokens=False) for text in texts]
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        for output, text in zip(outputs, texts):
            output.prompt = text
        return outputs
