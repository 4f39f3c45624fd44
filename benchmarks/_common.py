"""Shared helpers for the benchmarks: run mpff as users do (a subprocess) and read its outputs."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
VENV_BIN = os.path.dirname(sys.executable)


def mpff_train(out: str, *, config: str, sets: list[str], ranks: int = 1, env: dict | None = None,
               timeout: float | None = None, root: str = ROOT) -> dict:
    """Run `mpff train` (under mpiexec when ranks > 1) and return its run.json plus the wall time.
    ``root``: the checkout whose mpff runs (another commit's worktree, for before/after runs)."""
    cmd = [sys.executable, "-m", "mpi4py", "-m", "mpff", "train", "--config", config, "--out", out,
           "--force", "-q"]
    for s in sets:
        cmd += ["--set", s]
    if ranks > 1:
        cmd = [os.path.join(VENV_BIN, "mpiexec"), "-n", str(ranks)] + cmd
    e = dict(os.environ)
    e.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
    e.update(env or {})
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=e, text=True, capture_output=True, timeout=timeout)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    with open(os.path.join(out, "run.json")) as fh:
        run = json.load(fh)
    run["process_wall_time"] = elapsed
    return run


def span_seconds(run_dir: str, kinds: tuple[str, ...]) -> list[float]:
    """Per rank: seconds spent in spans of the given kinds (the run read by mpff.analysis.runs)."""
    import numpy as np

    from mpff.analysis.runs import load_run
    return [float((rt.spans["end"] - rt.spans["start"])[np.isin(rt.kinds, kinds)].sum())
            for rt in load_run(run_dir).ranks]


def read_json(path: str) -> dict | None:
    """A JSON file's contents, or None where it is missing or unreadable."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def write_result(name: str, data: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    data = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host_cpus": os.cpu_count(), **data}
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    print(json.dumps(data, indent=2))
    print(f"wrote {path}")
    return path


median = statistics.median
