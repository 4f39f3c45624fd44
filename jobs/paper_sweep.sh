#!/usr/bin/env bash
# The paper's experiment grid as SLURM jobs: schedules x rank counts x negatives x
# classifiers x seeds, then one dependent job that writes the comparison report.
#
#   bash jobs/paper_sweep.sh [extra mpff train arguments]
#
# Run it from anywhere on a SLURM login node; it submits, prints the job ids and
# the sweep directory, and returns. Per schedule and rank count it submits one job
# array (one array task per negatives x classifier x seed, each a run directory
# SWEEP_DIR/<schedule>-<negatives>-<classifier>[-n<ranks>][-seed<seed>]/, trained
# by jobs/slurm_single_node.sbatch; -n<ranks> appears when the schedule runs at
# several rank counts, -seed<seed> when there are several seeds), because the
# arrays need different numbers of ranks. Then a report job, --dependency=afterany
# on all arrays, runs
#   mpff report SWEEP_DIR/<finished runs> [--predict] --out SWEEP_DIR/report
# which pairs each run with the Sequential run of the same problem (the same seed
# where there is one), groups the runs that differ only in their seed (mean and
# spread) and draws speedup against ranks: one submission gives a scaling curve
# with its spread over seeds. The report job fails (after writing the report) if
# any run did not finish.
#
# Environment (defaults in brackets; lists are space-separated):
#   MPFF_SWEEP_CONFIG       preset [configs/paper.toml]
#   MPFF_SWEEP_SCHEDULES    [sequential single_layer all_layers] (federated too)
#   MPFF_SWEEP_NEGATIVES    [adaptive random fixed]
#   MPFF_SWEEP_CLASSIFIERS  [goodness softmax]
#   MPFF_SWEEP_SEEDS        [0] train.seed of every run, e.g. "0 1 2"
#   MPFF_SWEEP_RANKS        [4] rank counts of every parallel schedule, e.g. "2 4 8 16"
#   MPFF_SWEEP_NP_SEQUENTIAL [1], MPFF_SWEEP_NP_SINGLE_LAYER, MPFF_SWEEP_NP_ALL_LAYERS,
#   MPFF_SWEEP_NP_FEDERATED [MPFF_SWEEP_RANKS]
#                           rank counts (= GPUs) of that schedule's runs;
#                           single_layer needs ranks <= layers (4 in the paper's net),
#                           federated adaptive needs train.adaptive_lag = ranks - 1
#   MPFF_SWEEP_RANKS_PER_NODE [unset: every run on one node] ranks (GPUs) per node:
#                           a run of N ranks asks for ceil(N / this) nodes
#   MPFF_GPUS_PER_TASK      [1]; 0 on a CPU-only cluster
#   MPFF_SWEEP_CPUS_PER_TASK  [unset: the site default] CPUs (torch threads) per rank
#   MPFF_SWEEP_TIME         time limit of each run [04:00:00]
#   MPFF_SWEEP_MAX_PARALLEL at most this many runs of one array at once [unset]
#   MPFF_SWEEP_SET          extra overrides for every run, "k=v k=v" (no spaces
#                           inside a value: model.dims=[784,500,500])
#   MPFF_SWEEP_DIR          [outputs/sweep-<date>-<time>], must not hold a sweep
#   MPFF_SWEEP_BASELINE     run name to force as the report's single baseline (the
#                           report refuses it for a run of another problem)
#   MPFF_SWEEP_PREDICT=1    the report adds the predicted time and speedup curve
#   MPFF_SWEEP_SBATCH_ARGS  extra sbatch options for every job, word-split
#                           (e.g. "-p gpu -A myproject"; SBATCH_PARTITION and
#                           SBATCH_ACCOUNT in the environment work too)
#   MPFF_SWEEP_DRY_RUN=1    print the sbatch commands instead of submitting
#   MPFF_PYTHON, MPFF_SRUN_MPI, MPFF_LAUNCHER, ... as in jobs/slurm_launch.sh
#                           (MPFF_LAUNCHER=mpiexec: the mpiexec fallback for an
#                           MPI without SLURM support)
# Shrunk, e.g. a smoke test of the whole machinery in a few minutes:
#   MPFF_SWEEP_CONFIG=configs/tiny.toml MPFF_SWEEP_SCHEDULES="sequential all_layers" \
#   MPFF_SWEEP_NEGATIVES=random MPFF_SWEEP_CLASSIFIERS=goodness bash jobs/paper_sweep.sh
# A scaling curve with spread: All Layers on 2..16 GPUs (4 per node), 3 seeds each:
#   MPFF_SWEEP_SCHEDULES="sequential all_layers" MPFF_SWEEP_NEGATIVES=random \
#   MPFF_SWEEP_CLASSIFIERS=goodness MPFF_SWEEP_SEEDS="0 1 2" MPFF_SWEEP_RANKS="2 4 8 16" \
#   MPFF_SWEEP_RANKS_PER_NODE=4 MPFF_SWEEP_PREDICT=1 bash jobs/paper_sweep.sh
#
# Internal: `jobs/paper_sweep.sh --report SWEEP_DIR` is what the report job runs.
set -euo pipefail

