"""`cpmtool clean` end to end through a subprocess: bad lines, rejects, stats, errors, subcommands."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

CPMTOOL = [sys.executable, "-m", "cpmtool"]
GOOD = (
    "The history of the town goes back to a small market that was held near the river every week. "
    "Farmers came with their goods and traders from the coast brought salt, cloth and news from far away. "
    "Over the years the market grew into a busy place with houses, a church, two inns and a school."
)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("CPMTOOL_HOME", str(tmp_path / "home"))


def run(*args, stdin=None):
    return subprocess.run([*CPMTOOL, "clean", *map(str, args)], input=stdin, capture_output=True, timeout=180)


def jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


@pytest.fixture()
def bad_input(tmp_path):
    p = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"id": "good", "text": GOOD}).encode(),
        json.dumps({"id": "short", "text": "Too short to keep."}).encode(),
        b'{"id": "latin1", "text": "caf\xe9"}',  # not UTF-8
        b"[1, 2, 3]",  # JSON, not an object
        b'{"id": "broken", "text": ',  # not JSON
        b"",
        json.dumps({"id": "dup", "text": GOOD}).encode(),
    ]
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def test_bad_lines_are_counted_rejects_and_nothing_is_lost(bad_input, tmp_path):
    r = run(
        bad_input,
        "--stages",
        "normalise,gopher_quality,exact_dedup",
        "--rejects",
        tmp_path / "rej.jsonl",
        "--stats",
        tmp_path / "stats.json",
    )
    assert r.returncode == 0, r.stderr
    out = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert [o["id"] for o in out] == ["good"]
    rej = {x["reject_reason"]: x for x in jsonl(tmp_path / "rej.jsonl")}
    assert set(rej) == {
        "bad_utf8",
        "not_object",
        "bad_json",
        "gopher_quality:gopher_short_doc",
        "exact_dedup:duplicate",
    }
    assert rej["bad_utf8"]["reject_line"] == 3 and "\\xe9" in rej["bad_utf8"]["raw"]
    assert (
        rej["exact_dedup:duplicate"]["dup_of"] == "good" and rej["exact_dedup:duplicate"]["reject_line"] == 7
    )
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["in"] == 6 == stats["out"] + stats["rejected"] and stats["empty_lines"] == 1
    assert stats["stages"]["gopher_quality"]["dropped"] == {"gopher_short_doc": 1}
    assert b"6 in, 1 out, 5 rejected" in r.stderr


def test_stdin_and_strict(bad_input):
    r = run("-", "--stages", "normalise", stdin=bad_input.read_bytes())
    assert r.returncode == 0 and len(r.stdout.decode().splitlines()) == 3
    r = run(bad_input, "--stages", "normalise", "--strict")
    assert r.returncode == 2
    err = r.stderr.decode().strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"cpmtool clean: error: {bad_input}:3: bad_utf8"), err


def main(capsys, *args):
    """Run `cpmtool clean ARGS` in this process (faster than a subprocess); (exit code, stdout, stderr)."""
    from cpmtool.cli.app import main as cpmtool_main

    with pytest.raises(SystemExit) as e:
        cpmtool_main(["clean", *map(str, args)])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_errors_are_one_line(bad_input, tmp_path, capsys):
    for args, needle in [
        (["--stages", "gopher_quality", "--set", "gopher_quality.min_doc_words=many"], "min_doc_words"),
        (["--stages", "nosuch"], "unknown stage 'nosuch'"),
        (["--pipeline", tmp_path / "missing.yaml"], "cannot read pipeline file"),
        (["--shard", "1/0"], "--shard"),
    ]:
        code, _, err = main(capsys, bad_input, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("cpmtool clean: error:"), lines
        assert needle in lines[0]
    code, _, err = main(capsys, tmp_path / "nope.jsonl")
    assert code == 2 and "no such file" in err


def test_bench_clean_is_registered(capsys):
    from cpmtool.cli.app import main as cpmtool_main

    with pytest.raises(SystemExit) as e:
        cpmtool_main(["bench", "clean", "--compare", "nope", "x.jsonl"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [
        "cpmtool bench: error: --compare 'nope': only datatrove is supported"
    ]


def test_help_and_stages(capsys):
    code, out, _ = main(capsys, "--help")
    assert code == 0 and "train-classifier" in out and "dedup-merge" in out
    code, out, _ = main(capsys, "run", "--help")
    assert code == 0 and "--rejects" in out and "Example" in out
    code, out, _ = main(capsys, "stages")
    assert code == 0 and "min_doc_words = 50" in out and "hashes_per_bucket = 8" in out


def test_sharded_dedup_and_classifier_through_the_cli(tmp_path, capsys):
    import random

    rng = random.Random(0)
    vocab = sorted(set(GOOD.replace(",", "").replace(".", "").split()))
    docs = [{"id": f"d{i}", "text": " ".join(rng.choices(vocab, k=80))} for i in range(6)]
    docs += [{"id": "copy", "text": docs[1]["text"]}, {"id": "near", "text": docs[4]["text"] + " Indeed."}]
    for k, part in enumerate([docs[:3], docs[3:6], docs[6:]]):
        (tmp_path / f"p{k}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in part))
    inputs = [tmp_path / f"p{k}.jsonl" for k in range(3)]
    for i in range(2):
        code, _, err = main(
            capsys,
            *inputs,
            "--stages",
            "exact_dedup,minhash",
            "--shard",
            f"{i}/2",
            "--signatures",
            tmp_path / "sigs",
            "-o",
            tmp_path / f"k{i}.jsonl",
        )
        assert code == 0, err
    code, _, err = main(capsys, "dedup-merge", tmp_path / "sigs", "-o", tmp_path / "drops.jsonl")
    assert code == 0, err
    drops = jsonl(tmp_path / "drops.jsonl")
    assert {(d["id"], d["dup_of"], d["reason"]) for d in drops} == {
        ("copy", "d1", "duplicate"),
        ("near", "d4", "near_duplicate"),
    }
    kept = []
    for i in range(2):
        code, out, err = main(
            capsys,
            "dedup-apply",
            tmp_path / f"k{i}.jsonl",
            "--drops",
            tmp_path / "drops.jsonl",
            "--shard",
            f"{i}/2",
        )
        assert code == 0, err
        kept += [json.loads(x)["id"] for x in out.splitlines()]
    assert sorted(kept) == [f"d{i}" for i in range(6)]

    neg = [{"text": "BUY NOW cheap pills click here login cart " * (i + 3)} for i in range(20)]
    (tmp_path / "neg.jsonl").write_text("".join(json.dumps(d) + "\n" for d in neg))
    code, out, err = main(
        capsys,
        "train-classifier",
        "--pos",
        inputs[0],
        "--pos",
        inputs[1],
        "--neg",
        tmp_path / "neg.jsonl",
        "--out",
        tmp_path / "clf",
    )
    assert code == 0, err
    assert json.loads(out)["n_pos"] == 6
    code, out, err = main(
        capsys,
        inputs[2],
        tmp_path / "neg.jsonl",
        "--stages",
        "none",
        "--classifier",
        tmp_path / "clf",
        "--threshold",
        "0.5",
    )
    assert code == 0, err
    out = [json.loads(x) for x in out.splitlines()]
    assert {o["id"] for o in out} == {"copy", "near"} and all(0.5 <= o["quality"] <= 1 for o in out)
