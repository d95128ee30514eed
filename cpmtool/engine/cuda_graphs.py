"""Decode steps replayed as CUDA graphs, on by default as in CPM.cu and vLLM.

vLLM captures a fixed set of batch sizes up front and pads the batch to the next one; here a graph
is captured when a (rows, slots) shape first occurs, since a rollout's batch only shrinks.

A small model's decode step on a GPU is bound by kernel launches and Python, not by the GPU: a
cpm-tiny step (4 layers, ~35 kernels each) took ~6.8 ms eager on an H200 for 64 rows, nearly all of
it host time. A graph replays the step's kernels in one launch.

A graph fixes every shape and address it was captured with, so a captured step:
- reads the scheduler's current KV cache tensors. When the cache is rebuilt (rows dropped, a new
  admission appended) its tensors change, and the graphs of the old ones are dropped and recaptured
  on first use. The scheduler therefore keeps finished rows in the batch until half of it is done
  (`Scheduler._compact(lazy=True)`): a dead row re-feeds its last token at its last position, which
  rewrites the same K/V into the same slot, and its logits are dropped.
- attends over a fixed number of cache slots, `s_bucket`: the next power of two (at least 64) above
  the furthest position, at most the cache's length. The slots past a row's position are masked,
  so this is the same attention as over the `used` slots of an eager step; the KV cache then skips
  its high-water mark (`KVCache.fixed_used`), the one host sync in an eager step.
- feeds the tokens and positions through static input buffers, one pair per (rows, slots) key.

Each key's first step costs one eager warm-up (on a side stream, as torch asks before a capture),
the capture and a replay; a 64 x 64-token rollout captures a handful of keys.
"""

from __future__ import annotations

import torch

MIN_SLOTS = 64


def s_bucket(positions_needed: int, max_len: int) -> int:
    """Cache slots a captured step attends over: the next power of two >= `positions_needed`
    (at least MIN_SLOTS), capped at the cache's length."""
    s = MIN_SLOTS
    while s < positions_needed:
        s *= 2
    return min(s, max_len)


class _Captured:
    def __init__(self, graph, ids, pos, logits):
        self.graph, self.ids, self.pos, self.logits = graph, ids, pos, logits


class DecodeGraphs:
    """CUDA graphs of `model`'s one-token decode step over a `KVCache`, keyed by (rows, slots).

    `capture=False` runs the same fixed-shape step eagerly: the logic (slot buckets, dead rows,
    cache rebinding) without CUDA, for the tests on a CPU.
    """

    def __init__(self, model, capture: bool = True):
        self.model = model
        self.capture = capture
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.stream = None  # the side stream of warm-ups and captures
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self._bound: tuple | None = None  # the cache tensors the graphs read
        self.captures = 0  # graphs captured so far (a test and bench figure)

    def _bind(self, cache) -> None:
        tensors = (*cache.k, *cache.v, cache.valid)
        if self._bound is None or len(tensors) != len(self._bound) or \
                any(a is not b for a, b in zip(tensors, self._bound, strict=True)):
            # the old graphs point into tensors the cache no longer uses: drop them and hold the new
            # ones, so their addresses stay the graphs' own. A pool whose graphs are all gone is
            # released and cannot take a capture again: the next graphs share a new one
            if self.graphs:
                self.graphs.clear()
                self.pool = torch.cuda.graph_pool_handle()
            self._bound = tensors

    def _step(self, ids, pos, cache):
        h = self.model.hidden_states(ids, pos, cache)  # (B, 1, hidden)
        return self.model.logits(h[:, -1]).float()  # (B, V)

    def logits(self, cache, ids: list[int], positions: list[int]) -> torch.Tensor:
        """Logits (B, V) of one decode step: row b feeds token ids[b] at positions[b]. The result
        is the graph's output buffer, valid until the next call."""
        self._bind(cache)
        b = len(ids)
        s = s_bucket(max(positions) + 1, cache.max_len)
        dev = cache.valid.device
        host = torch.tensor([ids, positions], dtype=torch.long)  # (2, B), one copy to the device
        # every valid slot lies below its row's position, so below s: s is a high-water mark
        cache.used = s
        cache.fixed_used = True
        try:
            key = (b, s)
            g = self.graphs.get(key)
            if g is not None:
                g.ids.copy_(host[0, :, None], non_blocking=True)
                g.pos.copy_(host[1, :, None], non_blocking=True)
                g.graph.replay()
                return g.logits
            x = host.to(dev)
            ids_buf, pos_buf = x[0, :, None].contiguous(), x[1, :, None].contiguous()  # (B, 1) each
            if not self.capture:
                return self._step(ids_buf, pos_buf, cache)
            # warm-up on a side stream (cuBLAS workspaces, lazy inits), then capture on it. The
            # warm-up runs the real step: it writes this step's K/V, which the replay rewrites unchanged.
            # capture_begin/end rather than `with torch.cuda.graph`: that one empties the allocator's
            # cache before every capture, and a rollout captures several times
            if self.stream is None:
                self.stream = torch.cuda.Stream()
            self.stream.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(self.stream):
                self._step(ids_buf, pos_buf, cache)
                self.stream.synchronize()
                graph.capture_begin(pool=self.pool)
                try:
                    out = self._step(ids_buf, pos_buf, cache)
                finally:
                    graph.capture_end()
            torch.cuda.current_stream().wait_stream(self.stream)
            self.graphs[key] = g = _Captured(graph, ids_buf, pos_buf, out)
            self.captures += 1
            g.graph.replay()
            return g.logits
        finally:
            # each step's mask is rebuilt at its layer 0 (KVCache.claim); the one left here may be
            # a graph's pool tensor, which a later eager step must not take for its own
            cache.fixed_used = False
            cache._mask = None
