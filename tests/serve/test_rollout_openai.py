"""`cpmtool rollout --engine openai` against a real `cpmtool serve` process: samples come back over
HTTP, and a prompt over the server's context is a counted `request_refused` reject with the
server's message while the other prompts are answered."""

import json
import os
import subprocess
import sys

import orjson


def test_rollout_through_an_openai_server_rejects_a_refused_prompt(server, tmp_path):
    prompts = [{"id": "a", "prompt": "1 + 1 ="}, {"id": "long", "prompt": "all work and no play " * 120},
               {"id": "b", "prompt": "The capital of France is"}]
    src = tmp_path / "p.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in prompts))
    r = subprocess.run([sys.executable, "-m", "cpmtool", "rollout", "--engine", "openai", "--api-base", server.url,
                        "--api-key", server.key, "--model", server.model, "--n", "2", "--temperature", "0",
                        "--max-tokens", "4", "--rejects", str(tmp_path / "rej.jsonl"), "--stats",
                        str(tmp_path / "st.json"), str(src)],
                       capture_output=True, timeout=600, env={**os.environ, "CPMTOOL_HOME": str(tmp_path / "h")})
    assert r.returncode == 0, r.stderr.decode()
    out = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert sorted((s["group"], s["sample"]) for s in out) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    rej = [orjson.loads(x) for x in (tmp_path / "rej.jsonl").read_bytes().splitlines()]
    assert [(x["id"], x["reject_reason"]) for x in rej] == [("long", "request_refused")]
    assert "maximum context length is 512" in rej[0]["error"]
    st = json.loads((tmp_path / "st.json").read_text())
    assert (st["in"], st["rejected"], st["rejected_by_reason"]) == (3, 1, {"request_refused": 1})
