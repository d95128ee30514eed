"""Speculative decoding: the acceptance rule keeps the target distribution exactly; greedy output
equals plain greedy decoding; FR-Spec frequency lists."""

import json

import pytest
import torch

from cpmtool.engine.native import NativeEngine
from cpmtool.engine.speculative import SpecConfig, accept_tokens, layer_prefix, prompt_lookup, spec_config
from cpmtool.engine.types import Request, SamplingParams
from cpmtool.errors import ConfigError

# -- the rule on fixed distributions ------------------------------------------------------------

P = torch.tensor([[0.50, 0.20, 0.15, 0.10, 0.05],
                  [0.05, 0.05, 0.30, 0.30, 0.30],
                  [0.10, 0.60, 0.10, 0.10, 0.10]], dtype=torch.float64)  # target p at positions 0, 1, 2
Q = torch.tensor([[0.10, 0.10, 0.10, 0.10, 0.60],
                  [0.40, 0.40, 0.10, 0.05, 0.05],
                  [0.20, 0.20, 0.20, 0.20, 0.20]], dtype=torch.float64)  # a deliberately bad draft


def _tv(a, b):
    return 0.5 * float((a - b).abs().sum())


def _chi2(counts, probs):
    n = counts.sum()
    exp = probs * n
    return float(((counts - exp) ** 2 / exp).sum())


def _simulate(draft_kind: str, n_draws: int, seed: int = 0):
    """Generate 3-token sequences by rounds of k=2 proposals; p and q depend on the position only,
    so every sequence should be distributed as P[0] x P[1] x P[2]."""
    g = torch.Generator().manual_seed(seed)
    q_ids = torch.tensor([4, 0, 1]) if draft_kind == "frspec" else None
    q_sub = None
    if q_ids is not None:  # FR-Spec: the draft only knows tokens 4, 0, 1
        q_sub = Q[:, q_ids] / Q[:, q_ids].sum(-1, keepdim=True)
    joint = torch.zeros(5, 5, 5)
    for _ in range(n_draws):
        seq: list[int] = []
        while len(seq) < 3:
            t0 = len(seq)
            k = min(2, 3 - t0 - 1)
            pos = list(range(t0, t0 + k))
            if draft_kind == "ngram":  # a fixed proposal, as prompt lookup makes
                draft, q, idx = [4] * k, None, None
            elif draft_kind == "frspec":
                q = q_sub[pos]
                idx = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(k)]
                draft = [int(q_ids[i]) for i in idx]
            else:
                q = Q[pos]
                draft, idx = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(k)], None
            seq += accept_tokens(P[t0: t0 + k + 1], draft, q, q_ids, idx, generator=g)
        a, b, c = seq[:3]
        joint[a, b, c] += 1
    return joint


@pytest.mark.parametrize("draft_kind", ["model", "frspec", "ngram"])
def test_acceptance_rule_keeps_the_target_distribution(draft_kind):
    n = 12000
    joint = _simulate(draft_kind, n)
    exact = P[0][:, None, None] * P[1][None, :, None] * P[2][None, None, :]
    # the draft is far from the target, so emitting draft tokens unchecked would fail these bounds
    assert _tv(Q[0], P[0]) > 0.3
    for axis, want in ((0, P[0]), (1, P[1]), (2, P[2])):
        dims = tuple(d for d in range(3) if d != axis)
        got = joint.sum(dims).double()
        assert _chi2(got, want) < 20.5, (axis, got / n)  # chi2(4) p = 0.0004
        assert _tv(got / n, want) < 0.02
    pair = joint.sum(2).flatten().double()
    assert _chi2(pair, exact.sum(2).flatten()) < 51.2  # chi2(24) p = 0.001
    assert _tv(joint.flatten().double() / n, exact.flatten()) < 0.06


def test_acceptance_rule_greedy_and_edge_cases():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    # a one-hot target keeps exactly the matching prefix and then its own token
    assert accept_tokens(p, [1, 2]) == [1, 2, 0]
    assert accept_tokens(p, [1, 0]) == [1, 2]
    assert accept_tokens(p, [2, 2]) == [1]
    assert accept_tokens(p[:1], []) == [1]
    # a draft token the draft gave zero probability is never accepted
    q = torch.tensor([[0.5, 0.0, 0.5]], dtype=torch.float64)
    assert accept_tokens(p[:2], [1], q) == [1]  # rejected; the residual max(0, p - q) is token 1 again


def test_prompt_lookup_takes_the_earliest_longest_match():
    h = [5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 6, 7]
    assert prompt_lookup(h, 3, max_ngram=2) == [8, 9, 5]  # "6 7" first seen at 1: continue from 3
    assert prompt_lookup(h, 3, max_ngram=3) == [8, 9, 5]
    assert prompt_lookup([1, 2, 3], 4) == []
    assert prompt_lookup([4, 1, 2, 4], 2, max_ngram=1) == [1, 2]


