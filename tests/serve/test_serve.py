"""`cpmtool serve` end to end: a real server process, the official `openai` client and raw httpx."""

import asyncio
import subprocess
import sys
import time

import httpx
import orjson
import pytest

MODEL = "tiny"  # the conftest server's --served-model-name
TOO_LONG = 600  # tokens: past the tiny model's 512 positions
ABORTED = 'vllm:request_success_total{model_name="tiny",finished_reason="abort"}'
CHAT = [{"role": "user", "content": "Name three colours."}]


def wait_until(pred, what: str, limit: float = 120.0):
    """Poll `pred` (bounded); fail with `what` if it never holds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    pytest.fail(f"never happened: {what}")


def sse(lines) -> tuple[list[dict], bool]:
    """The JSON events of an SSE body and whether it ended with [DONE]."""
    events, done = [], False
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        assert not done, "data after [DONE]"
        if data == "[DONE]":
            done = True
        else:
            events.append(orjson.loads(data))
    return events, done


# -- surface -------------------------------------------------------------------------------------------
def test_models_health_metrics(http, server):
    data = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == [MODEL] and data[0]["max_model_len"] == server.max_len
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_count", "vllm:e2e_request_latency_seconds_sum"):
        assert name in text, name


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "{key}", "Basic {key}"])
def test_api_key_required(server, auth):
    headers = {} if auth is None else {"Authorization": auth.format(key=server.key)}
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 401


def test_openai_client_rejects_a_wrong_key(server):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0) as c, \
            pytest.raises(openai.AuthenticationError):
        c.models.list()


# -- the official client ---------------------------------------------------------------------------------
def test_chat_with_openai_client(client, tiny_dir):
    from cpmtool.model.tokenizer import encode_chat, load_tokenizer

    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.model == MODEL and len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content and c.finish_reason == "length"
    tok = load_tokenizer(tiny_dir)
    assert r.usage.prompt_tokens == len(encode_chat(tok, CHAT))
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_greedy_text_equals_the_engine(client, tiny_dir):
    from cpmtool.engine.native import NativeEngine
    from cpmtool.engine.types import Request, SamplingParams

    engine = NativeEngine.load(str(tiny_dir))
    want = engine.generate([Request(messages=CHAT)], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == want[0].completions[0].text


def test_stream_equals_non_stream(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    deltas = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert "".join(deltas) == full
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in full  # no half characters mid-stream
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_n2_with_seed(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=10, n=2, seed=7, temperature=1.0,
              extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1]
    texts = [c.message.content for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.message.content for c in sorted(b.choices, key=lambda c: c.index)]  # same seed, same text
    assert texts[0] != texts[1]  # two samples, not one copied
    assert a.usage.completion_tokens == 20
    # streamed n=2: chunks of both indices interleave, each index finishes once
    chunks = list(client.chat.completions.create(stream=True, **kw))
    got = {0: "", 1: ""}
    finished = []
    for ch in chunks:
        for c in ch.choices:
            got[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.append(c.index)
    assert sorted(finished) == [0, 1]
    assert [got[0], got[1]] == texts


def test_completions_prompt_forms_and_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=["Hello", "The cat"], n=2, max_tokens=4, logprobs=3,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
        assert all(x <= 0 for x in lp.token_logprobs)
        assert all(1 <= len(d) <= 4 for d in lp.top_logprobs)  # the sampled token + the 3 most likely
    assert r.usage.completion_tokens == 16
    ids = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2, extra_body={"ignore_eos": True})
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 2


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, logprobs=True, top_logprobs=2,
                                       temperature=0, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        # greedy: the chosen token is the most likely one
        assert t.logprob == pytest.approx(max(x.logprob for x in t.top_logprobs), abs=1e-5)


def test_stop_string_cuts_text_in_both_modes(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=30, seed=3, temperature=1.0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop.strip()) >= 1
    cut = full[:full.index(stop)]
    r = client.completions.create(stop=[stop, "\x00never"], **kw).choices[0]
    assert (r.text, r.finish_reason) == (cut, "stop")
    streamed = list(client.completions.create(stop=[stop, "\x00never"], stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_max_tokens_caps_the_completion(client):
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


# -- errors ------------------------------------------------------------------------------------------------
BAD = [
    ("/v1/completions", b"{not json", "not valid JSON"),
    ("/v1/completions", orjson.dumps({"prompt": "x", "n": 0}), "n:"),
    ("/v1/completions", orjson.dumps({"prompt": 5}), "prompt: must be"),
    ("/v1/completions", orjson.dumps({"prompt": "x", "temperature": -1}), "temperature"),
    ("/v1/completions", orjson.dumps({"prompt": "x", "max_tokens": 0}), "max_tokens"),
    ("/v1/completions", orjson.dumps({"prompt": "x", "max_tokens": 10**6}), "maximum context length"),
    ("/v1/completions", orjson.dumps({"prompt": list(range(TOO_LONG))}), "maximum context length"),
    ("/v1/completions", orjson.dumps({"prompt": [10**9]}), "token ids"),
    ("/v1/completions", orjson.dumps({"prompt": ""}), "empty"),
    ("/v1/completions", orjson.dumps({"prompt": "x", "presence_penalty": 0.5}), "presence_penalty"),
    ("/v1/completions", orjson.dumps({"prompt": "x", "logprobs": 50}), "logprobs"),
    ("/v1/completions", orjson.dumps([1, 2]), "JSON object"),
    ("/v1/chat/completions", orjson.dumps({"messages": []}), "messages"),
    ("/v1/chat/completions", orjson.dumps({"messages": [{"role": "wizard", "content": "x"}]}), "role"),
    ("/v1/chat/completions", orjson.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
     "text parts"),
    ("/v1/chat/completions", orjson.dumps({"messages": CHAT, "top_logprobs": 2}), "top_logprobs"),
]


@pytest.mark.parametrize("path,body,needle", BAD, ids=[b[2] for b in BAD])
def test_bad_requests_get_openai_400(http, path, body, needle):
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and needle in err["message"], err


def test_unknown_model_is_404(client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-nope", prompt="x", max_tokens=1)


def test_openai_client_raises_bad_request(client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10**6)
    assert e.value.code == "context_length_exceeded"


# -- batching, concurrency, disconnects --------------------------------------------------------------------
async def _stream_one(c: httpx.AsyncClient, i: int) -> tuple[list[dict], bool]:
    if i % 2:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Question {i}?"}]}
    else:
        path, body = "/v1/completions", {"prompt": f"Story number {i}:"}
    body.update(model=MODEL, max_tokens=4 + i % 5, stream=True, ignore_eos=True, seed=i)
    async with c.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        return sse([line async for line in r.aiter_lines()])


def test_32_concurrent_streams_all_complete(server, metric):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {server.key}"},
                                     timeout=300, limits=httpx.Limits(max_connections=40)) as c:
            return await asyncio.gather(*(_stream_one(c, i) for i in range(32)))

    results = asyncio.run(main())
    for i, (events, done) in enumerate(results):
        assert done, f"stream {i} missed [DONE]"
        finals = [ch for e in events for ch in e["choices"] if ch.get("finish_reason")]
        assert [f["finish_reason"] for f in finals] == ["length"], i
        text = "".join(ch.get("text") or (ch.get("delta") or {}).get("content") or ""
                       for e in events for ch in e["choices"])
        assert text, i
    wait_until(lambda: metric("vllm:num_requests_running") == 0, "running count back to 0")


def test_new_request_joins_the_running_batch(server):
    """A short request sent while a long one decodes finishes first: it joined the batch between steps
    instead of waiting for the long one to end."""
    order = []

    async def long(c, started: asyncio.Event):
        body = {"model": MODEL, "prompt": "A long story:", "max_tokens": 200, "stream": True, "ignore_eos": True}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    n += 1
                    if n == 3:
                        started.set()
                    if orjson.loads(line[6:])["choices"][0]["finish_reason"]:
                        order.append("long")

    async def short(c, started: asyncio.Event):
        await started.wait()
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3,
                                                  "ignore_eos": True})
        assert r.status_code == 200
        order.append("short")

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {server.key}"},
                                     timeout=300) as c:
            started = asyncio.Event()
            await asyncio.gather(long(c, started), short(c, started))

    asyncio.run(main())
    assert order == ["short", "long"]


def test_stream_disconnect_frees_the_slot(server, metric):
    aborted = metric(ABORTED)
    body = {"model": MODEL, "prompt": "Go on forever:", "max_tokens": server.max_len - 10, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {server.key}"}, timeout=120) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                got += 1
                if got == 3:
                    break  # leave mid-stream: the context manager closes the connection
    wait_until(lambda: metric(ABORTED) == aborted + 1, "the server noticed the disconnect")
    wait_until(lambda: metric("vllm:num_requests_running") == 0, "running count back to 0")


def test_non_stream_disconnect_frees_the_slot(server, metric):
    aborted = metric(ABORTED)
    body = {"model": MODEL, "prompt": "Go on forever:", "max_tokens": server.max_len - 10, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {server.key}"},
                   timeout=httpx.Timeout(120, read=0.3))
    wait_until(lambda: metric(ABORTED) == aborted + 1, "the server noticed the disconnect")
    wait_until(lambda: metric("vllm:num_requests_running") == 0, "running count back to 0")


# -- the command line ------------------------------------------------------------------------------------------
def test_busy_port_is_a_one_line_error(server):
    port = server.url.rsplit(":", 1)[1]
    r = subprocess.run([sys.executable, "-m", "cpmtool", "serve", "--model", "nowhere", "--port", port],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("cpmtool serve: error: cannot listen on 127.0.0.1:") and \
        len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_missing_model_is_a_one_line_error(tmp_path):
    from cpmtool.serve.process import free_port

    r = subprocess.run([sys.executable, "-m", "cpmtool", "serve", "--model", str(tmp_path / "none"),
                        "--port", str(free_port())], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "CPMTOOL_HOME": str(tmp_path)})
    assert r.returncode == 2 and r.stderr.startswith("cpmtool serve: error:"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_smollm2_answers_a_chat_question():
    """The default model behind the server gives a real answer through the official client."""
    openai = pytest.importorskip("openai")
    from cpmtool.errors import ModelError
    from cpmtool.model.registry import resolve_model
    from cpmtool.serve.process import launch_server

    try:
        resolve_model("smollm2-135m")
    except ModelError as e:
        pytest.skip(f"smollm2-135m is not pulled ({e})")
    with launch_server("smollm2-135m", args=["--threads", "1", "--max-model-len", "512"], startup_timeout=600) as srv, \
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=600) as c:
        r = c.chat.completions.create(model="smollm2-135m", max_tokens=12, temperature=0,
                                      messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content
