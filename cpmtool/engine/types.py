"""Request and result types shared by every backend (native, vllm, openai).

Field names follow the OpenAI / vLLM sampling parameters so that a record's settings pass through
to any backend unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from cpmtool.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `temperature=0` is greedy.

    `logprobs=None` returns no log-probabilities; `logprobs=0` returns the sampled token's
    log-probability under the model (raw logits, temperature 1, before top-k/top-p filtering, as
    vLLM's default `raw_logprobs`), `logprobs=k` adds the k most likely tokens at each step.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self):
        problems = []
        if self.n < 1:
            problems.append(f"n must be >= 1 (got {self.n})")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1] (got {self.min_p})")
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1 (got {self.max_tokens})")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            problems.append(f"logprobs must be in [0, 20] (got {self.logprobs})")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if problems:
            raise ConfigError(problems)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_(self, **kw) -> SamplingParams:
        return replace(self, **kw)


@dataclass
class Request:
    """One prompt: text, chat messages, or token ids (exactly one). `id` is echoed in the result."""

    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_ids: list[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    id: str = ""

    def __post_init__(self):
        given = sum(x is not None for x in (self.prompt, self.messages, self.prompt_ids))
        if given != 1:
            raise ConfigError("a request needs exactly one of prompt, messages, prompt_ids")

    def encode(self, tokenizer) -> list[int]:
        """Prompt token ids: given ids as is, messages through the chat template, text without BOS."""
        if self.prompt_ids is not None:
            return list(self.prompt_ids)
        if self.messages is not None:
            from cpmtool.model.tokenizer import encode_chat

            return encode_chat(tokenizer, self.messages)
        return tokenizer.encode(self.prompt, add_special_tokens=False)


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    logprobs: list[float] | None = None  # per generated token
    top_logprobs: list[dict[int, float]] | None = None
    stop_reason: str | int | None = None  # the stop string or token that ended it (vLLM's field)


@dataclass
class Result:
    """The completions of one request. A request the backend refused on its own (a server's 400 for
    a prompt over its context, say) comes back with `error` set and no completions, so one bad
    record is a counted reject of the caller rather than the end of a whole batch."""

    id: str
    prompt_ids: list[int]
    completions: list[Completion]
    error: str | None = None

    @property
    def n_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def n_completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)
