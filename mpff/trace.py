"""Per-rank timing traces in HDF5: spans and scalars buffered in memory, appended at chapter ends.

Tracing never blocks training: :meth:`Tracer.span` only appends a tuple to a list;
:meth:`Tracer.flush` (called by the engine at chapter ends) appends the buffered
records to resizable HDF5 datasets and flushes the file, so a run killed midway still
leaves a readable trace up to its last flushed chapter. The layout is documented in
``docs/traces.md`` and in the file itself (units and meaning of every field are
attributes of its dataset); it is plain HDF5 that h5py reads with no mpff code.

All times are seconds on one time base shared by all ranks: rank 0's clock at start-up
(each rank measures its offset to rank 0 with a ping-pong before training).

Chapters: callers pass the 0-based chapter the code uses everywhere (-1: none); the file
stores it 1-based, as every number a user sees (format version 2; version 1 files stored
it 0-based, and :func:`mpff.analysis.runs.read_trace` converts them). Layers stay 0-based, as the
model file's ``layers/<k>`` groups.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import h5py
import numpy as np

from .fsutil import write_atomic

FORMAT = "mpff-trace"
#: 2: ``kind`` and ``name`` are variable-length UTF-8 strings (were NUL-padded S12/S32),
#: chapters are 1-based (were 0-based), datasets carry units and meaning as attributes.
FORMAT_VERSION = 2

#: Span kinds, grouped as the report groups them.
SPAN_KINDS = (
    "train", "forward", "negatives", "head",  # compute
    "ship",                                   # compute: a block's outputs for the next rank (run.inputs)
    "send", "recv",                           # communication (posting, packing, unpacking)
    "allreduce",                              # data-parallel backprop: a gradient bucket (overlaps train)
    "wait",                                   # blocked on a buffer that has not arrived
    "eval",                                   # test-set evaluation
    "checkpoint", "io", "setup",              # other
)

_TEXT = h5py.string_dtype("utf-8")
SPAN_DTYPE = np.dtype([
    ("kind", _TEXT), ("chapter", "<i4"), ("layer", "<i4"),
    ("start", "<f8"), ("end", "<f8"), ("bytes", "<i8"), ("peer", "<i4"),
])
SCALAR_DTYPE = np.dtype([
    ("name", _TEXT), ("chapter", "<i4"), ("layer", "<i4"), ("time", "<f8"), ("value", "<f8"),
])

TIME_BASE = "seconds since rank 0's clock at start-up, shared by all ranks (clock_offset applied)"
CHAPTER = "chapter, 1-based; -1: none"
LAYER = "layer, 0-based as model.h5's layers/<k>; -1: none"

#: (units, meaning) of every field, written as ``<field>_units`` / ``<field>_meaning``
#: attributes of the dataset.
SPAN_FIELDS = {
    "kind": ("", "what the rank did: " + ", ".join(SPAN_KINDS)),
    "chapter": ("", CHAPTER),
    "layer": ("", LAYER + " (send/recv: the buffer's index; the head is -1 for other kinds)"),
    "start": ("s", "start, " + TIME_BASE),
    "end": ("s", "end, " + TIME_BASE),
    "bytes": ("B", "bytes moved (send, recv), else 0"),
    "peer": ("", "the other rank (send, recv, wait), else -1"),
}
SCALAR_FIELDS = {
    "name": ("", "what was measured; value_units gives each name's unit"),
    "chapter": ("", CHAPTER),
    "layer": ("", LAYER),
    "time": ("s", "when it was recorded, " + TIME_BASE),
    "value": ("see value_units", "the value"),
}
#: Units of the scalar values, by name.
SCALAR_UNITS = {
    "loss": "1 (mean FF loss of the layer's last epoch in the chapter)",
    "head_loss": "1 (mean cross-entropy of the softmax head)",
    "test_accuracy": "fraction in [0, 1]",
    "negatives_changed": "fraction in [0, 1] of negative labels that changed",
    "peak_host_mem": "B (peak resident set size of the rank's process)",
    "peak_gpu_mem": "B (torch.cuda.max_memory_allocated)",
    "host_mem": "B (resident set size of the rank's process when the trace was flushed)",
    "bp_steps": "1 (backprop optimizer steps of the chapter on this rank)",
    "bp_forward_seconds": "s (backprop: forward passes with the loss of the chapter's steps, summed; "
                          "GPU: CUDA events on every 8th step, scaled to all)",
    "bp_backward_seconds": "s (backprop: backward passes of the chapter's steps, summed; data-parallel: "
                           "each ends when DDP's last all-reduce of the step is back)",
    "bp_optimizer_seconds": "s (backprop: optimizer steps of the chapter, summed)",
}


#: The phases of a backprop training step whose seconds a trace records per chapter
#: (``bp_<phase>_seconds``, by :class:`mpff.backprop.StepClock`; read by :mod:`mpff.predict.backprop`).
STEP_PHASES = ("forward", "backward", "optimizer")


def user_chapter(chapter: int) -> int:
    """The 1-based chapter stored in a trace for the code's 0-based one (-1 stays -1)."""
    return chapter + 1 if chapter >= 0 else -1


