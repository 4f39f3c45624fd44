#!/usr/bin/env bash
# The GPU checks in one call (issues 14, 21): the CUDA tests, Sequential's per-epoch time at the
# paper's width for fp32, tf32 and bf16, then rows of the paper's Table 1 at its width. Made for
# the workplace's `device` tool (a GPU machine whose python3 has a CUDA torch but no MPI runtime
# and no network), usable on any GPU node:
#
#   here, once:  echo /.whl/ >> .git/info/exclude
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 \
#                  -d .whl mpich==5.0.2 mpi4py==4.1.2
#   there:       run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560)
#
# Everything it prints and writes lands in $OUT (./gpu_check without one): versions.txt,
# cuda_tests.log, precision.log and precision_cuda.json (copied to benchmarks/results too).
# Each step has its own time limit so that one hang still leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

if compgen -G ".whl/*.whl" >/dev/null; then  # an MPI runtime (mpiexec, libmpi) and mpi4py for it
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --prefix /tmp/mpff-mpi .whl/*.whl \
        || exit 1
    site=$(ls -d /tmp/mpff-mpi/lib/python3*/site-packages)
    export PATH=/tmp/mpff-mpi/bin:$PATH LD_LIBRARY_PATH=/tmp/mpff-mpi/lib:${LD_LIBRARY_PATH:-} PYTHONPATH=$site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} MPIR_CVAR_ENABLE_HEAVY_YIELD=1

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" -c "import torch, mpi4py; from mpi4py import MPI
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))
print('mpi4py', mpi4py.__version__, MPI.Get_library_version().splitlines()[0])"
} 2>&1 | tee "$OUT/versions.txt"

timeout 200 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
tests=${PIPESTATUS[0]}

timeout 300 "$PY" benchmarks/precision.py --device cuda --dims 784 2000 2000 2000 2000 \
    --precisions fp32 tf32 bf16 --seeds 0 --epochs 2 2>&1 | tee "$OUT/precision.log"
bench=${PIPESTATUS[0]}
cp benchmarks/results/precision_cuda.json "$OUT/" 2>/dev/null

# The paper's Table 1 at its own width (issue 21), 2 ranks sharing the GPU, each row under its
# own time limit (a row stopped by it is kept as "preempted" with its accuracy so far).
# MPFF_PAPER_ROWS picks the rows (benchmarks/paper_table.py --list), MPFF_PAPER_ROW_LIMIT the seconds.
table=0
for row in ${MPFF_PAPER_ROWS:-random-goodness adaptive-goodness}; do
    timeout $(( ${MPFF_PAPER_ROW_LIMIT:-240} + 60 )) "$PY" benchmarks/paper_table.py "$row" --device cuda \
        --dims 784 2000 2000 2000 2000 --time-limit "${MPFF_PAPER_ROW_LIMIT:-240}" \
        --runs /tmp/mpff-paper-table 2>&1 | tee -a "$OUT/paper_table.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || table=1
done
cp benchmarks/results/paper_table/*2000x2000x2000x2000*.json "$OUT/" 2>/dev/null

echo "cuda tests: exit $tests; precision benchmark: exit $bench; paper table: exit $table"
exit $(( tests != 0 || bench != 0 || table != 0 ))
