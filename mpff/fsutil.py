"""Atomic file writes: the bytes go to a temporary file beside the target, then one rename.

Readers (``mpff report`` while a run writes, a resumed job, a user's h5py) see the old file or
the new one, never half of one; a full disk or an I/O error leaves the old file and no
temporary file. Files are created with ``open`` and so follow the umask (group-readable under
the usual 022), unlike ``tempfile.mkstemp``'s private 0600.

HDF5 files are built in memory (:mod:`io.BytesIO`) and written here with plain file I/O: the
HDF5 library then never meets a failing disk, which leaves it in a state that crashes the
process at exit (seen with a full tmpfs: ``Can't decrement id ref count`` then SIGSEGV).
"""

from __future__ import annotations

import os


def write_atomic(path: str, data: bytes | bytearray | memoryview | str) -> None:
    """Write ``data`` (text is UTF-8) to ``path`` atomically; on any error the temporary file is
    removed and the error raised (an OSError with its errno)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".tmp-{os.path.basename(path)}-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
