"""Chapters shorter than an epoch (``train.chapter_batches = K``): which batches each chapter holds.

Pure arithmetic, no torch: the plan sizes buffers from it, the FF rank state draws the rows.

Each data shard s (one, unless Federated or ``data.shards``) is a stream of batches: epoch e of
the shard is a permutation of its samples drawn from (seed, shard, e) alone, cut into
``ceil(len_s / B)`` batches of B (the last one shorter). A shard's stream is
``T_s = ceil(E * batches_per_epoch_s / P)`` batches long over P shards: E epochs with one shard,
the E/P epochs of a shard that the chapter rotation of Federated gives it otherwise (chapter
c trains shard c mod P). Chapter c takes the next K batches of its shard's stream: batches
``[j K, min((j + 1) K, T_s))`` with ``j = c // P``. There are ``S = P * ceil(T_0 / K)``
chapters (shard 0 is the longest); S may exceed E.

With K = C epochs of batches this is the paper's chapter of C epochs (but with one shuffle per
epoch shared by every layer, so that every layer of a chapter trains on the same samples). With
K = 1 and Sequential it is per-batch FF: every layer steps once on each batch, layer k on the
batch pushed through layer k-1 after that layer's step.

The learning-rate cooldown follows the position in the run: the g-th batch of G in all takes
the rate of global epoch ``floor(g * E / G) + 1`` (:func:`mpff.ff.cooldown_lr`), which with
one shard is exactly the epoch the batch belongs to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Batch:
    """One batch of a chapter: ``rows`` samples, the ``start``-th to ``start + rows``-th row of
    the chapter's data; drawn as positions ``[lo, lo + rows)`` of permutation ``epoch`` of the
    shard; trained at the rate of global epoch ``global_epoch`` (1-based)."""
    epoch: int
    lo: int
    rows: int
    start: int
    global_epoch: int


class Chapters:
    """The chapters of a run whose chapters are K batches long."""

    def __init__(self, *, epochs: int, batch_size: int, chapter_batches: int, shard_lens: list[int],
                 slice_batches: int) -> None:
        if chapter_batches < 1 or batch_size < 1 or epochs < 1 or not shard_lens or min(shard_lens) < 1:
            raise ValueError("chapters need positive sizes and non-empty shards")
        self.epochs = epochs
        self.batch_size = batch_size
        self.k = chapter_batches
        self.shard_lens = list(shard_lens)
        self.shards = len(shard_lens)
        #: batches per slice: the rows a layer's inputs are held for at once (run in slices when a
        #: chapter is longer)
        self.slice_batches = max(1, slice_batches)
        self.per_epoch = [math.ceil(n / batch_size) for n in shard_lens]
        self.stream = [math.ceil(epochs * nb / self.shards) for nb in self.per_epoch]
        self.per_shard = math.ceil(max(self.stream) / self.k)
        self.num_chapters = self.shards * self.per_shard
        counts = [self.num_batches(c) for c in range(self.num_chapters)]
        self._before = [0]
        for n in counts:
            self._before.append(self._before[-1] + n)
        self.total_batches = self._before[-1]

    def shard(self, chapter: int) -> int:
        return chapter % self.shards

    def span(self, chapter: int) -> tuple[int, int]:
        """The chapter's batches as positions ``[first, end)`` of its shard's stream."""
        s, j = self.shard(chapter), chapter // self.shards
        first = min(j * self.k, self.stream[s])
        return first, min(first + self.k, self.stream[s])

    def num_batches(self, chapter: int) -> int:
        first, end = self.span(chapter)
        return end - first

    def _batch_rows(self, s: int, b: int) -> tuple[int, int, int]:
        """(epoch, first position, rows) of batch b of shard s's stream."""
        nb, n = self.per_epoch[s], self.shard_lens[s]
        epoch, i = divmod(b, nb)
        lo = i * self.batch_size
        return epoch, lo, min(self.batch_size, n - lo)

    def rows(self, chapter: int) -> int:
        """Samples the chapter trains on (the sizes of its negatives and shipped buffers)."""
        s = self.shard(chapter)
        first, end = self.span(chapter)
        return sum(self._batch_rows(s, b)[2] for b in range(first, end))

    def batches(self, chapter: int) -> list[Batch]:
        """The chapter's batches in training order, with their rates' global epochs."""
        s = self.shard(chapter)
        first, end = self.span(chapter)
        out, start, g = [], 0, self._before[chapter]
        for b in range(first, end):
            epoch, lo, n = self._batch_rows(s, b)
            out.append(Batch(epoch, lo, n, start, g * self.epochs // self.total_batches + 1))
            start += n
            g += 1
        return out

    def slices(self, chapter: int) -> list[list[Batch]]:
        """The chapter's batches in slices of at most ``slice_batches``: the unit its data is pushed
        through the layers in (fixed by the chapter alone, so every schedule computes the same)."""
        bs = self.batches(chapter)
        return [bs[i:i + self.slice_batches] for i in range(0, len(bs), self.slice_batches)]

    def epochs_of(self, chapter: int) -> float:
        """The chapter's length in epochs of its shard (a fraction below one)."""
        return self.rows(chapter) / self.shard_lens[self.shard(chapter)]

    def mean_epochs(self) -> float:
        """The mean chapter length in epochs of a shard: for work estimates."""
        return sum(self.epochs_of(c) for c in range(min(self.num_chapters, self.shards))) / min(
            self.num_chapters, self.shards)
