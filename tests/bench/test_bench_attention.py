"""`cpmtool bench attention`: rows from the library, the table and JSONL from the CLI."""

import json
import subprocess
import sys

import pytest
from cpmtool.kernels.infllmv2.cpu import _fused_kernels

from cpmtool.bench.attention import bench_attention, parse_contexts
from cpmtool.errors import ConfigError

SMALL = {"kernel_size": 8, "kernel_stride": 4, "block_size": 16, "window_size": 32, "topk": 4}


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("CPMTOOL_HOME", str(tmp_path / "home"))


def test_parse_contexts():
    assert parse_contexts("4k, 8K,300") == [4096, 8192, 300]
    for bad in ("", "4q", "0", "-1k"):
        with pytest.raises(ConfigError, match="bad --context"):
            parse_contexts(bad)


def test_rows_per_context_and_phase():
    seen = []
    rows = bench_attention([256, 300], heads=4, kv_heads=2, head_dim=16, sparse_config=SMALL, decode_steps=2,
                           threads=1, on_row=seen.append)
    assert rows == seen
    assert [(r["context"], r["phase"]) for r in rows] == [(256, "prefill"), (256, "decode"), (300, "prefill"),
                                                          (300, "decode")]
    for r in rows:
        assert r["dense_ms"] > 0 and r["sparse_ms"] > 0
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"])
        assert (r["device"], r["dtype"], r["dense"]) == ("cpu", "float32", "sdpa")
        assert r["sparse"] == ("infllmv2-torch" if _fused_kernels() is None else "infllmv2-c")
        assert r["sparse_config"]["dense_len"] == -1 and r["sparse_config"]["topk"] == 4
        assert r["threads"] == 1


def test_names_the_torch_path_when_the_c_kernels_are_off(monkeypatch):
    monkeypatch.setattr("cpmtool.kernels.infllmv2.cpu._fused_kernels", lambda: None)
    rows = bench_attention([256], heads=2, kv_heads=1, head_dim=16, sparse_config=SMALL, decode_steps=1, threads=1)
    assert {r["sparse"] for r in rows} == {"infllmv2-torch"}


def test_bad_settings_are_one_config_error():
    with pytest.raises(ConfigError) as e:
        bench_attention([256], heads=3, kv_heads=2, device="tpu")
    assert "heads=3" in str(e.value) and "tpu" in str(e.value)


def run(*args):
    return subprocess.run([sys.executable, "-m", "cpmtool", "bench", "attention", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_prints_jsonl_on_stdout_and_a_table_on_stderr():
    r = run("--context", "256", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--decode-steps", "2",
            "--sparse-config", json.dumps(SMALL))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["phase"] for x in rows] == ["prefill", "decode"]
    assert "SPEEDUP" in r.stderr and "256" in r.stderr


@pytest.mark.parametrize("args, msg", [
    (["--context", "4q"], "bad --context"),
    (["--context", "256", "--sparse-config", "{topk"], "not JSON"),
    (["--context", "256", "--sparse-config", '{"topk": 0}'], "topk=0"),
])
def test_cli_errors_are_one_line(args, msg):
    r = run(*args)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("cpmtool bench: error:") and msg in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
