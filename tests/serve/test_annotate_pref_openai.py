"""`cpmtool annotate-pref --engine openai` against a real `cpmtool serve` process whose context is
512 tokens: a response too long to judge there is left unscored with `judge_request_refused` and
the server's message, the other judgments go on, and nothing is lost."""

import json
import os
import subprocess
import sys

import orjson


def test_a_refused_judgment_is_an_unscored_response(server, tmp_path):
    recs = [{"id": "i1", "prompt": "Name a colour.", "responses": [
        {"text": "Red.", "generator": "a"}, {"text": "blue " * 600, "generator": "b"},
        {"text": "Green is a colour.", "generator": "c"}]}]
    src = tmp_path / "r.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    r = subprocess.run([sys.executable, "-m", "cpmtool", "annotate-pref", "--engine", "openai", "--api-base",
                        server.url, "--api-key", server.key, "--model", server.model, "--max-tokens", "4",
                        "--no-cache", "--rejects", str(tmp_path / "rej.jsonl"), "--stats", str(tmp_path / "st.json"),
                        "-o", str(tmp_path / "pairs.jsonl"), str(src)],
                       capture_output=True, timeout=600, env={**os.environ, "CPMTOOL_HOME": str(tmp_path / "h")})
    assert r.returncode == 0, r.stderr.decode()
    st = json.loads((tmp_path / "st.json").read_text())
    assert st["in"] == 1 and st["out"] + st["rejected"] == 1
    assert st["judge"]["judge_request_refused"] == 1 and sum(st["judge"].values()) == 3
    lines = [orjson.loads(x) for f in ("pairs.jsonl", "rej.jsonl") for x in (tmp_path / f).read_bytes().splitlines()]
    responses = [x for rec in lines for x in rec["responses"]]
    long = [x for x in responses if x["generator"] == "b"]
    assert len(responses) == 3 and len(long) == 1
    assert long[0]["score"] is None and long[0]["judge_error"] == "judge_request_refused"
    assert "maximum context length" in long[0]["judgments"][0]
