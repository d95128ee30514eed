"""The bridge between asyncio request handlers and the native engine's continuous-batching Scheduler.

One thread owns the Scheduler (it is not thread-safe) and loops `step()` while there is work.
Handlers never touch it: they post commands (add, abort) on a thread-safe queue, which the engine
thread drains between two steps -- that is where a new request joins the running batch. Each step's
token events go back to the handlers' asyncio queues with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass

from cpmtool.engine.types import Request, SamplingParams
from cpmtool.errors import CpmtoolError
from cpmtool.serve.metrics import Metrics
from cpmtool.serve.protocol import ApiError


@dataclass(frozen=True)
class Token:
    """One new token of one sequence, as the engine thread hands it to a handler."""

    index: int  # sequence index within the request (0..n-1)
    token_id: int
    logprob: float | None
    top: dict[int, float] | None
    finish_reason: str | None  # None while the sequence runs
    stop_reason: str | int | None
    text: str | None  # the final text when the engine cut it at a stop string


class RequestStream:
    """The handler's end of one request: `await get()` returns the tokens of one engine step."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt_ids: list[int], params: SamplingParams, rid: str):
        self.loop = loop
        self.prompt_ids = prompt_ids
        self.params = params
        self.id = rid
        self._queue: asyncio.Queue = asyncio.Queue()
        # engine-thread state
        self.handle = None
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: dict[int, float] = {}
        self.n_generated = 0
        self.finished = False

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    async def get(self) -> list[Token]:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


class EngineLoop:
    """Runs a native engine's Scheduler in a background thread for many concurrent requests."""

    def __init__(self, engine, *, max_len: int, metrics: Metrics):
        self.engine = engine
        self.max_len = max_len
        self.metrics = metrics
        self._sched = engine.scheduler(max_len=max_len)
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[int, RequestStream] = {}  # id(handle) -> stream
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpmtool-engine", daemon=True)
        self.error: BaseException | None = None  # set when the thread died

    # -- handler side (event-loop thread) -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._cmds.put(("stop", None))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def submit(self, prompt_ids: list[int], params: SamplingParams, rid: str) -> RequestStream:
        stream = RequestStream(asyncio.get_running_loop(), prompt_ids, params, rid)
        self._cmds.put(("add", stream))
        return stream

    def abort(self, stream: RequestStream) -> None:
        """The client went away: free the request's rows in the batch."""
        self._cmds.put(("abort", stream))

    # -- engine thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(block=not self._sched.has_work)
                if self._stop.is_set():
                    break
                if self._sched.has_work:
                    self._step()
                self._publish_load()
        except BaseException as e:  # the thread must never die silently: /health reports it
            self.error = e
            self._fail_all(ApiError(f"engine stopped: {type(e).__name__}: {e}", 503))
            raise

    def _drain(self, block: bool) -> None:
        while True:
            try:
                cmd, stream = self._cmds.get(timeout=0.5) if block else self._cmds.get_nowait()
            except queue.Empty:
                if block and not self._stop.is_set():
                    continue
                return
            block = False
            if cmd == "add":
                self._add(stream)
            elif cmd == "abort":
                self._abort(stream)
            elif cmd == "stop":
                return

    def _add(self, stream: RequestStream) -> None:
        try:
            handle = self._sched.add(Request(prompt_ids=stream.prompt_ids, params=stream.params, id=stream.id),
                                     stream.params)
        except CpmtoolError as e:
            stream.finished = True
            stream._put(ApiError(str(e), 400))
            return
        stream.handle = handle
        self._live[id(handle)] = stream
        p = stream.params
        self.metrics.observe("request_params_n", p.n)
        self.metrics.observe("request_params_max_tokens", p.max_tokens)

    def _abort(self, stream: RequestStream) -> None:
        if stream.handle is None or stream.finished:
            return
        self._sched.abort(stream.handle)
        self._live.pop(id(stream.handle), None)
        stream.finished = True
        self.metrics.finish("abort")

    def _step(self) -> None:
        start = time.monotonic()
        try:
            events = self._sched.step()
        except Exception as e:  # noqa: BLE001 -- one bad batch must not take the server down
            self._fail_all(ApiError(f"generation failed: {type(e).__name__}: {e}", 500))
            self._sched = self.engine.scheduler(max_len=self.max_len)
            return
        now = time.monotonic()
        batches: dict[int, list[Token]] = {}
        for ev in events:
            stream = self._live.get(id(ev.seq.req))
            if stream is None:
                continue
            seq = ev.seq
            lp = seq.logprobs[-1] if seq.logprobs and len(seq.logprobs) == len(seq.tokens) else None
            top = seq.top[-1] if seq.top and len(seq.top) == len(seq.tokens) else None
            reason = seq.finish_reason if ev.finished else None
            batches.setdefault(id(seq.req), []).append(
                Token(ev.index, ev.token_id, lp, top, reason, seq.stop_reason if ev.finished else None,
                      seq.text if ev.finished else None))
            self._timing(stream, ev.index, start, now)
        self.metrics.add(generation_tokens=len(events))
        for key, toks in batches.items():
            stream = self._live[key]
            stream._put(toks)
            if stream.handle.done:
                self._finished(stream, now)

    def _timing(self, stream: RequestStream, index: int, start: float, now: float) -> None:
        if stream.first_token_at is None:  # admitted (prefilled) by this step
            stream.first_token_at = now
            self.metrics.observe("request_queue_time_seconds", start - stream.arrival)
            self.metrics.add(prompt_tokens=len(stream.prompt_ids))
            self.metrics.observe("time_to_first_token_seconds", now - stream.arrival)
        last = stream.last_token_at.get(index)
        if last is not None:
            self.metrics.observe("inter_token_latency_seconds", now - last)
            self.metrics.observe("time_per_output_token_seconds", now - last)
        stream.last_token_at[index] = now
        stream.n_generated += 1

    def _finished(self, stream: RequestStream, now: float) -> None:
        del self._live[id(stream.handle)]
        stream.finished = True
        seqs = stream.handle.seqs
        longest = max(len(s.tokens) for s in seqs)
        if longest > 1:
            self.metrics.observe("request_time_per_output_token_seconds",
                                 (now - stream.first_token_at) / (longest - 1))
        self.metrics.observe("e2e_request_latency_seconds", now - stream.arrival)
        self.metrics.observe("request_prompt_tokens", len(stream.prompt_ids))
        self.metrics.observe("request_generation_tokens", stream.n_generated)
        self.metrics.finish("length" if any(s.finish_reason == "length" for s in seqs) else "stop")

    def _fail_all(self, error: ApiError) -> None:
        for stream in self._live.values():
            stream.finished = True
            stream._put(error)
        self._live.clear()

    def _publish_load(self) -> None:
        running = len({id(s.req) for s in self._sched.running if s.finish_reason is None})
        self.metrics.set_load(running, len(self._sched.waiting) + self._cmds.qsize())
