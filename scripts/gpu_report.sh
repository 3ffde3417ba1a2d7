#!/usr/bin/env bash
# One short accelerator session for docs/benchmarks.md (issue 12's GPU table, issue 13's kernels-vs-XLA runs).
#
#   OUT=/tmp/gpu_report bash scripts/gpu_report.sh
#
# 1. scripts/benchmark.py in bfloat16 at 4K and 16K tokens for softmax, local, bigbird and linear (the
#    kernels are chosen where the step is lowered: Pallas on cuda/tpu);
# 2. ListOps runlocal in bfloat16 (head dim 64, block size 64) with bigbird and linear, kernels (implementation left
#    to the dispatcher) vs implementation=xla, 100 steps each; steps/s from metrics.jsonl.
# Every phase has a time limit so the whole fits one device call; a phase that runs out is reported as such.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_report}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

timeout "${BENCH_SECONDS:-200}" python3 scripts/benchmark.py --dtype=bfloat16 --lengths=4096,16384 \
  --attention=softmax,local,bigbird,linear --steps=10 --warmup=2 \
  --timeout=60 --output_dir=/tmp/gpu_bench || echo "benchmark phase ended with status $?"
cp /tmp/gpu_bench/benchmark.md /tmp/gpu_bench/benchmark.csv /tmp/gpu_bench/benchmark.png "$OUT/" 2>/dev/null

for variant in bigbird linear; do
  for impl in default xla; do
    extra=()
    [ "$impl" = xla ] && extra=(--config.model.attention.implementation=xla)
    [ "$variant" = bigbird ] && extra+=(--config.model.attention.block_size=64)
    timeout "${LISTOPS_SECONDS:-35}" python3 train.py --config "configs/lra/listops.py:runlocal,attention=$variant" \
      --workdir "/tmp/listops_${variant}_${impl}" --config.model.dtype=bfloat16 --config.model.qkv_dim=256 \
      --config.model.num_heads=4 --config.train.num_steps=100 --config.train.log_every_steps=50 --config.train.eval_every_steps=100 \
      --config.train.checkpoint_every_steps=100 --config.train.num_eval_batches=1 "${extra[@]}" \
      > "$OUT/listops_${variant}_${impl}.log" 2>&1 || echo "listops $variant $impl ended with status $?"
    grep -h steps_per_second "/tmp/listops_${variant}_${impl}/metrics.jsonl" | tail -1 \
      | sed "s/^/listops $variant $impl: /" | tee -a "$OUT/listops.txt"
  done
done
