"""Token frequency lists for FR-Spec (frequency-ranked speculative sampling).

FR-Spec restricts the draft model's LM head to the most frequent tokens of the target tokenizer,
which cuts the draft's LM-head cost while the target still verifies over the full vocabulary (so
the output distribution is unchanged). The list is built as CPM.cu's `gen_fr_index.py` does:
tokenize a corpus with the target tokenizer, count ids, sort by count (descending); when the top
`r` is taken, EOS is forced in by replacing the tail.

A list is a JSON file: {"model", "vocab_size", "n_docs", "n_tokens", "ids", "counts"} with `ids`
sorted by frequency (ties by id) and covering every token seen in the corpus.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from cpmtool.errors import ConfigError, InputError

# record fields that hold text, in the order they are tried
TEXT_FIELDS = ("text", "prompt", "completion", "output", "instruction", "input", "chosen")


def record_text(record: dict, fields: tuple[str, ...] = TEXT_FIELDS) -> str:
    """The text of a record: the given fields that are strings, plus the contents of `messages`."""
    parts = [record[f] for f in fields if isinstance(record.get(f), str)]
    for m in record.get("messages") or []:
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            parts.append(m["content"])
    return "\n".join(parts)


def count_tokens(texts: Iterable[str], tokenizer, *, batch: int = 256) -> tuple[Counter, int]:
    """Token-id counts over `texts` (no special tokens added) and the number of texts counted."""
    counts: Counter = Counter()
    n, buf = 0, []

    def flush():
        for ids in tokenizer(buf, add_special_tokens=False)["input_ids"]:
            counts.update(ids)

    for t in texts:
        if not t:
            continue
        buf.append(t)
        n += 1
        if len(buf) >= batch:
            flush()
            buf = []
    if buf:
        flush()
    return counts, n


def build_freq(texts: Iterable[str], tokenizer, *, model: str = "") -> dict:
    """The frequency list (see the module docstring) of `texts` under `tokenizer`."""
    counts, n_docs = count_tokens(texts, tokenizer)
    order = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "model": model,
        "vocab_size": len(tokenizer),
        "n_docs": n_docs,
        "n_tokens": sum(counts.values()),
        "ids": [i for i, _ in order],
        "counts": [c for _, c in order],
    }


def freq_path(model: str | os.PathLike) -> Path:
    """Default location of a model's list: $CPMTOOL_HOME/freq/<model name>.json."""
    from cpmtool.model.registry import cpmtool_home

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(model)).expanduser().name or str(model))
    return cpmtool_home() / "freq" / f"{name}.json"


def save_freq(freq: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(freq))
    tmp.replace(path)
    return path


def load_freq(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        freq = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise InputError(f"no frequency list at {path}; build one with `cpmtool models freq MODEL CORPUS`") from e
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the frequency list {path}: {e}") from e
    if not isinstance(freq, dict) or not isinstance(freq.get("ids"), list):
        raise InputError(f"{path} is not a frequency list (no `ids`)")
    return freq


def frspec_ids(freq: dict, size: int, eos_ids: Iterable[int] = (), vocab_size: int | None = None) -> list[int]:
    """The `size` most frequent ids, with every EOS id forced in (replacing the tail), sorted by rank.

    When the corpus saw fewer than `size` distinct tokens, the list is padded with unseen ids in
    id order, so the draft vocabulary always has exactly `size` entries.
    """
    if size < 1:
        raise ConfigError(f"--frspec-vocab must be >= 1 (got {size})")
    vocab = vocab_size or freq.get("vocab_size")
    if vocab is not None and size > vocab:
        raise ConfigError(f"--frspec-vocab {size} exceeds the vocabulary size {vocab}")
    ids = [int(i) for i in freq["ids"] if vocab is None or 0 <= int(i) < vocab]
    top = ids[:size]
    if len(top) < size and vocab is not None:
        seen = set(top)
        top += [i for i in range(vocab) if i not in seen][: size - len(top)]
    eos = [e for e in dict.fromkeys(int(e) for e in eos_ids) if e not in top]
    if eos:
        if len(eos) > size:
            raise ConfigError(f"--frspec-vocab {size} cannot hold the {len(eos)} EOS tokens")
        top = top[: size - len(eos)] + eos
    return top


def corpus_freq(model: str, inputs: list[str], *, fields: tuple[str, ...] = TEXT_FIELDS, max_docs: int | None = None,
                out: str | os.PathLike | None = None, strict: bool = False) -> tuple[Path, dict]:
    """Build `model`'s frequency list from JSONL corpora (`-` is stdin; .zst/.gz by extension)
    and save it (default: `freq_path(model)`). Malformed lines are skipped and counted.

    Returns:
        (where it was written, the list with `n_rejected` added).
    """
    from itertools import islice

    from cpmtool.io import RunStats, read_records
    from cpmtool.model.tokenizer import load_tokenizer

    if max_docs is not None and max_docs < 1:
        raise ConfigError(f"--max-docs must be >= 1 (got {max_docs})")
    tokenizer = load_tokenizer(model)
    stats = RunStats()
    texts = (record_text(r, fields) for r in read_records(inputs, stats=stats, strict=strict))
    freq = build_freq(islice(texts, max_docs), tokenizer, model=str(model))
    if not freq["ids"]:
        raise InputError(f"no text found in {', '.join(map(str, inputs))} (fields: {', '.join(fields)}, messages)")
    freq["n_rejected"] = stats.n_rejected
    return save_freq(freq, out or freq_path(model)), freq
