"""The run directory: the one owner of run.json, config.toml, the lock and failure notes.

Layout (``docs/traces.md`` documents each file)::

    RUN_DIR/config.toml        the resolved configuration of the latest attempt (a resume reads it back)
    RUN_DIR/run.json           status and results, one schema (:data:`RUN_FIELDS`), written
                               atomically (temporary file + rename) by rank 0 only
    RUN_DIR/.lock              "host pid" of the job using the directory
    RUN_DIR/model.h5           the final model
    RUN_DIR/trace/rank<r>.h5   per-rank traces (a resume moves older ones to trace-before-c<N>-<t>/)
    RUN_DIR/checkpoints/c<N>/  per-rank checkpoints after N chapters
    RUN_DIR/failure-rank<r>.txt  what went wrong on a rank (removed when a later attempt finishes)
    RUN_DIR/report/            the report

Chapters in run.json are counted from 1, as in the progress lines and the report.

What a directory may hold before a new run goes into it (:meth:`RunDir.check`): nothing (it is
missing or empty), or an mpff run, which only ``--force`` replaces (``--resume`` continues it).
An mpff run is known by its run.json; without one, nothing in the directory is known to be
mpff's (a user's own ``model.h5`` looks like a run's), so it is refused even with ``--force``.
``--force`` removes only the names in :data:`FORCE_REMOVES`; anything else stays. Offline tools
never write over, or inside, a run's own files (:func:`refuse_run_files`).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from typing import Any

from .config import Config, ConfigError
from .fsutil import write_atomic
from .halt import DISK_ERRNOS

RUN_FORMAT = "mpff-run"
RUN_FORMAT_VERSION = 2

#: Every key of run.json with its value before anything is known. Statuses: running, finished,
#: preempted (stopped by a signal; resumable), failed (an error, see "reason"), diverged
#: (non-finite loss or weights).
RUN_FIELDS: dict[str, Any] = {
    "format": RUN_FORMAT,
    "format_version": RUN_FORMAT_VERSION,
    "status": None,
    "reason": None,                    # one line: why the run is not running or finished
    "exit_code": None,
    "signal": None,                    # the signal that stopped a preempted run
    "name": None,
    "algorithm": "ff",
    "schedule": None,
    "world_size": None,
    "scaling": None,                   # data-parallel backprop: "strong" (global batch fixed) or "weak"
    "global_batch": None,              # rows per optimizer step over all ranks
    "started": None,                   # ISO 8601, the first attempt
    "ended": None,                     # ISO 8601, the latest attempt's end
    "wall_time": None,                 # seconds, the latest attempt (process start of rank 0 to end)
    "training_seconds": None,          # seconds in the training phase (setup apart), latest attempt
    "n_train": None,                   # training samples
    "n_test": None,                    # test samples
    "test_accuracy": None,             # after the last chapter
    "accuracy_per_chapter": {},        # {"<chapter, from 1>": accuracy}, every attempt
    "chapters_done": 0,
    "newest_complete_checkpoint": None,  # chapters done at the newest complete checkpoint
    "resumed_after_chapter": None,     # the latest attempt resumed after this many chapters
    "attempts": [],                    # [{started, ended, status, world_size, resumed_after_chapter}]
    "ranks": [],                       # per rank: host, device, bytes sent/received, memory
    "config": {},
    "versions": {},
    "host": {},
    "provenance": {},
}


#: Files and folders of a run directory that ``mpff train`` writes and reads back; an offline
#: output (``mpff export --out``, ``mpff report --out``, ``mpff predict --out``) may neither
#: replace them nor go inside them.
RUN_FILES = ("config.toml", "run.json", "model.h5", "trace", "checkpoints", ".lock", ".lock.break",
             ".reserve")
#: name prefixes of the same (failure notes, the traces a resume kept, the lock's and the atomic
#: writes' temporary files)
RUN_FILE_PREFIXES = ("failure-rank", "trace-before-", ".lock.tmp-", ".tmp-")
#: What ``--force`` removes before a new run: the run's own files, and the outputs mpff's tools
#: write inside a run by default (they describe the run being replaced). Nothing else.
FORCE_REMOVES = RUN_FILES + ("report", "predict", "otf2", "trace.json")
#: a directory holding only these is as good as empty (left by a job that died while starting)
HOUSEKEEPING = (".lock", ".lock.break", ".reserve")
HOUSEKEEPING_PREFIXES = (".lock.tmp-", ".tmp-")


def _force_removes(name: str) -> bool:
    """Does ``--force`` remove this entry? Not the lock (this job's own), not config.toml (written
    anew), not another job's lock attempt (``.lock.tmp-``)."""
    if name in (".lock", ".lock.break", "config.toml") or name.startswith(".lock.tmp-"):
        return False
    return name in FORCE_REMOVES or name.startswith(RUN_FILE_PREFIXES)