def test_spec_config_validation():
    assert spec_config(None) is None
    assert spec_config("ngram", spec_tokens=3) == SpecConfig("ngram", 3)
    with pytest.raises(ConfigError, match="needs --draft-model"):
        spec_config("draft")
    with pytest.raises(ConfigError, match="unknown --spec"):
        spec_config("eagle")
    with pytest.raises(ConfigError, match="only applies to --spec draft"):
        spec_config("ngram", frspec_vocab=100)
    with pytest.raises(ConfigError, match="need --spec draft"):
        spec_config(None, draft_model="x")


# -- end to end through the engine on a tiny vocabulary ----------------------------------------

V = 6


@pytest.fixture(scope="module")
def small_vocab_pair():
    """Target and (different) draft Llamas over a 6-token vocabulary, so exact sequence
    probabilities can be enumerated."""
    from cpmtool.model.config import ModelConfig
    from cpmtool.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(1)
    target = Transformer(cfg).eval()
    draft = Transformer(cfg).eval()
    for m in (target, draft):  # sharper than the default init, so the distributions are far from uniform
        with torch.no_grad():
            m.lm_head.weight.mul_(2)
    return target, draft


def _pooled_chi2(counts, probs):
    """Chi-square statistic and degrees of freedom, rare cells (expected < 5) pooled into one."""
    n = float(counts.sum())
    keep = probs * n >= 5
    obs, exp = counts[keep], probs[keep]
    if (~keep).any() and float(probs[~keep].sum()) * n >= 5:
        obs = torch.cat([obs, counts[~keep].sum()[None]])
        exp = torch.cat([exp, probs[~keep].sum()[None]])
    return _chi2(obs, exp / exp.sum()), len(obs) - 1


def _exact_joint(model, prompt, steps, temperature, top_k):
    from cpmtool.engine.sampling import filter_logits

    seqs = torch.cartesian_prod(*[torch.arange(V)] * steps)  # (V^steps, steps)
    ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        logits = model(ids)[:, len(prompt) - 1: -1].reshape(-1, V)
    n = logits.shape[0]
    x = filter_logits(logits, torch.full((n,), temperature), torch.full((n,), top_k), torch.ones(n), torch.zeros(n))
    logp = x.log_softmax(-1).view(len(seqs), steps, V).gather(2, seqs[:, :, None])[..., 0]
    return logp.sum(1).exp().double()  # (V^steps,)


@pytest.mark.parametrize("method", ["draft", "frspec", "ngram"])
def test_engine_samples_the_target_distribution(method, small_vocab_pair, smollm2_tokenizer, tmp_path):
    target, draft = small_vocab_pair
    spec = SpecConfig("ngram", 2)
    if method != "ngram":
        # the draft model is passed in-process: write it out and load it back by path
        from cpmtool.model.loader import save_pretrained

        d = tmp_path / "draft"
        save_pretrained(draft, d)
        freq = tmp_path / "freq.json"
        freq.write_text(json.dumps({"ids": [3, 1, 4, 0, 5, 2], "vocab_size": V}))
        spec = SpecConfig("draft", 2, draft_model=str(d), frspec_vocab=3 if method == "frspec" else None,
                          frspec_file=str(freq))
    eng = NativeEngine(target, smollm2_tokenizer, max_batch=4096, speculative=spec)
    prompt = [1, 2, 3, 1, 2]
    steps, n = 3, 3000
    params = SamplingParams(n=n, temperature=0.8, top_k=4, max_tokens=steps, ignore_eos=True, seed=5)
    res = eng.generate([Request(prompt_ids=prompt, id="x")], params)[0]
    assert eng.speculative.stats.drafted > 0 and eng.speculative.stats.accepted > 0
    counts = torch.zeros(V ** steps, dtype=torch.float64)
    for c in res.completions:
        assert len(c.token_ids) == steps
        a, b, cc = c.token_ids
        counts[(a * V + b) * V + cc] += 1
    exact = _exact_joint(target, prompt, steps, 0.8, 4)
    assert abs(float(exact.sum()) - 1) < 1e-6
    # the whole joint, and the joint of the speculated tokens (all but the first, which the prefill samples)
    for obs, want in ((counts, exact), (counts.view(V, V * V).sum(0), exact.view(V, V * V).sum(0))):
        stat, dof = _pooled_chi2(obs, want)
        assert dof >= 8 and stat < dof + 4.5 * (2 * dof) ** 0.5, (dof, stat)  # p < ~1e-4
    if method != "ngram":  # the test can fail: the draft's own distribution is rejected
        stat, dof = _pooled_chi2(counts, _exact_joint(draft, prompt, steps, 0.8, 4))
        assert stat > dof + 10 * (2 * dof) ** 0.5


# -- greedy: identical text ----------------------------------------------------------------------

PROMPTS = ["one two three one two three one two", "The quick brown fox", "a b c d a b c d a b", "Hello"]


