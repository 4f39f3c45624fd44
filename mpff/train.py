"""``mpff train``: set up a run (validate, pick devices, load data, plan), run this rank's tasks, finish.

Run it under MPI through mpi4py, so an exception on any rank aborts the whole job instead
of leaving the others blocked in a receive::

    mpiexec -n 2 python -m mpi4py -m mpff train --config configs/workstation.toml \\
        --set run.schedule=single_layer --out outputs/ws-single

Everything a user can get wrong is checked on every rank before any training starts; the
first problem is printed once (by rank 0) as one line and every rank exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
import traceback

import numpy as np
import torch

from .checkpoint import complete_checkpoints, load_checkpoint
from .config import Config, ConfigError, load

EXIT_USAGE = 2
#: Exit code of a run stopped by SIGTERM/SIGUSR1 after checkpointing (EX_TEMPFAIL: try again).
EXIT_PREEMPTED = 75

_stop_signal: list[int] = []


def _install_signal_handlers() -> None:
    """SLURM sends SIGUSR1 (with --signal) or SIGTERM before a time limit or preemption; mpiexec
    forwards both. The handler only sets a flag: the engine stops between tasks or while waiting."""
    import signal

    def handler(signum, frame):  # noqa: ARG001
        _stop_signal.append(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)


def stop_requested() -> bool:
    return bool(_stop_signal)


class RunLock:
    """RUN_DIR/.lock holds 'host pid' of the job using the directory; a lock whose process is
    gone (on this host) is stale and taken over."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, ".lock")

    def holder(self) -> str | None:
        try:
            with open(self.path) as fh:
                host, pid = fh.read().split()[:2]
        except (OSError, ValueError):
            return None
        if host == socket.gethostname():
            try:
                os.kill(int(pid), 0)
            except (ProcessLookupError, ValueError):
                return None  # stale: that process is gone
            except PermissionError:
                pass
        return f"pid {pid} on {host}"

    def acquire(self) -> None:
        holder = self.holder()
        if holder is not None:
            raise ConfigError(f"run directory {os.path.dirname(self.path)!r} is in use by another job "
                              f"({holder}); wait for it, or remove {self.path!r} if that job is gone")
        with open(self.path, "w") as fh:
            fh.write(f"{socket.gethostname()} {os.getpid()}\n")

    def release(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="TOML preset (configs/*.toml); defaults: the paper's settings")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.epochs=4 (repeatable)")
    p.add_argument("--out", "-o", help="run directory (default: outputs/<preset>-<schedule>-n<ranks>-<time>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--force", action="store_true", help="replace a finished run in --out")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--quiet", "-q", action="store_true", help="no per-chapter progress lines")


def pick_device(cfg: Config, local_rank: int) -> torch.device:
    want = cfg.run.device
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("run.device = 'cuda' but torch sees no GPU; use run.device=cpu or a CUDA build of torch")
    return torch.device("cuda", local_rank % torch.cuda.device_count())  # round robin per node


def default_run_dir(cfg: Config, world_size: int) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("outputs", f"{cfg.name}-{cfg.run.schedule}-n{world_size}-{stamp}")


def read_status(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, "run.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


def check_run_dir(run_dir: str, force: bool, resume: bool) -> None:
    """Rank 0: refuse to overwrite a finished run, to resume nothing, or to share a directory."""
    status = read_status(run_dir).get("status")
    if os.path.isdir(run_dir) and RunLock(run_dir).holder() is not None:
        RunLock(run_dir).acquire()  # raises: in use
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"--out {run_dir!r} is a file, not a directory; choose another --out")
    if status == "finished" and not (force or resume):
        raise ConfigError(f"{run_dir!r} already holds a finished run; pass --force to replace it "
                          "or choose another --out")
    parent = os.path.dirname(os.path.abspath(run_dir))
    probe = run_dir if os.path.isdir(run_dir) else parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"cannot write to {run_dir!r} (no permission on {probe!r}); choose another --out")


