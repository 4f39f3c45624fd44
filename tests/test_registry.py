"""Components that register: a toy data set and a toy layer kind, registered from this file alone
(no mpff module names them), trained through every FF schedule, bit for bit the Sequential run.

The schedules run in this process as tests/test_executor.py runs its toy rank state: on
COMM_SELF and on a duplicate of COMM_WORLD, with assertions that hold at any size, checks that
differ by rank combined with an allreduce. Under plain pytest the world has one rank;
:func:`test_the_suite_under_mpiexec` runs this file under ``mpiexec -n 2`` and ``-n 3``, where
Single Layer, All Layers and Federated really spread the toy network over ranks.
"""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpff import algorithms, dataspec, layers
from mpff.comm import Comm
from mpff.config import Config, ConfigError
from mpff.data import Raw, load_dataset
from mpff.executor import Executor
from mpff.ff import FFLayer
from mpff.ffstate import FFState
from mpff.modelfile import load_model, save_model, weights_of
from mpff.plan import Buf, build_plan
from mpff.progress import Board, Reporter
from mpff.trace import Tracer

TOY_INPUTS, TOY_CLASSES, TOY_TRAIN, TOY_TEST = 64, 4, 96, 32


def read_toy(cfg) -> Raw:
    """Four classes, each a random direction plus noise: a reader as a plug-in would write one."""
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((TOY_CLASSES, TOY_INPUTS))

    def split(n):
        y = rng.integers(0, TOY_CLASSES, n).astype(np.int64)
        return (centres[y] + 0.5 * rng.standard_normal((n, TOY_INPUTS))).astype(np.float32), y

    (x_train, y_train), (x_test, y_test) = split(TOY_TRAIN), split(TOY_TEST)
    return Raw(source="toy (tests/test_registry.py)", x_train=x_train, y_train=y_train, x_test=x_test,
               y_test=y_test, method="scalar", name="toy")


class BiasFreeLinear(layers.LayerSpec):
    """A layer kind with another parametrisation: the linear FF layer without its bias."""

    name = "toy_bias_free"

    def tensors(self, d_in, d_out):
        return [layers.Tensor("weight", (d_out, d_in))]

    def build(self, d_in, d_out, *, threshold_coeff, goodness, norm_eps, seed):
        return FFLayer(d_in, d_out, threshold_coeff=threshold_coeff, goodness=goodness, norm_eps=norm_eps,
                       seed=seed, bias=False)


@pytest.fixture(scope="module", autouse=True)
def toys():
    dataspec.register(dataspec.DataSpec(name="toy", reader=read_toy, title="toy", input_dim=TOY_INPUTS,
                                        num_classes=TOY_CLASSES, train_size=TOY_TRAIN, test_size=TOY_TEST,
                                        needs_path=False))
    layers.register(BiasFreeLinear())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per rank, as mpff train runs
    yield
    torch.set_num_threads(threads)
    dataspec.DATASETS.unregister("toy")
    layers.LAYERS.unregister("toy_bias_free")


@pytest.fixture(params=["self", "world-dup"])
def comm(request):
    c = MPI.COMM_SELF.Dup() if request.param == "self" else MPI.COMM_WORLD.Dup()
    yield c
    c.Free()


def _cfg(schedule: str, size: int, layer: str = "toy_bias_free", **train) -> Config:
    lag = size - 1 if schedule in ("all_layers", "federated") else 1
    return Config().replace(
        model={"dims": (TOY_INPUTS, 16, 16, 16), "layer": layer},
        train={"epochs": 4, "chapters": 4, "batch_size": 16, "negatives": "adaptive", "adaptive_lag": lag,
               "classifier": "softmax", "lr": 0.01, **train},
        run={"schedule": schedule, "exchange": "full"},
        data={"dataset": "toy", "shards": size if schedule == "federated" else 0})


def _execute(cfg: Config, comm):
    """Train cfg on ``comm`` in this process; returns (plan, rank state, board or None)."""
    dataset = load_dataset(cfg.data)
    rank = comm.Get_rank()
    plan = build_plan(cfg, comm.Get_size(), n_train=dataset.x_train.shape[0], num_classes=dataset.num_classes)
    tracer = Tracer(None, rank, {}, enabled=False)
    state = FFState(cfg, plan, dataset, tracer, torch.device("cpu"), rank=rank)
    mc = Comm(comm, poll_interval=0.0005)
    board = Board(plan, time.perf_counter(), quiet=True) if rank == 0 else None
    try:
        ex = Executor(plan, mc, state, tracer, reporter=Reporter(mc, board))
        ex.run()
        ex.reporter.collect(timeout=60)
    finally:
        mc.free()
    return plan, state, board


