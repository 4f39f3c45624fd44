"""The messages of a run (each send paired with its receive) and its Chrome trace event JSON
(trace.json: open it in https://ui.perfetto.dev or chrome://tracing)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .runs import Run
from .summary import KIND_CATEGORY


@dataclass(frozen=True)
class Message:
    """One buffer that went from rank ``src`` to rank ``dst``: the indices of its send span
    (in ``run.ranks[src].spans``) and of its recv span (in ``run.ranks[dst].spans``)."""
    src: int
    send: int
    dst: int
    recv: int
    chapter: int    # 1-based, -1: none
    layer: int      # the buffer's index (-1: the head or the negatives)
    nbytes: int


def messages(run: Run) -> tuple[list[Message], int, int]:
    """Pair every send span with its recv span; returns (pairs, unmatched sends, unmatched recvs).

    A send span on rank r with peer p is the recv span on rank p with peer r that has the
    same chapter, layer and bytes (the executor labels both with the buffer's chapter and index).
    Where several match -- the head and the negatives of one chapter are both layer -1, and
    could have the same size -- they pair in time order, as MPI delivers messages between two
    ranks. A send without a recv is a buffer the receiver never unpacked (a killed run, or
    adaptive negatives in 'newest' mode that a newer set overtook)."""
    def grouped(kind: str) -> dict[tuple, list[tuple[float, int]]]:
        out: dict[tuple, list[tuple[float, int]]] = {}
        for rt in run.ranks:
            for i in np.flatnonzero(rt.kinds == kind):
                sp = rt.spans[i]
                here, there = rt.rank, int(sp["peer"])
                src, dst = (here, there) if kind == "send" else (there, here)
                key = (src, dst, int(sp["chapter"]), int(sp["layer"]), int(sp["bytes"]))
                out.setdefault(key, []).append((float(sp["start"]), int(i)))
        return out

    sends, recvs = grouped("send"), grouped("recv")
    pairs: list[Message] = []
    for key, sent in sends.items():
        received = sorted(recvs.get(key, []))
        for (_, i), (_, j) in zip(sorted(sent), received):
            pairs.append(Message(key[0], i, key[1], j, key[2], key[3], key[4]))
    n_send = sum(len(v) for v in sends.values())
    n_recv = sum(len(v) for v in recvs.values())
    return pairs, n_send - len(pairs), n_recv - len(pairs)


#: Counter tracks of trace.json: scalar name -> (track name, scale, series label).
COUNTERS = {
    "loss": ("FF loss", 1.0, "layer {layer}"),
    "head_loss": ("head loss", 1.0, "head"),
    "test_accuracy": ("test accuracy (%)", 100.0, "accuracy"),
    "negatives_changed": ("negatives changed (%)", 100.0, "changed"),
    "host_mem": ("host memory (MiB)", 1 / 2**20, "resident"),
    "peak_host_mem": ("host memory (MiB)", 1 / 2**20, "peak"),
    "peak_gpu_mem": ("GPU memory (MiB)", 1 / 2**20, "peak allocated"),
}


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)


def chrome_trace(run: Run) -> dict:
    """Chrome trace event JSON (Perfetto, chrome://tracing): one process per rank with one named
    thread, spans as complete ("X") events in µs, a flow arrow from each send to its receive
    ("s"/"f" events bound to the two slices), and counter tracks ("C") for the losses, the test
    accuracy and memory."""
    t0 = run.wall_start
    events: list[dict] = []
    for rt in run.ranks:
        pid = rt.rank
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"name": f"rank {rt.rank} ({rt.host}, {rt.device})"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"sort_index": rt.rank}})
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"name": f"rank {rt.rank} tasks"}})
        for kind, span in zip(rt.kinds, rt.spans):
            chapter, layer = int(span["chapter"]), int(span["layer"])
            name = kind + (f" c{chapter}" if chapter >= 0 else "") + (f" L{layer}" if layer >= 0 else "")
            events.append({
                "name": name, "cat": KIND_CATEGORY.get(kind, "other"), "ph": "X",
                "ts": _us(float(span["start"]) - t0),
                "dur": _us(max(float(span["end"] - span["start"]), 0.0)),
                "pid": pid, "tid": 0,
                "args": {"chapter": chapter, "layer": layer, "bytes": int(span["bytes"]),
                         "peer": int(span["peer"])},
            })
        for name, span in zip(rt.scalar_names, rt.scalars):
            if name not in COUNTERS:
                continue
            track, scale, series = COUNTERS[name]
            events.append({"name": track, "ph": "C", "pid": pid, "tid": 0,
                           "ts": _us(float(span["time"]) - t0),
                           "args": {series.format(layer=int(span["layer"])): float(span["value"]) * scale}})
    pairs, _, _ = messages(run)
    for flow_id, m in enumerate(pairs):
        # each end sits in the middle of its slice and binds to it ("bp": "e": enclosing slice)
        for ph, rank, index in (("s", m.src, m.send), ("f", m.dst, m.recv)):
            span = run.ranks[rank].spans[index]
            middle = (float(span["start"]) + max(float(span["end"]), float(span["start"]))) / 2
            events.append({"name": "message", "cat": "message", "ph": ph, "id": flow_id, "bp": "e",
                           "pid": rank, "tid": 0, "ts": _us(middle - t0)})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"run": run.name, "time_base": "microseconds since the first rank's wall_start",
                          "chapters": "1-based", "layers": "0-based (model.h5 layers/<k>)"}}

