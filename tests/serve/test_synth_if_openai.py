"""`cpmtool synth-if` against a real `cpmtool serve` process with `--engine openai`: every stage
that calls a model works over HTTP, answers are cached, a rerun sends no request but the one the
server refused, and a seed longer than the server's context is a counted reject, not a crash."""

import json
import os
import subprocess
import sys

import orjson
import pytest

SEEDS = [
    {"id": "s1", "instruction": "Name three primary colors.", "input": ""},
    {"id": "s2", "instruction": "Translate to French.", "input": "Good morning"},
    {"id": "long", "instruction": "Summarise: " + "all work and no play " * 120, "input": ""},  # > 512 tokens
]
POOL = [{"id": "p", "constraints": [{"type": "format", "constraint": "as a list",
                                     "question": "Is the response a list?"}]}]


def write(path, recs):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return path


def read(path):
    return [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]


@pytest.mark.slow  # six CLI processes: about a minute on an idle machine
def test_synth_if_through_an_openai_server(server, tmp_path):
    env_home = {"CPMTOOL_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    remote = ["--engine", "openai", "--api-base", f"{server.url}/v1", "--api-key", server.key, "--model", server.model,
              "--cache", str(tmp_path / "cache")]

    def run(*args):
        r = subprocess.run([sys.executable, "-m", "cpmtool", "synth-if", *map(str, args)], capture_output=True,
                           timeout=600, env={**os.environ, **env_home})
        assert r.returncode == 0, r.stderr.decode()
        return r

    def stats(name):
        s = json.loads((tmp_path / f"{name}.json").read_text())
        assert s["in"] == s["out"] + s["rejected"], s
        return s

    seeds = write(tmp_path / "seeds.jsonl", SEEDS)
    run("decompose", *remote, "--max-tokens", 16, seeds, "-o", tmp_path / "dec.jsonl", "--rejects",
        tmp_path / "dec.rej.jsonl", "--stats", tmp_path / "dec.json")
    dec = stats("dec")
    assert dec["in"] == 3 and dec["cache"]["misses"] >= 3  # a random tiny model: rejects with their raw text
    dec_rej = {r["id"]: r for r in read(tmp_path / "dec.rej.jsonl")}
    assert dec_rej["long"]["reject_reason"] == "request_refused"
    assert "maximum context length" in dec_rej["long"]["error"]
    assert all(isinstance(r["raw"], str) for k, r in dec_rej.items() if k != "long")

    pool = write(tmp_path / "pool.jsonl", POOL)
    run("compose", "--pool", pool, "--pool-ratio", 1.0, "--rounds", 2, seeds, "-o", tmp_path / "comp.jsonl")
    run("generate", *remote, "--k", 2, "--max-tokens", 8, tmp_path / "comp.jsonl", "-o", tmp_path / "gen.jsonl",
        "--stats", tmp_path / "gen.json", "--rejects", tmp_path / "gen.rej.jsonl")
    gen = stats("gen")
    assert (gen["out"], gen["cache"]["misses"], gen["cache"]["calls"]) == (2, 3, 1)
    assert [(r["id"], r["reject_reason"]) for r in read(tmp_path / "gen.rej.jsonl")] == [("long", "request_refused")]
    assert all(len(r["responses"]) == 2 for r in read(tmp_path / "gen.jsonl"))

    run("filter", *remote, "--max-tokens", 8, "--keep-unsatisfied", tmp_path / "gen.jsonl", "-o",
        tmp_path / "sft.jsonl", "--pairs", tmp_path / "pairs.jsonl", "--stats", tmp_path / "filter.json")
    filt = stats("filter")
    judged = sum(1 for g in read(tmp_path / "gen.jsonl") for r in g["responses"] if r.strip())
    assert filt["out"] == 2 and filt["cache"]["calls"] == (1 if judged else 0)
    assert all(len(r["verdicts"]) == 2 and isinstance(r["completion"], str) for r in read(tmp_path / "sft.jsonl"))

    before = (tmp_path / "gen.jsonl").read_bytes()
    run("generate", *remote, "--k", 2, "--max-tokens", 8, tmp_path / "comp.jsonl", "-o", tmp_path / "gen.jsonl",
        "--stats", tmp_path / "gen.json")
    again = stats("gen")["cache"]
    # a refusal is not cached: the rerun asks the server again for that one only
    assert (again["calls"], again["misses"], again["hits"]) == (1, 1, 2)
    assert (tmp_path / "gen.jsonl").read_bytes() == before
