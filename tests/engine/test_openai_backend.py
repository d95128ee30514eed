"""The openai backend against a real `cpmtool serve` process (and a failure-injecting proxy in front
of it for the retry and concurrency checks)."""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from cpmtool.engine.native import NativeEngine
from cpmtool.engine.openai_backend import OpenAIEngine, normalize_base
from cpmtool.engine.types import Request, SamplingParams
from cpmtool.errors import ConfigError, ModelError

KEY = "sk-test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_is_implemented() -> bool:
    from cpmtool.cli.app import _COMMANDS

    return any(name == "serve" and module is not None for name, module, _ in _COMMANDS)


@pytest.fixture(scope="module")
def model_dir(tiny_pair, smollm2_tokenizer, tmp_path_factory):
    from cpmtool.model.loader import save_pretrained

    d = tmp_path_factory.mktemp("oa") / "tiny"
    save_pretrained(tiny_pair[0], d, tokenizer=smollm2_tokenizer)
    return d


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    if not _serve_is_implemented():
        pytest.skip("`cpmtool serve` is still a stub in cpmtool/cli/app.py")
    port = _free_port()
    home = tmp_path_factory.mktemp("home")
    env = dict(os.environ, HF_HUB_OFFLINE="1", CPMTOOL_HOME=str(home))
    log = open(home / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "cpmtool", "serve", "--model", str(model_dir), "--port", str(port),
                             "--api-key", KEY, "--max-batch", "16", "--threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"cpmtool serve exited with {proc.returncode}: {log.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("cpmtool serve did not become healthy in 300 s")
        time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def native(tiny_pair, smollm2_tokenizer):
    return NativeEngine(tiny_pair[0], smollm2_tokenizer, max_batch=8)


def test_completions_and_chat_equal_the_native_engine(server, model_dir, native):
    eng = OpenAIEngine(server, model=str(model_dir), api_key=KEY)
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    reqs = [Request(prompt="The quick brown fox", id="p"),
            Request(messages=[{"role": "user", "content": "Name three colors."}], id="c"),
            Request(prompt_ids=[504, 2365, 6354], id="ids")]
    got = eng.generate(reqs, p)
    want = native.generate(reqs, p)
    assert [r.id for r in got] == ["p", "c", "ids"]
    for g, w in zip(got, want, strict=True):
        assert g.completions[0].text == w.completions[0].text, g.id
        assert g.completions[0].finish_reason == "length"
        assert g.prompt_ids == w.prompt_ids  # from the local tokenizer (the server returns no ids)
        # ids re-encoded from the text: the same text, whatever the merge
        assert native.decode(g.completions[0].token_ids) == w.completions[0].text
    streamed = {r.id: r.completions[0].text for r in eng.generate_stream(iter(reqs), p)}
    assert streamed == {r.id: r.completions[0].text for r in got}


def test_n_seed_logprobs_and_stop(server, model_dir):
    eng = OpenAIEngine(server, model=str(model_dir), api_key=KEY)
    p = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=7, logprobs=2, ignore_eos=True)
    r1 = eng.generate([Request(prompt="Once upon a time", id="a")], p)[0]
    r2 = eng.generate([Request(prompt="Once upon a time", id="a")], p)[0]
    assert [c.index for c in r1.completions] == [0, 1, 2]
    assert [c.text for c in r1.completions] == [c.text for c in r2.completions]  # same seed, same samples
    for c in r1.completions:
        assert len(c.logprobs) == 6 and all(v <= 0 for v in c.logprobs)
        assert len(c.top_logprobs) == 6 and all(2 <= len(t) <= 3 for t in c.top_logprobs)
    chat = eng.generate([Request(messages=[{"role": "user", "content": "Hi"}], id="c")],
                        SamplingParams(temperature=0, max_tokens=5, logprobs=1, ignore_eos=True))[0].completions[0]
    assert len(chat.logprobs) == 5 and all(len(t) == 1 for t in chat.top_logprobs)
    base = eng.generate([Request(prompt="1, 2, 3,", id="s")],
                        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].completions[0]
    stop = base.text.strip()[:2]
    if stop:
        c = eng.generate([Request(prompt="1, 2, 3,", id="s")],
                         SamplingParams(temperature=0, max_tokens=10, stop=[stop], ignore_eos=True))[0].completions[0]
        assert c.finish_reason == "stop" and stop not in c.text


def test_errors_are_one_line(server, model_dir):
    with pytest.raises(ModelError, match="HTTP 401"):
        OpenAIEngine(server, model=str(model_dir), api_key="wrong", max_retries=0).generate([Request(prompt="x")])
    closed = _free_port()
    with pytest.raises(ModelError, match=f"cannot reach the OpenAI-compatible server at http://127.0.0.1:{closed}/v1"):
        OpenAIEngine(f"http://127.0.0.1:{closed}", model="m", max_retries=1, backoff=0.01).generate(
            [Request(prompt="x")])
    with pytest.raises(ConfigError, match="--api-base must be a URL"):
        OpenAIEngine("localhost:8000")
    assert normalize_base("http://h:1/") == "http://h:1/v1" and normalize_base("http://h:1/v1/") == "http://h:1/v1"
    # the model defaults to the server's first listed one
    eng = OpenAIEngine(server, api_key=KEY)
    assert eng.models() == [str(model_dir)] or len(eng.models()) == 1
    assert eng.generate([Request(prompt="Hi")], SamplingParams(temperature=0, max_tokens=2))[0].completions


class _FlakyProxy:
    """Forwards to the real server; the first `fail` calls get 429/503 instead; records the most
    calls in flight at once."""

    def __init__(self, target: str, fail: int):
        self.target, self.fail = target, fail
        self.calls = self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _forward(self, method):
                with proxy.lock:
                    proxy.calls += 1
                    n = proxy.calls
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    if n <= proxy.fail:
                        self.send_response(429 if n % 2 else 503)
                        self.send_header("Retry-After", "0")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                    req = urllib.request.Request(proxy.target + self.path, data=body, method=method,
                                                 headers={k: v for k, v in self.headers.items()
                                                          if k.lower() in ("authorization", "content-type")})
                    with urllib.request.urlopen(req, timeout=300) as r:
                        data, status = r.read(), r.status
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with proxy.lock:
                        proxy.in_flight -= 1

            def do_POST(self):
                self._forward("POST")

            def do_GET(self):
                self._forward("GET")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_retries_and_concurrency_limit(server, model_dir):
    proxy = _FlakyProxy(server, fail=2)
    try:
        eng = OpenAIEngine(proxy.url, model=str(model_dir), api_key=KEY, max_concurrency=2, backoff=0.01)
        reqs = [Request(prompt=f"{i} apples and", id=str(i)) for i in range(6)]
        res = eng.generate(reqs, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        assert [r.id for r in res] == [str(i) for i in range(6)] and all(r.completions[0].text for r in res)
        assert proxy.calls == 6 + 2  # two refused calls were retried
        assert proxy.max_in_flight <= 2
        proxy.fail = proxy.calls + 100  # from now on every call fails: retries run out
        with pytest.raises(ModelError, match=r"HTTP (429|503).*after 3 tries"):
            OpenAIEngine(proxy.url, model="m", api_key=KEY, max_retries=2, backoff=0.01).generate(
                [Request(prompt="x")])
    finally:
        proxy.close()


def test_a_refused_request_is_its_results_error_and_the_others_go_on(server, model_dir):
    """A prompt over the server's context is refused with HTTP 400: that request's Result carries the
    server's message and no completions; the requests beside it are answered. An error that concerns
    every request (401) still ends the call."""
    eng = OpenAIEngine(server, model=str(model_dir), api_key=KEY, max_retries=0)
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    long = Request(prompt_ids=[504] * 600, id="long")  # the tiny model has 512 positions
    got = eng.generate([Request(prompt="Hi", id="a"), long, Request(prompt="Bye", id="b")], p)
    assert [r.id for r in got] == ["a", "long", "b"]
    assert got[1].completions == [] and "HTTP 400" in got[1].error and "maximum context length" in got[1].error
    assert got[0].error is None and got[2].error is None and all(len(r.completions[0].text) for r in (got[0], got[2]))
    streamed = {r.id: r.error for r in eng.generate_stream(iter([long, Request(prompt="Hi", id="a")]), p)}
    assert streamed["a"] is None and "maximum context length" in streamed["long"]
