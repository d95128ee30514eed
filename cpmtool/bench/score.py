"""Quality and token economy of sample records (the output of `cpmtool rollout`), per model.

    rows = score_samples(records, ks=(1, 4), budgets=(64, 128))   # one summary dict per model

A sample record carries `group` (the prompt id), `sample` (its index in the group), `completion`,
`correct` (True/False, or None when there was no gold answer), `n_tokens` and `finish_reason`.
Records are summarised per value of a field (`by`, default `model`; records without it fall under
a default label such as the input file's name). Per model:

- accuracy: the mean of `correct` over graded samples (mean@n).
- pass@k: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k) per prompt with
  n samples of which c are correct, averaged over the prompts that have at least k samples.
- maj@k: is the majority answer of a prompt's first k samples (by `sample` index) correct? The
  answers are extracted (`extract_answer`) and voted on as TTRL does (`cpmtool.rewards.vote`), and
  the majority answer counts as correct when the first of those k samples that gave it is correct.
  With k = n this is rollout --vote's `maj_correct`. Departure: taking the first k samples rather
  than an expectation over all k-subsets keeps it simple and deterministic; for k < n it is an
  unbiased but noisier estimate.
- token economy (efficient reasoning): mean completion tokens, mean tokens of correct samples,
  tokens per correct answer (all tokens spent / correct samples), the over-length rate
  (`finish_reason == "length"`), and the accuracy under each token budget B: a sample that needed
  more than B tokens counts as wrong, as it would if it had been cut at B before its final answer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from cpmtool.io import RejectSink, RunStats, read_records
from cpmtool.io.jsonl import handle_reject
from cpmtool.rewards.math import extract_answer
from cpmtool.rewards.vote import majority


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with `n` samples, `c` of them correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), the numerically stable form of Chen et al.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool | None]) -> bool | None:
    """Is the majority answer right? `correct[i]` grades `answers[i]`; None when nothing is graded.

    No answer at all (every sample unanswered) is a wrong majority, as in TTRL.
    """
    if all(c is None for c in correct):
        return None
    v = majority(answers)
    if v.answer is None:
        return False
    first = next(i for i, a in enumerate(answers) if a is not None and a == v.answer)
    return bool(correct[first])


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [k for k in (2**i for i in range(12)) if k <= n]
    return ks + [n] if n not in ks else ks


def _group(records: Iterable[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(str(r.get("group", r.get("id"))), []).append(r)
    for g in groups.values():
        g.sort(key=lambda r: r.get("sample") if isinstance(r.get("sample"), int) else 0)
    return groups


def summarize(samples: Sequence[dict], *, ks: Sequence[int] | None = None,
              budgets: Sequence[int] = ()) -> dict:
    """The metrics of one model's sample records (see the module docstring).

    Args:
        samples: sample records with `group`, `sample`, `completion`, `correct`, `n_tokens`,
            `finish_reason`.
        ks: the k of pass@k and maj@k (default: 1, 2, 4, ... up to the largest group).
        budgets: token budgets for accuracy under a budget.

    Returns:
        A dict: prompts, samples, graded, accuracy, pass@k, maj@k (dicts keyed by k as a string),
        mean_tokens, mean_tokens_correct, tokens_per_correct, over_length_rate, budgets
        ({"B": {"accuracy", "over_budget_rate"}}). A metric with nothing to compute it on is None.
    """
    groups = _group(samples)
    sizes = [len(g) for g in groups.values()]
    ks = list(ks) if ks else default_ks(max(sizes, default=1))
    graded = [r for r in samples if r.get("correct") is not None]
    n_correct = sum(bool(r["correct"]) for r in graded)
    tokens = [int(r.get("n_tokens") or 0) for r in samples]
    correct_tokens = [int(r.get("n_tokens") or 0) for r in graded if r["correct"]]

    passk: dict[str, float | None] = {}
    majk: dict[str, float | None] = {}
    for k in ks:
        p, m = [], []
        for g in groups.values():
            grades = [r.get("correct") for r in g]
            if len(g) < k or any(c is None for c in grades):
                continue  # pass@k needs k samples; an ungraded prompt has no pass@k
            p.append(pass_at_k(len(g), sum(map(bool, grades)), k))
            m.append(majority_correct([extract_answer(r.get("completion") or "") for r in g[:k]], grades[:k]))
        passk[str(k)] = _mean(p)
        majk[str(k)] = _mean(m)

    out = {
        "prompts": len(groups),
        "samples": len(samples),
        "samples_per_prompt": round(len(samples) / len(groups), 2) if groups else None,
        "graded": len(graded),
        "correct": n_correct,
        "accuracy": n_correct / len(graded) if graded else None,
        "pass@k": passk,
        "maj@k": majk,
        "mean_tokens": _mean(tokens),
        "mean_tokens_correct": _mean(correct_tokens),
        "tokens_per_correct": sum(tokens) / n_correct if n_correct else None,
        "over_length_rate": (sum(r.get("finish_reason") == "length" for r in samples) / len(samples)
                             if samples else None),
        "budgets": {},
    }
    for b in budgets:
        out["budgets"][str(b)] = {
            "accuracy": budget_accuracy(graded, b),
            "over_budget_rate": sum(t > b for t in tokens) / len(tokens) if tokens else None,
        }
    return out


def budget_accuracy(samples: Sequence[dict], budget: int) -> float | None:
    """Accuracy when a sample longer than `budget` tokens counts as wrong (cut before its answer)."""
    graded = [r for r in samples if r.get("correct") is not None]
    if not graded:
        return None
    return sum(bool(r["correct"]) and int(r.get("n_tokens") or 0) <= budget for r in graded) / len(graded)


def _mean(xs: Sequence) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def score_samples(records: Iterable[dict], *, by: str = "model", default: str = "-",
                  ks: Sequence[int] | None = None, budgets: Sequence[int] = ()) -> list[dict]:
    """One summary row per value of the field `by` (records without it: `default`), in first-seen order."""
    models: dict[str, list[dict]] = {}
    for r in records:
        models.setdefault(str(r.get(by, default)), []).append(r)
    return score_models(models, by=by, ks=ks, budgets=budgets)


def score_models(models: dict[str, list[dict]], *, by: str = "model", ks: Sequence[int] | None = None,
                 budgets: Sequence[int] = ()) -> list[dict]:
    """One row {by: name, **summarize(records)} per model; `ks` default to powers of two up to the
    largest group of all models, so the rows have the same columns."""
    if not ks:
        biggest = max((len(g) for recs in models.values() for g in _group(recs).values()), default=1)
        ks = default_ks(biggest)
    return [{by: name, **summarize(recs, ks=ks, budgets=budgets)} for name, recs in models.items()]


def format_table(rows: Sequence[dict], by: str = "model"):
    """A rich Table of `score_samples` rows (rendered on stderr by the CLI)."""
    from rich.table import Table

    t = Table(title="bench score", title_justify="left")
    ks = list(rows[0]["pass@k"]) if rows else []
    budgets = list(rows[0]["budgets"]) if rows else []
    cols = [by, "prompts", "samples", "acc"] + [f"pass@{k}" for k in ks] + [f"maj@{k}" for k in ks] + [
        "mean tok", "tok/correct", "over-len"] + [f"acc@{b}" for b in budgets]
    for c in cols:
        t.add_column(c, justify="left" if c == by else "right")
    for r in rows:
        t.add_row(str(r[by]), str(r["prompts"]), str(r["samples"]), _pct(r["accuracy"]),
                  *[_pct(r["pass@k"][k]) for k in ks], *[_pct(r["maj@k"][k]) for k in ks],
                  _num(r["mean_tokens"]), _num(r["tokens_per_correct"]), _pct(r["over_length_rate"]),
                  *[_pct(r["budgets"][b]["accuracy"]) for b in budgets])
    return t


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def plot_scores(rows: Sequence[dict], samples: dict[str, list[dict]], out_dir, by: str = "model") -> list[str]:
    """PNG plots in `out_dir`: accuracy vs token budget, pass@k and maj@k vs k, token histograms.

    `samples` maps each row's label to its sample records (for the histogram). Returns the paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    if rows and rows[0]["budgets"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            bs = [int(b) for b in r["budgets"]]
            ax.plot(bs, [100 * (r["budgets"][str(b)]["accuracy"] or 0) for b in bs], marker="o", label=r[by])
        ax.set_xscale("log", base=2)
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.set(xlabel="token budget", ylabel="accuracy (%)", title="accuracy under a token budget")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(_save(fig, out / "accuracy_vs_budget.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ks = [int(k) for k, v in r["pass@k"].items() if v is not None]
        ax.plot(ks, [100 * r["pass@k"][str(k)] for k in ks], marker="o", label=f"{r[by]} pass@k")
        ks = [int(k) for k, v in r["maj@k"].items() if v is not None]
        ax.plot(ks, [100 * r["maj@k"][str(k)] for k in ks], marker="s", ls="--", label=f"{r[by]} maj@k")
    ax.set_xscale("log", base=2)
    ks = sorted({int(k) for r in rows for k in r["pass@k"]})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="k", ylabel="%", title="pass@k and maj@k")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out / "pass_maj_at_k.png"))

    fig, axes = plt.subplots(len(rows), 1, figsize=(6, 2.5 * max(len(rows), 1)), squeeze=False)
    for ax, r in zip(axes[:, 0], rows, strict=True):
        recs = samples[r[by]]
        right = [int(s.get("n_tokens") or 0) for s in recs if s.get("correct")]
        wrong = [int(s.get("n_tokens") or 0) for s in recs if not s.get("correct")]
        ax.hist([right, wrong], bins=30, stacked=True, label=["correct", "not correct"], color=["tab:green", "tab:red"])
        ax.set(xlabel="completion tokens", ylabel="samples", title=str(r[by]))
        ax.legend()
    paths.append(_save(fig, out / "token_histogram.png"))
    return paths


