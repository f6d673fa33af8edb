#!/usr/bin/env bash
# The GPU benchmark in one call (about 3 minutes on one H100 with 16 cores, at most ~4.5 by the steps' timeouts).
# Headline: ResNet-50 bf16 embed_shard end to end (row d), with the code's default pipeline settings, plus a
# sweep of $SWEEP settings as extra "d sweep" rows (one run each) and each run's ms/batch per stage.
# Needs python3 with torch (CUDA build), numpy, pyarrow, fsspec, pillow; torchvision for nvjpeg, ray optional.
# Prints the same table as the CPU run of bench/embed_bench.py; with $OUT set, tables and JSON land there.
#   bash bench/gpu_check.sh            # on the device machine
#   SMALL=1 DEVICE=cpu bash bench/gpu_check.sh   # the same script end to end on a CPU, tiny sizes
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-}
if [ "${SMALL:-0}" = 1 ]; then
  IMAGES=64 UNIQUE=32 BATCH=16 MODELS="refcnn-v1" SWEEP=${SWEEP-"prefetch=1;fetch=4"}
else
  IMAGES=${IMAGES:-32768} UNIQUE=${UNIQUE:-4096} BATCH=${BATCH:-256} MODELS=${MODELS:-"resnet50 resnet18"}
  SWEEP=${SWEEP-"prefetch=1;prefetch=6,fetch=32;fetch=8;batch=512"}
fi
log=${OUT:+$OUT/gpu_check.log}
[ -n "$OUT" ] && mkdir -p "$OUT"
say() { echo "== $*" | tee -a ${log:-/dev/null}; }
failures=0
step() {  # step <seconds> <name> <command...>: one failing or slow step does not stop the others
  local limit=$1 name=$2; shift 2
  say "$name: $*"
  local began=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a ${log:-/dev/null}
  local rc=${PIPESTATUS[0]}
  say "$name: rc=$rc in $((SECONDS - began))s"
  [ "$rc" = 0 ] || failures=$((failures + 1))
}

say "machine: $(nproc) cores, $(uname -m); $(date -u +%FT%TZ)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a ${log:-/dev/null}
$PY - <<'PY' 2>&1 | tee -a ${log:-/dev/null}
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("torchvision", "ray", "faiss", "dagster"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(name, "not installed:", type(exc).__name__)
PY
step 40 "nvjpeg fallback" $PY bench/gpu_fallback_check.py
first=${MODELS%% *}
for model in $MODELS; do
  if [ "$model" = "$first" ]; then  # the headline: best of $REPEAT rounds, then the sweep
    step 120 "embed bench $model bf16" $PY bench/embed_bench.py --device "$DEVICE" --model "$model" --precision bf16 \
      --images "$IMAGES" --unique "$UNIQUE" --batch "$BATCH" --repeat "${REPEAT:-2}" --skip "${SKIP:-ray}" --sweep "$SWEEP" ${OUT:+--out "$OUT"}
  else
    step 50 "embed bench $model bf16" $PY bench/embed_bench.py --device "$DEVICE" --model "$model" --precision bf16 \
      --images "$IMAGES" --unique "$UNIQUE" --batch "$BATCH" --skip naive,ray ${OUT:+--out "$OUT"}
  fi
done
# the same end to end without nvjpeg (PIL on the CPU cores feeding the GPU): what GPU decode buys
step 50 "embed bench $first bf16, PIL decode" $PY bench/embed_bench.py --device "$DEVICE" --model "$first" --precision bf16 \
  --images "$((IMAGES / 4))" --unique "$UNIQUE" --batch "$BATCH" --no-gpu-decode --skip naive,ray ${OUT:+--out "$OUT/pil"}
say "done: $failures step(s) failed"
exit $((failures > 0))
