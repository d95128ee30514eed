"""`cpmtool train-rl`: RL on a policy (library: cpmtool.train.rl), and `train-rl fit-entropy`.

The flags are the fields of `cpmtool.train.config.RLConfig` (its defaults and help), so the
library and the CLI cannot drift apart; `config_command` builds them for train-sft/train-dpo too.
"""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import MISSING, fields

import typer

from cpmtool.train.config import RLConfig, field_type

EXAMPLE = ("Example: cpmtool train-rl --model cpm-tiny --prompts train.jsonl --algo grpo --steps 40 --lr 1e-4 "
           "--out runs/grpo   |   torchrun --nproc-per-node 2 -m cpmtool train-rl ... (data-parallel)   |   "
           "cpmtool train-rl fit-entropy runs/grpo/metrics.jsonl   |   cpmtool train-rl report runs/*")
app = typer.Typer(invoke_without_command=True, no_args_is_help=False, epilog=EXAMPLE)


def config_command(cls, run, doc: str):
    """A typer callback whose options are the fields of the config dataclass `cls`, plus --config.

    Every option defaults to None, so only the flags actually given override the YAML file, which
    overrides the dataclass defaults. `run(cfg)` gets the resolved config.
    """

    def command(ctx: typer.Context, **kwargs):
        if ctx.invoked_subcommand is not None:
            return
        from cpmtool.train.config import load_config

        config = kwargs.pop("config")
        overrides = {k: v for k, v in kwargs.items() if v is not None}
        run(load_config(cls, config, overrides))

    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
              inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=str | None,
                                default=typer.Option(None, "--config", help="YAML file of settings (keys are the "
                                                     "flag names); flags given on the command line win."))]
    for f in fields(cls):
        t = field_type(cls, f.name)
        flag = "--" + f.name.replace("_", "-")
        decl = f"{flag}/--no-{f.name.replace('_', '-')}" if t is bool else flag
        aliases = f.metadata.get("aliases", ())
        default = "" if f.default is MISSING else f" [default: {f.default}]"
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, annotation=t | None,
            default=typer.Option(None, decl, *aliases, help=f.metadata.get("help", "") + default, show_default=False)))
    command.__signature__ = inspect.Signature(params)
    command.__doc__ = doc
    return command


def _progress_log():
    from cpmtool.io.stats import progress_enabled

    if not progress_enabled():
        return None
    keys = ("step", "loss", "reward", "accuracy", "eval_accuracy", "entropy", "response_length", "clip_frac", "kl",
            "reward_margin", "grad_norm", "step_time")

    def log(row: dict) -> None:
        if "event" in row:
            print(f"train: {row['event']} {row.get('path') or row.get('checkpoint') or row.get('note', '')}",
                  file=sys.stderr, flush=True)
            return
        parts = [f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys if k in row]
        print("train: " + " ".join(parts), file=sys.stderr, flush=True)

    return log


def _train(cfg: RLConfig) -> None:
    from cpmtool.train.rl import train_rl

    result = train_rl(cfg, log=_progress_log())
    if result.get("rank", 0) == 0:
        print(json.dumps(result))


HELP = """RL on a policy: GRPO/DAPO, PRIME, NFT, LUFFY, TTRL; Clip-Cov/KL-Cov entropy control.

Rolls out with the current weights in-process, rewards with a verifier (or TTRL's majority
vote), computes advantages and updates the policy for --steps. Writes --out/metrics.jsonl,
curves.png, run.json, checkpoints/ (HF layout, atomic; --resume continues from the last) and
model/. Prints the final metrics as JSON. Data-parallel: torchrun --nproc-per-node 2 -m cpmtool train-rl ...

Example: cpmtool train-rl --model cpm-tiny --prompts train.jsonl --algo grpo --steps 40 --lr 1e-4 --out runs/grpo
"""
app.callback()(config_command(RLConfig, _train, HELP))


@app.command("fit-entropy")
def fit_entropy_cmd(
    metrics: str = typer.Argument(..., help="A run's metrics.jsonl."),
    y: str = typer.Option(None, "--y", help="Performance column (default: eval_accuracy if logged, else accuracy)."),
    x: str = typer.Option("entropy", "--x", help="Entropy column."),
    fit_steps: int = typer.Option(0, "--fit-steps", help="Fit on the first N points, report the RMSE on the rest."),
    png: str = typer.Option(None, "--png", help="Plot path (default: entropy_fit.png beside the metrics)."),
):
    """Fit R = -a*exp(H) + b (Entropy Mechanism) to a run's entropy and accuracy; print a, b, RMSE as JSON.

    Example: cpmtool train-rl fit-entropy runs/grpo/metrics.jsonl --fit-steps 20
    """
    from pathlib import Path

    from cpmtool.train.runlog import fit_entropy

    png = png or str(Path(metrics).parent / "entropy_fit.png")
    print(json.dumps(fit_entropy(metrics, y=y, x=x, fit_steps=fit_steps, png=png)))


@app.command("report")
def report_cmd(
    runs: list[str] = typer.Argument(..., help="Run directories (each with run.json and metrics.jsonl)."),
):
    """One JSON line per run: algorithm, steps, wall minutes, load, greedy accuracy before/after, entropy.

    Example: cpmtool train-rl report runs/rlvr/* | jq -r '[.algo, .accuracy_before, .accuracy_after] | @tsv'
    """
    from cpmtool.train.runlog import summarize_run

    for r in runs:
        print(json.dumps(summarize_run(r)))
