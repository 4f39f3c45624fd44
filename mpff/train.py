"""``mpff train``: prepare (collective validation) -> run (this rank's tasks) -> finish.

Run it under MPI through mpi4py, so an exception on any rank aborts the whole job instead
of leaving the others blocked in a receive::

    mpiexec -n 2 python -m mpi4py -m mpff train --config configs/workstation.toml \\
        --set run.schedule=single_layer --out outputs/ws-single

Everything a user can get wrong is checked on every rank before any training starts; the
first problem is printed once (by rank 0) as one line and every rank exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import Config, ConfigError, load
from .ff import cpu_bf16_products, cuda_bf16_products
from .halt import (
    DISK_ERRNOS,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    Halt,
    IOFailure,
    OutOfMemory,
    PeerLost,
    Preempted,
    Stalled,
    Watch,
    install_signal_handlers,
    io_reason,
    stop_signal,
)


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
        if cfg.train.precision == "tf32":
            raise ConfigError("train.precision = 'tf32' needs a CUDA GPU (TF32 is a tensor-core format); "
                              + ("use train.precision=bf16 (this CPU computes bf16 products) or fp32"
                                 if cpu_bf16_products() else
                                 "use train.precision=fp32 (this CPU has no bf16 products either)"))
        if cfg.train.precision == "bf16" and not cpu_bf16_products():
            raise ConfigError("train.precision = 'bf16' needs a CPU whose oneDNN computes bf16 products "
                              "(AVX-512 BF16 or AMX; torch reports none here, so every product would stay "
                              "fp32); use train.precision=fp32 here, or run bf16 on a GPU (run.device=cuda) "
                              "or a CPU that has them")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("run.device = 'cuda' but torch sees no GPU; use run.device=cpu or a CUDA build of torch")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())  # round robin per node
    # the rank's current device too: CUDA contexts, NCCL and anything allocated without a device
    # land on it, not all on GPU 0
    torch.cuda.set_device(device)
    if cfg.train.precision == "tf32" and torch.cuda.get_device_capability(device)[0] < 8:
        raise ConfigError(f"train.precision = 'tf32' needs TF32 tensor cores (Ampere or newer), not "
                          f"{torch.cuda.get_device_name(device)}; use train.precision=fp32")
    if cfg.train.precision == "bf16" and (why := cuda_bf16_products(device)) is not None:
        raise ConfigError(f"train.precision = 'bf16': {why}; use train.precision=fp32 (or tf32)")
    return device


def default_run_dir(cfg: Config, world_size: int) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("outputs", f"{cfg.name}-{cfg.run.schedule}-n{world_size}-{stamp}")


def configure_torch(cfg: Config) -> None:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    # Dead ReLU units get exactly-zero gradients, so their Adam moments decay into the
    # denormal range within an epoch, and x86 arithmetic on denormals is ~10x slower
    # (measured: 8.9 ms vs 0.85 ms per Adam step for a 1000x1000 layer). Flush them to
    # zero, as GPUs do; every rank does the same, so results stay reproducible.
    torch.set_flush_denormal(True)


# ------------------------------------------------------------------------------ prepare


@dataclass
class Setup:
    """Everything a rank needs to run, agreed on by all ranks."""
    comm: Any
    args: argparse.Namespace
    cfg: Config
    plan: Any
    rundir: Any
    dataset: Any
    device: torch.device
    snapshot: dict | None = None          # checkpoint state to start from
    resume: tuple[int, int] | None = None  # (chapters done, world size that wrote the checkpoint)
    start: float = field(default_factory=time.perf_counter)
    board: Any = None                      # rank 0's progress board, once the run started
    memory_base: Any = None                # mpff.memory.Baseline: resident memory after the data loaded
    ddp_group: Any = None                  # torch.distributed group of data-parallel backprop


def _collectively(comm, step: Callable[[], Any]) -> tuple[Any, tuple[int, str] | None]:
    """Run ``step`` on every rank; every rank learns the first problem of any rank, as (exit code,
    one line): bad input (2), an I/O error (74), or a stop signal during start-up (75)."""
    result, error = None, None
    try:
        result = step()
    except ConfigError as exc:
        error = (EXIT_USAGE, str(exc))
    except Halt as exc:
        error = (exc.code, exc.reason)
    if error is None and stop_signal() is not None:
        error = (EXIT_PREEMPTED, f"stopped by signal {stop_signal()} during start-up; nothing was written")
    return result, comm.first_error(error)


def _on_root(comm, step: Callable[[], Any]) -> tuple[Any, tuple[int, str] | None]:
    """Run ``step`` on rank 0 only; every rank gets its result or its problem."""
    result, error = None, None
    if comm.rank == 0:
        try:
            result = step()
        except ConfigError as exc:
            error = (EXIT_USAGE, str(exc))
        except Halt as exc:
            error = (exc.code, exc.reason)
    result, error = comm.bcast((result, error))
    if error is None:  # a stop signal on any rank ends the start-up too
        _, error = _collectively(comm, lambda: None)
    return result, error


def prepare(comm, args: argparse.Namespace) -> Setup | int:
    """Validate everything on every rank, in phases; the first problem ends the run before
    anything is written: one line from rank 0, the same exit code on every rank (2 for bad
    input). Returns the Setup, or the exit code."""
    loaded, error = _collectively(comm, lambda: _load_config(comm, args))
    if error is None:
        cfg, plan = loaded
        comm.poll_interval = cfg.run.poll_interval
        checked, error = _on_root(comm, lambda: _check_run_dir(cfg, args, comm.size))
    if error is None:
        rundir, resume = checked
        if resume == "finished":  # --resume of a finished run: nothing to do
            if comm.rank == 0:
                print(f"mpff: {rundir.path} already finished; nothing to resume", flush=True)
            return 0
        ready, error = _collectively(comm, lambda: _load_data(comm, cfg, rundir, resume))
    if error is None:
        device, dataset, plan, snapshot, memory_base = ready
        cfg = plan.cfg  # with train.chapter_batches, the chapters the data makes (config.toml says so)
        _, error = _on_root(comm, lambda: _take_run_dir(rundir))
    if error is not None:
        code, message = error
        if comm.rank == 0:
            if code == EXIT_PREEMPTED:
                print(f"mpff: {message}", flush=True)
            else:
                print(f"mpff train: error: {message}", file=sys.stderr, flush=True)
        return code
    return Setup(comm=comm, args=args, cfg=cfg, plan=plan, rundir=rundir, dataset=dataset, device=device,
                 snapshot=snapshot, resume=resume, memory_base=memory_base)


def _load_config(comm, args: argparse.Namespace):
    from .plan import build_plan

    config_path = args.config
    if args.resume and not args.out:  # never a directory of a new name: it holds nothing to resume
        raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
    if args.resume and not config_path:
        config_path = os.path.join(args.out, "config.toml")
    notes: list[str] = []
    cfg = load(config_path, args.overrides, notes)
    if comm.rank == 0:
        for note in notes:
            print(f"mpff: note: {note}", flush=True)
    return cfg, build_plan(cfg, comm.size)


def _check_run_dir(cfg: Config, args: argparse.Namespace, world_size: int):
    from .checkpoint import complete_checkpoints
    from .rundir import RunDir

    rundir = RunDir(args.out or default_run_dir(cfg, world_size))
    rundir.check(args.force, args.resume, resumable=lambda: bool(complete_checkpoints(rundir.path)))
    return rundir, (_find_resume_point(rundir, cfg) if args.resume else None)


def _load_data(comm, cfg: Config, rundir, resume):
    from . import memory
    from .checkpoint import load_checkpoint
    from .data import load_dataset
    from .plan import build_plan

    configure_torch(cfg)
    device = pick_device(cfg, comm.node_local_rank()[0])
    dataset = load_dataset(cfg.data)
    _probe_memory(cfg, device, dataset.x_train.shape[0], comm.size)
    if dataset.input_dim != cfg.model.dims[0]:
        raise ConfigError(f"the data has {dataset.input_dim} inputs but model.dims[0] = "
                          f"{cfg.model.dims[0]}; set model.dims[0] = {dataset.input_dim}")
    if dataset.num_classes > cfg.model.dims[0]:  # the label overlay takes one input per class
        raise ConfigError(f"{dataset.name} has {dataset.num_classes} classes, more than its "
                          f"{dataset.input_dim} inputs can hold as a label; use larger images")
    shards, n_train = cfg.resolved_shards(comm.size), dataset.x_train.shape[0]
    if shards > n_train:
        # federated has one shard per rank: only there do fewer ranks help
        raise ConfigError(f"federated on {comm.size} ranks makes one data shard per rank but the data "
                          f"has {n_train} training samples; use at most {n_train} ranks or more data"
                          if cfg.run.schedule == "federated" else
                          f"data.shards = {shards} but the data has {n_train} training samples; set "
                          f"data.shards to at most {n_train} (or use more data: data.train_subset)")
    plan = build_plan(cfg, comm.size, start_chapter=resume[0] if resume else 0,
                      n_train=dataset.x_train.shape[0], num_classes=dataset.num_classes)
    snapshot = load_checkpoint(rundir.path, resume[0], comm.rank, comm.size) if resume else None
    return device, dataset, plan, snapshot, memory.start(device)


def _take_run_dir(rundir) -> None:
    try:
        rundir.acquire()
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise IOFailure(io_reason(f"the run directory {rundir.path}", exc)) from None
        raise ConfigError(f"cannot create {rundir.path!r} ({exc.strerror}); choose another --out") from None


def _find_resume_point(rundir, cfg: Config) -> tuple[int, int] | str:
    """Rank 0: (chapters done, world size) of the newest complete checkpoint, checked against the
    configuration; "finished" when the run has nothing left to do."""
    import json

    from .checkpoint import complete_checkpoints, load_checkpoint

    if rundir.status == "finished":
        return "finished"
    found = complete_checkpoints(rundir.path)
    if not found:
        if not rundir.holds_run():  # --force would refuse it too: nothing there is known to be mpff's
            raise ConfigError(f"no complete checkpoint in {rundir.path!r} to resume from, and no run.json: "
                              "it holds no mpff run to continue or replace; move its files away or choose "
                              "another --out")
        raise ConfigError(f"no complete checkpoint in {rundir.path!r} to resume from (checkpoints are "
                          "written with run.checkpoint_every > 0); start the run over with --force "
                          "instead of --resume")
    done, world = found[0]
    state = load_checkpoint(rundir.path, done, 0, world)  # validates every rank file
    old = json.loads(state["config"])
    new = cfg.to_dict()
    defaults = Config().to_dict()
    if cfg.train.chapter_batches:  # the count follows from the data (the [data] settings are compared)
        new["train"].pop("chapters")
        old["train"].pop("chapters", None)
        defaults["train"].pop("chapters")
    for section in ("model", "train", "data"):
        old[section] = {**defaults[section], **old[section]}  # a key it lacks (an older mpff) takes its default
        if old[section] != new[section]:
            diff = sorted(k for k in new[section] if old[section].get(k) != new[section][k])
            raise ConfigError(f"the checkpoint was made with different [{section}] settings "
                              f"({', '.join(diff)}); resume with the run's own config.toml")
    return (done, state.get("world_size", world))


# ------------------------------------------------------------------------------ run


@dataclass
class Outcome:
    status: str                      # finished | preempted | failed | diverged
    result: Any = None               # the executor's ExecResult
    memory: dict = field(default_factory=dict)
    halt: Halt | None = None


def execute(setup: Setup, quiet: bool = False) -> Outcome:
    """This rank's part of the run: the attempt recorded by rank 0, the tracer, the rank state,
    the executor; the model written by the rank that runs the final task. A halt (a stop signal,
    divergence, an I/O error, a stall) on any rank ends it on every rank."""
    from .executor import Executor
    from .progress import Board, Reporter

    comm, cfg, plan = setup.comm, setup.cfg, setup.plan
    halt = _start_attempt(setup)
    if halt is not None:
        return Outcome("failed", halt=halt)
    watch = Watch(comm)
    tracer = state = None
    try:
        tracer = _open_trace(setup)
        if comm.rank == 0:
            _banner(setup)
        board = setup.board = Board(plan, setup.start, quiet=quiet) if comm.rank == 0 else None
        with tracer.span("setup"):  # model, optimizers and data on the device
            state = _make_state(setup, tracer, watch)
            if setup.snapshot:
                state.restore(setup.snapshot)
        executor = Executor(plan, comm, state, tracer, reporter=Reporter(comm, board), watch=watch,
                            checkpointer=_Checkpointer(setup, comm.rank), stall_timeout=cfg.run.stall_timeout)
        result = executor.run()
        if comm.rank == plan.final_rank() and plan.tasks:
            with tracer.span("io", plan.num_chapters - 1, -1):
                _write_model(setup, state)
        with tracer.span("wait", -1, -1):
            try:
                if comm.rank == 0:
                    executor.reporter.collect(timeout=cfg.run.stall_timeout, on_idle=watch.check)
                comm.await_all(watch.check)  # ranks done early wait here, still stoppable
            except getattr(comm, "errors", ()) as exc:
                raise PeerLost(f"rank {comm.rank} lost a peer after training, waiting for the others to "
                               f"finish: MPI: {str(exc).strip().splitlines()[-1]}; its process, host or link "
                               "is gone. Resume with --resume once it is back") from None
        memory = _memory(setup, state)
        _close_trace(tracer, result, memory)
    except Halt as halt:
        if not halt.received and comm.size > 1:
            comm.notify_halt(halt.notice(comm.rank))  # the others stop at their next check
        _close_quietly(tracer, halt.status)
        return Outcome(halt.status, halt=halt)
    except BaseException as exc:
        if is_out_of_memory(exc):  # the settings' fault, not a bug: one line, exit 2
            halt = OutOfMemory(out_of_memory_reason(cfg, setup.device, exc, rank=comm.rank))
            _close_quietly(tracer, halt.status)
            if plan.replicated and comm.size > 1:
                # the other data-parallel ranks wait in a torch.distributed collective, where no
                # notice reaches them: record it here and end the job
                _record_halt(setup.rundir, halt)
                print(f"mpff train: error: {halt.reason}", file=sys.stderr, flush=True)
                comm.abort(halt.code)
            if comm.size > 1:
                comm.notify_halt(halt.notice(comm.rank))
            return Outcome(halt.status, halt=halt)
        # a bug: leave a note in the run directory, then let mpi4py abort the job
        setup.rundir.write_failure_note(comm.rank, traceback.format_exc())
        _record_bug(setup.rundir, comm.rank, exc)
        _close_quietly(tracer, "failed")
        raise
    finally:
        if setup.ddp_group is not None:
            from .ddp import shutdown
            if state is not None:
                state.close()  # the DDP model goes before its process group
            shutdown(setup.ddp_group)
    return Outcome("finished", result, memory)


def _start_attempt(setup: Setup) -> Halt | None:
    """Rank 0 records the attempt in the run directory (run.json "running", config.toml, the
    provenance with every rank's host); every rank learns whether that worked."""
    from .comm import mpi_info

    comm, rundir = setup.comm, setup.rundir
    hosts = comm.gather(mpi_info()["host"])
    reason = None
    if comm.rank == 0:
        from .provenance import provenance
        try:
            rundir.prepare(setup.cfg, force=setup.args.force,
                           resume_after=setup.resume[0] if setup.resume else None, world_size=comm.size,
                           n_train=setup.dataset.x_train.shape[0], n_test=setup.dataset.x_test.shape[0],
                           provenance={**provenance(getattr(setup.args, "argv", sys.argv[1:])), "hosts": hosts})
        except OSError as exc:
            reason = io_reason(f"the run directory {rundir.path}", exc)
    reason = comm.bcast(reason)
    return IOFailure(reason, origin=0) if reason is not None else None


def _open_trace(setup: Setup):
    """This rank's tracer, on the time base of rank 0 (ping-pong offset)."""
    from .comm import mpi_info
    from .provenance import versions
    from .trace import Tracer, trace_path

    comm, cfg = setup.comm, setup.cfg
    offset, t0 = comm.clock_offset()
    meta = {"world_size": comm.size, "host": mpi_info()["host"], "device": str(setup.device),
            "schedule": cfg.run.schedule, "config": cfg.to_json(), "versions": versions(),
            "mpi": mpi_info(), "torch_threads": torch.get_num_threads()}
    path = trace_path(setup.rundir.path, comm.rank)
    try:
        return Tracer(path, comm.rank, meta, clock_offset=offset, t0=t0, enabled=cfg.run.trace)
    except OSError as exc:
        raise IOFailure(io_reason(f"the trace {path}", exc)) from None


def _close_trace(tracer, result, memory: dict) -> None:
    """The run's last records in the trace: memory, bytes moved, the training phase."""
    for name, value in memory["memory"].items():
        if isinstance(value, (int, float)):
            tracer.scalar(name, -1, -1, value)
    for key in ("train_start", "train_end"):
        tracer.set_attr(key, getattr(result, key))
    for key in ("bytes_sent", "bytes_received"):
        tracer.set_attr(key, memory.get(key, getattr(result, key)))
    try:
        tracer.close("finished")
    except OSError as exc:
        raise IOFailure(io_reason(f"the trace {tracer.path}", exc)) from None


def _state_class(cfg: Config) -> type:
    from .algorithms import state_class
    return state_class(cfg.train.algorithm)


def _make_state(setup: Setup, tracer, watch):
    """The rank state of the run's algorithm (mpff.algorithms); its ``create`` does any collective
    set-up the algorithm needs (data-parallel backprop starts torch.distributed)."""
    return _state_class(setup.cfg).create(setup, tracer, watch)


def _write_model(setup: Setup, state) -> None:
    try:
        state.save(setup.rundir.model_path, setup)
    except OSError as exc:
        raise IOFailure(io_reason(f"the model {setup.rundir.model_path}", exc)) from None


def _memory(setup: Setup, state) -> dict:
    """This rank's memory: measured since the data was loaded, and the analytic breakdown; and
    the bytes the state moved outside the executor's messages (DDP's all-reduces)."""
    from . import memory
    measured = memory.finish(setup.memory_base, setup.device)
    out = {"memory": measured,
           "memory_analytic": memory.analytic(setup.cfg, setup.dataset.x_train.shape[0], setup.comm.size)}
    out.update(state.traffic())
    return out


def _close_quietly(tracer, status: str) -> None:
    """Close a trace on the way out; a trace that cannot be written any more stays as last written."""
    if tracer is not None:
        try:
            tracer.close(status)
        except OSError:
            pass


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: MemoryError, torch's OutOfMemoryError (CUDA), or the
    RuntimeError of torch's CPU allocator ("can't allocate memory")."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def out_of_memory_reason(cfg: Config, device, exc: BaseException | None, *, rank: int | None = None,
                         need: int | None = None) -> str:
    """One line for memory the run's settings need and a rank cannot get, saying what to lower."""
    who = f"rank {rank} " if rank is not None else "a rank "
    size = f"about {need / 2**30:.3g} GiB " if need is not None else ""
    if need is None and exc is not None:  # torch says "allocate 627200000000000 bytes" or "2.00 GiB"
        m = re.search(r"allocate ([\d.]+) ?(bytes|[KMGTP]iB)", str(exc))
        if m:
            amount = float(m.group(1)) / 2**30 if m.group(2) == "bytes" else None
            size = (f"{amount:.3g} GiB" if amount is not None else f"{m.group(1)} {m.group(2)}") + " more "
    return (f"{who}cannot allocate {size}on {device} for train.batch_size = {cfg.train.batch_size} "
            f"and model.dims {list(cfg.model.dims)}; lower train.batch_size (or the layer widths)")


def _probe_memory(cfg: Config, device, n_train: int, world_size: int) -> None:
    """Bad input found before anything is written: memory the run's settings need (the analytic
    peak of a rank, mpff.memory) that cannot be allocated at all, such as a batch of 10^11 rows.
    The block is only reserved, never touched, so the probe costs nothing when it fits."""
    from . import memory
    need = int(memory.analytic(cfg, n_train, world_size)["peak"])
    try:
        block = torch.empty(need, dtype=torch.uint8, device=device)
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise ConfigError(out_of_memory_reason(cfg, device, None, need=need)) from None
    del block
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _record_halt(rundir, halt: Halt) -> None:
    """Best effort, from the rank that found the halt when the job is about to be aborted."""
    try:
        rundir.end_attempt(halt.status, reason=halt.reason, exit_code=halt.code)
    except Exception:  # noqa: BLE001 - nothing more can be done here
        pass


def _record_bug(rundir, rank: int, exc: BaseException) -> None:
    """Best effort, from the failing rank itself (the job is about to be aborted): run.json says
    failed, and why."""
    try:
        text = str(exc).splitlines()[0] if str(exc) else ""
        rundir.end_attempt("failed", reason=f"rank {rank}: {type(exc).__name__}: {text} (traceback in "
                                            f"failure-rank{rank}.txt)", exit_code=1)
    except Exception:  # noqa: BLE001 - nothing more can be done here
        pass


class _Checkpointer:
    """The run's checkpoint policy (``run.checkpoint_every``) and where this rank writes."""

    def __init__(self, setup: Setup, rank: int) -> None:
        self.setup, self.rank = setup, rank
        self.every = setup.cfg.run.checkpoint_every

    def due(self, chapter: int) -> bool:
        # the last chapter is never checkpointed: the model is written right after it
        return bool(self.every) and chapter < self.setup.plan.num_chapters - 1 and (chapter + 1) % self.every == 0

    def write(self, chapter: int, snapshot: dict) -> None:
        from .checkpoint import checkpoint_dir, prune, write_rank_checkpoint
        s = self.setup
        try:
            write_rank_checkpoint(s.rundir.path, chapter, self.rank, s.comm.size, s.cfg.to_json(), snapshot)
            # Every rank prunes after its own file: the rank whose file completes a checkpoint
            # may be any of them (in Single Layer rank 0 writes all its files long before the
            # last rank writes its first). Pruning only removes checkpoints older than a
            # complete one, which every rank has passed, so no rank still writes into them.
            prune(s.rundir.path, s.cfg.run.checkpoint_keep)
        except OSError as exc:
            where = os.path.join(checkpoint_dir(s.rundir.path, chapter + 1), f"rank{self.rank:04d}.h5")
            raise IOFailure(io_reason(f"the checkpoint {where}", exc)) from None


def _banner(setup: Setup) -> None:
    cfg, size, ds = setup.cfg, setup.comm.size, setup.dataset
    mode = {"sequential": "sequential plan on rank 0"}.get(cfg.run.schedule, cfg.run.schedule)
    what = _state_class(cfg).summary(cfg, size)
    print(f"mpff: {cfg.name}: {mode}, {size} rank(s), dims {list(cfg.model.dims)}, "
          f"E={cfg.train.epochs} S={cfg.train.chapters}, {what}, {ds.x_train.shape[0]} train / "
          f"{ds.x_test.shape[0]} test samples, device {setup.device}", flush=True)
    print(f"mpff: writing {setup.rundir.path}", flush=True)
    if setup.resume is not None:
        done, old_world = setup.resume
        note = ""
        if old_world != size and cfg.run.exchange == "weights" and cfg.run.schedule != "single_layer":
            note = (" (note: different rank count with exchange = 'weights': each layer continues "
                    "with its last trainer's optimizer state, so results differ from an "
                    "uninterrupted run)")
        print(f"mpff: resuming after chapter {done} from a {old_world}-rank checkpoint{note}", flush=True)


# ------------------------------------------------------------------------------ finish


def finish(setup: Setup, outcome: Outcome) -> int:
    """After the tasks: run.json (rank 0), the summary line, the report; or the halt recorded."""
    if outcome.halt is not None:
        return _halted(setup, outcome.halt)
    comm, cfg, rundir = setup.comm, setup.cfg, setup.rundir
    result = outcome.result
    stats = comm.gather({"rank": comm.rank, "host": __import__("socket").gethostname(),
                         "device": str(setup.device), "bytes_sent": result.bytes_sent,
                         "bytes_received": result.bytes_received,
                         "train_start": result.train_start, "train_end": result.train_end, **outcome.memory})
    comm.barrier()
    code = 0
    if comm.rank == 0:
        # the lock is held until the job's last write (the report): until then a --force start
        # into the directory, which deletes the model and the traces the report reads, is
        # refused as "in use"
        try:
            from .modelfile import host_facts
            from .provenance import versions
            board = setup.board
            wall = time.perf_counter() - setup.start
            last = cfg.train.chapters - 1
            final_acc = board.acc.get(last)
            previous = rundir.read().get("accuracy_per_chapter", {})
            accuracy = {**previous, **{str(c + 1): a for c, a in sorted(board.acc.items())}}
            training = max(s["train_end"] for s in stats) - min(s["train_start"] for s in stats)
            for s in stats:
                del s["train_start"], s["train_end"]
            try:
                rundir.end_attempt("finished", test_accuracy=final_acc, wall_time=wall, training_seconds=training,
                                   accuracy_per_chapter=accuracy, chapters_done=cfg.train.chapters, ranks=stats,
                                   versions=versions(), host=host_facts(), exit_code=0, reason=None)
            except OSError as exc:
                print(f"mpff train: error: {io_reason(rundir.run_json, exc)}; the model is written: "
                      f"{rundir.model_path}", file=sys.stderr, flush=True)
                return IOFailure.code
            rundir.clear_failure_notes()
            acc_text = f"{100 * final_acc:.2f}%" if final_acc is not None else "n/a"
            how = _state_class(cfg).classified_by(cfg)
            print(f"mpff: done in {wall:.1f}s: test accuracy {acc_text} ({how}), model {rundir.model_path}",
                  flush=True)
            if cfg.run.report and cfg.run.trace:
                if stop_signal() is not None:  # the run is done; a stop now skips only the report
                    print(f"mpff: stopped before the report; write it with: python -m mpff report {rundir.path}",
                          flush=True)
                else:
                    code = _write_report(rundir.path)
        finally:
            rundir.release()
    return code


def _halted(setup: Setup, halt: Halt) -> int:
    """Every rank ends with the halt's exit code; one rank records it in run.json and prints one
    line: rank 0, or for a stall the rank that found it (rank 0 may be the one stuck, and the job
    is aborted at once)."""
    from .checkpoint import complete_checkpoints

    comm, rundir = setup.comm, setup.rundir
    if isinstance(halt, Stalled):
        writer = -1 if halt.received else comm.rank
    else:
        writer = 0
    if comm.rank == writer:
        done = [c for c, _ in complete_checkpoints(rundir.path)]
        acc = dict(rundir.read().get("accuracy_per_chapter", {}))
        if setup.board is not None:
            acc.update({str(c + 1): a for c, a in sorted(setup.board.acc.items())})
        fields = dict(reason=halt.reason, exit_code=halt.code, accuracy_per_chapter=acc,
                      newest_complete_checkpoint=max(done) if done else None, chapters_done=max(done) if done else 0)
        if isinstance(halt, Preempted):
            fields["signal"] = stop_signal()
        unrecorded = ""
        try:
            rundir.end_attempt(halt.status, **fields)
        except OSError as exc:
            unrecorded = f" ({io_reason(rundir.run_json, exc)}: it still says 'running')"
        if isinstance(halt, Stalled):
            rundir.release()  # the job is aborted next; nothing more is written
        if isinstance(halt, Preempted):
            sig = stop_signal()
            print(f"mpff: stopped by signal {sig if sig is not None else '(on another rank)'}; "
                  + (f"resume with --resume from after chapter {max(done)}" if done else
                     "no complete checkpoint yet, so nothing to resume: start it over with --force "
                     "(checkpoints come every run.checkpoint_every chapters)") + unrecorded, flush=True)
        else:
            print(f"mpff train: error: {halt.reason}{unrecorded}", file=sys.stderr, flush=True)
    if isinstance(halt, Stalled):
        comm.abort(halt.code)  # the stalled rank would never reach a barrier
    # every rank learnt of the halt; give them time to get here, then leave. A rank that never
    # comes (stopped, or blocked in a driver) is taken down by MPI_Abort.
    together = comm.bounded_barrier(30 if isinstance(halt, Preempted) else 10)
    if comm.rank == writer and setup.board is not None and comm.size > 1:
        _late_accuracies(setup)
    if comm.rank == writer:
        rundir.release()  # after the last write (the late accuracies)
    if not together:
        comm.abort(halt.code)
    return halt.code


def _late_accuracies(setup: Setup) -> None:
    """Rank 0, once the others have stopped: evaluations they reported just before the halt may
    still have been on their way (a chapter already checkpointed, so a resumed run would not
    evaluate it again): take them in and add them to run.json."""
    from .progress import Reporter

    board = setup.board
    before = dict(board.acc)
    reporter, seen, quiet = Reporter(setup.comm, board), len(board.acc), 0
    while quiet < 3:  # until three polls 20 ms apart bring nothing new
        reporter.poll()
        quiet = quiet + 1 if len(board.acc) == seen else 0
        seen = len(board.acc)
        time.sleep(0.02)
    if board.acc != before:
        acc = dict(setup.rundir.read().get("accuracy_per_chapter", {}))
        acc.update({str(c + 1): a for c, a in sorted(board.acc.items())})
        try:
            setup.rundir.update(accuracy_per_chapter=acc)
        except OSError:
            pass  # run.json already says how the run ended; the accuracies are a bonus


def run(comm, args: argparse.Namespace) -> int:
    """``mpff train`` on communicator ``comm`` (an mpi4py communicator)."""
    from .comm import Comm

    install_signal_handlers()  # (again: the entry point does it first) a signal must not kill a rank
    mpff_comm = Comm(comm)
    try:
        setup = prepare(mpff_comm, args)
        if isinstance(setup, int):
            return setup
        board_quiet = args.quiet
        return finish(setup, execute(setup, quiet=board_quiet))
    finally:
        mpff_comm.free()


def _write_report(run_dir: str) -> int:
    try:
        from .analysis import report
    except ImportError:  # pragma: no cover
        return 0
    try:
        return int(report.main([run_dir]) or 0)
    except Exception as exc:  # the run itself succeeded; a report bug must not hide that
        print(f"mpff: the report failed ({exc.__class__.__name__}: {exc}); "
              f"rerun: python -m mpff report {run_dir}", file=sys.stderr)
        return 0


# ------------------------------------------------------------------------------ in one process


def train_local(cfg: Config, dataset, *, tracer=None, device: torch.device | None = None):
    """Train ``cfg`` on ``dataset`` in this process (one rank on COMM_SELF, no run directory,
    no files): for tests and notebooks. Returns the rank state (``.net`` is the network)."""
    from .comm import Comm, self_comm
    from .executor import Executor
    from .ffstate import FFState
    from .plan import build_plan
    from .trace import Tracer

    comm = Comm(self_comm(), poll_interval=cfg.run.poll_interval)
    try:
        plan = build_plan(cfg, 1, n_train=dataset.x_train.shape[0], num_classes=dataset.num_classes)
        tracer = tracer or Tracer(None, 0, {}, enabled=False)
        state = FFState(plan.cfg, plan, dataset, tracer, device or torch.device("cpu"))
        Executor(plan, comm, state, tracer).run()
        return state
    finally:
        comm.free()