class Progress:
    """Rank 0: collects (loss, accuracy) records from all ranks and prints one line per chapter."""

    def __init__(self, cfg: Config, plan, start: float, quiet: bool = False) -> None:
        self.cfg = cfg
        self.num_layers = plan.num_layers
        self.num_chapters = plan.num_chapters
        self.first = plan.start_chapter
        self.evals = {t.chapter for t in plan.tasks if t.kind == "eval"}
        self.expected = sum(1 for t in plan.tasks if t.kind in ("train", "head", "eval"))
        self.received = 0
        self.losses: dict[int, dict[int, float]] = {}
        self.acc: dict[int, float] = {}
        self.next_to_print = plan.start_chapter
        self.start = start
        self.quiet = quiet

    def __call__(self, rec: np.ndarray) -> None:
        from .engine import REC_ACC, REC_LOSS
        code, chapter, layer, value = float(rec[0]), int(rec[1]), int(rec[2]), float(rec[3])
        self.received += 1
        if code == REC_LOSS:
            self.losses.setdefault(chapter, {})[layer] = value
        elif code == REC_ACC:
            self.acc[chapter] = value
        self._print_ready()

    def _print_ready(self) -> None:
        while self.next_to_print < self.num_chapters:
            c = self.next_to_print
            if len(self.losses.get(c, {})) < self.num_layers or (c in self.evals and c not in self.acc):
                return
            elapsed = time.perf_counter() - self.start
            done = c + 1 - self.first
            eta = elapsed / done * (self.num_chapters - c - 1)
            losses = " ".join(f"{self.losses[c][k]:.4f}" for k in range(self.num_layers))
            acc = f"  test acc {100 * self.acc[c]:6.2f}%" if c in self.acc else ""
            if not self.quiet:
                print(f"chapter {c + 1:>4}/{self.num_chapters}  loss {losses}{acc}  "
                      f"elapsed {elapsed:7.1f}s  eta {eta:7.1f}s", flush=True)
            self.next_to_print += 1


