"""Per-rank timing traces in HDF5: spans and scalars buffered in memory, appended at chapter ends.

Tracing never blocks training: :meth:`Tracer.span` only appends a tuple to a list;
:meth:`Tracer.flush` (called by the engine at chapter ends) appends the buffered
records to resizable HDF5 datasets and flushes the file, so a run killed midway still
leaves a readable trace up to its last flushed chapter. The layout is documented in
``docs/traces.md``; it is plain HDF5 that h5py reads with no mpff code.

All times are seconds on one time base shared by all ranks: rank 0's clock at start-up
(each rank measures its offset to rank 0 with a ping-pong before training).
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
FORMAT_VERSION = 1

#: Span kinds, grouped as the report groups them.
SPAN_KINDS = (
    "train", "forward", "negatives", "head",  # compute
    "send", "recv",                           # communication (posting, packing, unpacking)
    "allreduce",                              # data-parallel backprop: a gradient bucket (overlaps train)
    "wait",                                   # blocked on a buffer that has not arrived
    "eval",                                   # test-set evaluation
    "checkpoint", "io", "setup",              # other
)

SPAN_DTYPE = np.dtype([
    ("kind", "S12"), ("chapter", "<i4"), ("layer", "<i4"),
    ("start", "<f8"), ("end", "<f8"), ("bytes", "<i8"), ("peer", "<i4"),
])
SCALAR_DTYPE = np.dtype([
    ("name", "S32"), ("chapter", "<i4"), ("layer", "<i4"), ("time", "<f8"), ("value", "<f8"),
])


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
            self._file.create_dataset("spans", shape=(0,), maxshape=(None,),
                                      dtype=SPAN_DTYPE, chunks=(4096,))
            self._file.create_dataset("scalars", shape=(0,), maxshape=(None,),
                                      dtype=SCALAR_DTYPE, chunks=(1024,))
            attrs = self._file.attrs
            attrs["format"] = FORMAT
            attrs["format_version"] = FORMAT_VERSION
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
        start = self.now()
        try:
            yield
        finally:
            self._spans.append((kind, chapter, layer, start, self.now(), nbytes, peer))

    def add_span(self, kind: str, chapter: int, layer: int, start: float, end: float,
                 nbytes: int = 0, peer: int = -1) -> None:
        self._spans.append((kind, chapter, layer, start, end, nbytes, peer))

    def scalar(self, name: str, chapter: int, layer: int, value: float) -> None:
        self._scalars.append((name, chapter, layer, self.now(), float(value)))

    def flush(self) -> None:
        """Append the buffered records to the file (called at chapter ends; costs milliseconds)."""
        if not self.enabled or self._file is None:
            self._spans.clear()
            self._scalars.clear()
            return
        for name, rows, dtype in (("spans", self._spans, SPAN_DTYPE),
                                  ("scalars", self._scalars, SCALAR_DTYPE)):
            if not rows:
                continue
            arr = np.array(rows, dtype=dtype)
            ds = self._file[name]
            n = ds.shape[0]
            ds.resize((n + len(arr),))
            ds[n:] = arr
            rows.clear()
        self._file.attrs["wall_end"] = self.now()
        self._write()

    def _write(self) -> None:
        """The whole file, to disk (an OSError, with its errno, when the disk fails)."""
        self._file.flush()
        with self._buf.getbuffer() as view:  # released even if the write fails
            write_atomic(self.path, view)

    def set_attr(self, key: str, value: Any) -> None:
        if self._file is not None:
            self._file.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)

    def close(self, status: str = "finished") -> None:
        """Write the last records and the status; the trace is closed even if writing fails."""
        if self._file is None:
            return
        try:
            for name, rows, dtype in (("spans", self._spans, SPAN_DTYPE), ("scalars", self._scalars, SCALAR_DTYPE)):
                if rows:
                    ds = self._file[name]
                    n = ds.shape[0]
                    ds.resize((n + len(rows),))
                    ds[n:] = np.array(rows, dtype=dtype)
                    rows.clear()
            self._file.attrs["status"] = status
            self._file.attrs["wall_end"] = self.now()
            self._file.close()
            with self._buf.getbuffer() as view:  # released even if the write fails
                write_atomic(self.path, view)
        finally:
            if self._file:
                self._file.close()
            self._file = None
