"""An on-disk cache of model answers in front of any engine, so a rerun of a data tool is cheap.

    engine = CachedEngine(load_engine("smollm2-135m"), "~/.cache/cpmtool/cache",
                          model_key("smollm2-135m", "native"))
    results = engine.generate(requests, params)   # misses go to the model in one call
    engine.stats                                  # CacheStats(hits=.., misses=.., calls=..)

An answer is stored under a hash of (model identity, what was asked, sampling parameters): the
prompt text, chat messages or token ids, and every field of `SamplingParams` (so `n`, `seed`,
`temperature` and `max_tokens` all count). The request's `id` does not: two records that ask the
same thing share one answer. Identical requests in one batch are sent once and get the same
answer, as they would from the cache on a rerun; to draw distinct samples, ask for `n > 1` or give
distinct seeds. An unseeded sampled answer is therefore frozen once cached: that is the point
(a rerun reproduces the run), and `--no-cache` or a fresh cache directory draws again.

Storage is one SQLite file (`answers.sqlite`, WAL mode) in the cache directory, safe to share
between processes; each answer is committed as soon as the engine returns it, so an interrupted
run keeps what it paid for.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import orjson

from cpmtool.engine.types import Completion, Request, Result, SamplingParams
from cpmtool.errors import ConfigError

CACHE_FILE = "answers.sqlite"
# Bumped when the key or the stored layout changes, so an old cache is never misread.
KEY_VERSION = 1


def default_cache_dir() -> Path:
    """`$CPMTOOL_HOME/cache` (default `~/.cache/cpmtool/cache`)."""
    from cpmtool.model.registry import cpmtool_home

    return cpmtool_home() / "cache"


def model_key(model: str | None, backend: str = "native", *, api_base: str | None = None, **extra) -> str:
    """A string naming the model that answers, for cache keys.

    A local model (registry name, HF directory, .gguf) is named by its resolved path plus the size
    and mtime of its weight files, so retraining a checkpoint in place never serves its old answers.
    A served model is named by the server URL and model name. `extra` (e.g. `dtype="bfloat16"`)
    is added as is, because it changes the answers too.
    """
    parts = [backend, str(model)]
    if backend == "openai":
        parts.append(str(api_base or "").rstrip("/"))
    elif model is not None:
        parts.append(_weights_fingerprint(model))
    parts += [f"{k}={extra[k]}" for k in sorted(extra)]
    return "|".join(parts)


def _weights_fingerprint(model: str) -> str:
    from cpmtool.errors import ModelError
    from cpmtool.model.registry import resolve_model

    try:
        path = resolve_model(model)
    except ModelError:
        return "unresolved"  # a vllm/HF-hub name: the name alone identifies it
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf", ".bin", ".json"))
    h = hashlib.blake2b(str(path.resolve()).encode(), digest_size=8)
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def request_key(model: str, request: Request, params: SamplingParams) -> str:
    """The cache key of one request answered with `params` (hex sha256)."""
    asked = ({"prompt": request.prompt} if request.prompt is not None
             else {"messages": request.messages} if request.messages is not None
             else {"prompt_ids": list(request.prompt_ids)})
    blob = orjson.dumps({"v": KEY_VERSION, "model": model, "asked": asked, "params": asdict(params)},
                        option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()


@dataclass
class CacheStats:
    """Requests answered from the cache (hits), sent to the model (misses), and engine calls made."""

    hits: int = 0
    misses: int = 0
    calls: int = 0

    def to_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "calls": self.calls}


class AnswerCache:
    """The SQLite table key -> serialised Result (without its id). Thread-safe."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.dir = Path(cache_dir).expanduser()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--cache {self.dir}: cannot create the directory ({e.strerror})") from e
        self.path = self.dir / CACHE_FILE
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"--cache {self.dir}: {self.path.name} is not a usable cache ({e})") from e

    def get_many(self, keys: list[str]) -> dict[str, Result]:
        found: dict[str, Result] = {}
        uniq = list(dict.fromkeys(keys))
        with self._lock:
            for i in range(0, len(uniq), 500):  # SQLite caps the number of bound parameters
                chunk = uniq[i:i + 500]
                marks = ",".join("?" * len(chunk))
                for key, value in self._db.execute(f"SELECT key, value FROM answers WHERE key IN ({marks})", chunk):
                    found[key] = _load_result(value)
        return found

    def put_many(self, items: list[tuple[str, Result]]) -> None:
        rows = [(k, _dump_result(r)) for k, r in items]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO answers (key, value) VALUES (?, ?)", rows)
            self._db.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachedEngine:
    """`engine` with its answers cached in `cache_dir` under `model_key`; same interface.

    Attributes the wrapped engine has (`encode`, `decode`, `tokenizer`, `name`, `max_len`, ...)
    are reached through this object too, so it can stand in for the engine anywhere.
    """

    def __init__(self, engine, cache_dir: str | os.PathLike, model_key: str):
        self.engine = engine
        self.cache = AnswerCache(cache_dir)
        self.model_key = model_key
        self.stats = CacheStats()

    def __getattr__(self, name):
        if name == "engine":  # not set yet (copy, pickling): never recurse
            raise AttributeError(name)
        return getattr(self.engine, name)

    def _keys(self, requests: list[Request], params: SamplingParams | None) -> list[str]:
        return [request_key(self.model_key, r, params or r.params) for r in requests]

    def generate(self, requests: list[Request], params: SamplingParams | None = None) -> list[Result]:
        """Results in request order; the uncached requests go to the engine in one call."""
        requests = list(requests)
        keys = self._keys(requests, params)
        found = self.cache.get_many(keys)
        todo: dict[str, Request] = {}
        for k, r in zip(keys, requests, strict=True):
            if k not in found and k not in todo:
                todo[k] = r
        self.stats.misses += len(todo)
        self.stats.hits += len(requests) - len(todo)
        if todo:
            self.stats.calls += 1
            fresh = self.engine.generate(list(todo.values()), params)
            # a refused request is not an answer: a rerun asks again
            self.cache.put_many([(k, res) for k, res in zip(todo, fresh, strict=True) if res.error is None])
            found.update(zip(todo, fresh, strict=True))
        return [_with_id(found[k], r.id) for k, r in zip(keys, requests, strict=True)]

    def generate_stream(self, requests: Iterable[Request], params: SamplingParams | None = None) -> Iterator[Result]:
        """Cached results first as they are read, then the engine's as they finish (each stored at once).

        The input is read lazily in windows of 256 requests, so a long stream never sits in memory.
        """
        it = iter(requests)
        while True:
            window = list(islice(it, 256))
            if not window:
                return
            keys = self._keys(window, params)
            found = self.cache.get_many(keys)
            todo: dict[str, list[Request]] = {}
            for k, r in zip(keys, window, strict=True):
                if k in found:
                    self.stats.hits += 1
                    yield _with_id(found[k], r.id)
                else:
                    todo.setdefault(k, []).append(r)
            if not todo:
                continue
            self.stats.misses += len(todo)
            self.stats.hits += sum(len(same) - 1 for same in todo.values())  # as generate() counts them
            self.stats.calls += 1
            # the engine echoes request ids; stand-in ids map its results back to their keys
            by_id = {f"c{i}": k for i, k in enumerate(todo)}
            asks = [Request(prompt=r.prompt, messages=r.messages, prompt_ids=r.prompt_ids, params=r.params, id=cid)
                    for cid, r in ((cid, todo[k][0]) for cid, k in by_id.items())]
            for res in self.engine.generate_stream(asks, params):
                k = by_id[res.id]
                if res.error is None:
                    self.cache.put_many([(k, res)])
                for r in todo[k]:
                    yield _with_id(res, r.id)

    def close(self) -> None:
        self.cache.close()
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()