def run(args: argparse.Namespace, mpi_comm=None) -> int:
    from .checkpoint import load_checkpoint, write_rank_checkpoint
    from .comm import Comm, mpi_info
    from .data import load_dataset
    from .engine import Engine, Preempted, wait_all_progress
    from .modelfile import host_facts, save_model, versions
    from .plan import build_plan
    from .trace import Tracer, trace_path

    _install_signal_handlers()  # first: a signal during start-up must not kill the rank
    comm = Comm(mpi_comm)
    rank, size = comm.rank, comm.size

    # ----- validation, identical on every rank; the first error is printed once -----
    error = None
    cfg = plan = None
    run_dir = args.out
    resume_from = None  # (chapter, world size that wrote it)
    try:
        config_path = args.config
        if args.resume and not config_path:
            if not run_dir:
                raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
            config_path = os.path.join(run_dir, "config.toml")
        cfg = load(config_path, args.overrides)
        comm.poll_interval = cfg.run.poll_interval
        plan = build_plan(cfg, size)
    except ConfigError as exc:
        error = str(exc)
    error = comm.first_error(error)
    if error is None:
        if rank == 0:
            try:
                run_dir = run_dir or default_run_dir(cfg, size)
                check_run_dir(run_dir, args.force, args.resume)
                if args.resume:
                    resume_from = _find_resume_point(run_dir, cfg)
            except ConfigError as exc:
                error = str(exc)
        error, run_dir, resume_from = comm.bcast((error, run_dir, resume_from))
    if error is None and resume_from is not None:
        try:
            if resume_from[0] == "finished":
                plan = None
            else:
                plan = build_plan(cfg, size, start_chapter=resume_from[0] + 1)
        except ConfigError as exc:
            error = str(exc)
        error = comm.first_error(error)
    if error is None and plan is None:  # --resume of a finished run: nothing to do
        if rank == 0:
            print(f"mpff: {run_dir} already finished; nothing to resume", flush=True)
        comm.free()
        return 0
    initial_state = None
    dataset = None
    device = None
    if error is None:
        try:
            if cfg.train.threads:
                torch.set_num_threads(cfg.train.threads)
            # Dead ReLU units get exactly-zero gradients, so their Adam moments decay into the
            # denormal range within an epoch, and x86 arithmetic on denormals is ~10x slower
            # (measured: 8.9 ms vs 0.85 ms per Adam step for a 1000x1000 layer). Flush them to
            # zero, as GPUs do; every rank does the same, so results stay reproducible.
            torch.set_flush_denormal(True)
            local_rank, _ = comm.node_local_rank()
            device = pick_device(cfg, local_rank)
            dataset = load_dataset(cfg.data)
            if dataset.input_dim != cfg.model.dims[0]:
                raise ConfigError(f"the data has {dataset.input_dim} inputs but model.dims[0] = "
                                  f"{cfg.model.dims[0]}; set model.dims[0] = {dataset.input_dim}")
            if cfg.resolved_shards(size) > dataset.x_train.shape[0]:
                raise ConfigError("more data shards than training samples; use fewer ranks or more data")
            if resume_from is not None:
                initial_state = load_checkpoint(run_dir, resume_from[0], rank, size)
        except ConfigError as exc:
            error = str(exc)
        error = comm.first_error(error)
    if error is None and rank == 0:
        try:
            os.makedirs(run_dir, exist_ok=True)
            RunLock(run_dir).acquire()
        except ConfigError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"cannot create {run_dir!r} ({exc.strerror}); choose another --out"
    error = comm.bcast(error)
    if error is not None:
        if rank == 0:
            print(f"mpff train: error: {error}", file=sys.stderr, flush=True)
        comm.free()
        return EXIT_USAGE

    # ----- the run directory (rank 0 prepares it; everyone waits) -----
    if rank == 0:
        if args.force:
            stale_paths = ["trace", "report", "checkpoints", "model.h5"]
            stale_paths += [n for n in os.listdir(run_dir) if n.startswith(("failure-rank", "trace-before-"))]
            for stale in stale_paths:
                path = os.path.join(run_dir, stale)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.unlink(path)
        if resume_from is None:
            with open(os.path.join(run_dir, "config.toml"), "w") as fh:
                fh.write(cfg.to_toml())
        else:  # keep the interrupted attempt's traces beside the new ones
            old = os.path.join(run_dir, "trace")
            if os.path.isdir(old):
                os.replace(old, os.path.join(run_dir, f"trace-before-c{resume_from[0] + 1:05d}-{int(time.time())}"))
        previous = read_status(run_dir)
        write_json_atomic(os.path.join(run_dir, "run.json"), {
            "status": "running", "world_size": size, "schedule": cfg.run.schedule,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": cfg.to_dict(),
            "resumed_from_chapter": None if resume_from is None else resume_from[0] + 1,
            "accuracy_per_chapter": previous.get("accuracy_per_chapter", {}) if resume_from else {}})
    comm.barrier()

    offset, t0 = comm.clock_offset()
    meta = {"world_size": size, "host": socket.gethostname(), "device": str(device),
            "schedule": cfg.run.schedule, "config": cfg.to_json(), "versions": versions(),
            "mpi": mpi_info(), "torch_threads": torch.get_num_threads()}
    tracer = Tracer(trace_path(run_dir, rank), rank, meta, clock_offset=offset, t0=t0,
                    enabled=cfg.run.trace)
    start = time.perf_counter()
    if rank == 0:
        mode = {"sequential": "sequential plan on rank 0"}.get(cfg.run.schedule, cfg.run.schedule)
        print(f"mpff: {cfg.name}: {mode}, {size} rank(s), dims {list(cfg.model.dims)}, "
              f"E={cfg.train.epochs} S={cfg.train.chapters}, {cfg.train.negatives} negatives, "
              f"{cfg.train.classifier} classifier, {dataset.x_train.shape[0]} train / "
              f"{dataset.x_test.shape[0]} test samples, device {device}", flush=True)
        print(f"mpff: writing {run_dir}", flush=True)
        if resume_from is not None:
            note = ""
            if resume_from[1] != size and cfg.run.exchange == "weights" and cfg.run.schedule != "single_layer":
                note = (" (note: different rank count with exchange = 'weights': each layer continues "
                        "with its last trainer's optimizer state, so results differ from an "
                        "uninterrupted run)")
            print(f"mpff: resuming after chapter {resume_from[0] + 1} from a {resume_from[1]}-rank "
                  f"checkpoint{note}", flush=True)
    progress = Progress(cfg, plan, start, quiet=args.quiet) if rank == 0 else None

    def write_model(net) -> None:
        acc = engine.result.test_accuracy.get(cfg.train.chapters - 1)
        save_model(os.path.join(run_dir, "model.h5"), net, cfg, input_mean=dataset.input_mean,
                   input_std=dataset.input_std, input_scale=dataset.input_scale, test_accuracy=acc,
                   extra={"world_size": size, "schedule": cfg.run.schedule})

    def checkpoint(chapter, buffers, negatives, local_opt):
        write_rank_checkpoint(run_dir, chapter, rank, size, cfg.to_json(), buffers, negatives, local_opt)

    try:
        with tracer.span("setup"):  # model, optimizers (torch imports lazily here), data on device
            engine = Engine(cfg, plan, comm if size > 1 else None, rank, dataset, tracer, device,
                            on_progress=progress, write_model=write_model, initial_state=initial_state,
                            checkpoint=checkpoint, checkpoint_every=cfg.run.checkpoint_every,
                            should_stop=stop_requested)
        result = engine.run()
        if rank == 0 and size > 1:
            with tracer.span("wait", -1, -1):
                wait_all_progress(comm, progress.expected - progress.received, progress, cfg.run.poll_interval)
        mem = _peak_memory(device)
        for name, value in mem.items():
            tracer.scalar(name, -1, -1, value)
        tracer.set_attr("bytes_sent", result.bytes_sent)
        tracer.set_attr("bytes_received", result.bytes_received)
        tracer.close("finished")
    except Preempted:
        return _preempted(comm, tracer, run_dir, rank, progress)
    except BaseException:
        # leave a note in the run directory, then let mpi4py abort the job
        with open(os.path.join(run_dir, f"failure-rank{rank}.txt"), "w") as fh:
            fh.write(traceback.format_exc())
        tracer.close("failed")
        raise
    wall = time.perf_counter() - start
    stats = comm.gather({"rank": rank, "host": socket.gethostname(), "device": str(device),
                         "bytes_sent": result.bytes_sent, "bytes_received": result.bytes_received,
                         **mem})
    comm.barrier()
    code = 0
    if rank == 0:
        final_acc = progress.acc.get(cfg.train.chapters - 1)
        summary = {
            "status": "finished", "world_size": size, "schedule": cfg.run.schedule,
            "test_accuracy": final_acc, "wall_time": wall,
            "accuracy_per_chapter": {str(c): a for c, a in sorted(progress.acc.items())},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ranks": stats,
            "resumed_from_chapter": None if resume_from is None else resume_from[0] + 1,
            "config": cfg.to_dict(), "versions": versions(), "host": host_facts(),
        }
        previous = read_status(run_dir).get("accuracy_per_chapter", {})
        summary["accuracy_per_chapter"] = {**previous, **summary["accuracy_per_chapter"]}
        write_json_atomic(os.path.join(run_dir, "run.json"), summary)
        RunLock(run_dir).release()
        acc_text = f"{100 * final_acc:.2f}%" if final_acc is not None else "n/a"
        print(f"mpff: done in {wall:.1f}s: test accuracy {acc_text} ({cfg.train.classifier} classifier), "
              f"model {os.path.join(run_dir, 'model.h5')}", flush=True)
        if cfg.run.report and cfg.run.trace:
            code = _write_report(run_dir)
    comm.free()
    return code


