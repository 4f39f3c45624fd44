"""What mpff sets before MPI starts (mpff.mpienv), and that it is set before MPI starts.

The multi-node case: under ``srun --mpi=pmi2`` on two nodes, the PyPI mpich's UCX netmod
publishes its address through PMI-1 lines longer than the 1024 bytes slurmstepd reads, and
MPI_Init fails at random (CI run of 2026-12-02: ``value not properly terminated in client
request``, then UCX ``Destination is unreachable``). tests/test_slurm.py runs the two-node jobs;
here the decision itself, on every side of each condition.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from mpff.mpienv import multi_node_pmi2, prepare

TWO_NODE_PMI2 = {"SLURM_MPI_TYPE": "pmi2", "PMI_FD": "11", "SLURM_STEP_NUM_NODES": "2"}


def test_two_node_pmi2_with_the_pypi_mpich_takes_ofi():
    env = dict(TWO_NODE_PMI2)
    done = prepare(env, mpich=True)
    assert env["MPIR_CVAR_CH4_NETMOD"] == "ofi"
    assert done == {"UCX_DEBUG_SIGNO": "0", "MPIR_CVAR_CH4_NETMOD": "ofi"}


@pytest.mark.parametrize("change", [
    {"SLURM_STEP_NUM_NODES": "1"},         # one node: MPICH exchanges nothing through PMI
    {"SLURM_MPI_TYPE": "pmix"},            # another PMI plugin
    {"SLURM_MPI_TYPE": None},              # not started by srun (mpiexec, Hydra)
    {"PMI_FD": None},                      # srun without a PMI server for the task
    {"SLURM_STEP_NUM_NODES": "two"},       # nonsense is no reason to change the transport
])
def test_ucx_stays_elsewhere(change):
    env = dict(TWO_NODE_PMI2)
    for key, value in change.items():
        if value is None:
            env.pop(key)
        else:
            env[key] = value
    assert not multi_node_pmi2(env)
    prepare(env, mpich=True)
    assert "MPIR_CVAR_CH4_NETMOD" not in env


def test_a_site_mpi_is_not_touched():
    env = dict(TWO_NODE_PMI2)
    prepare(env, mpich=False)
    assert "MPIR_CVAR_CH4_NETMOD" not in env


def test_the_users_values_win():
    env = dict(TWO_NODE_PMI2, MPIR_CVAR_CH4_NETMOD="ucx", UCX_DEBUG_SIGNO="1")
    assert prepare(env, mpich=True) == {}
    assert env["MPIR_CVAR_CH4_NETMOD"] == "ucx" and env["UCX_DEBUG_SIGNO"] == "1"


SPY = textwrap.dedent("""
    import json, os, sys
    import mpff.mpienv as m
    seen = {}
    real = m.prepare
    def spy(*args, **kwargs):
        seen["mpi_loaded"] = "mpi4py.MPI" in sys.modules
        return real(*args, **kwargs)
    m.prepare = spy
    from mpff.cli import main
    rc = main(["info"])
    from mpi4py import MPI
    seen["rc"] = rc
    seen["netmod"] = os.environ.get("MPIR_CVAR_CH4_NETMOD")
    print("SPY " + json.dumps(seen))
""")


def test_prepare_runs_before_mpi_starts(tmp_path):
    """``python -m mpi4py -m PKG`` as the job scripts start mpff: prepare() sees no MPI loaded.

    (The two-node environment variables are not faked here: a PMI_FD that leads nowhere would
    stop MPI_Init; test_slurm's two-node job records the netmod in run.json.)"""
    (tmp_path / "spympff").mkdir()
    (tmp_path / "spympff" / "__init__.py").write_text("")
    (tmp_path / "spympff" / "__main__.py").write_text(SPY)
    proc = subprocess.run([sys.executable, "-m", "mpi4py", "-m", "spympff"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SPY ")][-1]
    seen = json.loads(line[4:])
    assert seen == {"mpi_loaded": False, "rc": 0, "netmod": None}
