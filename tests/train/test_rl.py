"""The RL loop end to end on a tiny random MiniCPM: every algorithm, checkpoints, resume, chunks.

A random model never solves arithmetic, so these runs reward "the response has an even number of
characters" (a user reward function, `--reward file.py:function`): about half the samples get it,
so groups have mixed outcomes and every algorithm gets a gradient. (A reward on one token, such as
"contains the digit 1", hits a near-uniform policy over 320 tokens in ~4% of 12-token samples:
whether a step gets a gradient is then down to the seed.)
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from cpmtool.train.config import RLConfig
from cpmtool.train.rl import RLRecipe, train_rl

TIMING = {"rollout_s", "update_s", "step_time", "gen_tokens_per_s", "train_tokens_per_s", "samples_per_s",
          "elapsed_s", "load_1m", "eval_s"}


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("reward") / "even.py"
    p.write_text("def even_length(record, completion):\n    return len(completion) % 2 == 0\n")
    return f"{p}:even_length"


@pytest.fixture
def base(tiny_model_dir, arith_prompts, reward_file, tmp_path):
    train, test = arith_prompts
    return dict(model=str(tiny_model_dir), prompts=str(train), out=str(tmp_path / "run"), steps=2, batch_size=2,
                n=4, max_tokens=12, lr=1e-3, reward=reward_file, seed=0,
                threads=1)  # tiny matmuls on a shared machine: one thread avoids stragglers


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_run_leaves_metrics_curves_run_json_and_hf_checkpoints(base, arith_prompts, tmp_path):
    from cpmtool.model.loader import load_model

    res = train_rl(RLConfig(**base, eval_prompts=str(arith_prompts[1]), save_every=1))
    out = tmp_path / "run"
    got = rows(out)
    assert [r["step"] for r in got] == [0, 1, 2]
    assert set(got[0]) == {"step", "eval_accuracy", "eval_s"}
    for key in ("reward", "accuracy", "entropy", "response_length", "clip_frac", "ppo_kl", "grad_norm", "loss",
                "gen_tokens_per_s", "step_time", "cov_mean", "cov_std", "eval_accuracy"):
        assert key in got[2], key
    assert 0 < got[1]["entropy"] < 6.0  # a near-uniform policy over 320 tokens: about ln 320 = 5.77
    assert res["last"]["step"] == 2
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["algo"] == "grpo" and run["config"]["norm_std"] is True and run["world_size"] == 1
    assert run["malloc"] == ("kept" if sys.platform == "linux" else "not_glibc")  # train.cpu_heap, on the CPU
    assert (out / "curves.png").stat().st_size > 1000
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000001", "step-000002"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    # the final checkpoint and model/ are HF directories our loader reads, with the trained weights
    m1, _ = load_model(out / "model")
    m2, _ = load_model(out / "checkpoints" / "step-000002")
    m0, _ = load_model(base["model"])
    sd0, sd1, sd2 = m0.state_dict(), m1.state_dict(), m2.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert any(not torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert not list((out / "checkpoints").glob(".*"))  # no temp directories left behind


def test_rollout_engine_shares_the_training_module(base):
    recipe = RLRecipe(RLConfig(**base))
    recipe.setup()
    try:
        assert recipe.engine.model is recipe.policy
        before = recipe.engine.generate  # the same engine object is used every step: no reload
        recipe.train()
        assert recipe.engine.generate == before and recipe.engine.model is recipe.policy
    finally:
        recipe.cleanup()


def _strip(rs):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rs]


@pytest.mark.parametrize("extra", [{}, pytest.param({"algo": "prime"}, marks=pytest.mark.slow),
                                   {"chunk_tokens": 5, "steps": 4}], ids=["grpo", "prime", "chunked"])
def test_resume_continues_identically(base, tmp_path, extra):
    cfg = {**base, **extra}
    steps = cfg["steps"] = max(cfg["steps"], 4)
    full = tmp_path / "full"
    train_rl(RLConfig(**{**cfg, "out": str(full), "save_every": 2}))
    # stop after step 2, then resume to the same total
    part = tmp_path / "part"
    train_rl(RLConfig(**{**cfg, "out": str(part), "steps": 2, "save_every": 2}))
    assert [r["step"] for r in rows(part)] == [1, 2]
    train_rl(RLConfig(**{**cfg, "out": str(part), "save_every": 2, "resume": True}))
    a, b = _strip(rows(full)), _strip(rows(part))
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert a == b


ALGOS = [
    {"algo": "grpo", "dynamic_sampling": True, "clip_high": 0.28, "clip_c": 10.0, "overlong_buffer": 4},
    {"algo": "grpo", "norm_std": False, "loss_agg": "seq-mean-token-mean", "kl_coef": 0.01, "kl_type": "k3",
     "mini_batch_size": 1, "ppo_epochs": 2},
    {"algo": "grpo", "entropy_control": "clip-cov", "clip_cov_ratio": 0.2, "clip_cov_lb": -1.0, "clip_cov_ub": 5.0},
    {"algo": "grpo", "entropy_control": "kl-cov", "kl_cov_ratio": 0.2, "mini_batch_size": 1},
    {"algo": "grpo", "length_penalty": "kimi"},
    {"algo": "prime"},
    {"algo": "nft"},
    {"algo": "luffy"},
    {"algo": "ttrl", "vote_n": 6},
]
ALGO_IDS = ["dapo", "drgrpo-kl-minibatch", "clip-cov", "kl-cov", "length", "prime", "nft", "luffy", "ttrl"]


@pytest.mark.parametrize("extra", ALGOS, ids=ALGO_IDS)
def test_every_algorithm_trains(base, tmp_path, extra):
    res = train_rl(RLConfig(**{**base, **extra}))
    last = res["last"]
    # a random model writes no \\boxed{} answers, so TTRL's vote has no label and no gradient here;
    # test_ttrl_vote_rewards checks the vote itself
    assert last["groups_kept"] >= 1 and (last["grad_norm"] > 0 or extra["algo"] == "ttrl"), last
    mini = extra.get("mini_batch_size") or 2
    assert last["optimizer_steps"] == extra.get("ppo_epochs", 1) * (2 // mini)
    algo = extra["algo"]
    if algo == "prime":
        assert {"prm_loss", "prm_acc", "process_reward"} <= set(last)
    if algo == "ttrl":
        assert {"label_accuracy", "reward_accuracy", "majority_ratio"} <= set(last)
    if algo == "luffy":
        assert last["off_policy_prob"] > 0  # the reference traces were trained on
    if extra.get("entropy_control"):
        assert last["cov_selected"] >= 1
    if extra.get("kl_coef"):
        assert "kl" in last
    if extra.get("ppo_epochs") == 2 or extra.get("entropy_control") == "kl-cov":
        assert last["ppo_kl"] != 0.0  # later mini-batches are off-policy


def test_chunked_rollout_carries_trajectories_over_steps(base):
    recipe = RLRecipe(RLConfig(**{**base, "chunk_tokens": 4, "max_tokens": 8, "steps": 2}))
    recipe.setup()
    try:
        recipe.step = 1
        groups, info = recipe.collect()
        # a random model rarely ends within 4 tokens: both groups wait for their next chunk
        assert info["inflight_groups"] == 2 and len(groups) < 2
        first = [list(s.tokens) for g in recipe.inflight for s in g]
        with torch.no_grad():  # the policy moves between the two chunks (as an update would)
            for p in recipe.policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        recipe.step = 2
        groups, info = recipe.collect()
        samples = [s for g in groups for s in g]
        assert len(groups) == 2 and all(s.finish for s in samples)
        # the second chunk continued the first (same prefix) and was sampled by the newer policy
        long = [s for s in samples if len(s.tokens) > 4]
        assert long and all(s.tokens[:4] in first for s in long)
        assert all(s.versions[:4] == [1] * 4 and set(s.versions[4:]) <= {2} for s in long)
        assert info["staleness"] > 0
        assert all(len(s.behav_logp) == len(s.tokens) for s in samples)
        # the PPO ratio is taken against the stored behaviour log-probs, which the moved policy no
        # longer reproduces for the first chunk
        upd = recipe.update(groups)
        assert abs(upd["ppo_kl"]) > 1e-4
    finally:
        recipe.cleanup()


def test_conflicting_flags_are_reported_together(base):
    from cpmtool.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        RLConfig(**{**base, "algo": "nft", "entropy_control": "clip-cov", "n": 1, "clip_c": 0.5}).validate()
    msg = str(e.value)
    assert "--entropy-control clip-cov" in msg and "--n >= 2" in msg and "--clip-c" in msg


def test_ttrl_vote_rewards_train_on_the_first_n(base):
    from cpmtool.rewards import load_reward
    from cpmtool.train.rl import Sample

    recipe = RLRecipe(RLConfig(**{**base, "algo": "ttrl", "n": 2, "vote_n": 4}))
    recipe.reward_fn = load_reward("math")
    rec = {"id": "q", "prompt": "Compute 6+7.", "answer": "13", "task": "arithmetic"}
    texts = ["6+7=12\n\\boxed{12}", "\\boxed{13}", "\\boxed{12.0}", "no answer"]
    group = [Sample("g0", 0, j, rec, [1], [2], text=t, finish="stop") for j, t in enumerate(texts)]
    st = recipe.score([group])
    # votes: 12 twice (12 and 12.0 agree), 13 once, one without an answer: label 12, ratio 2/4
    assert st["ratio"] == 0.5 and st["labelled"] == 1 and st["label_hits"] == 0
    # trained on the first n = 2 samples, rewarded for agreeing with the label, not the gold answer
    assert len(group) == 2 and [s.reward for s in group] == [1.0, 0.0]
    assert [s.correct for s in group] == [False, True]
    assert st["reward_hits"] == 0  # both pseudo-rewards disagree with the gold ones


def test_max_minutes_stops_early_and_still_evaluates(base, arith_prompts):
    res = train_rl(RLConfig(**{**base, "steps": 50, "max_minutes": 1e-4, "eval_prompts": str(arith_prompts[1])}))
    # the budget is spent after the first step: it is the last, and it carries the final evaluation
    assert res["steps"] == 1 and "eval_accuracy" in res["last"]


def test_training_survives_a_rewrite_of_the_checkpoint_it_loaded(tiny_model_dir, tmp_path):
    import shutil

    from cpmtool.train.checkpoint import load_for_training

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    model, _ = load_for_training(d)
    (d / "model.safetensors").write_bytes(b"")  # rebuilt in place, as a registry model can be
    out = model(torch.tensor([[1, 2, 3]]))  # touching an mmap'd page of a truncated file would be SIGBUS
    assert out.shape[:2] == (1, 3) and torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("extra", ALGOS, ids=ALGO_IDS)
def test_every_algorithm_trains_on_cuda(base, extra):
    # the policy (and PRIME's PRM, the reference) on the GPU, rollouts by the in-process engine there;
    # the batch-level tensors stay on the CPU and each micro-batch's slices move to the model
    last = train_rl(RLConfig(**{**base, **extra, "device": "cuda"}))["last"]
    assert last["groups_kept"] >= 1 and (last["grad_norm"] > 0 or extra["algo"] == "ttrl"), last
    assert all(v == v for v in last.values() if isinstance(v, float)), last  # no NaN
