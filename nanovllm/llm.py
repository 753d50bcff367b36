"""The user-facing entry point."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.validation import chat_messages, require_text

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
        from jinja2 import TemplateError  # transformers renders chat templates with jinja2

        if not isinstance(messages, (list, tuple)) or not messages:
            raise TypeError(f"messages must be a non-empty list of messages or of conversations, got {messages!r}")
        if isinstance(messages[0], Mapping):
            conversations = [chat_messages(messages)]
        else:
            conversations = [chat_messages(conversation, f"messages[{i}]") for i, conversation in enumerate(messages)]
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, Mapping):
            raise TypeError(f"chat_template_kwargs must be a dict, got {chat_template_kwargs!r}")
        texts = []
        for i, conversation in enumerate(conversations):
            try:
                texts.append(self.tokenizer.apply_chat_template(
                    conversation, chat_template=chat_template, tokenize=False,
                    add_generation_prompt=add_generation_prompt, **dict(chat_template_kwargs or {}),
                ))
            except TemplateError as error:
                raise ValueError(f"the chat template failed on conversation {i}: {type(error).__name__}: {error}") from error
        for text in texts:
            require_text("a chat message", text)
        prompts = [self.tokenizer.encode(text, add_special_tokens=False) for text in texts]
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        for output, text in zip(outputs, texts):
            output.prompt = text
        return outputs