class LazyNativeEngine:
    """A native engine whose weights load on the first `generate`: what a request needs before
    that (its token ids, the context length, the chat template) comes from the tokenizer and the
    config alone, so a rerun answered from the cache never loads the model."""

    name = "native"

    def __init__(self, model: str, **load_kw):
        from cpmtool.model.registry import model_info
        from cpmtool.model.tokenizer import load_tokenizer

        self._model, self._load_kw, self._engine = model, load_kw, None
        self.tokenizer = load_tokenizer(model)
        self.max_len = model_info(model).get("context")

    @property
    def engine(self):
        if self._engine is None:
            from cpmtool.engine import load_engine

            self._engine = load_engine(self._model, "native", **self._load_kw)
        return self._engine

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def encode(self, request: Request) -> list[int]:
        return request.encode(self.tokenizer)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, requests: list[Request], params: SamplingParams | None = None) -> list[Result]:
        return self.engine.generate(requests, params)

    def generate_stream(self, requests: Iterable[Request], params: SamplingParams | None = None) -> Iterator[Result]:
        return self.engine.generate_stream(requests, params)


def load_cached_engine(model: str | None, backend: str = "native", *, cache: str | os.PathLike | None = None,
                       no_cache: bool = False, api_base: str | None = None, api_key: str | None = None,
                       max_batch: int = 64, dtype: str = "float32", lazy: bool = False, **kw):
    """`load_engine(...)` behind a CachedEngine in `cache` (default `default_cache_dir()`).

    With `no_cache` the bare engine comes back (every request goes to the model). With `lazy`
    (native backend only) the weights load at the first cache miss (`LazyNativeEngine`). This is
    what the data tools' `--model/--engine/--api-base/--cache/--no-cache` flags map to.
    """
    from cpmtool.engine import load_engine

    if lazy and backend == "native" and not no_cache and model is not None:
        engine = LazyNativeEngine(model, max_batch=max_batch, dtype=dtype, **kw)
    else:
        engine = load_engine(model, backend, api_base=api_base, api_key=api_key, max_batch=max_batch, dtype=dtype,
                             **kw)
    if no_cache:
        return engine
    extra = {"dtype": dtype} if backend != "openai" else {}
    return CachedEngine(engine, cache if cache is not None else default_cache_dir(),
                        model_key(model, backend, api_base=api_base, **extra))


