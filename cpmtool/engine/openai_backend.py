"""The `openai` backend: any OpenAI-compatible server (vLLM, `cpmtool serve`, llama.cpp, OpenAI).

A request with `messages` goes to /v1/chat/completions, one with `prompt` or `prompt_ids` to
/v1/completions; `n` samples come back as the n choices of one call. Calls run on a thread pool
(`max_concurrency` in flight), and a call that fails with 429, a 5xx or a connection error is
retried with exponential backoff (honouring `Retry-After`). Other HTTP errors and an unreachable
server raise ModelError with one readable line, except the errors that concern one request only
(400, 413, 422: a prompt over the server's context, a bad parameter value): that request's Result
carries `error` and the others go on.

Token ids: OpenAI's API returns text only. With `vllm_fields` (the default except for
api.openai.com) the request also asks for vLLM's `return_token_ids` and
`return_tokens_as_token_ids`, so a vLLM server gives exact ids (and top-logprob keys as ids). A
server that ignores them (`cpmtool serve`, OpenAI) gives token strings: the completion's ids are
then the tokenizer's encoding of its text when a tokenizer is known (the `model` is a local model,
or `tokenizer=` is given), else empty, and top-logprob dicts are keyed by token string.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from urllib.parse import urlparse

from cpmtool.engine.types import Completion, Request, Result, SamplingParams
from cpmtool.errors import ConfigError, ModelError, require

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
# a refusal of this request's content; 401/403/404 (key, model name) concern every request and end the run
REQUEST_STATUS = frozenset({400, 413, 422})


class RequestRefused(ModelError):
    """The server refused one request (HTTP 400/413/422)."""


class OpenAIEngine:
    """Generation through an OpenAI-compatible HTTP server."""

    name = "openai"

    def __init__(self, api_base: str, model: str | None = None, api_key: str | None = None, *,
                 max_concurrency: int = 8, max_retries: int = 4, backoff: float = 0.5, timeout: float = 600.0,
                 vllm_fields: bool | None = None, tokenizer=None, **_ignored):
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1 (got {max_concurrency})")
        self.api_base = normalize_base(api_base)
        self.model = model
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        self.max_concurrency, self.max_retries, self.backoff = max_concurrency, max_retries, backoff
        self.vllm_fields = "api.openai.com" not in self.api_base if vllm_fields is None else vllm_fields
        self._tokenizer = tokenizer
        self._tokenizer_tried = tokenizer is not None
        self._lock = threading.Lock()
        httpx = require("httpx", purpose="the openai backend")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.Client(base_url=self.api_base, headers=headers,
                                    timeout=httpx.Timeout(timeout, connect=10.0),
                                    limits=httpx.Limits(max_connections=max_concurrency))

    # -- plumbing ------------------------------------------------------------------------------
    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def tokenizer(self):
        """The model's tokenizer when it is a local model (None for remote-only names)."""
        with self._lock:
            if not self._tokenizer_tried:
                self._tokenizer_tried = True
                if self.model:
                    from cpmtool.model.tokenizer import load_tokenizer

                    try:
                        self._tokenizer = load_tokenizer(self.model)
                    except Exception:  # not a local model: ids stay unknown
                        self._tokenizer = None
        return self._tokenizer

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        httpx = require("httpx")
        url = f"{self.api_base}{path}"
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                r = self._client.request(method, path, json=body)
            except httpx.TransportError as e:
                if last:
                    raise ModelError(f"cannot reach the OpenAI-compatible server at {self.api_base} "
                                     f"({_transport_reason(e)}; {attempt + 1} tries)") from e
                self._sleep(attempt, None)
                continue
            if r.status_code < 400:
                try:
                    return r.json()
                except ValueError as e:
                    raise ModelError(f"{url}: the server answered {r.status_code} with a body that is not JSON") from e
            if r.status_code in RETRY_STATUS and not last:
                self._sleep(attempt, r.headers.get("retry-after"))
                continue
            err = RequestRefused if r.status_code in REQUEST_STATUS else ModelError
            raise err(f"{url}: HTTP {r.status_code}: {_error_message(r)}"
                      + (f" (after {attempt + 1} tries)" if attempt else ""))
        raise AssertionError("unreachable")

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * (2 ** attempt) * (0.5 + random.random())
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), 60.0))
            except ValueError:
                pass
        time.sleep(delay)

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/models").get("data", [])]

    def _model_name(self) -> str:
        with self._lock:
            known = self.model
        if known:
            return known
        names = self.models()
        if not names:
            raise ModelError(f"{self.api_base}/models lists no model; pass --model")
        with self._lock:
            self.model = self.model or names[0]
            return self.model

    # -- one request ---------------------------------------------------------------------------
    def _body(self, req: Request, p: SamplingParams) -> tuple[str, dict]:
        body: dict = {"model": self._model_name(), "n": p.n, "temperature": p.temperature, "max_tokens": p.max_tokens}
        if p.top_p < 1:
            body["top_p"] = p.top_p
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        if self.vllm_fields:
            body["return_token_ids"] = True
            body["return_tokens_as_token_ids"] = p.logprobs is not None
        # vLLM's sampling extensions: sent only when they change something, since OpenAI rejects them
        if p.top_k > 0:
            body["top_k"] = p.top_k
        if p.min_p > 0:
            body["min_p"] = p.min_p
        if p.stop_token_ids:
            body["stop_token_ids"] = list(p.stop_token_ids)
        if p.ignore_eos:
            body["ignore_eos"] = True
        if req.messages is not None:
            body["messages"] = req.messages
            if p.logprobs is not None:
                body["logprobs"] = True
                body["top_logprobs"] = p.logprobs
            return "/chat/completions", body
        body["prompt"] = req.prompt if req.prompt is not None else list(req.prompt_ids)
        if p.logprobs is not None:
            body["logprobs"] = p.logprobs
        return "/completions", body

    def _one(self, req: Request, params: SamplingParams | None) -> Result:
        p = params or req.params
        path, body = self._body(req, p)
        try:
            data = self._request("POST", path, body)
        except RequestRefused as e:
            return Result(id=req.id, prompt_ids=[], completions=[], error=str(e))
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != p.n:
            raise ModelError(f"{self.api_base}{path}: expected {p.n} choices, the server returned {len(choices)}")
        comps = [self._completion(c, p, chat=path == "/chat/completions") for c in choices]
        prompt_ids = data.get("prompt_token_ids") or (choices[0].get("prompt_token_ids") if choices else None)
        if prompt_ids is None:
            prompt_ids = self._prompt_ids(req)
        return Result(id=req.id, prompt_ids=list(prompt_ids), completions=comps)

    def _completion(self, c: dict, p: SamplingParams, *, chat: bool) -> Completion:
        text = (c.get("message") or {}).get("content") if chat else c.get("text")
        text = text or ""
        lps = tops = None
        ids_from_lp: list[int | None] = []
        lp = c.get("logprobs")
        if p.logprobs is not None and lp:
            if chat:
                entries = lp.get("content") or []
                lps = [e.get("logprob") for e in entries]
                ids_from_lp = [_token_id(e.get("token")) for e in entries]
                tops = [{_key(t.get("token")): t.get("logprob") for t in e.get("top_logprobs") or []}
                        for e in entries]
            else:
                lps = list(lp.get("token_logprobs") or [])
                ids_from_lp = [_token_id(t) for t in lp.get("tokens") or []]
                tops = [{_key(t): v for t, v in (d or {}).items()} for d in lp.get("top_logprobs") or []]
            if not p.logprobs:
                tops = None
        token_ids = c.get("token_ids")
        if token_ids is None and ids_from_lp and all(i is not None for i in ids_from_lp):
            token_ids = ids_from_lp
        if token_ids is None:
            tok = self.tokenizer
            token_ids = tok.encode(text, add_special_tokens=False) if tok is not None and text else []
        finish = c.get("finish_reason") or "length"
        return Completion(index=int(c.get("index", 0)), text=text, token_ids=list(token_ids),
                          finish_reason=finish if finish in ("stop", "length") else finish,
                          logprobs=lps, top_logprobs=tops, stop_reason=c.get("stop_reason"))

    def _prompt_ids(self, req: Request) -> list[int]:
        if req.prompt_ids is not None:
            return list(req.prompt_ids)
        tok = self.tokenizer
        if tok is None:
            return []
        if req.messages is not None:
            from cpmtool.model.tokenizer import encode_chat

            try:
                return encode_chat(tok, req.messages)
            except ModelError:
                return []
        return tok.encode(req.prompt, add_special_tokens=False)

    # -- the engine interface ------------------------------------------------------------------
    def generate(self, requests: list[Request], params: SamplingParams | None = None) -> list[Result]:
        """Results in request order."""
        requests = list(requests)
        if not requests:
            return []
        with ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="openai") as pool:
            futures = [pool.submit(self._one, r, params) for r in requests]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def generate_stream(self, requests: Iterable[Request], params: SamplingParams | None = None) -> Iterator[Result]:
        """Results as they finish; the input is read lazily, 2 x max_concurrency calls ahead."""
        it = iter(requests)
        pending: set[Future] = set()
        with ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="openai") as pool:
            try:
                exhausted = False
                while True:
                    while not exhausted and len(pending) < 2 * self.max_concurrency:
                        nxt = next(it, None)
                        if nxt is None:
                            exhausted = True
                            break
                        pending.add(pool.submit(self._one, nxt, params))
                    if not pending:
                        return
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        yield f.result()
            finally:
                for f in pending:
                    f.cancel()


def normalize_base(api_base: str) -> str:
    """`http://host:8000` -> `http://host:8000/v1`; a given path (`.../v1`) is kept; no trailing slash."""
    if not api_base or "://" not in api_base:
        raise ConfigError(f"--api-base must be a URL like http://127.0.0.1:8000/v1 (got {api_base!r})")
    base = api_base.rstrip("/")
    if urlparse(base).path in ("", "/"):
        base += "/v1"
    return base


def _token_id(token: str | None) -> int | None:
    # vLLM's return_tokens_as_token_ids form
    if isinstance(token, str) and token.startswith("token_id:"):
        try:
            return int(token[len("token_id:"):])
        except ValueError:
            return None
    return None


def _key(token: str | None):
    tid = _token_id(token)
    return token if tid is None else tid


def _transport_reason(e) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


def _error_message(r) -> str:
    try:
        body = r.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return " ".join(str(msg).split())[:300]
    except ValueError:
        pass
    return " ".join(r.text.split())[:300] or r.reason_phrase
