"""The native engine: parity with transformers `generate`, sampling contracts, continuous batching."""

import pytest
import torch

from cpmtool.engine.native import NativeEngine
from cpmtool.engine.types import Request, SamplingParams
from cpmtool.errors import ConfigError

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away, there lived", "1, 2, 3,", "Hello"]


@pytest.fixture(scope="module")
def engine(tiny_pair, smollm2_tokenizer):
    return NativeEngine(tiny_pair[0], smollm2_tokenizer, max_batch=8)


def hf_greedy(ref, ids, n):
    import transformers

    gc = transformers.GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        return ref.generate(torch.tensor([ids]), generation_config=gc)[0, len(ids):].tolist()


def test_greedy_matches_transformers_generate(engine, tiny_pair):
    reqs = [Request(prompt=p, id=str(i)) for i, p in enumerate(PROMPTS)]
    res = engine.generate(reqs, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for r in res:
        c = r.completions[0]
        assert c.token_ids == hf_greedy(tiny_pair[1], r.prompt_ids, 12), r.id
        assert c.finish_reason == "length" and len(c.token_ids) == 12


def test_batch_composition_does_not_change_outputs(engine):
    p = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=10, seed=11, n=2, ignore_eos=True)
    together = engine.generate([Request(prompt=x, id=x) for x in PROMPTS], p)
    for x, r in zip(PROMPTS, together, strict=True):
        alone = engine.generate([Request(prompt=x, id=x)], p)[0]
        assert [c.token_ids for c in r.completions] == [c.token_ids for c in alone.completions]


def test_drawing_uniforms_ahead_gives_the_tokens_of_one_draw_per_token(engine, monkeypatch):
    # 150 tokens cross two refills of a row's 64-draw block; a greedy request draws nothing
    from cpmtool.engine.native import Scheduler

    reqs = [Request(prompt=x, id=x, params=SamplingParams(temperature=1.0, max_tokens=150, seed=i, n=2,
                                                          ignore_eos=True)) for i, x in enumerate(PROMPTS[:2])]
    reqs.append(Request(prompt="Hello", id="g", params=SamplingParams(temperature=0, max_tokens=5, seed=3)))
    got = {}
    for ahead in (False, True):
        monkeypatch.setattr(Scheduler, "draw_ahead", ahead)
        got[ahead] = [[c.token_ids for c in r.completions] for r in engine.generate(reqs)]
    assert got[True] == got[False] and len(got[True][0][0]) == 150


def test_a_sequence_draws_its_generators_numbers_in_order(engine):
    # Scheduler's per-sequence blocks against one torch.rand(1) per token from the same seed
    from cpmtool.engine.native import UNIFORM_BLOCK, Scheduler

    sched = Scheduler(engine)
    req = sched.add(Request(prompt="Hi", id="x"), SamplingParams(temperature=1.0, max_tokens=150, seed=7))
    s = req.seqs[0]
    ref = torch.Generator().manual_seed(s.generator.initial_seed())
    want = [torch.rand(1, dtype=torch.float64, generator=ref).item() for _ in range(2 * UNIFORM_BLOCK + 5)]
    got = []
    for _ in range(2 * UNIFORM_BLOCK + 5):
        got.append(s.uniform())
        s.tokens.append(0)  # a token per draw, as sampling appends
    assert got == want


def test_n_samples_share_the_prompt_and_differ(engine):
    r = engine.generate([Request(prompt="Hello", id="h")], SamplingParams(temperature=1.0, n=4, max_tokens=8,
                                                                         seed=1, ignore_eos=True))[0]
    assert [c.index for c in r.completions] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in r.completions}) > 1


def test_logprobs_equal_a_full_forward(engine, tiny_pair):
    ours = tiny_pair[0]
    r = engine.generate([Request(prompt="The quick brown fox", id="x")],
                        SamplingParams(temperature=1.0, max_tokens=6, seed=3, logprobs=3, ignore_eos=True))[0]
    c = r.completions[0]
    ids = torch.tensor([r.prompt_ids + c.token_ids])
    with torch.no_grad():
        logp = ours(ids)[0].log_softmax(-1)
    n = len(r.prompt_ids)
    for t, tok in enumerate(c.token_ids):
        want = logp[n - 1 + t]
        assert abs(c.logprobs[t] - want[tok].item()) < 1e-4
        top = want.topk(3)
        assert list(c.top_logprobs[t]) == top.indices.tolist()


