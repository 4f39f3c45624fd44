"""MPI at the edge: the only module that imports mpi4py.

Wraps a communicator handed in by the caller (``COMM_WORLD``, ``COMM_SELF`` or a ``Dup()``),
never fetched from a global inside the library, so tests can run the same code on any
communicator; :func:`world` is the one place that names ``COMM_WORLD`` (the command-line entry
point calls it once). Waiting is done by polling ``Test`` with a short sleep: MPICH busy-waits
inside ``Wait``, which would steal the core a working rank needs when ranks outnumber cores.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any, TypeVar

import numpy as np
from mpi4py import MPI

T = TypeVar("T")

#: Progress records (loss, accuracy, ...) travel to rank 0 on a communicator of their own,
#: so their tags can never match a weight buffer's receive; halt notices on a third one.
PROGRESS_TAG = 7
HALT_TAG = 11


def world() -> Any:
    """The job's communicator, for the entry point to hand to a command."""
    return MPI.COMM_WORLD


def self_comm() -> Any:
    """A communicator of this process alone (one-process runs and tests)."""
    return MPI.COMM_SELF


class Comm:
    #: what the communicator's calls raise when MPI cannot reach a peer (mpff.executor turns it
    #: into a PeerLost halt): mpi4py sets MPI_ERRORS_RETURN, so a failed call raises
    errors: tuple[type[BaseException], ...] = (MPI.Exception,)

    def __init__(self, comm: Any, poll_interval: float = 0.001) -> None:
        self.world = comm
        self.data = self.world.Dup()      # weight, head and negatives buffers
        self.progress = self.world.Dup()  # small records for rank 0's progress lines
        self.control = self.world.Dup()   # halt notices: a stop, a divergence, an I/O error
        self._notices: list[Any] = []     # their send requests (mpi4py keeps the pickles alive)
        self._barrier: Any = None         # a barrier this rank posted and has not completed
        self.rank = self.world.Get_rank()
        self.size = self.world.Get_size()
        self.poll_interval = poll_interval
        attr = self.world.Get_attr(MPI.TAG_UB)
        self.tag_ub = int(attr) if attr is not None else 32767
        #: every rank's host, by rank, so a rank that waits too long can say where its peer runs
        self.hosts: list[str] = self.world.allgather(MPI.Get_processor_name())

    # ----- set-up helpers (blocking collectives are fine outside the training loop) -----
    def node_local_rank(self) -> tuple[int, int]:
        """(local rank, local size) among the ranks sharing this node's memory."""
        local = self.world.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            return local.Get_rank(), local.Get_size()
        finally:
            local.Free()

    def first_error(self, error: T | None) -> T | None:
        """Every rank learns the first error of any rank, by rank order (None: no rank had one).
        ``error`` is whatever the caller reports, e.g. train's (exit code, one line)."""
        errors = self.world.allgather(error)
        return next((e for e in errors if e is not None), None)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self.world.bcast(obj, root=root)

    def gather(self, obj: Any, root: int = 0) -> Any:
        return self.world.gather(obj, root=root)

    def barrier(self) -> None:
        self.await_all()  # a polling barrier: a plain Barrier busy-waits in MPICH

    def clock_offset(self, rounds: int = 8) -> tuple[float, float]:
        """(offset, t0): add ``offset`` to this rank's perf_counter to get rank 0's clock; t0 is
        rank 0's perf_counter at the common start. Ping-pong with the lowest round-trip time."""
        offset = 0.0
        buf = np.zeros(1, dtype=np.float64)
        for peer in range(1, self.size):
            if self.rank == 0:
                for _ in range(rounds):
                    self.world.Recv(buf, source=peer, tag=1)
                    buf[0] = time.perf_counter()
                    self.world.Send(buf, dest=peer, tag=2)
            elif self.rank == peer:
                best = float("inf")
                for _ in range(rounds):
                    t1 = time.perf_counter()
                    self.world.Send(buf, dest=0, tag=1)
                    self.world.Recv(buf, source=0, tag=2)
                    t2 = time.perf_counter()
                    if t2 - t1 < best:
                        best, offset = t2 - t1, float(buf[0]) - (t1 + t2) / 2
        t0 = self.world.bcast(time.perf_counter() if self.rank == 0 else None, root=0)
        return offset, t0

    # ----- point to point, nonblocking -----
    def isend(self, buf: np.ndarray, dest: int, tag: int) -> Any:
        return self.data.Isend(buf, dest=dest, tag=tag % (self.tag_ub + 1))

    def irecv(self, buf: np.ndarray, source: int, tag: int) -> Any:
        return self.data.Irecv(buf, source=source, tag=tag % (self.tag_ub + 1))

    @staticmethod
    def test(req: Any) -> bool:
        return bool(req.Test())

    def wait(self, req: Any, on_idle=None) -> None:
        """Wait for ``req`` without burning the CPU; ``on_idle`` runs between polls."""
        while not req.Test():
            if on_idle is not None:
                on_idle()
            time.sleep(self.poll_interval)

    # ----- progress records to rank 0 -----
    def send_progress(self, record: np.ndarray) -> Any:
        return self.progress.Isend(record, dest=0, tag=PROGRESS_TAG)

    def poll_progress(self) -> list[tuple[int, np.ndarray]]:
        """Rank 0: (source rank, record) of every progress record that has arrived."""
        out = []
        status = MPI.Status()
        while self.progress.Iprobe(source=MPI.ANY_SOURCE, tag=PROGRESS_TAG, status=status):
            rec = np.empty(status.Get_count(MPI.DOUBLE), dtype=np.float64)
            source = status.Get_source()
            self.progress.Recv(rec, source=source, tag=PROGRESS_TAG)
            out.append((source, rec))
        return out

    # ----- halts: any rank tells every other one -----
    def notify_halt(self, notice: tuple) -> None:
        """Tell every other rank that the run halts (``notice``: a small picklable tuple)."""
        for r in range(self.size):
            if r != self.rank:
                try:
                    self._notices.append(self.control.isend(notice, dest=r, tag=HALT_TAG))
                except self.errors:  # that rank is gone (PeerLost): it needs no notice
                    pass

    def halt_notice(self) -> Any:
        """A halt notice another rank sent, or None (does not wait)."""
        status = MPI.Status()
        if self.control.iprobe(source=MPI.ANY_SOURCE, tag=HALT_TAG, status=status):
            return self.control.recv(source=status.Get_source(), tag=HALT_TAG)
        return None

    def _ibarrier(self) -> Any:
        # A rank that left a barrier early (a halt while it waited) completes that same barrier
        # later: barriers match in the order they are posted, so it must not post another.
        if self._barrier is None:
            self._barrier = self.world.Ibarrier()
        return self._barrier

    def await_all(self, check=None) -> None:
        """Wait until every rank gets here, polling (``check`` may raise to stop waiting)."""
        req = self._ibarrier()
        while not req.Test():
            if check is not None:
                check()
            time.sleep(self.poll_interval or 0.001)
        self._barrier = None

    def bounded_barrier(self, seconds: float) -> bool:
        """A barrier that gives up after ``seconds``; True when every rank arrived."""
        req = self._ibarrier()
        deadline = time.monotonic() + seconds
        while not req.Test():
            if time.monotonic() > deadline:
                return False
            time.sleep(self.poll_interval or 0.001)
        self._barrier = None
        return True

    #: seconds an aborting rank leaves the launcher to forward what it printed: MPI_Abort tears
    #: the job down at once, and Hydra's proxy can be killed before it has read the rank's last
    #: line from its pipe (seen: a stalled job exited 69 with its one-line reason lost)
    ABORT_GRACE = 0.5

    def abort(self, code: int) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # pragma: no cover - a closed or broken stream
                pass
        time.sleep(self.ABORT_GRACE)
        self.world.Abort(code)
        # MPI_Abort came back: the launcher could not be reached to kill the job (the host's
        # link is down; slurmstepd waits on srun), and a normal exit would wait in MPI's PMI
        # finalize for as long. The job is lost either way: leave now.
        os._exit(code)

    def free(self) -> None:
        for c in (self.data, self.progress, self.control):
            try:
                c.Free()
            except Exception:  # pragma: no cover - already finalized
                pass


def mpi_info() -> dict[str, str]:
    return {
        "mpi4py": __import__("mpi4py").__version__,
        "mpi_library": MPI.Get_library_version().strip().splitlines()[0],
        "mpi_standard": "{}.{}".format(*MPI.Get_version()),
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
    }
