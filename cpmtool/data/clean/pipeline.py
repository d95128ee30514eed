"""The `clean` pipeline: stages chosen and ordered by name, their settings, and the run.

A stage is a filter object: `stage(record) -> True | (False, "reason_code")`, free to add
fields to the record (lang, quality, dup_of) or to rewrite its text (normalise, c4).
`compose` turns the list into one generator over records that yields kept records and
`Reject`s whose reason is `"<stage>:<rule>"`, which `run_stream` counts and writes to --rejects.

A pipeline file (YAML) lists stages in order, each a name or a one-key mapping of settings:

    # cpmtool clean raw.jsonl --pipeline fineweb.yaml --rejects rej.jsonl > clean.jsonl
    stages:
      - normalise
      - lang: {languages: [en]}
      - gopher_repetition
      - gopher_quality: {min_doc_words: 50}
      - c4: {filter_no_terminal_punct: false}
      - fineweb
      - exact_dedup
      - minhash: {num_buckets: 14, hashes_per_bucket: 8}
"""

from __future__ import annotations

import dataclasses
import time
import typing
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cpmtool.errors import ConfigError

DEFAULT_STAGES = (
    "normalise",
    "lang",
    "gopher_repetition",
    "gopher_quality",
    "c4",
    "fineweb",
    "exact_dedup",
    "minhash",
)
DEDUP_STAGES = ("exact_dedup", "minhash")


def _registry() -> dict[str, tuple[type, Callable]]:
    # name -> (config dataclass, factory(config) -> stage); imported here so `--help` stays light
    from cpmtool.data.clean import c4, dedup, fineweb, gopher, lang, normalise, url

    return {
        "normalise": (normalise.NormaliseConfig, normalise.Normalise),
        "lang": (lang.LangConfig, lang.LanguageId),
        "url": (url.UrlConfig, url.UrlFilter),
        "gopher_repetition": (gopher.GopherRepetitionConfig, gopher.GopherRepetition),
        "gopher_quality": (gopher.GopherQualityConfig, gopher.GopherQuality),
        "c4": (c4.C4Config, c4.C4Quality),
        "fineweb": (fineweb.FineWebConfig, fineweb.FineWebQuality),
        "exact_dedup": (dedup.ExactDedupConfig, dedup.ExactDedup),
        "minhash": (dedup.MinHashConfig, dedup.MinHashDedup),
    }


def stage_names() -> list[str]:
    """Every stage name a pipeline may use ("quality" comes from --classifier)."""
    return list(_registry())


@dataclass
class StageSpec:
    name: str
    params: dict = field(default_factory=dict)


def parse_stages(spec: str | Sequence[str]) -> list[StageSpec]:
    """`"normalise,gopher_quality,minhash"` (or a list of names) -> stage specs; `"none"` -> []."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["none"]:
        return []
    if names == ["default"]:
        names = list(DEFAULT_STAGES)
    return [StageSpec(n) for n in names]


def load_pipeline_file(path: str | Path) -> list[StageSpec]:
    """Stage specs from a YAML pipeline file (see the module docstring).

    Raises:
        ConfigError: unreadable file or a malformed stage list.
    """
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read pipeline file {path} ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    items = doc.get("stages") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a list of stages under `stages:`")
    specs = []
    for i, item in enumerate(items, 1):
        if isinstance(item, str):
            specs.append(StageSpec(item))
        elif isinstance(item, dict) and len(item) == 1:
            ((name, params),) = item.items()
            if params is not None and not isinstance(params, dict):
                raise ConfigError(f"{path}: stage {i} ({name}): settings must be a mapping")
            specs.append(StageSpec(str(name), dict(params or {})))
        else:
            raise ConfigError(f"{path}: stage {i} must be a name or `name: {{settings}}`")
    return specs


def apply_overrides(specs: list[StageSpec], overrides: Sequence[str]) -> None:
    """Apply `stage.key=value` overrides (value parsed as YAML) to the specs in place."""
    import yaml

    problems = []
    for ov in overrides:
        target, sep, raw = ov.partition("=")
        stage, dot, key = target.strip().partition(".")
        if not sep or not dot or not key:
            problems.append(f"--set {ov!r}: expected STAGE.KEY=VALUE, e.g. gopher_quality.min_doc_words=30")
            continue
        matches = [s for s in specs if s.name == stage]
        if not matches:
            problems.append(
                f"--set {ov!r}: stage {stage!r} is not in the pipeline ({', '.join(s.name for s in specs)})"
            )
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        for s in matches:
            s.params[key] = value
    if problems:
        raise ConfigError(problems)


def build_config(cls: type, params: dict, stage: str):
    """`cls(**params)` with unknown keys and wrongly typed values reported together."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    problems = []
    values = {}
    for key, value in params.items():
        if key not in fields:
            problems.append(f"{stage}: unknown setting {key!r} (valid: {', '.join(fields)})")
            continue
        ok, value = _coerce(value, hints[key])
        if not ok:
            problems.append(f"{stage}.{key}: expected {_type_name(hints[key])}, got {value!r}")
        values[key] = value
    if problems:
        raise ConfigError(problems)
    return cls(**values)


def _coerce(value, hint) -> tuple[bool, object]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in args:
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        out = []
        for v in value:
            ok, v = _coerce(v, args[0]) if args else (True, v)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return False, value
        out = []
        for v, a in zip(value, args, strict=True):
            ok, v = _coerce(v, a)
            if not ok:
                return False, value
            out.append(v)
        return True, tuple(out)
    return True, value


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "")


@dataclass
class StageCounts:
    """Per-stage tallies for the stats file."""

    seen: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "in": self.seen,
            "out": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "seconds": round(self.seconds, 3),
        }


def build_stages(specs: list[StageSpec]) -> list:
    """Instantiate the stages of `specs`, validating names and settings (all problems at once)."""
    registry = _registry()
    problems, stages = [], []
    for s in specs:
        if s.name not in registry:
            problems.append(f"unknown stage {s.name!r} (stages: {', '.join(registry)})")
            continue
        cls, factory = registry[s.name]
        try:
            stages.append(factory(build_config(cls, s.params, s.name)))
        except ConfigError as e:
            problems.extend(e.args[0] if e.args and isinstance(e.args[0], list) else [str(e)])
    if problems:
        raise ConfigError(problems)
    return stages


def compose(stages: list, counts: dict[str, StageCounts] | None = None):
    """One generator function over records: every stage in order, drops as `Reject`s.

    The reject reason is `"<stage>:<rule>"`; the rejected record carries `reject_stage` and
    `reject_rule` too, so a rejects file can be grouped either way.
    """
    from cpmtool.io import Reject

    counts = counts if counts is not None else {}
    for st in stages:
        counts.setdefault(st.name, StageCounts())
    plan = [(st, st.name, counts[st.name]) for st in stages]
    clock = time.perf_counter

    def run(records: Iterator[dict]) -> Iterator:
        for rec in records:
            for st, name, c in plan:
                c.seen += 1
                t = clock()
                if not isinstance(rec.get("text"), str) and name != "normalise":
                    res = (False, "no_text")
                else:
                    res = st(rec)
                c.seconds += clock() - t
                if res is True:
                    c.kept += 1
                    continue
                rule = res[1] if isinstance(res, tuple) else "dropped"
                c.dropped[rule] += 1
                rec["reject_stage"], rec["reject_rule"] = name, rule
                yield Reject(rec, f"{name}:{rule}")
                break
            else:
                yield rec

    return run