def _with_id(r: Result, rid: str) -> Result:
    return Result(id=rid, prompt_ids=list(r.prompt_ids), completions=[
        Completion(index=c.index, text=c.text, token_ids=list(c.token_ids), finish_reason=c.finish_reason,
                   logprobs=None if c.logprobs is None else list(c.logprobs),
                   top_logprobs=None if c.top_logprobs is None else [dict(t) for t in c.top_logprobs],
                   stop_reason=c.stop_reason)
        for c in r.completions], error=r.error)


def _dump_result(r: Result) -> bytes:
    return orjson.dumps({
        "prompt_ids": r.prompt_ids,
        "completions": [{**asdict(c), "top_logprobs": None if c.top_logprobs is None else
                         [{str(t): lp for t, lp in d.items()} for d in c.top_logprobs]}
                        for c in r.completions],
    })


def _load_result(blob: bytes) -> Result:
    d = orjson.loads(blob)
    comps = []
    for c in d["completions"]:
        if c.get("top_logprobs") is not None:  # JSON object keys are strings; token ids are ints
            c["top_logprobs"] = [{int(t): lp for t, lp in x.items()} for x in c["top_logprobs"]]
        comps.append(Completion(**c))
    return Result(id="", prompt_ids=d["prompt_ids"], completions=comps)


__all__ = ["AnswerCache", "CacheStats", "CachedEngine", "LazyNativeEngine", "default_cache_dir", "load_cached_engine",
           "model_key", "request_key"]
