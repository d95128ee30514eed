import gzip

import orjson
import pytest
import zstandard

from cpmtool.errors import InputError
from cpmtool.io import RunStats, open_in, open_out, read_records, write_records

RECORDS = [
    {"id": str(i), "text": "héllo wörld " * (i % 7), "n": i, "x": [1.5, None, True]} for i in range(500)
]


@pytest.mark.parametrize("ext", ["", ".gz", ".zst"])
def test_round_trip(tmp_path, ext):
    path = tmp_path / f"data.jsonl{ext}"
    assert write_records(RECORDS, path) == len(RECORDS)
    stats = RunStats()
    assert list(read_records(path, stats=stats)) == RECORDS
    assert (stats.n_in, stats.n_rejected, stats.empty_lines) == (len(RECORDS), 0, 0)


def test_compression_is_chosen_by_extension(tmp_path):
    write_records(RECORDS, tmp_path / "a.jsonl.gz")
    write_records(RECORDS, tmp_path / "a.jsonl.zst")
    write_records(RECORDS, tmp_path / "a.jsonl")
    assert gzip.decompress((tmp_path / "a.jsonl.gz").read_bytes()) == (tmp_path / "a.jsonl").read_bytes()
    zst = zstandard.ZstdDecompressor().stream_reader((tmp_path / "a.jsonl.zst").read_bytes()).read()
    assert zst == (tmp_path / "a.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes().splitlines()[0] == orjson.dumps(RECORDS[0])


def test_zst_with_several_frames_reads_them_all(tmp_path):
    # pzstd and `cat a.zst b.zst` make multi-frame files
    lines = [orjson.dumps(r) + b"\n" for r in RECORDS]
    cctx = zstandard.ZstdCompressor()
    (tmp_path / "m.jsonl.zst").write_bytes(
        b"".join(cctx.compress(b"".join(lines[i : i + 100])) for i in range(0, 500, 100))
    )
    assert list(read_records(tmp_path / "m.jsonl.zst", stats=RunStats())) == RECORDS


def test_several_inputs_in_order_with_positions(tmp_path):
    write_records(RECORDS[:3], tmp_path / "a.jsonl")
    write_records(RECORDS[3:5], tmp_path / "b.jsonl.zst")
    stats = RunStats()
    seen = [
        (r["id"], stats.position)
        for r in read_records([tmp_path / "a.jsonl", tmp_path / "b.jsonl.zst"], stats=stats)
    ]
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.zst")
    assert seen == [("0", (a, 1)), ("1", (a, 2)), ("2", (a, 3)), ("3", (b, 1)), ("4", (b, 2))]
    assert stats.sources == [a, b]


def test_empty_input_gives_no_records(tmp_path):
    for name in ["e.jsonl", "e.jsonl.gz", "e.jsonl.zst"]:
        write_records([], tmp_path / name)
        stats = RunStats()
        assert list(read_records(tmp_path / name, stats=stats)) == []
        assert stats.n_in == 0


def _one_line_error(path) -> str:
    with pytest.raises(InputError) as info:
        list(read_records(path, stats=RunStats()))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_corrupt_and_truncated_compressed_input(tmp_path):
    data = b"".join(orjson.dumps(r) + b"\n" for r in RECORDS * 20)
    (tmp_path / "junk.jsonl.zst").write_bytes(b"this is not zstd\n")
    (tmp_path / "junk.jsonl.gz").write_bytes(b"this is not gzip\n")
    z = zstandard.ZstdCompressor().compress(data)
    (tmp_path / "cut.jsonl.zst").write_bytes(z[: len(z) // 2])
    g = gzip.compress(data)
    (tmp_path / "cut.jsonl.gz").write_bytes(g[: len(g) // 2])
    assert "Unknown frame descriptor" in _one_line_error(tmp_path / "junk.jsonl.zst")
    assert "Not a gzipped file" in _one_line_error(tmp_path / "junk.jsonl.gz")
    assert "truncated" in _one_line_error(tmp_path / "cut.jsonl.zst")
    assert "end-of-stream" in _one_line_error(tmp_path / "cut.jsonl.gz")


def test_missing_file_and_directory(tmp_path):
    assert "no such file" in _one_line_error(tmp_path / "nope.jsonl")
    assert "is a directory" in _one_line_error(tmp_path)


def test_open_out_creates_parents_and_open_in_reads_bytes(tmp_path):
    path = tmp_path / "deep" / "er" / "x.txt.gz"
    with open_out(path) as fh:
        fh.write(b"abc\n")
    with open_in(path) as fh:
        assert fh.read() == b"abc\n"
