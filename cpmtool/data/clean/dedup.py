"""Exact and MinHash near-duplicate removal, in one process or across shards.

The rule, the same in both modes: documents are taken in input order (input file, then line);
a document is a duplicate when it shares a key with any earlier document (for MinHash, a key
is one LSH band of its signature), and its cluster is that earlier document's. So the first
document of each cluster is kept and every later one is dropped with `dup_of` naming it.

One process: `ExactDedup` / `MinHashDedup` are streaming stages (a dict of keys in memory).
Shards: pass 1 writes each shard's keys with `SignatureWriter` (`--signatures DIR`), pass 2
(`merge_signatures`) sorts all shards' keys into input order and computes the same decisions
with numpy, pass 3 (`apply_drops`) removes them from each shard's output. Sharded and
unsharded runs keep exactly the same documents.

MinHash follows datatrove v0.10 (`MinhashConfig`): datatrove's `simplify_text`, word 5-grams
hashed with xxh64, 14 bands x 8 hashes from `RandomState(seed)` over the Mersenne prime 2^61-1,
so a pair with Jaccard similarity s is caught with probability 1-(1-s^8)^14 (0.72 -> ~50%).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cpmtool.data.clean.words import simplify_text, split_words
from cpmtool.errors import ConfigError, InputError, MissingDependencyError

_MERSENNE = np.uint64((1 << 61) - 1)


@dataclass
class ExactDedupConfig:
    """Args:
    whitespace: ignore differences in whitespace (compare `" ".join(text.split())`).
    lowercase: ignore case.
    """

    whitespace: bool = True
    lowercase: bool = False


@dataclass
class MinHashConfig:
    """Args (datatrove's MinhashConfig defaults):
    n_grams: words per shingle.
    num_buckets: LSH bands.
    hashes_per_bucket: hashes per band.
    seed: seed of the hash permutations (all shards must use the same).
    """

    n_grams: int = 5
    num_buckets: int = 14
    hashes_per_bucket: int = 8
    seed: int = 1


def exact_key(text: str, cfg: ExactDedupConfig) -> bytes:
    """16-byte hash of the normalised text."""
    if cfg.whitespace:
        text = " ".join(text.split())
    if cfg.lowercase:
        text = text.lower()
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class MinHasher:
    """Signatures and LSH band keys of documents, bit-compatible with datatrove's MinHash stage 1."""

    def __init__(self, cfg: MinHashConfig | None = None):
        self.cfg = c = cfg or MinHashConfig()
        for name in ("n_grams", "num_buckets", "hashes_per_bucket"):
            if getattr(c, name) < 1:
                raise ConfigError(f"minhash: {name} must be >= 1, not {getattr(c, name)}")
        try:
            import xxhash
        except ImportError:
            raise MissingDependencyError("minhash needs xxhash (pip install xxhash)") from None
        self._xxh64 = xxhash.xxh64_intdigest
        n = c.num_buckets * c.hashes_per_bucket
        gen = np.random.RandomState(c.seed)
        self._a = gen.randint(1, _MERSENNE, dtype=np.uint64, size=(1, n))  # (1, H)
        self._b = gen.randint(0, _MERSENNE, dtype=np.uint64, size=(1, n))

    def shingles(self, text: str) -> np.ndarray:
        """Hashed word n-grams of the simplified text, (S, 1) uint64; S = 0 for short texts."""
        words = split_words(simplify_text(text))
        n, h = self.cfg.n_grams, self._xxh64
        grams = [
            h(" ".join(words[i : i + n]).encode("utf-8", "surrogatepass")) for i in range(len(words) - n + 1)
        ]
        return np.fromiter(grams, dtype=np.uint64, count=len(grams)).reshape(-1, 1)

    def signature(self, text: str) -> np.ndarray | None:
        """(num_buckets, hashes_per_bucket) uint64, or None when the text has no shingle."""
        sh = self.shingles(text)
        if not len(sh):
            return None
        # the uint64 product wraps mod 2^64 before the modulo, exactly as datatrove computes it
        phv = (sh * self._a + self._b) % _MERSENNE  # (S, H)
        return phv.min(axis=0).reshape(self.cfg.num_buckets, self.cfg.hashes_per_bucket)

    def band_keys(self, text: str) -> np.ndarray | None:
        """One uint64 key per band (num_buckets,), or None when the text has no shingle."""
        sig = self.signature(text)
        if sig is None:
            return None
        h = self._xxh64
        return np.array([h(row.tobytes()) for row in sig], dtype=np.uint64)


class _Clusters:
    """First-seen index of every key, and the kept document each dropped one belongs to."""

    def __init__(self, n_tables: int):
        self.tables: list[dict] = [{} for _ in range(n_tables)]
        self.root: list[int] = []  # per document seen: its kept document's number
        self.ids: list[str] = []
        self.sizes: Counter = Counter()

    def add(self, keys, doc_id: str) -> int | None:
        """Register a document; return the number of its kept document if it is a duplicate."""
        me = len(self.root)
        earliest = None
        if keys is not None:
            for table, key in zip(self.tables, keys, strict=True):
                first = table.setdefault(key, me)
                if first != me and (earliest is None or first < earliest):
                    earliest = first
        root = me if earliest is None else self.root[earliest]
        self.root.append(root)
        self.ids.append(doc_id)
        self.sizes[root] += 1
        return None if earliest is None else root

    def size_histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.sizes.values()).items()))


