#!/bin/bash
# The refactor against the code before it (issue 9): the 2-rank speedup runs, alternately,
# with two checkouts on one machine; appends "code schedule round wall accuracy process-seconds"
# lines to /tmp/oldnew.log (results/before_after.log is that log). As run in the session that
# refactored mpff: the checkout before it at /work/wt-old (git worktree add /work/wt-old 2bb8bc3),
# after it at /work/main, both with the venv of /work/main.
# Old (2bb8bc3, before the refactor) against new code, same machine, alternating.
export MPIR_CVAR_ENABLE_HEAVY_YIELD=1
PY=/work/main/.venv/bin/python; MPX=/work/main/.venv/bin/mpiexec
SETS="--set model.dims=[784,1000,1000] --set train.epochs=20 --set train.chapters=20 --set train.batch_size=64 --set train.lr=0.01 --set train.negatives=random --set train.classifier=goodness --set train.eval_every=0 --set data.train_subset=0 --set data.test_subset=0 --set run.report=false --set train.threads=1"
for round in 1 2; do
 for code in old new; do
  for sched in all_layers single_layer; do
   if [ $code = old ]; then dir=/work/wt-old; extra=""; else dir=/work/main; extra="--set run.checkpoint_every=0"; fi
   out=/tmp/oldnew/$code-$sched-$round
   rm -rf $out
   cd "$dir" || exit 1
   t0=$(date +%s.%N)
   $MPX -n 2 $PY -m mpi4py -m mpff train --config $dir/configs/tiny.toml --out $out -q --force $SETS --set run.schedule=$sched $extra > /dev/null 2>&1
   t1=$(date +%s.%N)
   echo "$code $sched $round $(python3 -c "import json;d=json.load(open('$out/run.json'));print(round(d['wall_time'],1), d['test_accuracy'])") process $(echo "$t1-$t0"|bc)" >> /tmp/oldnew.log
  done
 done
done
