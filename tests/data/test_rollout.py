"""The rollout library on a tiny random MiniCPM (fast; no trained weights needed): records, rejects,
seeds, chunk-wise resumption, budgets, propose-and-aggregate, and the vote on literal samples."""

import orjson
import pytest
import torch

from cpmtool.data.aggregate import AGGREGATOR_INSTRUCTION, aggregation_query
from cpmtool.data.rollout import Prompt, Trajectory, _Run, rollout
from cpmtool.engine.types import Request, SamplingParams
from cpmtool.errors import ConfigError, InputError

CHAT = ("{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def engine():
    """A 2-layer MiniCPM with random weights and a 400-token byte-level BPE with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from cpmtool.engine.native import NativeEngine
    from cpmtool.model.config import ModelConfig
    from cpmtool.model.transformer import Transformer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = ["Compute 12+34. Use 3, 4 to make 7. \\boxed{46} Final answer:", AGGREGATOR_INSTRUCTION] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                 chat_template=CHAT)
    cfg = ModelConfig(family="minicpm", vocab_size=len(hf), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, scale_emb=4.0, scale_depth=1.4, dim_model_base=32, bos_token_id=1,
                      eos_token_id=[3], pad_token_id=0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)  # large enough that greedy text varies instead of repeating one token
    return NativeEngine(model.eval(), hf, max_batch=16)


PROMPTS = [
    {"id": "a", "messages": [{"role": "user", "content": "Compute 3+4."}], "answer": "7", "x": 1},
    {"id": "b", "prompt": "Use 3, 4 to make 7.", "answer": "#### 7"},
    {"id": "c", "prompt": "Compute 12+34."},
]


def run(tmp_path, records, name="out", **kw):
    src = tmp_path / f"{name}.in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    out, rej = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.rejects.jsonl"
    inputs = kw.pop("inputs", None)
    inputs = [src] if inputs is None else inputs
    stats = rollout(inputs, out, rejects=rej, **kw)
    read = lambda p: [orjson.loads(x) for x in p.read_bytes().splitlines()] if p.exists() else []  # noqa: E731
    return read(out), stats, read(rej)


def by_key(recs):
    return {(r["group"], r["sample"]): r for r in recs}


def test_sample_records(tmp_path, engine):
    out, stats, _ = run(tmp_path, PROMPTS, engine=engine, n=2, max_tokens=6, seed=0, logprobs=True)
    assert stats.n_in == 3 and stats.n_out == 6 and stats.n_rejected == 0
    assert sorted(by_key(out)) == [(g, s) for g in "abc" for s in (0, 1)]
    for r in out:
        assert r["id"] == f"{r['group']}-{r['sample']}"
        assert r["reward"] is None and r["correct"] is None  # --reward none
        assert r["finish_reason"] in ("stop", "length")
        assert 1 <= r["n_tokens"] == len(r["token_ids"]) == len(r["logprobs"]) <= 6
        assert all(lp <= 0 for lp in r["logprobs"])
        assert isinstance(r["completion"], str)
    a0 = by_key(out)[("a", 0)]
    assert a0["x"] == 1 and a0["messages"] == PROMPTS[0]["messages"] and a0["answer"] == "7"  # fields kept


def test_chat_flag_renders_a_plain_prompt_through_the_template(tmp_path, engine):
    rec = {"id": "p", "prompt": "Compute 3+4."}
    as_chat, _, _ = run(tmp_path, [rec], "chat", engine=engine, temperature=0, max_tokens=6, logprobs=True, chat=True)
    as_msgs, _, _ = run(tmp_path, [{"id": "p", "messages": [{"role": "user", "content": "Compute 3+4."}]}], "msgs",
                        engine=engine, temperature=0, max_tokens=6, logprobs=True)
    raw, _, _ = run(tmp_path, [rec], "raw", engine=engine, temperature=0, max_tokens=6, logprobs=True)
    assert as_chat[0]["token_ids"] == as_msgs[0]["token_ids"] != raw[0]["token_ids"]


def test_bad_records_are_counted_rejects_with_line_numbers(tmp_path, engine):
    records = [
        {"id": "ok", "prompt": "Compute 1+2."},
        {"text": "no prompt"},
        {"messages": "Compute 1+2."},
        {"messages": [{"role": "user"}]},
        {"messages": []},
        {"prompt": 5},
        {"prompt": "   "},
        {"prompt": "1" * 1100},  # longer than the model's 1024 positions
    ]
    out, stats, rej = run(tmp_path, records, engine=engine, max_tokens=3)
    assert [r["group"] for r in out] == ["ok"]
    assert [(r["reject_reason"], r["reject_line"]) for r in rej] == [
        ("no_prompt", 2), ("bad_messages", 3), ("bad_messages", 4), ("bad_messages", 5), ("bad_prompt", 6),
        ("empty_prompt", 7), ("prompt_too_long", 8)]
    assert stats.n_in == 8 and stats.n_rejected == 7


def test_strict_stops_at_the_first_reject(tmp_path, engine):
    with pytest.raises(InputError, match=r":2: no_prompt"):
        run(tmp_path, [{"prompt": "x"}, {"q": 1}], engine=engine, max_tokens=2, strict=True)


def test_seeded_samples_do_not_depend_on_the_batch(tmp_path, engine):
    kw = dict(engine=engine, n=3, max_tokens=8, temperature=1.0, seed=7, logprobs=True)
    both, _, _ = run(tmp_path, PROMPTS, "both", **kw)
    alone, _, _ = run(tmp_path, PROMPTS[1:2], "alone", **kw)
    again, _, _ = run(tmp_path, PROMPTS[1:2], "again", **kw)
    ids = lambda recs: [r["token_ids"] for r in sorted(recs, key=lambda r: r["sample"]) if r["group"] == "b"]  # noqa: E731
    assert ids(both) == ids(alone) == ids(again)
    assert len({tuple(x) for x in ids(alone)}) > 1  # the three samples differ


def test_user_reward_and_math_reward(tmp_path, engine):
    f = tmp_path / "rw.py"
    f.write_text("def r(record, completion):\n    return len(completion) / 100, record['id'] == 'a'\n")
    out, _, _ = run(tmp_path, PROMPTS, "user", engine=engine, max_tokens=4, seed=0, reward=f"{f}:r")
    for r in out:
        assert r["reward"] == len(r["completion"]) / 100 and r["correct"] is (r["group"] == "a")
    out, _, _ = run(tmp_path, PROMPTS, "math", engine=engine, max_tokens=4, seed=0, reward="math")
    graded = {r["group"]: (r["reward"], r["correct"]) for r in out}
    assert graded["c"] == (None, None)  # no gold answer
    assert graded["a"][0] in (0.0, 1.0) and graded["b"][0] in (0.0, 1.0)


# ---------------------------------------------------------------- chunk-wise rollout


def chunk_until_done(tmp_path, records, chunk, max_calls=10, **kw):
    """Call rollout with the records once, then without input until the state file is gone."""
    state = tmp_path / "state.json"
    outs = []
    for call in range(max_calls):
        out, _, _ = run(tmp_path, records, f"chunk{call}", inputs=None if call == 0 else [], chunk_tokens=chunk,
                        state=state, policy_version=call, **kw)
        outs.append(out)
        if not state.exists():
            return outs
    raise AssertionError(f"unfinished after {max_calls} calls")


def test_chunked_greedy_equals_one_uninterrupted_run(tmp_path, engine):
    kw = dict(engine=engine, n=2, max_tokens=20, temperature=0, logprobs=True)
    whole, _, _ = run(tmp_path, PROMPTS, "whole", **kw)
    outs = chunk_until_done(tmp_path, PROMPTS, 8, **kw)
    assert [len(o) for o in outs] == [0, 0, 6]  # 20 tokens: 8 + 8 + 4, whole groups at the end
    got, want = by_key(sum(outs, [])), by_key(whole)
    assert got.keys() == want.keys()
    for k, w in want.items():
        g = got[k]
        assert (g["completion"], g["token_ids"], g["finish_reason"], g["n_tokens"]) == \
            (w["completion"], w["token_ids"], w["finish_reason"], w["n_tokens"]), k
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-4)
        assert g["chunks"] == [{"policy_version": v, "n_tokens": t} for v, t in ((0, 8), (1, 8), (2, 4))]


def test_chunked_stop_string_across_a_chunk_boundary(tmp_path, engine):
    kw = dict(engine=engine, max_tokens=20, temperature=0, logprobs=True)
    ref, _, _ = run(tmp_path, PROMPTS[:1], "ref", **kw)
    ids = ref[0]["token_ids"]
    stop = engine.decode(ids[:10])[len(engine.decode(ids[:7])):]  # text of tokens 7..9: crosses the 8-token edge
    assert stop
    whole, _, _ = run(tmp_path, PROMPTS[:1], "whole", stop=[stop], **kw)
    outs = chunk_until_done(tmp_path, PROMPTS[:1], 8, stop=[stop], **kw)
    g, w = sum(outs, [])[0], whole[0]
    assert w["finish_reason"] == "stop" and w["n_tokens"] <= 10
    assert (g["completion"], g["token_ids"], g["finish_reason"]) == (w["completion"], w["token_ids"], "stop")
    assert sum(c["n_tokens"] for c in g["chunks"]) == g["n_tokens"]


def test_chunk_state_holds_tokens_logprobs_and_versions(tmp_path, engine):
    state = tmp_path / "s.json"
    out, stats, _ = run(tmp_path, PROMPTS[:2], engine=engine, n=2, max_tokens=30, temperature=1.0, seed=3,
                        chunk_tokens=5, state=state, policy_version=4)
    assert out == [] and stats.n_in == 2
    saved = orjson.loads(state.read_bytes())
    assert saved["format"] == "cpmtool-rollout-state" and len(saved["groups"]) == 2
    for g in saved["groups"]:
        assert g["prompt_ids"] and len(g["samples"]) == 2
        for s in g["samples"]:
            assert len(s["token_ids"]) == len(s["logprobs"]) == 5
            assert s["chunks"] == [{"policy_version": 4, "n_tokens": 5}] and s["finish_reason"] is None
    state.write_text("{}")
    with pytest.raises(InputError, match="not a rollout state file"):
        run(tmp_path, [], "bad", inputs=[], engine=engine, chunk_tokens=5, state=state)


# ---------------------------------------------------------------- budgets


def test_budget_truncate(tmp_path, engine):
    out, _, _ = run(tmp_path, PROMPTS, engine=engine, n=2, max_tokens=50, budget=5, seed=0)
    assert out and all(r["n_tokens"] <= 5 for r in out)
    assert all(r["finish_reason"] == "length" for r in out if r["n_tokens"] == 5)


def test_budget_force_answer_appends_the_cue_and_an_answer(tmp_path, engine):
    cue = "\nFinal answer: \\boxed{"
    cue_ids = engine.encode(Request(prompt=cue))
    kw = dict(engine=engine, max_tokens=50, budget=4, temperature=0, logprobs=True)
    cut, _, _ = run(tmp_path, PROMPTS, "cut", **kw)
    forced, _, _ = run(tmp_path, PROMPTS, "forced", budget_mode="force-answer", answer_tokens=6, **kw)
    cut, forced = by_key(cut), by_key(forced)
    for k, f in forced.items():
        c = cut[k]
        if c["finish_reason"] == "stop":  # finished within the budget: untouched
            assert f["budget_forced"] is False and f["token_ids"] == c["token_ids"]
            continue
        assert f["budget_forced"] is True
        assert f["token_ids"][:4] == c["token_ids"] and f["token_ids"][4:4 + len(cue_ids)] == cue_ids
        assert f["n_tokens"] == len(f["token_ids"]) <= 4 + len(cue_ids) + 6
        assert f["completion"].startswith(c["completion"] + cue)
        assert f["logprobs"][4:4 + len(cue_ids)] == [None] * len(cue_ids)
        answer = f["completion"][len(c["completion"] + cue):]
        assert ("}" not in answer) or (f["finish_reason"] == "stop" and answer.endswith("}"))


# ---------------------------------------------------------------- propose and aggregate


def test_aggregation_prompt_template():
    q = aggregation_query({"prompt": "Q?"}, ["p1", "p2"])
    assert q == {"prompt": f"{AGGREGATOR_INSTRUCTION}\n\nResponses from models:\n1. p1\n2. p2\n\nQ?"}
    m = aggregation_query({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}]},
                          ["p1"])
    assert m["messages"] == [
        {"role": "system", "content": f"{AGGREGATOR_INSTRUCTION}\n\nResponses from models:\n1. p1\n\nS"},
        {"role": "user", "content": "Q?"}]


def test_aggregate_keeps_the_proposals_of_every_layer(tmp_path, engine):
    out, stats, _ = run(tmp_path, PROMPTS, engine=engine, n=2, aggregate=3, layers=2, max_tokens=4, seed=1)
    assert stats.n_out == 6
    for r in out:
        assert len(r["proposals"]) == 2 and all(len(layer) == 3 for layer in r["proposals"])
        assert all(isinstance(p, str) for layer in r["proposals"] for p in layer)
        assert 0 < r["proposal_tokens"] <= 2 * 3 * 4 and r["n_tokens"] <= 4
    a = [r for r in out if r["group"] == "a"]
    assert a[0]["proposals"] == a[1]["proposals"]  # one proposal tree per prompt, n final aggregations


# ---------------------------------------------------------------- vote on literal samples


def test_vote_fields_on_literal_samples():
    run_ = _Run(None, SamplingParams(n=4), None, vote=True, logprobs=False, answer_field="answer",
                prompt_field="prompt", chat=False, max_batch=8)
    rec = {"id": "g", "prompt": "Compute 3+4.", "answer": "7", "task": "arithmetic"}
    p = Prompt(rec, "g", ("x", 1), Request(prompt="Compute 3+4."), {"prompt": "Compute 3+4."})
    texts = ["\\boxed{8}", "\\boxed{7}", "3+4=7\n\\boxed{7.0}", "no answer"]
    recs = run_.group_records(p, [Trajectory([1], [], t, "stop") for t in texts])
    assert [r["reward"] for r in recs] == [0.0, 1.0, 1.0, 0.0]
    assert [r["correct"] for r in recs] == [False, True, True, False]
    assert {(r["maj_answer"], r["maj_ratio"], r["maj_correct"]) for r in recs} == {("7", 0.5, True)}
    tie = run_.group_records(p, [Trajectory([1], [], t, "stop") for t in ["\\boxed{8}", "\\boxed{7}"]])
    assert tie[0]["maj_answer"] == "8" and tie[0]["maj_correct"] is False and tie[0]["reward"] == 1.0
    nogold = dict(rec)
    del nogold["answer"]
    recs = run_.group_records(Prompt(nogold, "g", ("x", 1), p.request, p.query),
                              [Trajectory([1], [], t, "stop") for t in texts])
    assert "maj_correct" not in recs[0] and recs[0]["correct"] is None and recs[1]["reward"] == 1.0


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("kw, message", [
    (dict(chunk_tokens=8), "needs --state"),
    (dict(state="s.json"), "only used with --chunk-tokens"),
    (dict(vote=True, reward="ifeval"), "--vote rewards agreement"),
    (dict(budget=0), "--budget must be >= 1"),
    (dict(budget=8, budget_mode="cut"), "--budget-mode must be one of"),
    (dict(budget=8, budget_mode="force-answer", aggregate=2), "cannot be combined"),
    (dict(chunk_tokens=8, state="s", aggregate=2), "--chunk-tokens cannot be combined with --aggregate"),
    (dict(n=0), "--n must be >= 1"),
])
def test_conflicting_settings(tmp_path, engine, kw, message):
    with pytest.raises(ConfigError, match=message):
        rollout([], tmp_path / "o.jsonl", engine=engine, **kw)
