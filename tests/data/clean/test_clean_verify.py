"""Efficient verification: the anneal comparison runs, is deterministic, and reports a delta."""

import json

import pytest

from cpmtool.data.clean.verify import VerifyConfig, verify
from cpmtool.errors import InputError

TINY = dict(
    pretrain_steps=3,
    anneal_steps=2,
    seq_len=32,
    batch_size=4,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    eval_windows=4,
)


def _docs(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_verify_reports_both_anneals_from_one_reference(tmp_path):
    prose = [f"The river runs past mill number {i} and on to the sea, where boats wait." for i in range(30)]
    junk = [f"zq{i}x 9#@ {i * 7919 % 997} qq kz {i}!!" for i in range(30)]
    cand = _docs(tmp_path / "c.jsonl", prose[:20])
    base = _docs(tmp_path / "b.jsonl", junk)
    held = _docs(tmp_path / "e.jsonl", prose[20:])
    r1 = verify(cand, base, held, VerifyConfig(**TINY))
    assert set(r1) >= {"reference_bpb", "baseline_bpb", "candidate_bpb", "delta_bpb", "helps", "runs"}
    assert 0 < r1["candidate_bpb"] < 12 and r1["delta_bpb"] == pytest.approx(
        r1["baseline_bpb"] - r1["candidate_bpb"], abs=1e-4
    )
    # with no candidate share every anneal is the baseline's: same start, same batches
    same = verify([cand, base], base, held, VerifyConfig(**{**TINY, "share": 0.0}))
    assert [c["delta_bpb"] for c in same["candidates"]] == [0.0, 0.0] and "delta_bpb" not in same
    assert same["reference_bpb"] == r1["reference_bpb"] and same["baseline_bpb"] == r1["baseline_bpb"]


def test_verify_needs_text(tmp_path):
    empty = _docs(tmp_path / "x.jsonl", [])
    ok = _docs(tmp_path / "ok.jsonl", ["some text " * 20])
    with pytest.raises(InputError, match="--candidate"):
        verify(empty, ok, ok, VerifyConfig(**TINY))
