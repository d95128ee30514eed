"""`bench speed` (the benchmark_serving-style load generator) against the session's tiny server."""

import math

import pytest

from cpmtool.bench.speed import RequestOutput, calculate_metrics, make_requests, run_speed
from cpmtool.errors import ConfigError


def test_metrics_by_hand():
    outs = [RequestOutput(True, 10, 5, ttft=0.1, itl=[0.02, 0.02, 0.03, 0.03], latency=0.2),
            RequestOutput(True, 20, 1, ttft=0.3, itl=[], latency=0.3),
            RequestOutput(False, error="boom")]
    m = calculate_metrics(outs, duration=2.0, percentiles=(50, 99))
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 30, 6)
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 3.0 and m["total_token_throughput"] == 18.0
    assert m["mean_ttft_ms"] == pytest.approx(200.0) and m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx(25.0)  # (0.2 - 0.1) / (5 - 1); one-token requests have no TPOT
    assert m["mean_itl_ms"] == pytest.approx(25.0) and m["p50_itl_ms"] == pytest.approx(25.0)
    assert m["mean_e2el_ms"] == pytest.approx(250.0) and m["errors"] == ["boom"]


def test_requests_lengths_and_reproducibility():
    a = make_requests(50, input_len=20, output_len=10, range_ratio=0.5, seed=1)
    assert a == make_requests(50, input_len=20, output_len=10, range_ratio=0.5, seed=1)
    assert all(5 <= r.max_tokens <= 15 for r in a) and len({r.max_tokens for r in a}) > 1
    assert all(10 <= len(r.prompt.split()) <= 30 for r in a)
    chat = make_requests(3, input_len=5, chat=True)
    assert all(r.prompt[0]["role"] == "user" for r in chat)
    with pytest.raises(ConfigError):
        make_requests(3, range_ratio=1.5)


def test_against_a_server(server):
    r = run_speed(server.url, api_key=server.key, num_prompts=12, input_len=16, output_len=6, max_concurrency=4,
                  request_rate=50.0, seed=0, num_warmups=1)
    assert r["completed"] == 12 and r["failed"] == 0, r["errors"]
    assert r["model"] == server.model and r["max_concurrency"] == 4
    assert r["total_output_tokens"] == 12 * 6  # ignore_eos: exact lengths, counted from the server's usage
    for k in ("mean_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p50_e2el_ms"):
        assert r[k] is not None and r[k] > 0 and math.isfinite(r[k]), k
    assert r["p99_ttft_ms"] >= r["median_ttft_ms"]
    chat = run_speed(server.url, api_key=server.key, chat=True, num_prompts=4, input_len=8, output_len=3)
    assert chat["completed"] == 4 and chat["total_output_tokens"] == 12 and chat["backend"] == "openai-chat"


def test_failures_are_counted_not_raised(server):
    r = run_speed(server.url, api_key="wrong", model=server.model, num_prompts=3, input_len=4, output_len=2)
    assert r["completed"] == 0 and r["failed"] == 3 and "401" in r["errors"][0]


def test_cli_against_a_url(server):
    import subprocess
    import sys

    import orjson

    r = subprocess.run([sys.executable, "-m", "cpmtool", "bench", "speed", "--url", server.url, "--api-key", server.key,
                        "--num-prompts", "4", "--input-len", "8", "--output-len", "3", "--concurrency", "2",
                        "--percentiles", "50,99"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1
    res = orjson.loads(lines[0])
    assert res["completed"] == 4 and res["total_output_tokens"] == 12 and res["p99_tpot_ms"] > 0
    assert "Serving Benchmark Result" in r.stderr and "P99 TTFT (ms)" in r.stderr


@pytest.mark.slow
def test_cli_launches_its_own_server(tiny_dir, tmp_path):
    import subprocess
    import sys

    import orjson

    out = tmp_path / "res.json"
    r = subprocess.run([sys.executable, "-m", "cpmtool", "bench", "speed", "--launch", "--model", str(tiny_dir),
                        "--serve-args", "--threads 1 --max-batch 4", "--num-prompts", "6", "--input-len", "8",
                        "--output-len", "4", "-o", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    res = orjson.loads(r.stdout)
    assert res == orjson.loads(out.read_text())
    assert res["completed"] == 6 and res["model"] == str(tiny_dir)
    assert res["launched"] == {"model": str(tiny_dir), "args": ["--threads", "1", "--max-batch", "4"]}
