"""Progress records: what every rank tells rank 0 while it trains, and rank 0's line per chapter.

A record is ``(kind, chapter, layer, value)``; the kinds, which task produces which, their
encoding on the wire and how many a plan produces are all here:

- ``loss``: a ``train(c, k)`` task's mean loss over its last epoch (layer k, chapter c);
- ``head_loss``: a ``head(c)`` task's mean loss (layer -1);
- ``accuracy``: an ``eval(c)`` task's test accuracy (layer -1);
- ``done``: the last record of a rank (chapter and layer -1): everything it had to say has
  been sent before it (MPI keeps the order of messages between two ranks on one communicator).

Records travel as four float64 values on the communicator's progress channel
(:meth:`mpff.comm.Comm.send_progress`). Rank 0 keeps a :class:`Board` that prints one line
per chapter as soon as that chapter is complete, and after its own tasks waits
(:meth:`Reporter.collect`) until every rank has said ``done``; a record still missing then
is named in the error instead of being waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

#: kind -> wire code (the codes of the first format are kept: 1 loss, 2 accuracy, 3 head loss)
CODES = {"loss": 1.0, "accuracy": 2.0, "head_loss": 3.0, "done": 9.0}
KINDS = {code: kind for kind, code in CODES.items()}
#: the record each task kind produces
TASK_RECORD = {"train": "loss", "head": "head_loss", "eval": "accuracy"}


class ProgressError(RuntimeError):
    """Rank 0 gave up waiting for progress records; the message names what is missing."""


class Record(NamedTuple):
    """(kind, chapter, layer, value); a tuple, so ``rec[3]`` is its value."""
    kind: str
    chapter: int
    layer: int
    value: float = 0.0

    def encode(self) -> np.ndarray:
        return np.array([CODES[self.kind], self.chapter, self.layer, self.value], dtype=np.float64)

    @staticmethod
    def decode(array: np.ndarray) -> Record:
        return Record(KINDS[float(array[0])], int(array[1]), int(array[2]), float(array[3]))

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.kind, self.chapter, self.layer)


def expected(plan) -> set[tuple[str, int, int]]:
    """Keys of every record the plan's tasks produce (each task once, whoever runs it)."""
    out = set()
    for t in plan.tasks:
        kind = TASK_RECORD.get(t.kind)
        if kind is not None:
            out.add((kind, t.chapter, t.layer if t.kind == "train" else -1))
    return out


def describe(key: tuple[str, int, int]) -> str:
    kind, chapter, layer = key
    where = f"chapter {chapter + 1}" + (f" layer {layer + 1}" if layer >= 0 else "")
    return f"{kind.replace('_', ' ')} of {where}"


class Board:
    """Rank 0: gathers the records and prints one line per chapter, in order, when complete."""

    def __init__(self, plan, start: float, quiet: bool = False,
                 print_line: Callable[[str], None] | None = None) -> None:
        self.num_chapters = plan.num_chapters
        self.first = plan.start_chapter
        self.expected = expected(plan)
        self.layers_per_chapter = {c: sorted(k for kind, cc, k in self.expected if kind == "loss" and cc == c)
                                   for c in range(plan.start_chapter, plan.num_chapters)}
        self.evals = {c for kind, c, _ in self.expected if kind == "accuracy"}
        self.got: set[tuple[str, int, int]] = set()
        self.losses: dict[int, dict[int, float]] = {}
        self.head_losses: dict[int, float] = {}
        self.acc: dict[int, float] = {}
        self.done_ranks: set[int] = set()
        self.next_to_print = plan.start_chapter
        self.start = start
        self.quiet = quiet
        self.print_line = print_line or (lambda line: print(line, flush=True))
        #: many short chapters (train.chapter_batches): a line for about every hundredth of the run,
        #: and for every chapter evaluated and the last, instead of thousands of lines
        self.line_every = 1 if self.num_chapters <= 200 else self.num_chapters // 100

    def add(self, rec: Record, source: int = 0) -> None:
        if rec.kind == "done":
            self.done_ranks.add(source)
            return
        self.got.add(rec.key)
        if rec.kind == "loss":
            self.losses.setdefault(rec.chapter, {})[rec.layer] = rec.value
        elif rec.kind == "accuracy":
            self.acc[rec.chapter] = rec.value
        elif rec.kind == "head_loss":
            self.head_losses[rec.chapter] = rec.value
        self._print_ready()

    def missing(self) -> list[tuple[str, int, int]]:
        return sorted(self.expected - self.got, key=lambda k: (k[1], k[2], k[0]))

    def _print_ready(self) -> None:
        while self.next_to_print < self.num_chapters:
            c = self.next_to_print
            layers = self.layers_per_chapter.get(c, [])
            if any(k not in self.losses.get(c, {}) for k in layers) or (c in self.evals and c not in self.acc):
                return
            elapsed = time.perf_counter() - self.start
            done = c + 1 - self.first
            eta = elapsed / done * (self.num_chapters - c - 1)
            losses = " ".join(f"{self.losses[c][k]:.4f}" for k in layers)
            acc = f"  test acc {100 * self.acc[c]:6.2f}%" if c in self.acc else ""
            shown = (c + 1) % self.line_every == 0 or c in self.evals or c + 1 == self.num_chapters
            if not self.quiet and shown:
                self.print_line(f"chapter {c + 1:>4}/{self.num_chapters}  loss {losses}{acc}  "
                                f"elapsed {elapsed:7.1f}s  eta {eta:7.1f}s")
            self.next_to_print += 1