say() { echo "mpff-sweep: $*"; }
die() {
  echo "mpff-sweep: error: $*" >&2
  exit 2
}

if [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_SUBMIT_DIR:-}" ]; then
  root="$SLURM_SUBMIT_DIR" # sbatch ran a copy of this script from its spool
else
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fi
cd "$root"
[ -f jobs/slurm_launch.sh ] || die "cannot find the mpff repository (in $(pwd))"

pick_python() {
  if [ -n "${MPFF_PYTHON:-}" ]; then
    echo "$MPFF_PYTHON"
  elif [ -x .venv/bin/python ]; then
    echo .venv/bin/python
  else
    echo python3
  fi
}

# ---------------------------------------------------------------- report job
report() {
  local dir="$1" name status
  [ -f "$dir/sweep.runs" ] || die "$dir is not a sweep directory (no sweep.runs)"
  local finished=() missing=()
  while read -r name; do
    [ -n "$name" ] || continue
    status="$(sed -n 's/.*"status": *"\([a-z_]*\)".*/\1/p' "$dir/$name/run.json" 2>/dev/null | head -n 1)"
    if [ "$status" = finished ]; then
      finished+=("$dir/$name")
    else
      missing+=("$name (${status:-no run.json})")
    fi
  done <"$dir/sweep.runs"
  if [ "${#missing[@]}" -gt 0 ]; then
    say "runs that did not finish: ${missing[*]}"
  fi
  [ "${#finished[@]}" -gt 0 ] || die "no run of the sweep finished; nothing to report (logs: $dir/logs)"
  # Without a forced baseline, `mpff report` pairs every run with the Sequential run of
  # its own problem (and seed): a single Sequential run of another problem (other
  # negatives, a failed twin) must never become everyone's baseline.
  local extra=()
  if [ -n "${MPFF_SWEEP_BASELINE:-}" ]; then
    extra+=(--baseline "$dir/$MPFF_SWEEP_BASELINE")
  fi
  if [ "${MPFF_SWEEP_PREDICT:-0}" = 1 ]; then
    extra+=(--predict)
  fi
  # the site's set-up (module loads, conda), as jobs/slurm_launch.sh sources it for the runs
  local setup="${MPFF_SETUP-jobs/site_setup.sh}" status
  if [ -n "$setup" ]; then
    if [ -f "$setup" ]; then
      say "sourcing $setup"
      set +u
      # shellcheck source=/dev/null
      source "$setup"
      status=$?
      set -u
      [ "$status" = 0 ] || die "the set-up file $setup failed (exit $status)"
    elif [ -n "${MPFF_SETUP:-}" ]; then
      die "MPFF_SETUP=$setup: no such file"
    fi
  fi
  local python rc=0
  python="$(pick_python)"
  say "$python -m mpff report ${finished[*]} ${extra[*]} --out $dir/report"
  "$python" -m mpff report "${finished[@]}" ${extra[@]+"${extra[@]}"} --out "$dir/report" || rc=$?
  if [ "$rc" -ne 0 ]; then
    say "mpff report failed with exit code $rc"
    exit "$rc"
  fi
  if [ "${#missing[@]}" -gt 0 ]; then
    say "report written to $dir/report/report.md, but ${#missing[@]} run(s) did not finish"
    exit 1
  fi
  say "report written to $dir/report/report.md"
}

