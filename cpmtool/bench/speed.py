"""Load generator for any OpenAI-compatible server, measured the way vLLM's `benchmark_serving`
(`vllm bench serve`) measures it.

Requests are streamed (`stream: true`, `stream_options.include_usage`). Per request: TTFT is the time
from sending to the first chunk that carries text; ITL the gaps between later text chunks; E2EL the
time to the last text chunk; TPOT = (E2EL - TTFT) / (output tokens - 1), output tokens as the
server's usage reports them. ITL pools every gap over all requests; TPOT is per request, then
summarised over requests. Arrivals are all at t=0 (`request_rate=inf`) or a gamma process with mean
1/rate (`burstiness=1`: Poisson); `max_concurrency` caps the requests in flight (a closed loop).
Throughputs divide by the wall-clock duration from the first send to the last completion.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson

from cpmtool.errors import ConfigError, InputError

METRICS = ("ttft", "tpot", "itl", "e2el")

# common English words; a word is about one BPE token, so a prompt of L words is about L tokens
_WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had not "
    "their but one new first also after two its who they been more time into other year state people city world "
    "school game during three team would them about most where over some than made later such many before city "
    "house river music film book water light story night early small large family history church village north "
    "south east west century power great place public general second between under while through called known "
    "number system market country station island series member water season party union group church record "
    "language science field report design energy model simple reason answer question problem method result"
).split()


@dataclass
class SpeedRequest:
    prompt: str | list[dict]  # text for /v1/completions, messages for /v1/chat/completions
    max_tokens: int


@dataclass
class RequestOutput:
    success: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str = ""


def make_requests(num_prompts: int, *, input_len: int = 128, output_len: int = 64, range_ratio: float = 0.0,
                  seed: int = 0, dataset: str | None = None, chat: bool = False,
                  tokenizer=None) -> list[SpeedRequest]:
    """`num_prompts` requests: synthetic prompts of about `input_len` tokens (exactly, with a tokenizer:
    random token ids decoded, as vLLM's random dataset), or prompt records from a JSONL `dataset`
    (`prompt` or `messages`), cycled. Lengths are drawn uniformly from [L(1-r), L(1+r)]."""
    if num_prompts < 1:
        raise ConfigError("--num-prompts must be >= 1")
    if not 0 <= range_ratio < 1:
        raise ConfigError(f"--range-ratio must be in [0, 1) (got {range_ratio})")
    rng = np.random.default_rng(seed)

    def lengths(mean: int) -> np.ndarray:
        lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return rng.integers(lo, hi + 1, size=num_prompts)

    outs = lengths(output_len)
    if dataset is not None:
        records = _read_prompts(dataset)
        prompts = [records[i % len(records)] for i in range(num_prompts)]
        return [SpeedRequest(_as_chat(p) if chat else _as_text(p), int(o)) for p, o in zip(prompts, outs, strict=True)]
    ins = lengths(input_len)
    reqs = []
    for i in range(num_prompts):
        if tokenizer is not None:
            vocab = len(tokenizer)
            offset = int(rng.integers(0, vocab))
            ids = ((offset + i + np.arange(int(ins[i]))) % vocab).tolist()
            text = tokenizer.decode(ids, skip_special_tokens=True)
        else:
            text = " ".join(rng.choice(_WORDS, size=int(ins[i])).tolist())
        reqs.append(SpeedRequest([{"role": "user", "content": text}] if chat else text, int(outs[i])))
    return reqs


def _read_prompts(path: str) -> list[str | list[dict]]:
    from cpmtool.io import read_records

    out = []
    for rec in read_records(path):
        if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            out.append(rec["messages"])
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            out.append(rec["prompt"])
    if not out:
        raise InputError(f"{path}: no record with a `prompt` string or a `messages` list")
    return out


def _as_chat(p) -> list[dict]:
    return p if isinstance(p, list) else [{"role": "user", "content": p}]


def _as_text(p) -> str:
    return p if isinstance(p, str) else "\n".join(str(m.get("content", "")) for m in p)


async def _send(client, url: str, headers: dict, payload: dict, chat: bool) -> RequestOutput:
    out = RequestOutput()
    start = last = time.perf_counter()
    done = False
    chunks = 0
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                out.error = f"HTTP {resp.status_code}: {body[:300]}"
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    continue
                now = time.perf_counter()
                obj = orjson.loads(data)
                if "error" in obj:
                    out.error = str(obj["error"].get("message", obj["error"]))
                    continue
                for choice in obj.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text:
                        if chunks == 0:
                            out.ttft = now - start
                        else:
                            out.itl.append(now - last)
                        last = now
                        chunks += 1
                usage = obj.get("usage")
                if usage:
                    out.output_len = int(usage.get("completion_tokens") or 0)
                    out.prompt_len = int(usage.get("prompt_tokens") or 0)
    except Exception as e:  # noqa: BLE001 -- a failed request is counted, the run goes on
        out.error = f"{type(e).__name__}: {e}"
        return out
    out.latency = last - start
    out.output_len = out.output_len or chunks
    out.success = done and not out.error and chunks > 0
    if done and chunks == 0 and not out.error:
        out.error = "the stream carried no text"
    return out


async def _benchmark(base_url: str, requests: list[SpeedRequest], *, model: str, chat: bool, api_key: str | None,
                     request_rate: float, burstiness: float, max_concurrency: int | None, ignore_eos: bool,
                     sampling: dict, seed: int, num_warmups: int, progress: Callable[[int, int], None] | None
                     ) -> tuple[list[RequestOutput], float]:
    import httpx

    url = base_url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    warmups, requests = requests[:num_warmups], requests[num_warmups:]
    limit = max_concurrency or len(requests)
    rng = np.random.default_rng(seed)

    def payload(r: SpeedRequest) -> dict:
        p = {"model": model, ("messages" if chat else "prompt"): r.prompt, "max_tokens": r.max_tokens,
             "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0, **sampling}
        if ignore_eos:
            p["ignore_eos"] = True
        return p

    timeout = httpx.Timeout(None, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=limit + 4)) as client:
        for r in warmups:  # unmeasured, one at a time
            await _send(client, url, headers, payload(r), chat)
        sem = asyncio.Semaphore(limit)
        finished = 0

        async def one(r: SpeedRequest) -> RequestOutput:
            nonlocal finished
            async with sem:
                out = await _send(client, url, headers, payload(r), chat)
            finished += 1
            if progress is not None:
                progress(finished, len(requests))
            return out

        tasks = []
        start = time.perf_counter()
        for r in requests:
            tasks.append(asyncio.ensure_future(one(r)))
            if math.isfinite(request_rate):
                # gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate; burstiness 1 is Poisson
                await asyncio.sleep(float(rng.gamma(burstiness, 1.0 / (request_rate * burstiness))))
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return list(outputs), duration


def calculate_metrics(outputs: Sequence[RequestOutput], duration: float,
                      percentiles: Sequence[float] = (50, 90, 99)) -> dict:
    """vLLM's summary: counts, throughputs and mean/median/std/percentiles (ms) of TTFT, TPOT, ITL, E2EL."""
    ok = [o for o in outputs if o.success]
    series = {
        "ttft": [o.ttft for o in ok],
        "tpot": [(o.latency - o.ttft) / (o.output_len - 1) for o in ok if o.output_len > 1],
        "itl": [x for o in ok for x in o.itl],
        "e2el": [o.latency for o in ok],
    }
    total_in = sum(o.prompt_len for o in ok)
    total_out = sum(o.output_len for o in ok)
    res = {
        "completed": len(ok), "failed": len(outputs) - len(ok), "duration": duration,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
    }
    for name, xs in series.items():
        arr = np.asarray(xs, dtype=float) * 1000.0  # ms
        empty = arr.size == 0
        res[f"mean_{name}_ms"] = None if empty else float(arr.mean())
        res[f"median_{name}_ms"] = None if empty else float(np.median(arr))
        res[f"std_{name}_ms"] = None if empty else float(arr.std())
        for p in percentiles:
            res[f"p{_pname(p)}_{name}_ms"] = None if empty else float(np.percentile(arr, p))
    errors = [o.error for o in outputs if o.error]
    res["errors"] = list(dict.fromkeys(errors))[:5]
    return res


def _pname(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def run_speed(url: str | None = None, *, launch: str | None = None, launch_args: Sequence[str] = (),
              model: str | None = None, chat: bool = False, api_key: str | None = None, num_prompts: int = 64,
              input_len: int = 128, output_len: int = 64, range_ratio: float = 0.0, dataset: str | None = None,
              tokenizer: str | None = None, request_rate: float = math.inf, burstiness: float = 1.0,
              max_concurrency: int | None = None, ignore_eos: bool = True, sampling: dict | None = None,
              seed: int = 0, num_warmups: int = 0, percentiles: Sequence[float] = (50, 90, 99),
              startup_timeout: float = 900.0, progress: Callable[[int, int], None] | None = None) -> dict:
    """Benchmark the server at `url`, or a `cpmtool serve --model LAUNCH LAUNCH_ARGS` started for the run.

    Returns one result record: the settings, vLLM's summary metrics (times in ms), and the first
    few distinct errors of failed requests.
    """
    if (url is None) == (launch is None):
        raise ConfigError("give exactly one of --url and --launch MODEL")
    if request_rate <= 0:
        raise ConfigError("--request-rate must be > 0 (inf: all at once)")
    if burstiness <= 0:
        raise ConfigError("--burstiness must be > 0")
    if max_concurrency is not None and max_concurrency < 1:
        raise ConfigError("--concurrency must be >= 1")
    tok = None
    if tokenizer is not None:
        from cpmtool.model.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
    reqs = make_requests(num_prompts + num_warmups, input_len=input_len, output_len=output_len,
                         range_ratio=range_ratio, seed=seed, dataset=dataset, chat=chat, tokenizer=tok)
    settings = {"backend": "openai-chat" if chat else "openai", "num_prompts": num_prompts,
                "request_rate": request_rate if math.isfinite(request_rate) else "inf", "burstiness": burstiness,
                "max_concurrency": max_concurrency, "input_len": input_len if dataset is None else None,
                "output_len": output_len, "range_ratio": range_ratio, "dataset": dataset or "random",
                "ignore_eos": ignore_eos, "seed": seed}

    def go(base: str) -> dict:
        import httpx

        name = model
        if name is None:  # as vllm bench: the first model the server lists
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            try:
                r = httpx.get(base.rstrip("/") + "/v1/models", headers=headers, timeout=30.0)
                r.raise_for_status()
                name = r.json()["data"][0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
                raise ConfigError(f"cannot list the models of {base} ({e}); give --model") from e
        outputs, duration = asyncio.run(_benchmark(
            base, reqs, model=name, chat=chat, api_key=api_key, request_rate=request_rate, burstiness=burstiness,
            max_concurrency=max_concurrency, ignore_eos=ignore_eos, sampling=sampling or {}, seed=seed,
            num_warmups=num_warmups, progress=progress))
        return {"url": base, "model": name, **settings, **calculate_metrics(outputs, duration, percentiles)}

    if url is not None:
        return go(url)
    from cpmtool.serve.process import launch_server

    with launch_server(launch, args=list(launch_args), startup_timeout=startup_timeout,
                       env={"CPMTOOL_API_KEY": api_key} if api_key else None) as srv:
        result = go(srv.url)
    result["launched"] = {"model": launch, "args": list(launch_args)}
    return result


def format_report(r: dict) -> str:
    """The result as vLLM prints it."""
    w = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="=")]

    def row(label, value, fmt="{:<10}"):
        lines.append(f"{label:<40} " + (fmt.format(value) if value is not None else "-"))

    row("Successful requests:", r["completed"])
    row("Failed requests:", r["failed"])
    if r.get("max_concurrency"):
        row("Maximum request concurrency:", r["max_concurrency"])
    row("Request rate (req/s):", r["request_rate"])
    row("Benchmark duration (s):", r["duration"], "{:<10.2f}")
    row("Total input tokens:", r["total_input_tokens"])
    row("Total generated tokens:", r["total_output_tokens"])
    row("Request throughput (req/s):", r["request_throughput"], "{:<10.2f}")
    row("Output token throughput (tok/s):", r["output_throughput"], "{:<10.2f}")
    row("Total Token throughput (tok/s):", r["total_token_throughput"], "{:<10.2f}")
    titles = {"ttft": ("Time to First Token", "TTFT"), "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
              "itl": ("Inter-token Latency", "ITL"), "e2el": ("End-to-end Latency", "E2EL")}
    for key, (title, short) in titles.items():
        lines.append("{s:{c}^{n}}".format(s=title, n=w, c="-"))
        for stat in ("mean", "median"):
            row(f"{stat.capitalize()} {short} (ms):", r.get(f"{stat}_{key}_ms"), "{:<10.2f}")
        for k in sorted((k for k in r if k.startswith("p") and k.endswith(f"_{key}_ms")),
                        key=lambda k: float(k[1:].split("_")[0])):
            row(f"P{k[1:].split('_')[0]} {short} (ms):", r[k], "{:<10.2f}")
    lines.append("=" * w)
    for e in r.get("errors") or ():
        lines.append(f"error: {e}")
    return "\n".join(lines)
