"""How a run ends early: the exit codes, the stop signals, and the halts every rank agrees on.

Exit codes (``mpff train --help`` and the README list them too):

====  ==========================================================================================
   0  finished (or nothing to resume)
   1  a bug: a traceback, and ``failure-rank<r>.txt`` in the run directory
   2  bad input: one line says what to fix; nothing was written (or, for memory that a
      run's settings need and that runs out once it started, the run is marked failed)
  65  diverged: a loss or weight became NaN or infinite; no model is written (lower the rate)
  69  stalled: a rank waited longer than ``run.stall_timeout`` for a peer; the job is aborted
  74  an I/O error (disk full, EIO, quota) writing a trace, checkpoint, model or run.json
  75  stopped by SIGTERM, SIGUSR1, SIGINT (Ctrl-C) or SIGHUP (the terminal closed); resume with
      ``--resume`` (EX_TEMPFAIL: SLURM scripts requeue on it)
====  ==========================================================================================

A halt detected on one rank (a signal, a non-finite loss, an I/O error) is announced to every
other rank on the communicator's control channel, so the whole job stops within a moment and
rank 0 records one status and one reason in run.json. The checks are cheap enough to run at
every training step (:class:`Watch`): a list lookup, and a nonblocking probe at most every
50 ms.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable

#: Data-parallel backprop ranks agree on a halt every this many steps (mpff.backprop: a 4-byte
#: all-reduce of the halt code; mpff.predict.backprop counts it).
VOTE_EVERY = 16

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 65   # EX_DATAERR
EXIT_STALLED = 69    # EX_UNAVAILABLE
EXIT_IO = 74         # EX_IOERR
EXIT_PREEMPTED = 75  # EX_TEMPFAIL

EXIT_CODES = {
    EXIT_OK: "finished",
    EXIT_BUG: "a bug (traceback; failure-rank<r>.txt in the run directory)",
    EXIT_USAGE: "bad input (one line says what to fix; nothing written)",
    EXIT_DIVERGED: "diverged (NaN or infinite loss or weights; no model written)",
    EXIT_STALLED: "stalled or lost a peer (silent longer than run.stall_timeout, or its process, host or "
                  "link gone; job aborted)",
    EXIT_IO: "I/O error writing a trace, checkpoint, model or run.json",
    EXIT_PREEMPTED: "stopped by SIGTERM/SIGUSR1/SIGINT/SIGHUP; resume with --resume",
}

#: SIGHUP too: a closing terminal or a scheduler sends it, and its default action kills the
#: rank with run.json left 'running' (UCX, under MPICH, would take it for its debug signal:
#: mpff.cli turns that off before MPI starts)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


class Halt(Exception):
    """The run cannot go on; every rank ends with ``code`` and run.json says ``status``."""
    code = EXIT_BUG
    status = "failed"

    def __init__(self, reason: str, *, origin: int = -1, received: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.origin = origin        # the rank that detected it (-1: this one, not yet known)
        self.received = received    # learnt from another rank's notice

    def notice(self, rank: int) -> tuple[str, str, int]:
        return (type(self).__name__, self.reason, self.origin if self.origin >= 0 else rank)


class Preempted(Halt):
    """A stop was requested (SIGTERM / SIGUSR1 / SIGINT / SIGHUP); checkpoints of passed chapters are on disk."""
    code = EXIT_PREEMPTED
    status = "preempted"


class Diverged(Halt):
    code = EXIT_DIVERGED
    status = "diverged"


class IOFailure(Halt):
    code = EXIT_IO
    status = "failed"


class Stalled(Halt):
    """A rank waited longer than ``run.stall_timeout`` for a message; the text names peer and buffer."""
    code = EXIT_STALLED
    status = "failed"

    def __init__(self, reason: str, *, peer: int = -1, **kw) -> None:
        super().__init__(reason, **kw)
        self.peer = peer


class PeerLost(Stalled):
    """MPI failed talking to a peer: its process died, its host went down or the link broke. Not
    a bug: the job is aborted as for a stall (no rank can reach the lost one) and a resume from
    the last complete checkpoint continues once the peer is back."""


class OutOfMemory(Halt):
    """The run's settings need more memory than a rank can allocate (a user's choice, such as
    train.batch_size, not a bug): one line saying what to lower."""
    code = EXIT_USAGE
    status = "failed"


HALTS = {cls.__name__: cls for cls in (Halt, Preempted, Diverged, IOFailure, Stalled, PeerLost, OutOfMemory)}


def from_code(code: int) -> Halt:
    """The halt another rank voted for, known only by its exit code (data-parallel votes)."""
    cls = {c.code: c for c in (Preempted, Diverged, IOFailure, Stalled, OutOfMemory)}.get(code, Halt)
    what = "stopped" if cls is Preempted else "halted"
    return cls(f"{what} on another rank (exit code {code})", received=True)


def from_notice(notice: tuple[str, str, int]) -> Halt:
    name, reason, origin = notice
    return HALTS.get(name, Halt)(reason, origin=origin, received=True)


# ------------------------------------------------------------------------------ signals

_stop_signals: list[int] = []


def install_signal_handlers() -> None:
    """SLURM sends SIGUSR1 (with --signal) or SIGTERM before a time limit or preemption; mpiexec
    forwards those and Ctrl-C's SIGINT to every rank; SIGHUP comes when the terminal closes. The
    handler only records the signal: the run stops at the next check (between training steps, or
    while waiting)."""
    def handler(signum, frame):  # noqa: ARG001
        _stop_signals.append(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


def stop_signal() -> int | None:
    return _stop_signals[0] if _stop_signals else None


#: errors of the storage itself (not of a path the user chose)
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG)


def io_reason(what: str, exc: OSError) -> str:
    """One line for an I/O error while writing ``what`` (h5py's own messages span lines)."""
    if exc.errno:
        why = os.strerror(exc.errno)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            why += " (free space or raise the quota, then --resume)"
    else:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"cannot write {what}: {why}"


class Watch:
    """The halt checks of one rank: a stop signal, or another rank's notice on ``comm``'s control
    channel. :meth:`check` raises the halt; call it often (every training step costs ~1 us)."""

    def __init__(self, comm=None, should_stop: Callable[[], bool] | None = None,
                 probe_every: float = 0.05) -> None:
        self.comm = comm
        self.should_stop = should_stop
        self.probe_every = probe_every
        self._next_probe = 0.0
        self._received: Halt | None = None

    def check(self) -> None:
        halt = self.pending()
        if halt is not None:
            raise halt

    def pending(self) -> Halt | None:
        """The halt :meth:`check` would raise, or None (for ranks that must agree first)."""
        sig = stop_signal()
        if sig is not None:
            return Preempted(f"stopped by signal {sig}")
        if self.should_stop is not None and self.should_stop():
            return Preempted("stop requested")
        if self._received is not None:
            return self._received
        if self.comm is not None and self.comm.size > 1:
            now = time.monotonic()
            if now >= self._next_probe:
                self._next_probe = now + self.probe_every
                notice = self.comm.halt_notice()
                if notice is not None:
                    self._received = from_notice(notice)
                    return self._received
        return None