def _save(fig, path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def sample_problem(record: dict) -> str | None:
    """Why a record cannot be scored (a reject reason), or None: it needs a text `completion` and
    an integer `n_tokens`; `correct` must be true, false or null."""
    if not isinstance(record.get("completion"), str):
        return "no_completion"
    n = record.get("n_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        return "bad_n_tokens"
    if record.get("correct") not in (True, False, None):
        return "bad_correct"
    return None


def load_samples(paths: Sequence[str], *, by: str = "model", rejects: str | None = None,
                 strict: bool = False) -> tuple[dict[str, list[dict]], RunStats]:
    """Read sample records, grouped by their `by` field (else the file's name, `stdin` for `-`).

    Records that cannot be scored go to `rejects` with their reason (`sample_problem`), as do
    malformed lines; the RunStats count them (`out` = records scored).
    """
    stats = RunStats()
    models: dict[str, list[dict]] = {}
    with RejectSink(rejects) if rejects else contextlib.nullcontext() as sink:
        for path in paths:
            label = "stdin" if str(path) == "-" else Path(path).name.split(".")[0]
            for rec in read_records(path, stats=stats, rejects=sink, strict=strict):
                why = sample_problem(rec)
                if why:
                    handle_reject(rec, why, stats.position, stats, sink, strict)
                    continue
                models.setdefault(str(rec.get(by, label)), []).append(rec)
                stats.n_out += 1
    stats.complete = True
    return models, stats
