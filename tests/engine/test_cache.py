"""CachedEngine on the real cpm-tiny native engine: a rerun makes no model calls, keys see every setting."""

import os
import shutil

import pytest

from cpmtool.engine.cache import AnswerCache, CachedEngine, load_cached_engine, model_key, request_key
from cpmtool.engine.native import NativeEngine
from cpmtool.engine.types import Request, SamplingParams
from cpmtool.errors import ConfigError
from cpmtool.model.registry import REGISTRY

P = SamplingParams(temperature=1.0, max_tokens=6, seed=5, ignore_eos=True)
KEY = "native|cpm-tiny|test"


class Counting:
    """The real engine, counting the calls and requests that reach it."""

    def __init__(self, engine):
        self.engine, self.calls, self.requests = engine, 0, 0

    def generate(self, requests, params=None):
        self.calls += 1
        self.requests += len(requests)
        return self.engine.generate(requests, params)

    def generate_stream(self, requests, params=None):
        self.calls += 1
        requests = list(requests)
        self.requests += len(requests)
        return self.engine.generate_stream(requests, params)

    def __getattr__(self, name):
        return getattr(self.engine, name)


@pytest.fixture(scope="module")
def tiny():
    return NativeEngine.load("cpm-tiny", max_batch=8)


def reqs(*prompts):
    return [Request(prompt=p, id=f"r{i}") for i, p in enumerate(prompts)]


def texts(results):
    return [[c.token_ids for c in r.completions] for r in results]


def test_rerun_makes_no_model_calls(tiny, tmp_path):
    first = Counting(tiny)
    a = CachedEngine(first, tmp_path, KEY)
    out1 = a.generate(reqs("1+2=", "3+4=", "1+2="), P)
    # the duplicate prompt is sent once; all misses go in one call
    assert (first.calls, first.requests) == (1, 2)
    assert a.stats.to_dict() == {"hits": 1, "misses": 2, "calls": 1}
    assert texts(out1)[0] == texts(out1)[2]
    a.close()

    second = Counting(tiny)
    b = CachedEngine(second, tmp_path, KEY)  # a new process would see the same file
    out2 = b.generate(reqs("1+2=", "3+4=", "1+2="), P)
    assert (second.calls, second.requests) == (0, 0)
    assert b.stats.to_dict() == {"hits": 3, "misses": 0, "calls": 0}
    assert texts(out2) == texts(out1)
    assert [r.id for r in out2] == ["r0", "r1", "r2"]
    assert [r.prompt_ids for r in out2] == [r.prompt_ids for r in out1]


def test_only_new_requests_reach_the_engine(tiny, tmp_path):
    eng = Counting(tiny)
    c = CachedEngine(eng, tmp_path, KEY)
    c.generate(reqs("5+5="), P)
    out = c.generate(reqs("5+5=", "6+6=", "7+7="), P)
    assert (eng.calls, eng.requests) == (2, 3)
    assert c.stats.to_dict() == {"hits": 1, "misses": 3, "calls": 2}
    assert len(out) == 3 and all(len(r.completions) == 1 for r in out)


def test_every_setting_is_part_of_the_key(tiny, tmp_path):
    eng = Counting(tiny)
    c = CachedEngine(eng, tmp_path, KEY)
    c.generate(reqs("2+2="), P)
    for params in (P.with_(seed=6), P.with_(n=2), P.with_(max_tokens=5), P.with_(temperature=0.5),
                   P.with_(stop=("\n",))):
        c.generate(reqs("2+2="), params)
    c.generate([Request(messages=[{"role": "user", "content": "2+2="}], id="m")], P)
    c.generate([Request(prompt_ids=tiny.encode(Request(prompt="2+2=")), id="t")], P)
    assert eng.requests == 8
    CachedEngine(eng, tmp_path, KEY + "-other").generate(reqs("2+2="), P)
    assert eng.requests == 9
    c.generate(reqs("2+2="), P)  # and the first one is still there
    assert eng.requests == 9


