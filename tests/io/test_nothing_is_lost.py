"""Property: every input line ends in exactly one place (output, rejects, or counted as blank)."""

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpmtool.io import Reject, RunStats, read_records, run_stream, write_records

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)
_no_newline = st.binary(max_size=20).map(lambda b: b.replace(b"\n", b""))

# (kind, line bytes); a valid object may carry "drop" so that the stage rejects it
LINE = st.one_of(
    st.tuples(
        st.just("ok"),
        st.dictionaries(_text, _json, max_size=4).filter(lambda d: "drop" not in d).map(orjson.dumps),
    ),
    st.tuples(
        st.just("drop"),
        st.dictionaries(_text, _json, max_size=3).map(lambda d: orjson.dumps({**d, "drop": 1})),
    ),
    # nothing valid starts with "}", whatever follows
    st.tuples(st.just("bad_json"), _text.map(lambda t: ("}" + t.replace("\n", " ")).encode())),
    st.tuples(st.just("not_object"), _json.filter(lambda v: not isinstance(v, dict)).map(orjson.dumps)),
    # 0xff never occurs in UTF-8
    st.tuples(st.just("bad_utf8"), _no_newline.map(lambda b: b"\xff" + b)),
    st.tuples(st.just("bad_utf8"), _no_newline.map(lambda b: b'{"t": "\xc3\x28' + b + b'"}')),
    st.tuples(st.just("empty"), st.sampled_from([b"", b" ", b"\t", b"  \t ", b"\r"])),
)


def drop_flagged(records):
    for r in records:
        yield Reject(r, "drop") if "drop" in r else r


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(LINE, max_size=30),
    crlf=st.booleans(),
    final_newline=st.booleans(),
    ext=st.sampled_from(["", ".gz", ".zst"]),
)
def test_in_equals_out_plus_rejected(tmp_path_factory, lines, crlf, final_newline, ext):
    tmp = tmp_path_factory.mktemp("prop")
    from cpmtool.io.streams import open_out

    sep = b"\r\n" if crlf else b"\n"
    with open_out(tmp / f"in.jsonl{ext}") as fh:
        fh.write(sep.join(b for _, b in lines) + (sep if final_newline and lines else b""))
    stats = run_stream(
        tmp / f"in.jsonl{ext}", tmp / "out.jsonl", drop_flagged, rejects=tmp / "rej.jsonl", ids=False
    )

    out = [orjson.loads(x) for x in (tmp / "out.jsonl").read_bytes().splitlines()]
    rej = [orjson.loads(x) for x in (tmp / "rej.jsonl").read_bytes().splitlines()]
    if lines and not final_newline and lines[-1][1] == b"":
        lines = lines[:-1]  # a file cannot end with an empty line that has no newline: it is not there
    n_empty = sum(kind == "empty" for kind, _ in lines)
    assert stats.n_in == len(lines) - n_empty == len(out) + len(rej) == stats.n_out + stats.n_rejected
    assert stats.empty_lines == n_empty
    assert out == [orjson.loads(b) for kind, b in lines if kind == "ok"]
    # each reject names the line it came from, by its 1-based physical line number
    expected = [(kind, i) for i, (kind, _) in enumerate(lines, 1) if kind not in ("ok", "empty")]
    assert [(r["reject_reason"], r["reject_line"]) for r in rej] == expected
    assert all(r["reject_source"] == str(tmp / f"in.jsonl{ext}") for r in rej)


def test_writing_many_records_then_reading_them_loses_none(tmp_path):
    records = [{"i": i} for i in range(100_000)]  # past the 64 KiB flush threshold many times
    write_records(records, tmp_path / "big.jsonl.zst")
    stats = RunStats()
    assert sum(1 for _ in read_records(tmp_path / "big.jsonl.zst", stats=stats)) == stats.n_in == 100_000