@pytest.mark.parametrize("spec", [SpecConfig("ngram", 3), SpecConfig("draft", 4, draft_model="self:1")])
def test_greedy_speculative_equals_plain_greedy(spec, tiny_pair, smollm2_tokenizer):
    plain = NativeEngine(tiny_pair[0], smollm2_tokenizer, max_batch=8)
    fast = NativeEngine(tiny_pair[0], smollm2_tokenizer, max_batch=8, speculative=spec)
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    reqs = [Request(prompt=x, id=str(i)) for i, x in enumerate(PROMPTS)]
    want = plain.generate(reqs, p)
    got = fast.generate(reqs, p)
    for w, g in zip(want, got, strict=True):
        cw, cg = w.completions[0], g.completions[0]
        assert cg.token_ids == cw.token_ids and cg.text == cw.text
        assert cg.finish_reason == "length" and len(cg.token_ids) == 24
        assert cg.logprobs == pytest.approx(cw.logprobs, abs=1e-4)
        assert [list(t) for t in cg.top_logprobs] == [list(t) for t in cw.top_logprobs]
    st = fast.speculative.stats
    assert st.drafted > 0 and st.emitted == 4 * 23  # the first token of each comes from the prefill


def test_speculative_respects_stops_and_continuous_batching(tiny_pair, smollm2_tokenizer):
    plain = NativeEngine(tiny_pair[0], smollm2_tokenizer, max_batch=8)
    fast = NativeEngine(tiny_pair[0], smollm2_tokenizer, max_batch=8, speculative=SpecConfig("ngram", 5))
    base = plain.generate([Request(prompt=PROMPTS[0], id="a")],
                          SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].completions[0]
    tok = base.token_ids[6]
    p = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[tok], ignore_eos=True)
    c = fast.generate([Request(prompt=PROMPTS[0], id="a")], p)[0].completions[0]
    first = base.token_ids.index(tok)
    assert c.token_ids == base.token_ids[: first + 1] and c.finish_reason == "stop"
    # a request added mid-run joins the running batch and both still equal plain greedy
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    solo = [plain.generate([Request(prompt=x, id=x)], p)[0].completions[0].token_ids for x in PROMPTS[:2]]
    sched = fast.scheduler()
    a = sched.add(Request(prompt=PROMPTS[0], id="a"), p)
    sched.step()
    sched.step()
    b = sched.add(Request(prompt=PROMPTS[1], id="b"), p)
    while sched.has_work:
        sched.step()
    assert [a.seqs[0].tokens, b.seqs[0].tokens] == solo


def test_layer_prefix_shares_weights(tiny_pair):
    target = tiny_pair[0]
    view = layer_prefix(target, 1)
    assert view.config.num_hidden_layers == 1 and len(view.model.layers) == 1
    assert view.model.layers[0] is target.model.layers[0] and view.lm_head is target.lm_head
    with pytest.raises(ConfigError, match="need 1 <= N < 2"):
        layer_prefix(target, 2)


@pytest.mark.slow
def test_smollm2_greedy_speculative_equals_plain():
    eng = NativeEngine.load("smollm2-135m", max_batch=2)
    text = "Roses are red, violets are blue, sugar is sweet, and so are you."
    reqs = [Request(messages=[{"role": "user", "content": f"Repeat this text exactly: {text}"}], id="r")]
    p = SamplingParams(temperature=0, max_tokens=20)
    want = eng.generate(reqs, p)[0].completions[0].token_ids
    assert "violets" in eng.decode(want)
    for spec in (SpecConfig("ngram", 4), SpecConfig("draft", 2, draft_model="self:6")):
        fast = NativeEngine(eng.model, eng.tokenizer, max_batch=2, speculative=spec)
        assert fast.generate(reqs, p)[0].completions[0].token_ids == want, spec
        assert fast.speculative.stats.drafted > 0
    assert fast.speculative.stats.emitted == len(want) - 1


# -- FR-Spec frequency lists ---------------------------------------------------------------------

def test_freq_list_and_frspec_ids(smollm2_tokenizer, tmp_path):
    from cpmtool.model.freq import build_freq, frspec_ids, load_freq, record_text, save_freq

    docs = [{"text": "the cat sat on the mat"}, {"messages": [{"role": "user", "content": "the the dog"}]},
            {"prompt": "a cat", "completion": " and the hat"}]
    freq = build_freq((record_text(r) for r in docs), smollm2_tokenizer, model="smollm2-135m")
    the = smollm2_tokenizer.encode(" the", add_special_tokens=False)
    assert len(the) == 1 and freq["ids"][0] == the[0] and freq["counts"][0] == 3  # " the", 3 times
    assert freq["counts"] == sorted(freq["counts"], reverse=True)
    assert freq["n_docs"] == 3 and freq["n_tokens"] == sum(freq["counts"])
    path = save_freq(freq, tmp_path / "f.json")
    back = load_freq(path)
    assert back == freq
    eos = smollm2_tokenizer.eos_token_id
    ids = frspec_ids(back, 4, [eos])
    assert len(ids) == 4 and ids[:3] == freq["ids"][:3] and ids[3] == eos
    padded = frspec_ids(back, len(freq["ids"]) + 5, [])
    assert len(padded) == len(freq["ids"]) + 5 and len(set(padded)) == len(padded)
    with pytest.raises(ConfigError, match="exceeds the vocabulary"):
        frspec_ids(back, 10**6)