def _all(comm, ok: bool) -> bool:
    return comm.allreduce(bool(ok), op=MPI.LAND)


def _network(state: FFState) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.net.state_dict().items()}


# ------------------------------------------------------------------------------ the registries

def test_the_toys_are_what_configuration_plan_memory_and_data_see():
    cfg = _cfg("sequential", 1)
    assert cfg.data.num_classes == TOY_CLASSES and cfg.data.input_dim == TOY_INPUTS
    assert cfg.data.train_samples == TOY_TRAIN and cfg.data.facts.title == "toy"
    plan = build_plan(cfg, 1, n_train=TOY_TRAIN)
    assert plan.num_classes == TOY_CLASSES
    assert plan.buffer_spec(Buf("layer", 0, 0), False) == (16 * TOY_INPUTS, np.float32)  # no bias
    assert plan.buffer_spec(Buf("layer", 1, 0), True) == (3 * 16 * 16 + 1, np.float32)
    assert plan.buffer_spec(Buf("head", -1, 0), False) == (TOY_CLASSES * 32, np.float32)
    ds = load_dataset(cfg.data)
    assert ds.name == "toy" and ds.num_classes == TOY_CLASSES and ds.x_train.shape == (TOY_TRAIN, TOY_INPUTS)
    from mpff import memory
    figure = memory.analytic(cfg, TOY_TRAIN, 1)
    assert figure["parameters"] == 4 * (16 * TOY_INPUTS + 2 * 16 * 16 + TOY_CLASSES * 32)
    assert algorithms.state_class(cfg.train.algorithm) is FFState


def test_names_that_are_not_registered_are_refused():
    with pytest.raises(ConfigError, match="data.dataset = 'toy2' is not one of mnist, .*toy"):
        Config().replace(data={"dataset": "toy2"})
    with pytest.raises(ConfigError, match="model.layer = 'conv' is not one of linear, toy_bias_free"):
        Config().replace(model={"layer": "conv"})
    with pytest.raises(ConfigError, match="toy has 64 inputs: set model.dims\\[0\\] = 64"):
        Config().replace(data={"dataset": "toy"})
    with pytest.raises(ValueError, match="registered already"):
        layers.register(BiasFreeLinear())
    with pytest.raises(ConfigError, match="model.layer = 'toy_bias_free' is a Forward-Forward setting"):
        Config().replace(model={"dims": (TOY_INPUTS, 8), "layer": "toy_bias_free"}, data={"dataset": "toy"},
                         train={"algorithm": "backprop"})


def test_a_registered_algorithm_is_configured_with_its_own_schedules():
    algorithms.register(algorithms.Algorithm(name="toy_algorithm", state=FFState, schedules=("sequential",)))
    try:
        cfg = Config().replace(train={"algorithm": "toy_algorithm"})
        assert algorithms.state_class(cfg.train.algorithm) is FFState
        with pytest.raises(ConfigError, match="run.schedule = 'federated' is not one train.algorithm = "
                                              "'toy_algorithm' runs; use sequential"):
            Config().replace(train={"algorithm": "toy_algorithm"}, run={"schedule": "federated"})
    finally:
        algorithms.ALGORITHMS.unregister("toy_algorithm")
    with pytest.raises(ConfigError, match="train.algorithm = 'toy_algorithm' is not one of ff, backprop"):
        Config().replace(train={"algorithm": "toy_algorithm"})


def test_the_toy_layer_kind_is_written_and_read_back(tmp_path):
    cfg = _cfg("sequential", 1, negatives="fixed", epochs=1, chapters=1)
    _, state, _ = _execute(cfg, MPI.COMM_SELF)
    ds = load_dataset(cfg.data)
    path = str(tmp_path / "model.h5")
    save_model(path, state.net, cfg, input_mean=ds.input_mean, input_std=ds.input_std, input_scale=1.0)
    arrays = weights_of(path)
    assert sorted(k for k in arrays if k.startswith("layers/")) == [f"layers/{k}/weight" for k in range(3)]
    model = load_model(path)
    assert model.attrs["layer"] == "toy_bias_free" and model.net.layers[0].bias is None
    got, want = _network(model), _network(state)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    x = read_toy(cfg.data).x_test
    assert torch.equal(model.predict(x), state.net.predict(model.normalize(x), "softmax"))


