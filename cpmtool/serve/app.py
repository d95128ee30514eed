"""`cpmtool serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the native engine.

Endpoints (the surface vLLM implements): `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions` (`stream: true` as server-sent events ending in `data: [DONE]`), `GET
/health` (200 while the engine thread lives, 503 after it died), `GET /metrics` (Prometheus text,
vLLM's metric names), `GET /ping`, `GET /version`. With an API key every `/v1` route wants
`Authorization: Bearer <key>`; `/health` and `/metrics` stay open, as in vLLM.

Requests run through one continuous-batching Scheduler in a background thread
(`cpmtool.serve.scheduler`): a request that arrives while others decode joins the batch at the next
step. A client that disconnects has its sequences aborted, which frees their batch rows.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import orjson
from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cpmtool import __version__
from cpmtool.engine.types import SamplingParams
from cpmtool.errors import ConfigError, CpmtoolError
from cpmtool.serve.detokenize import TextStream
from cpmtool.serve.metrics import Metrics
from cpmtool.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from cpmtool.serve.scheduler import EngineLoop, RequestStream, Token


def _json(obj, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def _sse(obj) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


@dataclass
class _Seq:
    """What a handler accumulates for one sequence."""

    text: TextStream
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float] | None] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    final_text: str | None = None


class Server:
    """The served model and its handlers; `app` is the FastAPI application."""

    def __init__(self, engine, *, model_name: str, max_model_len: int, api_key: str | None = None,
                 default_max_tokens: int = 1024, root: str | None = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.root = root or model_name
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens
        self.api_key = api_key
        self.vocab_size = engine.model.config.vocab_size
        self.created = int(time.time())
        self.metrics = Metrics(model_name, max_model_len)
        self.loop = EngineLoop(engine, max_len=max_model_len, metrics=self.metrics)
        self.app = self._build()

    # -- application ----------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app):
            self.loop.start()
            try:
                yield
            finally:
                self.loop.stop()

        app = FastAPI(title="cpmtool serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)

        @app.exception_handler(ApiError)
        async def _api_error(request, exc: ApiError):
            return _json(exc.body(), exc.status)

        @app.exception_handler(RequestValidationError)
        async def _invalid(request, exc: RequestValidationError):
            return _json(_validation_error(exc).body(), 400)

        @app.exception_handler(StarletteHTTPException)
        async def _http(request, exc: StarletteHTTPException):
            return _json(ApiError(str(exc.detail), exc.status_code).body(), exc.status_code)

        auth = [Depends(self._check_auth)]
        app.get("/v1/models", dependencies=auth)(self.models)
        app.post("/v1/completions", dependencies=auth)(self.completions)
        app.post("/v1/chat/completions", dependencies=auth)(self.chat_completions)
        app.get("/health")(self.health)
        app.get("/ping")(self.health)
        app.post("/ping")(self.health)
        app.get("/metrics")(self.prometheus)
        app.get("/version")(self.version)
        return app

    async def _check_auth(self, request: HttpRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError("Incorrect or missing API key: send `Authorization: Bearer <key>`", 401,
                           code="invalid_api_key")

    # -- simple routes -------------------------------------------------------------------------------
    async def models(self):
        return _json({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "cpmtool",
            "root": self.root, "parent": None, "max_model_len": self.max_model_len}]})

    async def health(self):
        if not self.loop.alive:
            err = self.loop.error
            raise ApiError(f"engine is not running{f': {err}' if err else ''}", 503)
        return Response(status_code=200)

    async def prometheus(self):
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def version(self):
        return _json({"version": __version__})

    # -- request preparation ---------------------------------------------------------------------
    def _check_common(self, body) -> None:
        if body.model is not None and body.model not in (self.model_name, self.root):
            raise ApiError(f"The model `{body.model}` does not exist (this server serves `{self.model_name}`).",
                           404, param="model", code="model_not_found")
        bad = body.unsupported()
        if bad:
            raise ApiError(f"unsupported parameter(s): {', '.join(bad)} (leave them unset or at their defaults)",
                           400, param=bad[0])

    def _params(self, body, prompt_len: int, max_tokens: int | None, logprobs: int | None, what: str
                ) -> SamplingParams:
        if prompt_len == 0:
            raise ApiError(f"the {what} is empty", 400, param=what)
        if prompt_len >= self.max_model_len:
            raise ApiError(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                           f"{what} has {prompt_len} tokens. Please reduce the length of the {what}.", 400,
                           param=what, code="context_length_exceeded")
        if max_tokens is None:  # chat without a limit: the server default, clipped to the context
            max_tokens = min(self.default_max_tokens, self.max_model_len - prompt_len)
        if prompt_len + max_tokens > self.max_model_len:
            raise ApiError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                           f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} "
                           f"in the completion). Please reduce the length of the {what} or max_tokens.", 400,
                           param="max_tokens", code="context_length_exceeded")
        if body.stop_token_ids and any(not 0 <= t < self.vocab_size for t in body.stop_token_ids):
            raise ApiError(f"stop_token_ids must be in [0, {self.vocab_size})", 400, param="stop_token_ids")
        try:
            return SamplingParams(
                n=body.n, temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=max(body.top_k or 0, 0),
                min_p=body.min_p or 0.0, max_tokens=max_tokens, stop=body.stops(),
                stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
                seed=body.seed, logprobs=logprobs)
        except ConfigError as e:
            raise ApiError(str(e), 400) from e

    def _completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str):
            prompts = [p]
        elif not p:
            raise ApiError("prompt must not be empty", 400, param="prompt")
        elif all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = list(p)
        out = []
        for x in prompts:
            if isinstance(x, str):
                out.append(self.tokenizer.encode(x, add_special_tokens=False))
            else:
                if any(not 0 <= t < self.vocab_size for t in x):
                    raise ApiError(f"prompt token ids must be in [0, {self.vocab_size})", 400, param="prompt")
                out.append(list(x))
        return out

    def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        from cpmtool.model.tokenizer import encode_chat

        messages = []
        for i, m in enumerate(body.messages):
            content = m.content
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ApiError(f"messages[{i}].content: only text parts are supported "
                                       f"(got type {part.get('type')!r})", 400, param=f"messages[{i}].content")
                    parts.append(part["text"])
                content = "".join(parts)
            messages.append({"role": m.role, "content": content or ""})
        try:
            return encode_chat(self.tokenizer, messages)
        except CpmtoolError as e:
            raise ApiError(str(e), 400, param="messages") from e
        except Exception as e:  # noqa: BLE001 -- a template may reject a role order (jinja raise_exception)
            raise ApiError(f"the chat template rejected these messages: {e}", 400, param="messages") from e

    # -- routes --------------------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: HttpRequest):
        self._check_common(body)
        prompts = self._completion_prompts(body)
        params = [self._params(body, len(p), body.max_tokens, body.logprobs, "prompt") for p in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = [self.loop.submit(p, sp, f"{rid}-{i}") for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(streams, request, rid, chat=False, include_usage=include_usage),
                                     media_type="text/event-stream")
        seqs = await self._collect(streams, request)
        choices = []
        for i, per in enumerate(seqs):
            for j, s in enumerate(per):
                choices.append({"index": i * body.n + j, "text": self._final_text(s),
                                "logprobs": self._completion_logprobs(s) if body.logprobs is not None else None,
                                "finish_reason": s.finish_reason, "stop_reason": s.stop_reason})
        return _json({"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
                      "choices": choices, "usage": self._usage(streams, seqs)})

    async def chat_completions(self, body: ChatCompletionRequest, request: HttpRequest):
        self._check_common(body)
        ids = self._chat_prompt(body)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise ApiError("top_logprobs needs logprobs: true", 400, param="top_logprobs")
        params = self._params(body, len(ids), body.max_completion_tokens or body.max_tokens, logprobs, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = [self.loop.submit(ids, params, rid)]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(streams, request, rid, chat=True, include_usage=include_usage),
                                     media_type="text/event-stream")
        seqs = await self._collect(streams, request)
        choices = [{"index": j, "message": {"role": "assistant", "content": self._final_text(s)},
                    "logprobs": {"content": self._chat_logprobs(s)} if body.logprobs else None,
                    "finish_reason": s.finish_reason, "stop_reason": s.stop_reason}
                   for j, s in enumerate(seqs[0])]
        return _json({"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
                      "choices": choices, "usage": self._usage(streams, seqs)})

    # -- driving requests ------------------------------------------------------------------------------
    async def _events(self, streams: list[RequestStream], request: HttpRequest
                      ) -> AsyncIterator[tuple[int, list[Token]]]:
        """(prompt index, tokens) as the engine produces them, until every stream finished. Aborts
        the unfinished streams if the client leaves or the consumer stops early."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream):
            finished: set[int] = set()
            try:
                while len(finished) < stream.params.n:
                    toks = await stream.get()
                    finished.update(t.index for t in toks if t.finish_reason)
                    merged.put_nowait((i, toks))
            except Exception as e:  # noqa: BLE001 -- handed to the consumer
                merged.put_nowait((i, e))

        async def client_gone():
            # FastAPI already read the body, so the next ASGI message can only be the disconnect
            while (await request.receive())["type"] != "http.disconnect":
                pass

        done: dict[int, set[int]] = {i: set() for i in range(len(streams))}
        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        gone = asyncio.ensure_future(client_gone())
        tasks.append(gone)
        left = len(streams)
        try:
            while left:
                get = asyncio.ensure_future(merged.get())
                await asyncio.wait([get, gone], return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return
                i, item = get.result()
                if isinstance(item, Exception):
                    raise item
                for t in item:
                    if t.finish_reason:
                        done[i].add(t.index)
                if len(done[i]) == streams[i].params.n:
                    left -= 1
                yield i, item
        finally:
            for t in tasks:
                t.cancel()
            for i, s in enumerate(streams):
                if len(done[i]) < s.params.n:
                    self.loop.abort(s)

    def _new_seqs(self, streams: list[RequestStream]) -> list[list[_Seq]]:
        return [[_Seq(TextStream(self.tokenizer, s.params.stop)) for _ in range(s.params.n)] for s in streams]

    async def _collect(self, streams: list[RequestStream], request: HttpRequest) -> list[list[_Seq]]:
        seqs = self._new_seqs(streams)
        async for i, toks in self._events(streams, request):
            for t in toks:
                _record(seqs[i][t.index], t)
        if any(s.finish_reason is None for per in seqs for s in per):
            raise ApiError("client disconnected", 499)
        return seqs

    async def _stream(self, streams: list[RequestStream], request: HttpRequest, rid: str, *, chat: bool,
                      include_usage: bool) -> AsyncIterator[bytes]:
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        n = streams[0].params.n
        want_lp = streams[0].params.logprobs is not None

        def chunk(choices, usage=None):
            out = {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return _sse(out)

        seqs = self._new_seqs(streams)
        if chat:
            for j in range(n):
                yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
        try:
            async for i, toks in self._events(streams, request):
                for t in toks:
                    s = seqs[i][t.index]
                    _record(s, t)
                    s.text.push(t.token_id)
                    text = s.text.finish(self._final_text(s)) if t.finish_reason else s.text.delta()
                    if not text and not t.finish_reason and not want_lp:
                        continue
                    one = _Seq(s.text, [t.token_id], [t.logprob] if t.logprob is not None else [], [t.top])
                    choice = {"index": i * n + t.index}
                    if chat:
                        choice["delta"] = {"content": text} if text else {}
                        choice["logprobs"] = {"content": self._chat_logprobs(one)} if want_lp else None
                    else:
                        choice["text"] = text
                        choice["logprobs"] = self._completion_logprobs(one) if want_lp else None
                    choice["finish_reason"] = t.finish_reason
                    if t.finish_reason:
                        choice["stop_reason"] = t.stop_reason
                    yield chunk([choice])
        except ApiError as e:
            yield _sse(e.body())
            yield b"data: [DONE]\n\n"
            return
        if any(s.finish_reason is None for per in seqs for s in per):
            return  # the client left: nobody to finish the stream for
        if include_usage:
            yield chunk([], self._usage(streams, seqs))
        yield b"data: [DONE]\n\n"

    # -- response pieces ----------------------------------------------------------------------------------
    def _final_text(self, s: _Seq) -> str:
        if s.final_text is not None:
            return s.final_text
        return self.tokenizer.decode(s.tokens, skip_special_tokens=True)

    def _token_str(self, tid: int) -> str:
        return self.tokenizer.decode([tid])

    def _completion_logprobs(self, s: _Seq) -> dict:
        tokens = [self._token_str(t) for t in s.tokens]
        offsets, at = [], 0
        for tok in tokens:
            offsets.append(at)
            at += len(tok)
        top = []
        for tok, lp, alts in zip(tokens, s.logprobs, s.top, strict=False):
            d = {tok: lp}
            for tid, v in (alts or {}).items():
                d.setdefault(self._token_str(tid), v)
            top.append(d)
        return {"tokens": tokens, "token_logprobs": list(s.logprobs), "top_logprobs": top, "text_offset": offsets}

    def _chat_logprobs(self, s: _Seq) -> list[dict]:
        out = []
        for tid, lp, alts in zip(s.tokens, s.logprobs, s.top, strict=False):
            tok = self._token_str(tid)
            out.append({"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": [
                {"token": (a := self._token_str(i)), "logprob": v, "bytes": list(a.encode())}
                for i, v in (alts or {}).items()]})
        return out

    @staticmethod
    def _usage(streams: list[RequestStream], seqs: list[list[_Seq]]) -> dict:
        prompt = sum(len(s.prompt_ids) for s in streams)
        completion = sum(len(s.tokens) for per in seqs for s in per)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _record(s: _Seq, t: Token) -> None:
    s.tokens.append(t.token_id)
    if t.logprob is not None:
        s.logprobs.append(t.logprob)
        s.top.append(t.top)
    if t.finish_reason:
        s.finish_reason, s.stop_reason = t.finish_reason, t.stop_reason
        s.final_text = t.text


# what a union-typed field accepts, for one readable message instead of one per alternative
_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
}


def _validation_error(exc: RequestValidationError) -> ApiError:
    problems, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        kind = err.get("type", "")
        if kind == "json_invalid":
            problems.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})")
            continue
        if not loc and kind in ("model_attributes_type", "dict_type"):
            problems.append("the request body must be a JSON object")
            continue
        where = ".".join(loc[:1]) if loc and loc[0] in _EXPECTED else ".".join(loc)
        param = param or where or None
        if where in _EXPECTED:
            problems.append(f"{where}: must be {_EXPECTED[where]}")
        else:
            problems.append(f"{where}: {err['msg']}" if where else err["msg"])
    seen = list(dict.fromkeys(problems))
    msg = "; ".join(seen[:4]) + (f"; ... ({len(seen) - 4} more)" if len(seen) > 4 else "")
    return ApiError(f"invalid request: {msg}", 400, param=param)