if [ "${1:-}" = "--report" ]; then
  [ -n "${2:-}" ] || die "usage: jobs/paper_sweep.sh --report SWEEP_DIR"
  report "$2"
  exit 0
fi

# ---------------------------------------------------------------- submission
config="${MPFF_SWEEP_CONFIG:-configs/paper.toml}"
read -r -a schedules <<<"${MPFF_SWEEP_SCHEDULES:-sequential single_layer all_layers}"
read -r -a negatives <<<"${MPFF_SWEEP_NEGATIVES:-adaptive random fixed}"
read -r -a classifiers <<<"${MPFF_SWEEP_CLASSIFIERS:-goodness softmax}"
read -r -a seeds <<<"${MPFF_SWEEP_SEEDS:-0}"
read -r -a extra_sets <<<"${MPFF_SWEEP_SET:-}"
read -r -a sbatch_args <<<"${MPFF_SWEEP_SBATCH_ARGS:-}"
gpus="${MPFF_GPUS_PER_TASK:-1}"
per_node="${MPFF_SWEEP_RANKS_PER_NODE:-}"
runtime="${MPFF_SWEEP_TIME:-04:00:00}"
dir="${MPFF_SWEEP_DIR:-outputs/sweep-$(date +%Y%m%d-%H%M%S)}"
dry="${MPFF_SWEEP_DRY_RUN:-0}"

[ -f "$config" ] || die "no preset $config (MPFF_SWEEP_CONFIG)"
if [ "${#schedules[@]}" -eq 0 ] || [ "${#negatives[@]}" -eq 0 ] || [ "${#classifiers[@]}" -eq 0 ] ||
  [ "${#seeds[@]}" -eq 0 ]; then
  die "MPFF_SWEEP_SCHEDULES, MPFF_SWEEP_NEGATIVES, MPFF_SWEEP_CLASSIFIERS and MPFF_SWEEP_SEEDS must not be empty"
fi
case "$gpus" in '' | *[!0-9]*) die "MPFF_GPUS_PER_TASK must be a number, not '$gpus'" ;; esac
for seed in "${seeds[@]}"; do
  case "$seed" in *[!0-9]*) die "MPFF_SWEEP_SEEDS must list non-negative integers, not '$seed'" ;; esac
done
case "$per_node" in *[!0-9]* | 0) die "MPFF_SWEEP_RANKS_PER_NODE must be a positive number, not '$per_node'" ;; esac
if [ -e "$dir/sweep.runs" ]; then
  die "$dir already holds a sweep; choose another MPFF_SWEEP_DIR"
fi
if [ "$dry" != 1 ] && ! command -v sbatch >/dev/null; then
  die "sbatch not found: run this on a SLURM login node (MPFF_SWEEP_DRY_RUN=1 prints the jobs)"
fi

ranks_for() { # sets rank_counts to the rank counts of a schedule (in this shell: die exits)
  local var list n
  var="MPFF_SWEEP_NP_$(echo "$1" | tr '[:lower:]' '[:upper:]')"
  list="${!var:-}"
  if [ -z "$list" ]; then
    case "$1" in
      sequential) list=1 ;;
      *) list="${MPFF_SWEEP_RANKS:-4}" var=MPFF_SWEEP_RANKS ;;
    esac
  fi
  read -r -a rank_counts <<<"$list"
  for n in "${rank_counts[@]}"; do
    case "$n" in *[!0-9]* | 0) die "$var must list positive numbers: '$n' must be a positive number" ;; esac
  done
}

for schedule in "${schedules[@]}"; do # check every axis before submitting anything
  case "$schedule" in
    sequential | single_layer | all_layers | federated) ;;
    *) die "unknown schedule '$schedule' in MPFF_SWEEP_SCHEDULES" ;;
  esac
  ranks_for "$schedule"
  if [ "$schedule" = sequential ] && [ "${rank_counts[*]}" != 1 ]; then
    die "the sequential schedule runs on 1 rank, not ${rank_counts[*]}"
  fi
done