def test_stop_strings_and_stop_tokens(engine):
    base = engine.generate([Request(prompt="1, 2, 3,", id="a")],
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].completions[0]
    # stop at the text of the third generated token: the text is cut before it
    cut = engine.decode(base.token_ids[:3])
    stop_piece = engine.decode(base.token_ids[2:3]).strip()
    if stop_piece:
        c = engine.generate([Request(prompt="1, 2, 3,", id="a")],
                            SamplingParams(temperature=0, max_tokens=12, stop=[stop_piece], ignore_eos=True)
                            )[0].completions[0]
        assert c.finish_reason == "stop" and c.stop_reason == stop_piece
        assert stop_piece not in c.text and cut.startswith(c.text)
    tok = base.token_ids[4]
    c = engine.generate([Request(prompt="1, 2, 3,", id="a")],
                        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[tok], ignore_eos=True)
                        )[0].completions[0]
    first = base.token_ids.index(tok)
    assert c.token_ids == base.token_ids[: first + 1] and c.finish_reason == "stop" and c.stop_reason == tok


def test_continuous_batching_a_late_request_joins(engine):
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    solo = {x: engine.generate([Request(prompt=x, id=x)], p)[0].completions[0].token_ids for x in PROMPTS[:2]}
    sched = engine.scheduler()
    a = sched.add(Request(prompt=PROMPTS[0], id="a"), p)
    for _ in range(4):
        sched.step()
    assert len(sched.running) == 1
    b = sched.add(Request(prompt=PROMPTS[1], id="b"), p)
    sched.step()
    assert len(sched.running) == 2  # b joined the running batch
    while sched.has_work:
        sched.step()
    assert a.seqs[0].tokens == solo[PROMPTS[0]]
    assert b.seqs[0].tokens == solo[PROMPTS[1]]


def test_more_requests_than_batch_slots(tiny_pair, smollm2_tokenizer):
    eng = NativeEngine(tiny_pair[0], smollm2_tokenizer, max_batch=2)
    p = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    reqs = [Request(prompt=f"{i} apples and", id=str(i)) for i in range(7)]
    res = eng.generate(reqs, p)
    assert [r.id for r in res] == [str(i) for i in range(7)]
    streamed = {r.id: r.completions[0].token_ids for r in eng.generate_stream(iter(reqs), p)}
    assert streamed == {r.id: r.completions[0].token_ids for r in res}


def test_bad_requests(engine):
    with pytest.raises(ConfigError, match="empty prompt"):
        engine.generate([Request(prompt_ids=[], id="e")])
    with pytest.raises(ConfigError, match="exceeds the maximum length"):
        engine.generate([Request(prompt_ids=[1] * 600, id="long")])
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ConfigError, match="exactly one"):
        Request(prompt="a", prompt_ids=[1])


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2_tokenizer):
    import transformers

    from cpmtool.model.registry import resolve_model

    eng = NativeEngine.load("smollm2-135m", max_batch=4)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(resolve_model("smollm2-135m")),
                                                            dtype=torch.float32).eval()
    msgs = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Name three colors.")]
    res = eng.generate([Request(messages=m, id=str(i)) for i, m in enumerate(msgs)],
                       SamplingParams(temperature=0, max_tokens=20))
    assert "Paris" in res[0].completions[0].text
    for r in res:
        c = r.completions[0]
        gc = transformers.GenerationConfig(max_new_tokens=20, do_sample=False)
        with torch.no_grad():
            want = ref.generate(torch.tensor([r.prompt_ids]), generation_config=gc)[0, len(r.prompt_ids):].tolist()
        assert c.token_ids == want


def test_prefill_groups_bound_the_padding():
    from types import SimpleNamespace

    from cpmtool.engine.native import _length_groups

    reqs = [SimpleNamespace(prompt_ids=[0] * n) for n in (41, 10, 100, 12, 40, 11)]
    groups = [[len(r.prompt_ids) for r in g] for g in _length_groups(reqs)]
    # by hand: 12 joins 10, 11 (36 padded <= 1.25 * 33 real); 40 would pad 160 > 1.25 * 73; 41 joins
    # 40 (82 <= 101.25); 100 would pad 300 > 1.25 * 181
    assert groups == [[10, 11, 12], [40, 41], [100]]
    assert _length_groups([]) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_greedy_and_seeded_sampling_match_the_cpu(tiny_pair, smollm2_tokenizer):
    import copy

    gpu = NativeEngine(copy.deepcopy(tiny_pair[0]).cuda(), smollm2_tokenizer, max_batch=8)
    cpu = NativeEngine(tiny_pair[0], smollm2_tokenizer, max_batch=8)
    reqs = [Request(prompt=p, id=str(i)) for i, p in enumerate(PROMPTS)]
    for params in (SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2),
                   SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=5, n=2, ignore_eos=True)):
        on_gpu, on_cpu = gpu.generate(reqs, params), cpu.generate(reqs, params)
        # sampling runs on the CPU with the requests' CPU generators: logits equal up to rounding give equal tokens
        assert [[c.token_ids for c in r.completions] for r in on_gpu] == \
            [[c.token_ids for c in r.completions] for r in on_cpu]