class Reporter:
    """Every rank's end of the progress channel. Rank 0 records into its board directly; the
    others send, keeping each record's buffer alive until its send completes."""

    def __init__(self, comm, board: Board | None = None) -> None:
        self.comm = comm
        self.board = board
        self._sends: list[tuple[object, np.ndarray]] = []

    def report(self, rec: Record) -> None:
        if self.comm.rank == 0:
            if self.board is not None:
                self.board.add(rec, 0)
            return
        array = rec.encode()
        self._sends.append((self.comm.send_progress(array), array))

    def poll(self) -> None:
        """Rank 0: take in what has arrived. Others: forget sends that completed."""
        if self.comm.rank == 0:
            for source, array in self.comm.poll_progress():
                if self.board is not None:
                    self.board.add(Record.decode(array), source)
        self._sends = [(r, a) for r, a in self._sends if not self.comm.test(r)]

    def pending(self) -> list:
        return [r for r, _ in self._sends]

    def buffers(self) -> list[np.ndarray]:
        """The records still in flight (a rank leaving early keeps them alive)."""
        return [a for _, a in self._sends]

    def collect(self, *, timeout: float = 0.0, on_idle: Callable[[], None] | None = None) -> None:
        """Rank 0, after its own tasks: wait until every rank has said ``done``.

        ``timeout`` (seconds without any new record; 0: none) bounds the wait for ranks that are
        still working; when it passes, or when every rank is done and records are still missing,
        :class:`ProgressError` names the missing records and the silent ranks."""
        if self.comm.rank != 0 or self.board is None:
            return
        board = self.board
        last_news, seen = time.monotonic(), len(board.got) + len(board.done_ranks)
        while len(board.done_ranks) < self.comm.size:
            self.poll()
            now = time.monotonic()
            if len(board.got) + len(board.done_ranks) != seen:
                last_news, seen = now, len(board.got) + len(board.done_ranks)
            elif timeout and now - last_news > timeout:
                silent = sorted(set(range(self.comm.size)) - board.done_ranks)
                hosts = getattr(self.comm, "hosts", None) or []
                raise ProgressError(
                    f"no progress from rank(s) "
                    f"{', '.join(f'{r} (host {hosts[r]})' if r < len(hosts) else str(r) for r in silent)} "
                    f"for {timeout:.0f} s "
                    f"(run.stall_timeout); still missing: {_some(board.missing())}")
            if len(board.done_ranks) < self.comm.size:
                if on_idle is not None:
                    on_idle()
                time.sleep(self.comm.poll_interval)
        if board.missing():
            raise ProgressError(f"every rank finished but rank 0 never got: {_some(board.missing())}")


def _some(keys: list[tuple[str, int, int]], limit: int = 5) -> str:
    text = ", ".join(describe(k) for k in keys[:limit])
    return text + (f" and {len(keys) - limit} more" if len(keys) > limit else "") if keys else "nothing"
