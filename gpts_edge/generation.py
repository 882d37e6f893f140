"""Text in, text out, for any runtime: tokenizer + the shared sampling loop (numpy only)."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
from tokenizers import Tokenizer

from gpts_edge.config import ModelConfig
from gpts_edge.constants import DEFAULT_GENERATION
from gpts_edge.errors import GptsError
from gpts_edge.sampling import SamplingOptions, generate_tokens
from gpts_edge.tokenizer import EOT_ID, StreamDecoder


class Runtime(Protocol):
    """What every runtime supplies. ``step`` takes the new token ids (1-D int64) and returns the
    next-token logits (1-D float) and the updated cache; ``forward_logits`` scores whole
    sequences. Generation needs only ``new_cache``/``step``; eval, perplexity and parity use
    ``forward_logits``."""

    config: ModelConfig
    tokenizer: Tokenizer
    generation_config: dict[str, Any]

    def new_cache(self) -> Any: ...

    def step(self, tokens: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]: ...

    def forward_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits (batch, time, vocab) of whole sequences (scoring, parity); left padding via
        ``attention_mask``."""
        ...


def sampling_options(
    generation_config: dict[str, Any], *, greedy: bool = False, **overrides: Any
) -> SamplingOptions:
    """Defaults from generation_config.json, then explicit overrides (None = keep default)."""
    g = generation_config

    def field(key: str, kind: type) -> Any:
        value = g.get(key, DEFAULT_GENERATION[key])
        # bool is an int subclass; a JSON true/false here is a mistake, not 1/0.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            if value is None and kind is int:
                return 0
            raise GptsError(f"generation_config.json: field {key}: expected a number, found {value!r}")
        return kind(value)

    values = {
        "temperature": field("temperature", float) if g.get("do_sample", True) else 0.0,
        "top_k": field("top_k", int),
        "top_p": field("top_p", float),
        "repetition_penalty": field("repetition_penalty", float),
        "no_repeat_ngram_size": field("no_repeat_ngram_size", int),
        "max_new_tokens": field("max_new_tokens", int),
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    if greedy:
        values["temperature"] = 0.0
    return SamplingOptions(**values)


def generate_ids(
    rt: Runtime,
    prompt_ids: list[int],
    opts: SamplingOptions,
    *,
    seed: int = 0,
    warn: Callable[[str], None] | None = None,
) -> Iterator[int]:
    return generate_tokens(
        rt.step,
        rt.new_cache,
        prompt_ids,
        opts,
        context_length=rt.config.context_length,
        vocab_size=rt.config.vocab_size,
        eos_id=EOT_ID,
        seed=seed,
        warn=warn,
    )


def generate_text(
    rt: Runtime,
    prompt: str,
    opts: SamplingOptions,
    *,
    seed: int = 0,
    warn: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """Yield text pieces as tokens arrive (never splitting a UTF-8 character)."""
    if not isinstance(prompt, str):
        raise GptsError(f"prompt: expected text, found {type(prompt).__name__}")
    ids = rt.tokenizer.encode(prompt).ids if prompt else []
    dec = StreamDecoder(rt.tokenizer)
    for tok in generate_ids(rt, ids, opts, seed=seed, warn=warn):
        if tok == EOT_ID:
            break
        piece = dec.push(tok)
        if piece:
            yield piece
    rest = dec.flush()
    if rest:
        yield rest


class TextModel:
    """Text in, text out over any Runtime: ``generate`` and the streaming ``stream``, with the
    sampling defaults of the model's generation_config.json."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @property
    def config(self) -> ModelConfig:
        return self.runtime.config

    def stream(
        self,
        prompt: str = "",
        max_new_tokens: int | None = None,
        *,
        seed: int = 0,
        greedy: bool = False,
        **sampling: Any,
    ) -> Iterator[str]:
        """Yield text pieces as they are sampled."""
        opts = sampling_options(
            self.runtime.generation_config, greedy=greedy, max_new_tokens=max_new_tokens, **sampling
        )
        yield from generate_text(self.runtime, prompt, opts, seed=seed)

    def generate(self, prompt: str = "", max_new_tokens: int | None = None, **kwargs: Any) -> str:
        """The generated continuation of ``prompt`` (without the prompt)."""
        return "".join(self.stream(prompt, max_new_tokens, **kwargs))
