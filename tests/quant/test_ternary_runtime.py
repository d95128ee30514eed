"""A packed ternary cpm-tiny through the runtime: the native engine, `cpmtool rollout` and bench ternary."""

import subprocess
import sys

import orjson
import pytest

from cpmtool.data import tasks
from cpmtool.model.loader import load_model
from cpmtool.model.tokenizer import encode_chat, load_tokenizer
from cpmtool.quant.ternary import Ternary, save_ternary


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
    model, _ = load_model("cpm-tiny")  # naive ternarisation: enough to exercise the runtime
    return save_ternary(model, tmp_path_factory.mktemp("rt") / "tiny-ternary", Ternary(0, 8),
                        tokenizer=load_tokenizer("cpm-tiny"))


def _reference_greedy(path, messages, n):
    model, _ = load_model(path)
    ids = encode_chat(load_tokenizer(path), messages)
    return model.greedy(ids, n)


def test_native_engine_matches_reference_greedy(packed_dir):
    from cpmtool.engine.native import NativeEngine
    from cpmtool.engine.types import Request, SamplingParams

    msgs = [{"role": "user", "content": "Compute 12+34."}]
    eng = NativeEngine.load(str(packed_dir))
    out = eng.generate([Request(messages=msgs)], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    want = _reference_greedy(packed_dir, msgs, 10)
    assert out[0].completions[0].token_ids[:len(want)] == want


@pytest.mark.slow
def test_rollout_on_packed_model(packed_dir, tmp_path):
    recs = list(tasks.generate("arithmetic", "test", 2, 0, level=1))
    lines = b"".join(orjson.dumps(r) + b"\n" for r in recs)
    p = subprocess.run([sys.executable, "-m", "cpmtool", "rollout", "--model", str(packed_dir), "--n", "1",
                        "--temperature", "0", "--max-tokens", "8", "--reward", "math", "--logprobs"],
                       input=lines, capture_output=True, timeout=900)
    assert p.returncode == 0, p.stderr.decode()
    out = [orjson.loads(x) for x in p.stdout.splitlines()]
    assert [o["group"] for o in out] == [r["id"] for r in recs] and all("reward" in o for o in out)
    want = _reference_greedy(packed_dir, recs[0]["messages"], 8)
    n = len(out[0]["token_ids"])
    assert n >= 1 and out[0]["token_ids"] == want[:n]


def test_bench_ternary_record(packed_dir):
    from cpmtool.bench.ternary import bench_ternary, format_ternary

    r = bench_ternary("cpm-tiny", ternary=str(packed_dir), batch=2, max_tokens=4, repeats=1, kernels=False)
    # per tensor: 2 bits a weight plus one bf16 scale for each of the 28 matrices
    assert r["bits_per_weight"] == pytest.approx(2 + 28 * 16 / r["quantized_weights"], abs=1e-4)
    assert r["group_size"] == 0 and r["act_bits"] == 8
    assert r["file_bytes_ternary"] < r["bf16_bytes"] / 4
    assert r["decode_tok_s_fp32"] > 0 and r["decode_tok_s_ternary"] > 0
    assert "decode tokens" in format_ternary(r)


def test_cpu_paths_rows():
    from cpmtool.bench.ternary import cpu_paths

    rows = cpu_paths(8, 12, m_values=(1,), repeats=1)
    names = [r["cpu_path"] for r in rows]
    assert names[:3] == ["unpack_per_call_fp32", "cached_fp32 (used)", "cached_bf16"]
    assert rows[0]["vs_unpack_per_call"] == 1.0 and all(r.get("us_per_call", 1) > 0 for r in rows)
