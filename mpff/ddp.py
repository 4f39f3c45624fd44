"""torch.distributed for data-parallel backprop, started from the MPI job mpiexec or srun launched.

The MPI ranks are the torch.distributed ranks: rank 0 picks its host name and a free TCP port,
every rank learns them through the mpff communicator (one ``bcast``), and each calls
``init_process_group`` with ``init_method="tcp://host:port"``. gloo serves CPU tensors, NCCL
CUDA ones. Nothing here sends gradients: DistributedDataParallel does (see mpff.backprop).

Use::

    from mpff.comm import Comm
    from mpff import ddp
    comm = Comm(MPI.COMM_WORLD)
    group = ddp.init_process_group(comm, device)   # every rank, before building BPState
    ...
    ddp.shutdown(group)                             # every rank, at the end

mpi4py is not imported here: ``comm`` is anything with ``.rank``, ``.size``, ``.bcast(obj)`` and
``.barrier()``.
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist

#: How long ranks wait for each other in a collective before torch gives up. Long, because a
#: rank may be evaluating the test set (rank 0 only) while the others wait in the next step's
#: all-reduce; a rank that dies is taken down by MPI (mpi4py -m) long before this.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _free_port() -> int:
    """A TCP port free right now on this host (the OS picks it; released at once for the store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def init_process_group(comm, device: torch.device) -> dist.ProcessGroup:
    """Start torch.distributed on every rank of ``comm``; returns the default process group.

    Collective: every rank of ``comm`` must call it. The TCP rendezvous store listens on rank 0's
    host; on clusters whose host names do not resolve between nodes, that is a site problem
    torch would hit the same way under torchrun.
    """
    address = (socket.gethostname(), _free_port()) if comm.rank == 0 else None
    host, port = comm.bcast(address)
    # Every rank has the address before rank 0 leaves MPI for the store: a bcast may return on
    # the root before the message left (MPICH's OFI netmod over TCP, between hosts), and rank 0
    # then waits in the store for a rank that waits in the bcast.
    comm.barrier()
    # NCCL: the rank's own GPU, bound at once (the communicator is made here, not guessed from
    # the rank number at the first collective)
    bind = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend_for(device), init_method=f"tcp://{host}:{port}", rank=comm.rank,
                            world_size=comm.size, timeout=COLLECTIVE_TIMEOUT, **bind)
    return dist.group.WORLD


def shutdown(group=None) -> None:
    """Leave torch.distributed (every rank). Safe to call when it was never started.

    Call it after the DistributedDataParallel models are gone (``BPState.close``): a reducer
    that outlives its process group, or a process group torn down at interpreter exit, left
    gloo threads running at exit and the process aborted ("terminate called without an active
    exception", about one launch in six here)."""
    import gc
    gc.collect()  # DDP reducers still referenced only from cycles
    if dist.is_initialized():
        dist.destroy_process_group(group)
