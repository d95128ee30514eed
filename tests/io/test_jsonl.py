import hashlib
import json

import orjson
import pytest

from cpmtool.errors import InputError
from cpmtool.io import RejectSink, RunStats, ensure_id, read_records

LINES = [
    b'{"a": 1}',  # 1
    b"",  # 2
    b"   \t",  # 3
    b'{"a": ',  # 4 bad_json
    b"[1, 2]",  # 5 not_object
    b'"just a string"',  # 6 not_object
    b'{"a": "\xff\xfe"}',  # 7 bad_utf8
    b'{"b": 2}\r',  # 8 CRLF file
    b"null",  # 9 not_object
]


def _read(tmp_path, lines, **kw):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    stats = RunStats()
    with RejectSink(tmp_path / "rej.jsonl") as sink:
        out = list(read_records(path, stats=stats, rejects=sink, **kw))
    rejects = [orjson.loads(x) for x in (tmp_path / "rej.jsonl").read_bytes().splitlines()]
    return out, rejects, stats, str(path)


def test_rejects_carry_reason_line_and_source(tmp_path):
    out, rejects, stats, src = _read(tmp_path, LINES)
    assert out == [{"a": 1}, {"b": 2}]
    assert [(r["reject_reason"], r["reject_line"], r["reject_source"]) for r in rejects] == [
        ("bad_json", 4, src),
        ("not_object", 5, src),
        ("not_object", 6, src),
        ("bad_utf8", 7, src),
        ("not_object", 9, src),
    ]
    assert rejects[0]["raw"] == '{"a": '
    assert rejects[3]["raw"] == '{"a": "\\xff\\xfe"}'  # bad bytes kept visible as escapes
    assert (stats.n_in, stats.n_out, stats.empty_lines) == (7, 0, 2)
    assert stats.rejected == {"bad_json": 1, "not_object": 3, "bad_utf8": 1}


def test_strict_stops_at_first_malformed_line(tmp_path):
    with pytest.raises(InputError, match=r"in\.jsonl:4: bad_json") as info:
        _read(tmp_path, LINES, strict=True)
    assert "\n" not in str(info.value)


def test_strict_lets_blank_lines_pass(tmp_path):
    out, _, stats, _ = _read(tmp_path, [b'{"a": 1}', b"", b'{"a": 2}', b""], strict=True)
    assert out == [{"a": 1}, {"a": 2}] and stats.empty_lines == 2


def test_utf8_bom_on_first_line_is_ignored(tmp_path):
    out, rejects, _, _ = _read(tmp_path, [b'\xef\xbb\xbf{"a": 1}', b'{"a": 2}'])
    assert out == [{"a": 1}, {"a": 2}] and rejects == []


def test_reject_fields_do_not_overwrite_the_records_own(tmp_path):
    with RejectSink(tmp_path / "r.jsonl") as sink:
        sink.write_reject({"source": "wikipedia", "line": "to be", "id": "d1"}, "too_short", ("x.jsonl", 3))
    (row,) = [orjson.loads(x) for x in (tmp_path / "r.jsonl").read_bytes().splitlines()]
    assert row == {
        "reject_reason": "too_short",
        "reject_source": "x.jsonl",
        "reject_line": 3,
        "source": "wikipedia",
        "line": "to be",
        "id": "d1",
    }


def test_ensure_id_is_a_stable_content_hash():
    a = ensure_id({"text": "hi", "meta": {"x": 1, "y": 2}})
    b = ensure_id({"meta": {"y": 2, "x": 1}, "text": "hi"})
    c = ensure_id({"text": "hi!", "meta": {"x": 1, "y": 2}})
    assert a["id"] == b["id"] != c["id"]
    assert len(a["id"]) == 16 and int(a["id"], 16) >= 0
    # the definition, spelled with the standard library: ids must not change between versions
    blob = json.dumps({"text": "hi", "meta": {"x": 1, "y": 2}}, sort_keys=True, separators=(",", ":"))
    assert a["id"] == hashlib.blake2b(blob.encode(), digest_size=8).hexdigest() == "14b39661a3e6560b"
    assert ensure_id({"id": 7, "text": "hi"})["id"] == 7
    assert ensure_id({"id": None, "text": "hi"})["id"] != None  # noqa: E711