class ExactDedup:
    """Streaming exact dedup stage; reason `duplicate`, adds `dup_of` to the dropped record."""

    name = "exact_dedup"
    reason = "duplicate"

    def __init__(self, cfg: ExactDedupConfig | None = None):
        self.cfg = cfg or ExactDedupConfig()
        self.clusters = _Clusters(1)

    def keys(self, record: dict):
        return (exact_key(record["text"], self.cfg),)

    def __call__(self, record: dict) -> bool | tuple[bool, str]:
        root = self.clusters.add(self.keys(record), str(record.get("id")))
        if root is None:
            return True
        record["dup_of"] = self.clusters.ids[root]
        return False, self.reason

    def report(self) -> dict:
        return {"clusters_by_size": self.clusters.size_histogram()}


class MinHashDedup(ExactDedup):
    """Streaming MinHash/LSH near-dedup stage; reason `near_duplicate`, adds `dup_of`."""

    name = "minhash"
    reason = "near_duplicate"

    def __init__(self, cfg: MinHashConfig | None = None):
        self.cfg = cfg or MinHashConfig()
        self.hasher = MinHasher(self.cfg)
        self.clusters = _Clusters(self.cfg.num_buckets)

    def keys(self, record: dict):
        keys = self.hasher.band_keys(record["text"])
        return None if keys is None else keys.tolist()


# ---- shards: pass 1 (signatures), pass 2 (merge), pass 3 (apply) --------------------------


def signature_path(directory: str | Path, shard: int, n_shards: int) -> Path:
    return Path(directory) / f"shard-{shard:05d}-of-{n_shards:05d}.npz"


class SignatureWriter:
    """Pass 1: keeps every document and records its dedup keys for the merge.

    A document is known by (input number, line) for ordering and by its position in this
    shard's output for pass 3, so it must be the last stage (nothing may drop after it).
    """

    name = "signatures"

    def __init__(self, stages: list, path: Path, shard: int, n_shards: int, position):
        self.stages = stages  # ExactDedup / MinHashDedup instances, in pipeline order
        self.path, self.shard, self.n_shards = path, shard, n_shards
        self._position = position  # () -> (input number, line) of the current record
        self.inputs: list[int] = []
        self.lines: list[int] = []
        self.ids: list[str] = []
        self.keys: list[list] = [[] for _ in stages]

    def __call__(self, record: dict) -> bool:
        j, line = self._position()
        self.inputs.append(j)
        self.lines.append(line)
        self.ids.append(str(record.get("id")))
        for store, st in zip(self.keys, self.stages, strict=True):
            store.append(st.keys(record))
        return True

    def save(self) -> None:
        arrays = {
            "input": np.asarray(self.inputs, dtype=np.int64),
            "line": np.asarray(self.lines, dtype=np.int64),
            "ids": np.asarray(self.ids, dtype=np.str_),
            "shard": np.int64(self.shard),
            "n_shards": np.int64(self.n_shards),
        }
        meta = []
        for k, (st, store) in enumerate(zip(self.stages, self.keys, strict=True)):
            if isinstance(st, MinHashDedup):
                width = st.cfg.num_buckets
                mat = np.zeros((len(store), width), dtype=np.uint64)
                has = np.zeros(len(store), dtype=bool)
                for i, keys in enumerate(store):
                    if keys is not None:
                        mat[i] = keys
                        has[i] = True
            else:
                width = 2
                mat = np.frombuffer(b"".join(keys[0] for keys in store), dtype=np.uint64).reshape(-1, 2)
                has = np.ones(len(store), dtype=bool)
            arrays[f"keys{k}"] = mat
            arrays[f"has{k}"] = has
            meta.append({"stage": st.name, "config": asdict(st.cfg)})
        arrays["meta"] = np.asarray(__import__("json").dumps(meta))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(self.path)  # a half-written file never looks like a finished shard


