#!/usr/bin/env bash
# One short accelerator session for docs/benchmarks.md and docs/precision.md (issue 13 on a GPU):
#
#   OUT=/tmp/gpu_report bash scripts/gpu_report.sh
#
# 1. scripts/precision_report.py --baseline=reference: bf16 kernels vs the float32 reference at 4K and 8K (block-sparse with 64- and
#    32-token blocks, linear attention causal and not);
# 2. scripts/benchmark.py in bfloat16 at 4K and 16K with every variant that has a GPU kernel, at registry defaults
#    (the kernels are chosen where the step is lowered), then local, bigbird and linear again with
#    --implementation=xla: kernels vs XLA on the same device; fallback log lines of both runs to fallbacks.txt;
# 3. ListOps runlocal in bfloat16 (head dim 64, attention dropout 0.1: the dropout hash inside the kernels, under the
#    training mesh) with local, bigbird and linear, kernels vs implementation=xla, 60 steps each; steps/s and loss
#    from metrics.jsonl.
# Every phase has a time limit; a phase that runs out is reported as such. On an H100 the four phases need about
# 90 + 330 + 200 + 200 seconds (each benchmark variant is a worker process of its own: start-up, softmax baseline
# and two compilations), more than one 600-second device call: run them in two calls, e.g.
#   PHASES="tolerance bench" OUT=... bash scripts/gpu_report.sh;  PHASES="xla listops" OUT=... bash scripts/gpu_report.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_report}
PHASES=${PHASES:-tolerance bench xla listops}
mkdir -p "$OUT"
want() { [[ " $PHASES " == *" $1 "* ]]; }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

if want tolerance; then
timeout "${TOL_SECONDS:-150}" python3 scripts/precision_report.py --baseline=reference --lengths=4096,8192 --output="$OUT/tolerance.md" \
  > /tmp/tolerance.log 2>&1 || echo "tolerance phase ended with status $?"
grep "^| " /tmp/tolerance.log | sort -u
fi

if want bench; then
timeout "${BENCH_SECONDS:-330}" python3 scripts/benchmark.py --dtype=bfloat16 --lengths=4096,16384 \
  --attention=local,bigbird,longformer,sparse_transformer,linear,transnormer --steps=10 --warmup=2 \
  --timeout=60 --output_dir=/tmp/gpu_bench > /tmp/bench.log 2>&1 || echo "benchmark phase ended with status $?"
cp /tmp/gpu_bench/benchmark.md /tmp/gpu_bench/benchmark.csv /tmp/gpu_bench/benchmark.png "$OUT/" 2>/dev/null
grep -h "@" /tmp/bench.log | sed 's/^/bench: /'
fi

if want xla; then
timeout "${XLA_SECONDS:-200}" python3 scripts/benchmark.py --dtype=bfloat16 --lengths=4096,16384 \
  --attention=local,bigbird,linear --implementation=xla --steps=10 --warmup=2 \
  --timeout=60 --output_dir=/tmp/gpu_bench_xla > /tmp/bench_xla.log 2>&1 || echo "xla benchmark phase ended with status $?"
cp /tmp/gpu_bench_xla/benchmark.csv "$OUT/benchmark_xla.csv" 2>/dev/null
grep -h "@" /tmp/bench_xla.log | sed 's/^/bench xla: /'
fi
grep -rh "cannot serve\|Error" /tmp/gpu_bench/logs /tmp/gpu_bench_xla/logs 2>/dev/null | sort | uniq -c \
  > "$OUT/fallbacks.txt"
cat "$OUT/fallbacks.txt"

want listops && for variant in local bigbird linear; do
  for impl in default xla; do
    extra=()
    [ "$impl" = xla ] && extra=(--config.model.attention.implementation=xla)
    timeout "${LISTOPS_SECONDS:-40}" python3 train.py --config "configs/lra/listops.py:runlocal,attention=$variant" \
      --workdir "/tmp/listops_${variant}_${impl}" --config.model.dtype=bfloat16 --config.model.qkv_dim=256 \
      --config.model.num_heads=4 --config.model.attention_dropout_rate=0.1 --config.train.num_steps=60 \
      --config.train.log_every_steps=30 --config.train.eval_every_steps=60 --config.train.checkpoint_every_steps=60 \
      --config.train.num_eval_batches=1 "${extra[@]}" > "/tmp/listops_${variant}_${impl}.log" 2>&1 \
      || echo "listops $variant $impl ended with status $?"
    grep -h "cannot serve" "/tmp/listops_${variant}_${impl}.log" | sed "s/^/listops $variant $impl: /" | tee -a "$OUT/listops.txt"
    grep -h steps_per_second "/tmp/listops_${variant}_${impl}/metrics.jsonl" | tail -1 \
      | sed "s/^/listops $variant $impl: /" | tee -a "$OUT/listops.txt"
  done
done
tar czf "$OUT/logs.tgz" /tmp/*.log /tmp/gpu_bench/logs /tmp/gpu_bench_xla/logs 2>/dev/null
echo "gpu_report done"