def is_run_file(name: str) -> bool:
    """Is ``name`` (an entry of a run directory) one of the run's own files?"""
    return name in RUN_FILES or name.startswith(RUN_FILE_PREFIXES)


def looks_like_run(path: str) -> bool:
    """Does directory ``path`` hold an mpff run (or what is left of one: traces or checkpoints)?"""
    return (os.path.isfile(os.path.join(path, "run.json"))
            or bool(glob.glob(os.path.join(glob.escape(path), "trace", "rank*.h5")))
            or bool(glob.glob(os.path.join(glob.escape(path), "checkpoints", "c[0-9]*"))))


def refuse_run_files(target: str, what: str, *, whole: bool = False) -> None:
    """Raise ConfigError when writing ``target`` (``what``: the option that named it) would replace
    one of a run's own files or write inside one (a report in ``RUN/checkpoints``, a Chrome trace
    as ``RUN/model.h5``). ``whole``: the target is replaced as a whole, so a run directory itself
    is refused too. Symbolic links are followed: what counts is where the bytes would land."""
    real = os.path.realpath(target)
    parts = []
    here = real
    while True:
        if os.path.isdir(here) and looks_like_run(here):
            if not parts and whole:
                raise ConfigError(f"{what} {target!r} is an mpff run directory, which an offline output "
                                  "must not replace; choose another --out (a new file or folder)")
            if parts and is_run_file(parts[-1]):
                own = os.path.join(here, parts[-1])
                if len(parts) > 1:
                    where = f"lies inside the run's own folder {own!r}"
                elif os.path.isdir(own):
                    where = "is a folder of the run itself"
                elif os.path.lexists(own):
                    where = "is a file of the run itself"
                else:
                    where = f"is a name the run itself writes ({parts[-1]})"
                raise ConfigError(f"{what} {target!r} {where}, which an offline output must not replace; "
                                  "choose another --out")
        parent = os.path.dirname(here)
        if parent == here:
            return
        parts.append(os.path.basename(here))
        here = parent


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_json_atomic(path: str, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` atomically (see :func:`mpff.fsutil.write_atomic`)."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class RunDir:
    """One run's directory. Only rank 0 writes run.json, config.toml and the lock."""

    def __init__(self, path: str) -> None:
        self.path = path

    # ----- paths -----
    def file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    @property
    def run_json(self) -> str:
        return self.file("run.json")

    @property
    def config_toml(self) -> str:
        return self.file("config.toml")

    @property
    def lock_path(self) -> str:
        return self.file(".lock")

    @property
    def model_path(self) -> str:
        return self.file("model.h5")

    @property
    def reserve_path(self) -> str:
        return self.file(".reserve")

    def failure_note(self, rank: int) -> str:
        return self.file(f"failure-rank{rank}.txt")

    # ----- run.json -----
    def read(self) -> dict:
        """run.json as stored ({} when missing or unreadable)."""
        try:
            with open(self.run_json) as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def status(self) -> str | None:
        return self.read().get("status")

    def update(self, **fields: Any) -> dict:
        """Merge ``fields`` into run.json (unknown keys are a bug) and write it atomically."""
        unknown = set(fields) - set(RUN_FIELDS)
        if unknown:
            raise AssertionError(f"run.json has no field(s) {sorted(unknown)}")  # internal invariant
        data = {**RUN_FIELDS, **{k: v for k, v in self.read().items() if k in RUN_FIELDS}}
        data.update(fields)
        data["format"], data["format_version"] = RUN_FORMAT, RUN_FORMAT_VERSION
        write_json_atomic(self.run_json, data)
        return data

    # ----- checks before a run (rank 0) -----
    def holds_run(self) -> bool:
        """Is there an mpff run here? Known by its run.json: an object with a status (or mpff's
        format name), or one that cannot be read (a damaged run.json is still the run's)."""
        try:
            with open(self.run_json) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            return True
        return isinstance(data, dict) and ("status" in data or data.get("format") == RUN_FORMAT)

    def contents(self) -> list[str]:
        """What the directory holds besides a dead job's lock and temporary files, sorted."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n not in HOUSEKEEPING and not n.startswith(HOUSEKEEPING_PREFIXES))

    def check(self, force: bool, resume: bool, resumable: Callable[[], bool] | None = None) -> None:
        """Refuse to overwrite a run's results, to resume nothing, or to share a directory. A
        new run goes only into a directory that is missing, empty, or holds an mpff run that
        ``--force`` replaces; files without a run.json are not known to be mpff's, and are
        refused even with ``--force``. ``resumable()``: does the run have a checkpoint to resume
        from (the advice for an unfinished run names only what will work)?"""
        if os.path.isdir(self.path):
            holder = self.lock_holder()
            if holder is not None:
                raise self._in_use(holder)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ConfigError(f"--out {self.path!r} is a file, not a directory; choose another --out")
        if not resume and os.path.isdir(self.path) and not self.holds_run():
            there = self.contents()
            if there:
                shown = ", ".join(n + ("/" if os.path.isdir(self.file(n)) else "") for n in there[:6])
                more = f" and {len(there) - 6} more" if len(there) > 6 else ""
                raise ConfigError(f"{self.path!r} holds files that are not an mpff run's ({shown}{more}; no "
                                  "run.json), which a new run would write over; move them away or choose "
                                  "another --out" + (" (--force replaces only an mpff run)" if force else ""))
        status = self.status
        if status is None and os.path.exists(self.run_json):
            status = "unreadable run.json"
        if status == "finished" and not (force or resume):
            raise ConfigError(f"{self.path!r} already holds a finished run; pass --force to replace it "
                              "or choose another --out")
        if status is not None and status != "finished" and not (force or resume):
            if resumable is not None and not resumable():  # --resume would find nothing to resume
                raise ConfigError(f"{self.path!r} holds an unfinished run (status {status!r}) with no "
                                  "checkpoint to resume from; pass --force to start it over, or choose "
                                  "another --out")
            raise ConfigError(f"{self.path!r} holds an unfinished run (status {status!r}); pass --resume "
                              "to continue it from its newest checkpoint, --force to start over, or "
                              "choose another --out")
        parent = os.path.dirname(os.path.abspath(self.path))
        probe = self.path if os.path.isdir(self.path) else parent
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.access(probe, os.W_OK):
            if resume and os.path.isdir(self.path):  # its checkpoints are here: another --out has none
                raise ConfigError(f"cannot write to {self.path!r} (no permission on {probe!r}), and its "
                                  "checkpoints are there; make it writable (chmod -R u+w), or copy the "
                                  "directory somewhere writable and pass --resume --out COPY")
            raise ConfigError(f"cannot write to {self.path!r} (no permission on {probe!r}); choose another --out")

    # ----- the lock -----
    #: an empty or unreadable lock younger than this is taken as being written by a job that
    #: is starting (older mpff versions created it empty, then wrote it), not as stale
    LOCK_WRITING_S = 10.0

    def lock_holder(self) -> str | None:
        """'pid P on HOST' of a live job holding the lock; None when free or stale (its process
        is gone on this host)."""
        return self._holder_of(self.lock_path)

    def _holder_of(self, path: str, missing: str | None = None) -> str | None:
        """Who holds the lock file ``path``: None when stale, ``missing`` when it cannot be read."""
        try:
            with open(path) as fh:
                text = fh.read()
            age = time.time() - os.stat(path).st_mtime
        except OSError:
            return missing
        try:
            host, pid = text.split()[:2]
        except ValueError:
            return "a job that is starting" if age < self.LOCK_WRITING_S else None
        if host == socket.gethostname():
            try:
                os.kill(int(pid), 0)
            except (ProcessLookupError, ValueError):
                return None  # stale: that process is gone
            except PermissionError:
                pass
        return f"pid {pid} on {host}"

    def _in_use(self, holder: str) -> ConfigError:
        return ConfigError(f"run directory {self.path!r} is in use by another job ({holder}); wait for it, "
                           f"or remove {self.lock_path!r} if that job is gone")

    #: a ``.lock.break`` older than this was left by a job that died while removing a stale lock
    BREAK_STALE_S = 10.0

    def acquire(self) -> None:
        """Take the lock atomically: of jobs started at once, exactly one gets it. The lock
        appears with its content (a hard link of a written file: never empty, so never mistaken
        for a stale one while it is being written). A stale lock (its process gone on this host,
        or empty and old) is removed by one job at a time (:meth:`_remove_stale_lock`) and the
        lock taken again."""
        os.makedirs(self.path, exist_ok=True)
        mine = f"{socket.gethostname()} {os.getpid()}\n"
        deadline = time.monotonic() + self.BREAK_STALE_S + 5.0
        while not self._create_file(self.lock_path, mine):
            holder = self.lock_holder()
            if holder is not None:
                raise self._in_use(holder) from None
            if time.monotonic() > deadline:  # pragma: no cover - a breaker that never finishes
                raise self._in_use("another job")
            self._remove_stale_lock(mine)

    def _create_file(self, path: str, text: str) -> bool:
        """Create ``path`` holding ``text`` if it does not exist (atomic: of many jobs, one
        does). True: created; False: there is one already."""
        tmp = self.file(f".lock.tmp-{os.getpid()}-{time.monotonic_ns()}")
        try:
            with open(tmp, "w") as fh:
                fh.write(text)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except OSError as exc:  # a file system without hard links
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                return self._create_file_exclusive(path, text)
        finally:  # also when the disk is full: nothing left behind
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    @staticmethod
    def _create_file_exclusive(path: str, text: str) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
        except OSError:
            os.unlink(path)  # an empty lock would look held by a starting job
            raise
        return True

    def _remove_stale_lock(self, mine: str) -> None:
        """Delete the lock if it is stale, one job at a time: only the job that creates
        ``.lock.break`` (atomically, as the lock) checks the lock again and deletes it. Nothing
        can replace a lock that exists, and nothing but the breaker deletes a stale one, so the
        lock it deletes is the one it found stale. (Moving the lock aside to check it, and back
        when live, would not do: a job could take the lock while it was aside.) The others
        come back when the breaker is done; a breaker file left by a job that died is removed
        once it is :attr:`BREAK_STALE_S` old."""
        breaker = self.file(".lock.break")
        if not self._create_file(breaker, mine):
            try:
                if time.time() - os.stat(breaker).st_mtime > self.BREAK_STALE_S:
                    os.unlink(breaker)
            except FileNotFoundError:
                pass
            time.sleep(0.001)
            return
        try:
            # read once: a lock gone since (released, or deleted by an earlier breaker) may be
            # a live job's by now, and is not deleted
            if self._holder_of(self.lock_path, missing="gone") is None:
                os.unlink(self.lock_path)
        finally:
            os.unlink(breaker)

    def _lock_is_mine(self) -> bool:
        try:
            with open(self.lock_path) as fh:
                return fh.read().split()[:2] == [socket.gethostname(), str(os.getpid())]
        except OSError:
            return False

    def release(self) -> None:
        if self._lock_is_mine():
            try:
                os.unlink(self.lock_path)
            except OSError:
                pass

    # ----- preparing and finishing (rank 0) -----
    def prepare(self, cfg: Config, *, force: bool, resume_after: int | None, world_size: int,
                provenance: dict | None = None, n_train: int | None = None, n_test: int | None = None) -> None:
        """Before the first task: clear what --force replaces, write config.toml (a new run) or
        keep the interrupted attempt's traces (a resume), and mark the run running."""
        if force:  # only what mpff wrote: anything else in the directory is the user's
            for name in os.listdir(self.path):
                if not _force_removes(name):
                    continue
                path = self.file(name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                elif os.path.lexists(path):
                    os.unlink(path)
        previous = self.read() if resume_after is not None else {}
        if resume_after is None or cfg.to_toml() != self._config_text():
            # a resume may change how the run goes on (the schedule, the rank count): the next
            # plain --resume reads these settings back, so they must be the ones that run now
            write_atomic(self.config_toml, cfg.to_toml())
        if resume_after is not None:
            old = self.file("trace")
            if os.path.isdir(old):
                os.replace(old, self.file(f"trace-before-c{resume_after + 1:05d}-{int(time.time())}"))
        self._make_reserve()
        started = now_iso()
        attempts = list(previous.get("attempts", [])) + [{
            "started": started, "ended": None, "status": "running", "world_size": world_size,
            "resumed_after_chapter": resume_after}]
        dp = cfg.run.schedule == "data_parallel"
        self.update(status="running", reason=None, exit_code=None, signal=None, name=cfg.name,
                    algorithm=cfg.train.algorithm, schedule=cfg.run.schedule,
                    scaling=cfg.run.scaling if dp else None,
                    global_batch=cfg.train.batch_size * (world_size if dp and cfg.run.scaling == "weak" else 1),
                    world_size=world_size, started=previous.get("started") or started, ended=None,
                    config=cfg.to_dict(), resumed_after_chapter=resume_after, attempts=attempts,
                    accuracy_per_chapter=previous.get("accuracy_per_chapter", {}),
                    chapters_done=resume_after or 0, provenance=provenance or {}, n_train=n_train,
                    n_test=n_test)

    def _config_text(self) -> str | None:
        try:
            with open(self.config_toml) as fh:
                return fh.read()
        except (OSError, UnicodeDecodeError):
            return None

    #: Bytes set aside at the start of a run, freed before run.json is written at its end: on a
    #: full disk the final status (failed, and why) still fits.
    RESERVE_BYTES = 256 * 1024

    def _make_reserve(self) -> None:
        try:
            with open(self.reserve_path, "wb") as fh:
                fh.write(b"\0" * self.RESERVE_BYTES)
        except OSError:
            self.free_reserve()
            raise

    def free_reserve(self) -> None:
        try:
            os.unlink(self.reserve_path)
        except OSError:
            pass

    def end_attempt(self, status: str, **fields: Any) -> dict:
        """Record how this attempt ended (status and whatever else is known)."""
        self.free_reserve()
        data = self.read()
        attempts = list(data.get("attempts", []))
        ended = now_iso()
        if attempts:
            attempts[-1] = {**attempts[-1], "ended": ended, "status": status}
        return self.update(status=status, ended=ended, attempts=attempts, **fields)

    def clear_failure_notes(self) -> None:
        for name in os.listdir(self.path):
            if name.startswith("failure-rank"):
                try:
                    os.unlink(self.file(name))
                except OSError:
                    pass

    def write_failure_note(self, rank: int, text: str) -> None:
        """Best effort: a failure note must not raise on a full disk."""
        try:
            write_atomic(self.failure_note(rank), text)
        except OSError as exc:
            if exc.errno not in DISK_ERRNOS:
                raise

