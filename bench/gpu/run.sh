#!/bin/bash
# The benchmarks on a lent GPU machine (built by bench/gpu/stage.sh; docs/benchmarks.md, "On a GPU"):
# the matrix's missing prompts tuned in parallel processes, then the matrix and the policy bench side
# by side, each under a timeout so that what was computed comes back in $OUT/results.tgz
# (bench/cache, bench/results) before the call ends. Settings (environment):
#   TASKS (sst2_plain imdb_plain), TUNE_S (tuning ends this many seconds after the start, 210),
#   TOTAL_S (the benches end, 520), MATRIX_ARGS / POLICY_ARGS (more arguments for each bench).
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 MPLBACKEND=Agg
start=$(date +%s); until_() { echo $(( $1 - ($(date +%s) - start) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site
# the configs read ../shared beside the checkout: /work/shared beside /work/main, as on the CPU machine
mkdir -p /work/shared/models /work/shared/data
for f in .gpu1/*.tar.xz .gpu2/small-c.tar.xz; do [ -f "$f" ] && tar -C /work/shared/models -xJf "$f"; done
tar -C /work/shared/data -xJf .gpu2/imdb.tar.xz
if [ "$PWD" != /work/main ]; then
  mkdir -p /work/main && tar --exclude=./.gpu1 --exclude=./.gpu2 --exclude=./.whl -cf - . | tar -C /work/main -xf -
  cd /work/main
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, lightning, mlflow_recycle.job, datasets; print(torch.__version__, transformers.__version__, lightning.__version__)" || exit 4
timeout 120 python3 bench/gpu/parity.py > "$OUT/parity.log" 2>&1; tail -7 "$OUT/parity.log"  # device parity first
G="--tasks ${TASKS:-sst2_plain imdb_plain} --set trainer.accelerator=gpu"
stop() { pkill -f bench/ ; sleep 1; }
timeout -k 5 "$(until_ "${TUNE_S:-210}")" python3 bench/recycling_matrix.py $G --workers 16 --tune-only > "$OUT/tune.log" 2>&1
echo "tuning: rc $? after $(( $(date +%s) - start )) s"; stop
budget=$(until_ "${TOTAL_S:-520}")
timeout -k 5 "$budget" python3 bench/recycling_matrix.py $G --workers 8 $MATRIX_ARGS > "$OUT/matrix.log" 2>&1 &
timeout -k 5 "$budget" python3 bench/migration_policy.py $G --workers 8 $POLICY_ARGS > "$OUT/policy.log" 2>&1
echo "policy: rc $?"; wait; echo "benches done after $(( $(date +%s) - start )) s"; stop
tar -czf "$OUT/results.tgz" bench/cache bench/results
ls -la "$OUT"
