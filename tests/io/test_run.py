import json

import orjson
import pytest

from cpmtool.errors import ConfigError, InputError
from cpmtool.io import Reject, RunStats, read_records, run_stream, write_records

DOCS = [{"id": f"d{i}", "text": "word " * i} for i in range(10)]


def short_filter(records):
    for r in records:
        yield r if len(r["text"].split()) >= 3 else Reject(r, "too_short")


def _rows(path):
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def test_stage_rejects_go_to_the_rejects_file_with_their_line(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_bytes(
        b'{"id": "d0", "text": ""}\nnot json\n\n' + b"".join(orjson.dumps(d) + b"\n" for d in DOCS[1:])
    )
    stats = run_stream(
        src,
        tmp_path / "out.jsonl.gz",
        short_filter,
        rejects=tmp_path / "rej.jsonl",
        stats_path=tmp_path / "s.json",
    )
    assert [r["id"] for r in read_records(tmp_path / "out.jsonl.gz", stats=RunStats())] == [
        f"d{i}" for i in range(3, 10)
    ]
    rej = _rows(tmp_path / "rej.jsonl")
    # d0 is line 1, "not json" line 2, a blank line 3, then d1 at line 4 and d2 at line 5
    assert [(r["reject_reason"], r["reject_line"], r.get("id")) for r in rej] == [
        ("too_short", 1, "d0"),
        ("bad_json", 2, None),
        ("too_short", 4, "d1"),
        ("too_short", 5, "d2"),
    ]
    assert {r["reject_source"] for r in rej} == {str(src)}
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["in"] == 11 == saved["out"] + saved["rejected"]
    assert saved["rejected_by_reason"] == {"bad_json": 1, "too_short": 3}
    assert saved["empty_lines"] == 1 and saved["complete"] is True
    assert saved == {**stats.to_dict(), "seconds": saved["seconds"]}


def test_summary_line_on_stderr(tmp_path, capsys):
    write_records(DOCS, tmp_path / "d.jsonl")
    run_stream(tmp_path / "d.jsonl", tmp_path / "o.jsonl", short_filter)
    err = capsys.readouterr().err
    assert err.startswith("cpmtool: 10 in, 7 out, 3 rejected (too_short 3), ") and err.count("\n") == 1


def test_strict_names_file_line_and_stage_reason(tmp_path):
    write_records(DOCS[3:] + DOCS[:3], tmp_path / "d.jsonl")
    with pytest.raises(InputError, match=r"d\.jsonl:8: too_short"):
        run_stream(tmp_path / "d.jsonl", tmp_path / "o.jsonl", short_filter, strict=True)


def test_buffering_stage_rejects_later_with_saved_positions(tmp_path):
    write_records(DOCS[:4], tmp_path / "a.jsonl")
    write_records(DOCS[4:], tmp_path / "b.jsonl")
    stats = RunStats()

    def batch_of_three(records):  # judges records only once it holds three, like a batched scorer
        batch = []
        for r in records:
            batch.append((r, stats.position))
            if len(batch) == 3:
                yield from (Reject(r, "odd", pos) if int(r["id"][1:]) % 2 else r for r, pos in batch)
                batch = []
        yield from (Reject(r, "odd", pos) if int(r["id"][1:]) % 2 else r for r, pos in batch)

    run_stream(
        [tmp_path / "a.jsonl", tmp_path / "b.jsonl"],
        tmp_path / "o.jsonl",
        batch_of_three,
        rejects=tmp_path / "r.jsonl",
        stats=stats,
    )
    got = [
        (r["id"], r["reject_source"].rsplit("/", 1)[1], r["reject_line"]) for r in _rows(tmp_path / "r.jsonl")
    ]
    assert got == [
        ("d1", "a.jsonl", 2),
        ("d3", "a.jsonl", 4),
        ("d5", "b.jsonl", 2),
        ("d7", "b.jsonl", 4),
        ("d9", "b.jsonl", 6),
    ]
    assert stats.n_in == stats.n_out + stats.n_rejected == 10


def test_fan_out_reports_out_separately(tmp_path):
    write_records(DOCS[:4], tmp_path / "p.jsonl")

    def rollout(records):
        for r in records:
            yield from ({**r, "sample": k} for k in range(3))

    stats = run_stream(tmp_path / "p.jsonl", tmp_path / "o.jsonl", rollout)
    assert (stats.n_in, stats.n_out, stats.n_rejected) == (4, 12, 0)


def test_ids_are_added_before_the_stage(tmp_path):
    (tmp_path / "p.jsonl").write_bytes(b'{"text": "a"}\n{"id": 5, "text": "b"}\n')
    seen = []
    run_stream(tmp_path / "p.jsonl", tmp_path / "o.jsonl", lambda rs: (seen.append(dict(r)) or r for r in rs))
    assert seen[0]["id"] == _rows(tmp_path / "o.jsonl")[0]["id"] and len(seen[0]["id"]) == 16
    assert seen[1]["id"] == 5
    run_stream(tmp_path / "p.jsonl", tmp_path / "o2.jsonl", ids=False)
    assert _rows(tmp_path / "o2.jsonl") == [{"text": "a"}, {"id": 5, "text": "b"}]


def test_paths_that_would_clobber_or_collide_are_refused(tmp_path):
    write_records(DOCS, tmp_path / "d.jsonl")
    with pytest.raises(ConfigError, match="is also an input"):
        run_stream(tmp_path / "d.jsonl", tmp_path / "d.jsonl")
    with pytest.raises(ConfigError, match="--rejects cannot be stdout"):
        run_stream(tmp_path / "d.jsonl", tmp_path / "o.jsonl", rejects="-")
    with pytest.raises(ConfigError, match="more than once"):
        run_stream(["-", "-"], tmp_path / "o.jsonl")
    assert len(_rows(tmp_path / "d.jsonl")) == 10


def test_missing_input_is_one_line_input_error(tmp_path):
    with pytest.raises(InputError, match=r"nope\.jsonl: no such file$"):
        run_stream(tmp_path / "nope.jsonl", tmp_path / "o.jsonl")


def test_progress_switch(monkeypatch):
    from cpmtool.io import progress_enabled

    monkeypatch.setenv("CPMTOOL_PROGRESS", "1")
    assert progress_enabled() is True
    assert progress_enabled(False) is False
    monkeypatch.setenv("CPMTOOL_PROGRESS", "0")
    assert progress_enabled() is False
    monkeypatch.delenv("CPMTOOL_PROGRESS")
    assert progress_enabled() is False  # pytest's stderr is not a TTY