def _first_holder(keys: np.ndarray, has: np.ndarray, width: int) -> np.ndarray:
    """For each row (in order), the first row sharing a key with it; itself if none.

    keys: (N, G * width) uint64, G keys of `width` words each; has: (N,) whether the row has keys.
    """
    n = len(keys)
    earliest = np.arange(n)
    rows = np.flatnonzero(has)
    if not len(rows):
        return earliest
    for g in range(keys.shape[1] // width):
        k = keys[rows, g * width : (g + 1) * width]  # (R, width)
        order = np.lexsort((rows, *k.T[::-1]))  # by key words, then by row
        ks, rs = k[order], rows[order]
        starts = np.r_[True, (ks[1:] != ks[:-1]).any(axis=1)]
        first = rs[np.flatnonzero(starts)[np.cumsum(starts) - 1]]  # first row of each key group
        np.minimum.at(earliest, rs, first)
    return earliest


def merge_signatures(directory: str | Path) -> tuple[list[dict], dict]:
    """Pass 2: read every shard's signatures, return (drops, report).

    Each drop is `{"shard", "index", "id", "stage", "reason", "dup_of"}` where `index` is the
    record's position in that shard's pass-1 output. The report has counts and cluster sizes.

    Raises:
        InputError: no signature files, a missing shard, or shards written with different settings.
    """
    import json

    files = sorted(Path(directory).glob("shard-*-of-*.npz"))
    if not files:
        raise InputError(f"{directory}: no shard-*-of-*.npz signature files (write them with --signatures)")
    parts = []
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as z:
                parts.append({k: z[k] for k in z.files})
        except (OSError, ValueError) as e:
            raise InputError(f"{f}: cannot read signatures ({e})") from None
    n_shards = {int(p["n_shards"]) for p in parts}
    metas = {str(p["meta"]) for p in parts}
    if len(n_shards) != 1 or len(metas) != 1:
        raise InputError(f"{directory}: shards were written with different --shard N or dedup settings")
    total = n_shards.pop()
    have = sorted(int(p["shard"]) for p in parts)
    if have != list(range(total)):
        missing = sorted(set(range(total)) - set(have))
        raise InputError(f"{directory}: shards {missing} of {total} are missing (run pass 1 for them first)")
    meta = json.loads(metas.pop())

    shard = np.concatenate([np.full(len(p["input"]), int(p["shard"])) for p in parts])
    index = np.concatenate([np.arange(len(p["input"])) for p in parts])
    ids = np.concatenate([p["ids"] for p in parts]) if parts else np.array([], dtype=np.str_)
    order = np.lexsort(
        (np.concatenate([p["line"] for p in parts]), np.concatenate([p["input"] for p in parts]))
    )
    shard, index, ids = shard[order], index[order], ids[order]

    alive = np.ones(len(order), dtype=bool)
    drops: list[dict] = []
    report: dict = {"documents": int(len(order)), "shards": total, "stages": {}}
    for k, m in enumerate(meta):
        keys = np.concatenate([p[f"keys{k}"] for p in parts])[order]
        has = np.concatenate([p[f"has{k}"] for p in parts])[order]
        rows = np.flatnonzero(alive)  # a stage sees only what the earlier stages kept
        width = 2 if m["stage"] == "exact_dedup" else 1
        earliest = _first_holder(keys[rows], has[rows], width)
        root = earliest.copy()
        for i in range(len(root)):  # earliest[i] <= i, so one forward sweep resolves chains
            root[i] = root[earliest[i]] if earliest[i] != i else i
        dup = earliest != np.arange(len(rows))
        reason = "duplicate" if m["stage"] == "exact_dedup" else "near_duplicate"
        for i in np.flatnonzero(dup):
            r = rows[i]
            drops.append(
                {
                    "shard": int(shard[r]),
                    "index": int(index[r]),
                    "id": str(ids[r]),
                    "stage": m["stage"],
                    "reason": reason,
                    "dup_of": str(ids[rows[root[i]]]),
                }
            )
        sizes = Counter(Counter(root.tolist()).values())
        report["stages"][m["stage"]] = {
            "config": m["config"],
            "in": int(len(rows)),
            "dropped": int(dup.sum()),
            "clusters_by_size": {int(s): int(c) for s, c in sorted(sizes.items())},
        }
        alive[rows[dup]] = False
    drops.sort(key=lambda d: (d["shard"], d["index"]))
    return drops, report
