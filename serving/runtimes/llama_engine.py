"""llama-cpp-python's ``Llama``, counting what it evaluates and samples.

Imported only when a GGUF model loads (``llama_cpp`` is the ``llm`` extra). The subclass
changes no decoding: it records how many tokens the engine sampled in the current
generation and whether the last one ended it (end of generation, which is no part of the
answer), so streamed answers report the same ``usage`` as llama.cpp's own non-streamed
ones. :meth:`CountingLlama.prompt_tokens` templates and tokenizes a request's prompt the
way ``create_chat_completion`` / ``create_completion`` do, to check it fits the context
before anything is generated.
"""

from __future__ import annotations

from typing import Any

import llama_cpp
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from serving.runtimes.generation import GenerationRequest
from shared.errors import InvalidInput


class CountingLlama(Llama):
    """A ``Llama`` that counts the tokens it samples."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sampled = 0
        self._last_token = -1
        template = self.metadata.get("tokenizer.chat_template")
        self._formatter: Jinja2ChatFormatter | None = None
        if template:
            eos, bos = self.token_eos(), self.token_bos()
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self._model.token_get_text(eos) if eos != -1 else "",
                bos_token=self._model.token_get_text(bos) if bos != -1 else "",
                stop_token_ids=[eos],
            )

    def begin(self, *, reuse_prefix: bool = False) -> None:
        """Start a new generation, and count it; from an empty context unless
        ``reuse_prefix``.

        With ``reuse_prefix`` llama.cpp keeps the key/value cache of the previous prompt's
        common prefix and evaluates only the rest (faster to the first token). Evaluating
        the rest in a different batch shape changes the logits in their last bits, so a
        greedy answer could then differ between two identical requests; without it every
        request gets the answer a fresh engine gives.
        """
        if not reuse_prefix:
            self.reset()
        self._sampled = 0
        self._last_token = -1

    def sample(self, *args: Any, **kwargs: Any) -> int:
        token = int(super().sample(*args, **kwargs))
        self._sampled += 1
        self._last_token = token
        return token

    def completion_tokens(self) -> int:
        """Tokens of the answer sampled since :meth:`begin` (the end-of-generation token aside)."""
        ended = self._last_token >= 0 and llama_cpp.llama_vocab_is_eog(
            self._model.vocab, self._last_token
        )
        return self._sampled - (1 if ended else 0)

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        """The prompt's tokens, templated and tokenized as the engine will."""
        if request.messages is not None:
            if self._formatter is None:
                raise InvalidInput("this model has no chat template: use /v1/completions")
            messages: list[Any] = [{"role": m.role, "content": m.content} for m in request.messages]
            result = self._formatter(messages=messages)
            tokens: list[int] = self.tokenize(
                result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True
            )
            return tokens
        prompt = request.prompt or ""
        if not prompt:
            return [self.token_bos()]
        add_bos = bool(self._model.add_bos_token()) and self.token_bos() != -1
        tokens = self.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        return ([self.token_bos()] if add_bos else []) + tokens