def resident_bytes() -> float | None:
    """This process's current resident set size in bytes (Linux; None where /proc is absent)."""
    try:
        with open("/proc/self/statm") as fh:
            return float(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _describe(ds: h5py.Dataset, fields: dict[str, tuple[str, str]], what: str) -> None:
    ds.attrs["description"] = what
    for name, (units, meaning) in fields.items():
        ds.attrs[f"{name}_units"] = units
        ds.attrs[f"{name}_meaning"] = meaning


def trace_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, "trace", f"rank{rank:04d}.h5")


class Tracer:
    """Records spans and scalars of one rank. ``enabled=False`` keeps the API but writes nothing."""

    def __init__(self, path: str | None, rank: int, meta: dict[str, Any], *,
                 clock_offset: float = 0.0, t0: float | None = None, enabled: bool = True) -> None:
        self.rank = rank
        self.enabled = enabled and path is not None
        self.path = path
        #: local perf_counter value that corresponds to time 0 of the shared base
        self._origin = (time.perf_counter() if t0 is None else t0) - clock_offset
        self._spans: list[tuple] = []
        self._scalars: list[tuple] = []
        self._file: h5py.File | None = None
        if self.enabled:
            # Built in memory and written whole at each flush (atomically: a reader, such as
            # `mpff report` during the run, sees the previous chapter's file or this one), so the
            # HDF5 library never meets a full disk or an I/O error (see mpff.fsutil).
            self._buf = io.BytesIO()
            self._file = h5py.File(self._buf, "w")
            spans = self._file.create_dataset("spans", shape=(0,), maxshape=(None,),
                                              dtype=SPAN_DTYPE, chunks=(4096,))
            _describe(spans, SPAN_FIELDS, "one row per timed interval of this rank; the spans "
                      "of one rank do not overlap")
            scalars = self._file.create_dataset("scalars", shape=(0,), maxshape=(None,),
                                                dtype=SCALAR_DTYPE, chunks=(1024,))
            _describe(scalars, SCALAR_FIELDS, "one row per measured value")
            scalars.attrs["value_units"] = json.dumps(SCALAR_UNITS)
            attrs = self._file.attrs
            attrs["format"] = FORMAT
            attrs["format_version"] = FORMAT_VERSION
            attrs["time_units"] = "s"
            attrs["time_base"] = TIME_BASE
            attrs["chapter_base"] = 1
            attrs["layer_base"] = 0
            attrs["rank"] = rank
            attrs["clock_offset"] = clock_offset
            attrs["status"] = "running"
            attrs["wall_start"] = self.now()
            attrs["wall_end"] = self.now()
            for key, value in meta.items():
                attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
            self._write()

    def now(self) -> float:
        """Seconds on the shared time base."""
        return time.perf_counter() - self._origin

    @contextmanager
    def span(self, kind: str, chapter: int = -1, layer: int = -1, *, peer: int = -1,
             nbytes: int = 0) -> Iterator[None]:
        """Time the block as a span of ``kind``; ``chapter`` is the code's 0-based one (-1: none)."""
        start = self.now()
        try:
            yield
        finally:
            self._spans.append((kind, user_chapter(chapter), layer, start, self.now(), nbytes, peer))

    def add_span(self, kind: str, chapter: int, layer: int, start: float, end: float,
                 nbytes: int = 0, peer: int = -1) -> None:
        """A span measured by the caller; ``chapter`` 0-based as in :meth:`span`."""
        self._spans.append((kind, user_chapter(chapter), layer, start, end, nbytes, peer))

    def scalar(self, name: str, chapter: int, layer: int, value: float) -> None:
        """A measured value (units: :data:`SCALAR_UNITS`); ``chapter`` 0-based, -1: none."""
        self._scalars.append((name, user_chapter(chapter), layer, self.now(), float(value)))

    def flush(self) -> None:
        """Append the buffered records to the file (called at chapter ends; costs milliseconds)."""
        if not self.enabled or self._file is None:
            self._spans.clear()
            self._scalars.clear()
            return
        self._append_buffered()
        self._file.attrs["wall_end"] = self.now()
        self._write()

    def _append_buffered(self) -> None:
        self._sample_memory()
        for name, rows, dtype in (("spans", self._spans, SPAN_DTYPE),
                                  ("scalars", self._scalars, SCALAR_DTYPE)):
            if rows:
                ds = self._file[name]
                n = ds.shape[0]
                ds.resize((n + len(rows),))
                ds[n:] = np.array(rows, dtype=dtype)
                rows.clear()

    def _write(self) -> None:
        """The whole file, to disk (an OSError, with its errno, when the disk fails)."""
        self._file.flush()
        with self._buf.getbuffer() as view:  # released even if the write fails
            write_atomic(self.path, view)

    def _sample_memory(self) -> None:
        """A point of the memory counter (at every flush: chapter ends and the close)."""
        rss = resident_bytes()  # reading /proc takes microseconds
        if rss is not None:
            self._scalars.append(("host_mem", -1, -1, self.now(), rss))

    def set_attr(self, key: str, value: Any) -> None:
        if self._file is not None:
            self._file.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)

    def close(self, status: str = "finished") -> None:
        """Write the last records and the status; the trace is closed even if writing fails."""
        if self._file is None:
            return
        try:
            self._append_buffered()
            self._file.attrs["status"] = status
            self._file.attrs["wall_end"] = self.now()
            self._file.close()
            with self._buf.getbuffer() as view:  # released even if the write fails
                write_atomic(self.path, view)
        finally:
            if self._file:
                self._file.close()
            self._file = None
