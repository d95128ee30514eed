"""What a training run leaves beside its checkpoints: metrics.jsonl, curves.png, run.json, and the
entropy-performance fit of the Entropy Mechanism paper (R = -a·e^H + b)."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from cpmtool.errors import InputError

CURVE_KEYS = ("reward", "accuracy", "eval_accuracy", "entropy", "response_length", "clip_frac", "kl", "ppo_kl",
              "grad_norm", "cov_mean", "loss", "reward_accuracy", "label_accuracy", "prm_loss",
              "reward_margin", "pair_accuracy")


class MetricsLog:
    """Appends one JSON line per step to `path`, flushed at once (a crash loses nothing written).

    `resume_step` drops lines beyond the step a resumed run restarts from, so the file reads as
    one uninterrupted run.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl (unparsable lines are skipped: a run may have died mid-line)."""
    rows = []
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from e
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def plot_curves(rows: list[dict], png: str | Path, keys: tuple[str, ...] = CURVE_KEYS, title: str = "") -> Path | None:
    """One small panel per metric present in `rows`, against the step; None when there is nothing to plot."""
    present = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not present:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(present))
    nrows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, present, strict=False):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = Path(png).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, png)
    return Path(png)


def write_run_json(out: str | Path, config: dict, **extra) -> Path:
    """The resolved config and the environment of a run, as `<out>/run.json`."""
    import torch

    info = {
        "config": config,
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host_cpus": os.cpu_count(),
        **extra,
    }
    path = Path(out) / "run.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def fit_entropy(metrics: str | Path, *, y: str | None = None, x: str = "entropy", fit_steps: int = 0,
                png: str | Path | None = None) -> dict:
    """Least-squares fit of R = -a·exp(H) + b over a run's (entropy, performance) pairs.

    Args:
        metrics: a metrics.jsonl.
        y: the performance column (default: `eval_accuracy` when at least 3 rows have it, else `accuracy`).
        x: the entropy column.
        fit_steps: fit on the first N pairs only and report the RMSE of the prediction on the rest
            (the paper fits early steps and predicts the later ones); 0 fits all.
        png: where to plot the points and the fitted curve (optional).

    Returns:
        {a, b, ceiling (R at H = 0: b - a), rmse_fit, rmse_holdout, n_fit, n_holdout, x, y}.

    Raises:
        InputError: fewer than 3 usable pairs.
    """
    import numpy as np

    rows = read_metrics(metrics)
    if y is None:
        y = "eval_accuracy" if sum(isinstance(r.get("eval_accuracy"), (int, float)) for r in rows) >= 3 else "accuracy"
    pts = [(float(r[x]), float(r[y]), r.get("step")) for r in rows
           if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))]
    if len(pts) < 3:
        raise InputError(f"{metrics}: {len(pts)} rows have both {x!r} and {y!r}; the fit needs at least 3")
    h = np.array([p[0] for p in pts])
    r = np.array([p[1] for p in pts])
    k = fit_steps if 0 < fit_steps < len(pts) else len(pts)
    slope, intercept = np.polyfit(np.exp(h[:k]), r[:k], 1)
    a, b = -float(slope), float(intercept)
    pred = -a * np.exp(h) + b
    res = {
        "a": a, "b": b, "ceiling": b - a, "x": x, "y": y, "n_fit": k, "n_holdout": len(pts) - k,
        "rmse_fit": float(np.sqrt(np.mean((pred[:k] - r[:k]) ** 2))),
        "rmse_holdout": float(np.sqrt(np.mean((pred[k:] - r[k:]) ** 2))) if k < len(pts) else None,
    }
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.scatter(h[:k], r[:k], s=12, label="fitted points")
        if k < len(pts):
            ax.scatter(h[k:], r[k:], s=12, marker="x", label="held-out points")
        grid = np.linspace(min(0.0, h.min()), h.max() * 1.05 + 1e-9, 100)
        ax.plot(grid, -a * np.exp(grid) + b, color="C3", label=f"R = -{a:.3g}·e^H + {b:.3g}")
        ax.set_xlabel(f"{x} (H)")
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(png, dpi=90)
        plt.close(fig)
        res["png"] = str(png)
    return res


def summarize_run(run_dir: str | Path) -> dict:
    """One line about a finished run: algorithm, steps, wall time, load, and greedy accuracy before/after.

    Raises:
        InputError: the directory has no metrics.jsonl or run.json.
    """
    d = Path(run_dir)
    try:
        cfg = json.loads((d / "run.json").read_text())["config"]
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{d}: not a run directory (no readable run.json)") from e
    rows = read_metrics(d / "metrics.jsonl")
    steps = [r for r in rows if r.get("step", 0) > 0]
    evals = [r for r in rows if isinstance(r.get("eval_accuracy"), (int, float))]
    ent = [r["entropy"] for r in steps if isinstance(r.get("entropy"), (int, float))]
    loads = [r["load_1m"] for r in steps if isinstance(r.get("load_1m"), (int, float))]
    out = {
        "run": str(d), "algo": cfg.get("algo"), "entropy_control": cfg.get("entropy_control"),
        "steps": steps[-1]["step"] if steps else 0,
        "wall_min": round(steps[-1].get("elapsed_s", 0.0) / 60, 2) if steps else 0.0,
        "samples": sum(r.get("groups_kept", 0) * cfg.get("n", 1) for r in steps),
        "load_1m_mean": round(sum(loads) / len(loads), 2) if loads else None,
        "accuracy_before": evals[0]["eval_accuracy"] if evals and evals[0].get("step") == 0 else None,
        "accuracy_after": evals[-1]["eval_accuracy"] if evals else None,
        "entropy_first": round(ent[0], 4) if ent else None, "entropy_last": round(ent[-1], 4) if ent else None,
        "train_accuracy_first": steps[0].get("accuracy") if steps else None,
        "train_accuracy_last": steps[-1].get("accuracy") if steps else None,
    }
    if out["accuracy_before"] is not None and out["accuracy_after"] is not None:
        out["delta_points"] = round(100 * (out["accuracy_after"] - out["accuracy_before"]), 1)
    return out