def test_request_params_are_used_when_none_are_given(tiny, tmp_path):
    eng = Counting(tiny)
    c = CachedEngine(eng, tmp_path, KEY)
    c.generate([Request(prompt="9+1=", params=P, id="a")])
    c.generate([Request(prompt="9+1=", params=P, id="b")])
    c.generate([Request(prompt="9+1=", params=P.with_(seed=99), id="c")])
    assert eng.requests == 2
    assert request_key(KEY, Request(prompt="x", params=P), P) == request_key(KEY, Request(prompt="x", id="z"), P)


def test_logprobs_survive_the_round_trip(tiny, tmp_path):
    p = P.with_(logprobs=2, n=2)
    c = CachedEngine(tiny, tmp_path, KEY)
    fresh = c.generate(reqs("8+1="), p)[0]
    again = CachedEngine(tiny, tmp_path, KEY).generate(reqs("8+1="), p)[0]
    for x, y in zip(fresh.completions, again.completions, strict=True):
        assert (x.index, x.text, x.token_ids, x.finish_reason) == (y.index, y.text, y.token_ids, y.finish_reason)
        assert x.logprobs == pytest.approx(y.logprobs)
        assert [sorted(d) for d in x.top_logprobs] == [sorted(d) for d in y.top_logprobs]
        assert all(isinstance(t, int) for d in y.top_logprobs for t in d)


def test_stream_caches_and_replays(tiny, tmp_path):
    eng = Counting(tiny)
    c = CachedEngine(eng, tmp_path, KEY)
    streamed = {r.id: r for r in c.generate_stream(reqs("1+1=", "2+3=", "1+1="), P)}
    assert sorted(streamed) == ["r0", "r1", "r2"] and eng.requests == 2
    again = {r.id: r for r in c.generate_stream(reqs("1+1=", "2+3=", "1+1="), P)}
    assert eng.requests == 2 and c.stats.hits == 4
    assert texts([again[k] for k in sorted(again)]) == texts([streamed[k] for k in sorted(streamed)])
    # the streamed answers are the ones generate() finds
    assert texts(c.generate(reqs("2+3="), P)) == texts([streamed["r1"]]) and eng.requests == 2


def test_model_key_follows_the_weights(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(REGISTRY["cpm-tiny"].path(), d)
    k1 = model_key(str(d), "native")
    assert model_key(str(d), "native") == k1
    assert model_key(str(d), "native", dtype="bfloat16") != k1
    w = d / "model.safetensors"
    st = w.stat()  # a checkpoint rewritten in place: a new mtime
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert model_key(str(d), "native") != k1
    assert model_key("m", "openai", api_base="http://h:1/v1/") == "openai|m|http://h:1/v1"


def test_load_cached_engine(tmp_path):
    c = load_cached_engine("cpm-tiny", cache=tmp_path / "c", max_batch=4)
    assert isinstance(c, CachedEngine) and (tmp_path / "c" / "answers.sqlite").exists()
    assert c.encode(Request(prompt="1+1=")) == c.engine.encode(Request(prompt="1+1="))  # reaches the engine
    assert not isinstance(load_cached_engine("cpm-tiny", no_cache=True), CachedEngine)


def test_unusable_cache_is_a_config_error(tmp_path):
    (tmp_path / "answers.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="not a usable cache"):
        AnswerCache(tmp_path)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="cannot create"):
        AnswerCache(f / "sub")


def test_lazy_engine_loads_the_weights_only_on_a_miss(tiny, tmp_path):
    first = load_cached_engine("cpm-tiny", cache=tmp_path, max_batch=4, lazy=True)
    assert not first.engine.loaded
    req = Request(prompt="4+4=", id="a")
    assert first.encode(req) == tiny.encode(req) and first.max_len == tiny.model.config.max_position_embeddings
    out = first.generate([req], P)
    assert first.engine.loaded and first.stats.misses == 1
    again = load_cached_engine("cpm-tiny", cache=tmp_path, max_batch=4, lazy=True)
    assert texts(again.generate([req], P)) == texts(out)
    assert not again.engine.loaded and again.stats.to_dict() == {"hits": 1, "misses": 0, "calls": 0}
    # the same answers as the eager engine: one model identity
    assert texts(CachedEngine(tiny, tmp_path, "other").generate([req], P)) == texts(out)