# ------------------------------------------------------------------------------ every schedule

SCHEDULES = ["sequential", "single_layer", "all_layers", "federated"]


@pytest.mark.parametrize("layer", ["toy_bias_free", "linear"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_gives_the_sequential_network(comm, schedule, layer):
    size = comm.Get_size()
    if schedule == "sequential" and size > 1:
        pytest.skip("sequential runs on one rank")
    cfg = _cfg(schedule, size, layer)
    plan, state, board = _execute(cfg, comm)
    ref_cfg = cfg.replace(run={"schedule": "sequential"}, data={"shards": plan.shards})
    _, ref, ref_board = _execute(ref_cfg, MPI.COMM_SELF)
    ok = True
    if comm.Get_rank() == plan.final_rank():
        got, want = _network(state), _network(ref)
        ok = (sorted(got) == sorted(want) and any(k.endswith("weight") for k in want)
              and all(torch.equal(got[k], want[k]) for k in want))
        first = {k for k in want if k.startswith("layers.0.")}
        ok = ok and first == ({"layers.0.weight", "layers.0.bias"} if layer == "linear" else {"layers.0.weight"})
    assert _all(comm, ok), f"rank {plan.final_rank()}: the {layer} network differs from the sequential run"
    # every evaluation saw the network of its own chapter, wherever it ran
    assert _all(comm, board is None or (board.acc == ref_board.acc and len(board.acc) == plan.num_chapters))


def test_the_schedules_have_power(comm):
    """The comparison above can fail: another negative policy gives another network."""
    if comm.Get_size() > 1:
        pytest.skip("one comparison on one rank is enough")
    _, adaptive, _ = _execute(_cfg("sequential", 1), comm)
    _, fixed, _ = _execute(_cfg("sequential", 1, negatives="fixed"), comm)
    a, f = _network(adaptive), _network(fixed)
    assert not all(torch.equal(a[k], f[k]) for k in a)


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_the_suite_under_mpiexec(ranks, tmp_path, mpff_launch):
    """This file under mpiexec, every rank running the in-process tests (as test_mpi.py runs
    tests/test_executor.py); each rank writes its own JUnit report."""
    if MPI.COMM_WORLD.Get_size() > 1:
        pytest.skip("already under mpiexec")
    from conftest import run_file_on_ranks

    run_file_on_ranks(mpff_launch, "tests/test_registry.py", ranks, tmp_path, min_tests=10)


WRAPPER = '''"""mpff train with a data set and a layer kind of one's own: register them, then hand over."""
import sys

sys.path.insert(0, {tests!r})
from test_registry import TOY_CLASSES, TOY_INPUTS, TOY_TEST, TOY_TRAIN, BiasFreeLinear, read_toy

from mpff import dataspec, layers
from mpff.__main__ import _exit
from mpff.cli import main

dataspec.register(dataspec.DataSpec(name="toy", reader=read_toy, title="toy", input_dim=TOY_INPUTS,
                                    num_classes=TOY_CLASSES, train_size=TOY_TRAIN, test_size=TOY_TEST,
                                    needs_path=False))
layers.register(BiasFreeLinear())
_exit(main())
'''


@pytest.mark.mpi
def test_mpff_train_takes_components_registered_by_a_wrapper_script(tmp_path, mpff_launch):
    """The command-line route (docs/architecture.md): a script registers, then calls mpff's own
    main; `mpiexec -n 2 python -m mpi4py wrapper.py train ...` trains the toy on All Layers."""
    import os
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(tests=os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "run"
    settings = ("data.dataset=toy", "data.train_subset=0", "data.test_subset=0", "model.dims=[64,32,32]",
                "model.layer=toy_bias_free", "run.schedule=all_layers", "train.epochs=2", "train.chapters=2",
                "train.batch_size=16", "run.report=false")
    cmd = [mpff_launch.mpiexec, "-n", "2", mpff_launch.python, "-m", "mpi4py", str(wrapper), "train",
           "--config", "tiny", "--out", str(out), "-q", *[x for s in settings for x in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=mpff_launch.root, env=mpff_launch.env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model = load_model(str(out / "model.h5"))
    assert [tuple(p.shape) for p in model.net.layers.parameters()] == [(32, 64), (32, 32)]  # no biases
    assert "96 train / 32 test samples" in proc.stdout, proc.stdout