submit() { # prints the job id
  if [ "$dry" = 1 ]; then
    local v
    for v in MPFF_CONFIG MPFF_ARRAY_DIR MPFF_ARRAY_RUNS; do
      [ -z "${!v:-}" ] || printf '%s=%q ' "$v" "${!v}" >&2
    done
    printf 'sbatch' >&2
    printf ' %q' "$@" >&2
    echo >&2
    echo "DRYRUN$RANDOM"
  else
    sbatch --parsable "$@" | cut -d';' -f1
  fi
}

mkdir -p "$dir/logs"
: >"$dir/sweep.runs.tmp"
ids=()
say "sweep directory $dir"
for schedule in "${schedules[@]}"; do
  ranks_for "$schedule"
  for np in "${rank_counts[@]}"; do
    runs=()
    for neg in "${negatives[@]}"; do
      for cls in "${classifiers[@]}"; do
        for seed in "${seeds[@]}"; do
          name="$schedule-$neg-$cls"
          [ "${#rank_counts[@]}" -eq 1 ] || name="$name-n$np"
          [ "${#seeds[@]}" -eq 1 ] || name="$name-seed$seed"
          entry="$name run.schedule=$schedule train.negatives=$neg train.classifier=$cls"
          [ "${#seeds[@]}" -eq 1 ] && [ "$seed" = 0 ] || entry="$entry train.seed=$seed"
          [ "${#extra_sets[@]}" -eq 0 ] || entry="$entry ${extra_sets[*]}"
          runs+=("$entry")
          echo "$name" >>"$dir/sweep.runs.tmp"
        done
      done
    done
    joined="$(printf '%s;' "${runs[@]}")"
    if [ -z "$per_node" ]; then
      layout=(--nodes=1 --ntasks-per-node="$np")
    else
      nodes=$(((np + per_node - 1) / per_node))
      layout=(--nodes="$nodes" --ntasks="$np" --ntasks-per-node="$((np < per_node ? np : per_node))")
    fi
    opts=(--job-name="mpff-$schedule" --array="0-$((${#runs[@]} - 1))${MPFF_SWEEP_MAX_PARALLEL:+%$MPFF_SWEEP_MAX_PARALLEL}"
      "${layout[@]}" --gpus-per-task="$gpus" --time="$runtime"
      --output="$dir/logs/%x-%A_%a.out")
    if [ -n "${MPFF_SWEEP_CPUS_PER_TASK:-}" ]; then
      opts+=(--cpus-per-task="$MPFF_SWEEP_CPUS_PER_TASK")
    fi
    # Passed through the environment (sbatch exports it), not --export=, because
    # values may hold commas.
    id="$(MPFF_CONFIG="$config" MPFF_ARRAY_DIR="$dir" MPFF_ARRAY_RUNS="${joined%;}" MPFF_OUT='' \
      submit ${sbatch_args[@]+"${sbatch_args[@]}"} "${opts[@]}" jobs/slurm_single_node.sbatch "$@")"
    [ -n "$id" ] || die "sbatch returned no job id for $schedule"
    ids+=("$id")
    say "$schedule: job array $id, ${#runs[@]} run(s) of $np rank(s)"
  done
done
mv "$dir/sweep.runs.tmp" "$dir/sweep.runs"

deps="$(printf ':%s' "${ids[@]}")"
report_id="$(submit ${sbatch_args[@]+"${sbatch_args[@]}"} --job-name=mpff-sweep-report \
  --dependency="afterany$deps" --nodes=1 --ntasks=1 --time=00:30:00 \
  --output="$dir/logs/%x-%j.out" jobs/paper_sweep.sh --report "$dir")"
say "report: job $report_id (after $(IFS=,; echo "${ids[*]}")) -> $dir/report/report.md"
{
  echo "config=$config"
  echo "schedules=${schedules[*]}"
  echo "negatives=${negatives[*]}"
  echo "classifiers=${classifiers[*]}"
  echo "seeds=${seeds[*]}"
  echo "ranks_per_node=${per_node}"
  echo "set=${extra_sets[*]:-}"
  echo "args=$*"
  echo "arrays=${ids[*]}"
  echo "report=$report_id"
} >"$dir/sweep.jobs"
echo "$report_id" >"$dir/report.jobid"
say "follow with: squeue -u ${USER:-$(id -un)}; tail -f $dir/logs/*.out"
