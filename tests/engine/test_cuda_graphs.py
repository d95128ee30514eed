"""Decode steps as CUDA graphs (engine/cuda_graphs.py): the fixed-shape step, finished rows kept in the
batch, and the captured graphs against eager decoding.

On a CPU the same fixed-shape path runs without capture (the scheduler's logic: slot buckets, dead
rows, lazy compaction, rebinding after admissions); the captured replay itself is checked on CUDA.
"""

import copy

import pytest
import torch

from cpmtool.data import tasks
from cpmtool.engine.cuda_graphs import s_bucket
from cpmtool.engine.native import NativeEngine
from cpmtool.engine.types import Request, SamplingParams


@pytest.fixture(scope="module")
def tiny():
    return NativeEngine.load("cpm-tiny", max_batch=64)


@pytest.fixture(scope="module")
def requests():
    recs = tasks.generate("arithmetic", "test", 12, 3, level=[1, 2, 3])
    return [Request(prompt=r["prompt"], id=str(i)) for i, r in enumerate(recs)]


SETTINGS = [SamplingParams(temperature=0, max_tokens=48, logprobs=1),
            SamplingParams(temperature=1.0, top_p=0.95, max_tokens=48, seed=7, n=4, logprobs=1)]


def tokens(results):
    return [[c.token_ids for c in r.completions] for r in results]


def logprobs(results):
    return torch.tensor([x for r in results for c in r.completions for x in c.logprobs])


def fixed_shape(engine, on: bool):
    engine.graphs_enabled = on  # on a CPU: the graph path's fixed shapes, run eagerly (no capture)
    return engine


def test_slot_buckets():
    # powers of two from 64, capped at the cache's length
    assert [s_bucket(n, 512) for n in (1, 64, 65, 128, 129, 300, 512)] == [64, 64, 128, 128, 256, 512, 512]
    assert s_bucket(65, 100) == 100 and s_bucket(10, 40) == 40


@pytest.mark.parametrize("params", SETTINGS, ids=["greedy", "seeded"])
def test_fixed_shape_decode_gives_the_eager_tokens(tiny, requests, params):
    try:
        eager = tiny.generate(requests, params)
        fixed = fixed_shape(tiny, True).generate(requests, params)
    finally:
        fixed_shape(tiny, False)
    assert tokens(fixed) == tokens(eager)
    # the same attention over more (masked) slots: equal up to float summation order
    torch.testing.assert_close(logprobs(fixed), logprobs(eager), rtol=0, atol=1e-4)
    lens = {len(t) for r in tokens(eager) for t in r}
    assert len(lens) > 3 and max(lens) < 48  # rows end at EOS at different steps: dead rows are exercised


def test_finished_rows_stay_until_half_the_batch_is_done(tiny, requests):
    sched = fixed_shape(tiny, True).scheduler()
    try:
        for r in requests:
            sched.add(r, SETTINGS[1])
        kept_dead = 0
        while sched.has_work:
            sched.step()
            live = sum(s.finish_reason is None for s in sched.running)
            if sched.running:
                # lazy compaction: more than half alive, or the batch was just compacted to the live rows
                assert 2 * live > len(sched.running) or live == len(sched.running), (live, len(sched.running))
                assert sched.cache.batch_size == len(sched.running)
            kept_dead = max(kept_dead, len(sched.running) - live)
        assert kept_dead > 0
    finally:
        fixed_shape(tiny, False)


def test_a_late_request_joins_the_fixed_shape_batch(tiny, requests):
    params = SETTINGS[1]
    alone = tiny.generate(requests[:1], params)
    sched = fixed_shape(tiny, True).scheduler()
    try:
        first = [sched.add(r, params) for r in requests[1:5]]
        for _ in range(20):  # some rows are done by now and kept; the admission compacts them away
            sched.step()
        late = sched.add(requests[0], params)
        while sched.has_work:
            sched.step()
    finally:
        fixed_shape(tiny, False)
    assert all(r.done for r in first)
    assert [s.tokens for s in late.seqs] == [c.token_ids for c in alone[0].completions]


def test_graphs_are_off_on_the_cpu_and_by_environment(tiny, monkeypatch):
    assert not tiny.graphs_enabled and tiny.scheduler().graphs is None
    monkeypatch.setenv("CPMTOOL_CUDA_GRAPHS", "0")
    assert not NativeEngine(tiny.model, tiny.tokenizer).graphs_enabled


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("params", SETTINGS, ids=["greedy", "seeded"])
def test_on_cuda_graph_replays_give_the_eager_tokens(tiny, requests, params):
    model = copy.deepcopy(tiny.model).cuda()
    graphs = NativeEngine(model, tiny.tokenizer, max_batch=64)
    eager = NativeEngine(model, tiny.tokenizer, max_batch=64, cuda_graphs=False)
    assert graphs.graphs_enabled and not eager.graphs_enabled
    sched = graphs.scheduler()
    reqs = [sched.add(r, params) for r in requests]
    while sched.has_work:
        sched.step()
    assert sched.graphs.captures >= 2  # more than one (rows, slots) shape in a rollout
    got = [graphs._result(r) for r in reqs]
    want = eager.generate(requests, params)
    assert tokens(got) == tokens(want)
    torch.testing.assert_close(logprobs(got), logprobs(want), rtol=0, atol=1e-4)
    assert tokens(got) == tokens(tiny.generate(requests, params))  # and the CPU's