# -- running ----------------------------------------------------------------------------------------------
def listen_socket(host: str, port: int) -> socket.socket:
    """A bound, listening socket, or a ConfigError saying why not (before the model is loaded)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, max_batch: int = 64, max_model_len: int | None = None,
          default_max_tokens: int = 1024, dtype: str = "float32", device: str = "cpu", threads: int = 0,
          attention: str | None = None, log_level: str = "warning", on_ready=None) -> None:
    """Load `model` and serve it until interrupted.

    Args:
        model: registry name, HF directory or .gguf file.
        host, port: where to listen (loopback by default; port 0 picks a free one).
        api_key: require `Authorization: Bearer <api_key>` on /v1 routes.
        served_model_name: the id in /v1/models and responses (default: `model` as given).
        max_batch: the most sequences decoded together; more requests wait in the queue.
        max_model_len: prompt + completion token limit (default: the model's, at most 4096).
        default_max_tokens: the completion limit of chat requests that set none.
        threads: torch CPU threads (0: torch's default).
        on_ready: called with the URL once the socket listens and the model is loaded.
    """
    sock = listen_socket(host, port)  # a busy port fails fast, before the slow imports and the model load
    try:
        import torch
        import uvicorn

        from cpmtool.engine.native import NativeEngine

        if threads:
            torch.set_num_threads(threads)
        engine = NativeEngine.load(model, dtype=dtype, device=device, attention=attention, max_batch=max_batch)
        limit = engine.model.config.max_position_embeddings
        if max_model_len is None:
            max_model_len = min(limit, 4096)
        elif max_model_len > limit:
            raise ConfigError(f"--max-model-len {max_model_len} exceeds the model's {limit} positions")
        server = Server(engine, model_name=served_model_name or str(model), max_model_len=max_model_len,
                        api_key=api_key, default_max_tokens=default_max_tokens, root=str(model))
        config = uvicorn.Config(server.app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
        userver = uvicorn.Server(config)
        if on_ready is not None:
            bound_host, bound_port = sock.getsockname()[:2]
            url = f"http://{'[' + bound_host + ']' if ':' in bound_host else bound_host}:{bound_port}"
            _notify_when_started(userver, lambda: on_ready(url))
        userver.run(sockets=[sock])
    finally:
        sock.close()


def _notify_when_started(userver, callback) -> None:
    startup = userver.startup

    async def wrapped(*a, **kw):
        await startup(*a, **kw)
        if userver.started:
            callback()

    userver.startup = wrapped