def _find_resume_point(run_dir: str, cfg: Config) -> tuple:
    """Rank 0: the newest complete checkpoint of run_dir, checked against the configuration."""
    status = read_status(run_dir).get("status")
    if status == "finished":
        return ("finished", 0)
    found = complete_checkpoints(run_dir)
    if not found:
        raise ConfigError(f"no complete checkpoint in {run_dir!r} to resume from (checkpoints are "
                          "written with run.checkpoint_every > 0); run without --resume")
    chapter, world = found[0]
    state = load_checkpoint(run_dir, chapter, 0, world)  # validates every rank file
    old = json.loads(state["config"])
    new = cfg.to_dict()
    for section in ("model", "train", "data"):
        if old[section] != new[section]:
            diff = sorted(k for k in new[section] if old[section].get(k) != new[section][k])
            raise ConfigError(f"the checkpoint was made with different [{section}] settings "
                              f"({', '.join(diff)}); resume with the run's own config.toml")
    return (chapter, world)


def _preempted(comm, tracer, run_dir: str, rank: int, progress: Progress | None) -> int:
    """Stop requested: every passed chapter is checkpointed; wait (bounded) for the other ranks."""
    tracer.close("preempted")
    if rank == 0:
        done = [c for c, _ in complete_checkpoints(run_dir)]
        state = read_status(run_dir)
        # keep the accuracy of every chapter evaluated so far (a resumed run carries it on)
        acc = dict(state.get("accuracy_per_chapter", {}))
        acc.update({str(c): a for c, a in sorted(progress.acc.items())} if progress else {})
        state.update(status="preempted", signal=_stop_signal[0] if _stop_signal else None,
                     newest_complete_checkpoint=max(done) + 1 if done else None,
                     accuracy_per_chapter=acc)
        write_json_atomic(os.path.join(run_dir, "run.json"), state)
        RunLock(run_dir).release()
        print(f"mpff: stopped by signal {_stop_signal[0] if _stop_signal else '?'}; "
              + (f"resume with --resume from after chapter {max(done) + 1}" if done else
                 "no complete checkpoint yet (set run.checkpoint_every)"), flush=True)
    # all ranks got the signal (SLURM and mpiexec signal every rank); give them time to reach
    # this point, then leave. A rank that never comes is taken down by MPI_Abort.
    req = comm.world.Ibarrier()
    deadline = time.time() + 60
    while not req.Test():
        if time.time() > deadline:
            comm.abort(EXIT_PREEMPTED)
        time.sleep(0.01)
    return EXIT_PREEMPTED


def _write_report(run_dir: str) -> int:
    try:
        from . import report
    except ImportError:  # pragma: no cover
        return 0
    try:
        return int(report.main([run_dir]) or 0)
    except Exception as exc:  # the run itself succeeded; a report bug must not hide that
        print(f"mpff: the report failed ({exc.__class__.__name__}: {exc}); "
              f"rerun: python -m mpff report {run_dir}", file=sys.stderr)
        return 0


def _peak_memory(device: torch.device) -> dict[str, float]:
    import resource
    out = {"peak_host_mem": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0}
    if device.type == "cuda":
        out["peak_gpu_mem"] = float(torch.cuda.max_memory_allocated(device))
    return out
