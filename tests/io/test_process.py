"""The run as a process: stdin/stdout, `| head`, Ctrl-C. Uses driver.py, which exits like cli/app.py main()."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from cpmtool.io import RunStats, read_records

DRIVER = [sys.executable, str(Path(__file__).with_name("driver.py"))]
LINES = b"".join(orjson.dumps({"id": str(i), "text": f"doc {i}"}) + b"\n" for i in range(1000))


def _env(**extra):
    return {**os.environ, "CPMTOOL_PROGRESS": "0", **extra}


def test_stdin_to_stdout(tmp_path):
    p = subprocess.run(
        [*DRIVER, "-", "--stats", str(tmp_path / "s.json")],
        input=LINES + b"oops\n",
        capture_output=True,
        env=_env(),
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == LINES
    assert p.stderr.decode().startswith("cpmtool: 1001 in, 1000 out, 1 rejected (bad_json 1)")
    assert orjson.loads((tmp_path / "s.json").read_bytes())["in"] == 1001


def test_compressed_stdin_is_recognised(tmp_path):
    import zstandard

    p = subprocess.run(
        [*DRIVER, "-"],
        input=zstandard.ZstdCompressor().compress(LINES),
        capture_output=True,
        env=_env(),
        timeout=60,
    )
    assert p.returncode == 0 and p.stdout == LINES


def test_progress_never_touches_stdout(tmp_path):
    p = subprocess.run(
        [*DRIVER, "-"], input=LINES, capture_output=True, env=_env(CPMTOOL_PROGRESS="1"), timeout=60
    )
    assert p.returncode == 0 and p.stdout == LINES


def test_missing_input_is_one_line(tmp_path):
    p = subprocess.run([*DRIVER, str(tmp_path / "nope.jsonl")], capture_output=True, env=_env(), timeout=60)
    assert p.returncode == 2
    assert p.stderr.decode() == f"driver: error: {tmp_path / 'nope.jsonl'}: no such file\n"


def test_head_closing_the_pipe_ends_quietly(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(LINES)
    # 1000 records x 1000 copies is ~40 MB: far more than the pipe holds once head has gone
    run = subprocess.Popen(
        [*DRIVER, str(tmp_path / "in.jsonl"), "--copies", "1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    head = subprocess.Popen(["head", "-1"], stdin=run.stdout, stdout=subprocess.PIPE)
    run.stdout.close()  # only head holds the read end now
    first, _ = head.communicate(timeout=60)
    err = run.stderr.read()
    assert run.wait(timeout=60) == 0
    assert err == b""
    assert orjson.loads(first) == {"id": "0", "text": "doc 0", "copy": 0}


@pytest.mark.parametrize("ext", ["", ".zst"])
def test_ctrl_c_exits_130_leaving_whole_lines(tmp_path, ext):
    out = tmp_path / f"out.jsonl{ext}"
    run = subprocess.Popen(
        [*DRIVER, "-", "-o", str(out), "--stats", str(tmp_path / "s.json"), "--announce"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    run.stdin.write(LINES[: LINES.index(b"\n", 200) + 1])  # whole lines, then the pipe stays open
    run.stdin.flush()
    n = LINES[: LINES.index(b"\n", 200) + 1].count(b"\n")
    for line in run.stderr:  # wait until the driver has handled them all and blocks on stdin
        if line == f"seen {n}\n".encode():
            break
    else:
        pytest.fail(f"driver ended early: rc {run.wait()}")
    run.send_signal(signal.SIGINT)
    err = run.stderr.read()
    assert run.wait(timeout=60) == 130
    run.stdin.close()
    assert b"Traceback" not in err and b"(interrupted)" in err
    raw = out.read_bytes() if not ext else None
    if raw is not None:
        assert raw.endswith(b"\n") and raw == LINES[: len(raw)]
    got = list(read_records(out, stats=RunStats()))  # a .zst must be a complete, valid frame
    assert [r["id"] for r in got] == [str(i) for i in range(n)]
    stats = orjson.loads((tmp_path / "s.json").read_bytes())
    assert stats["complete"] is False and stats["out"] == n
