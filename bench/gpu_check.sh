#!/usr/bin/env bash
# The GPU benchmark in one call (about 3 minutes on one H100 with 16 cores before the nvImageCodec rows and the
# mixed-size step, which add about a minute; at most 8 by the steps' timeouts).
# Headline: ResNet-50 bf16 embed_shard end to end (row d) against model-only (row a), with the code's default
# pipeline settings, plus a sweep of $SWEEP settings as extra "d sweep" rows and each run's ms/batch per stage;
# then ResNet-18, the feeder alone (no model: what the host side can feed), the CPU decode table, the nvjpeg
# fallback check, and one summary table against issue 14's goals (bench/gpu_summary.py). Where nvImageCodec is
# installed (bench/gpu_wheels.sh), its fallback check, three sweep rows, two on the mixed sizes and a feeder row
# too. PIL_DECODE=1 adds the same end to end with PIL instead of nvjpeg (another ~50 s).
# Needs python3 with torch (CUDA build), numpy, pyarrow, fsspec, pillow; torchvision for nvjpeg, ray optional.
# Prints the same table as the CPU run of bench/embed_bench.py; tables and JSON land in $OUT (default: a temp folder).
#   bash bench/gpu_check.sh            # on the device machine
#   SMALL=1 DEVICE=cpu bash bench/gpu_check.sh   # the same script end to end on a CPU, tiny sizes
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-}
if [ "${SMALL:-0}" = 1 ]; then
  IMAGES=64 UNIQUE=32 BATCH=16 MODELS="refcnn-v1" SWEEP=${SWEEP-"prefetch=1;fetch=4;assemble=2"}
  FEED="--images 64 --unique 8 --side 128 --batch 16 --grid fetch=4,decode=2" DECODE_S=0.003
else
  IMAGES=${IMAGES:-32768} UNIQUE=${UNIQUE:-4096} BATCH=${BATCH:-256} MODELS=${MODELS:-"resnet50 resnet18"}
  SWEEP=${SWEEP-"prefetch=6,fetch=32;fetch=8;assemble=2,prefetch=6;assemble=4,prefetch=8"}
  FEED=${FEED:-"--images 16384 --unique 1024 --batch $BATCH --grid fetch=16,decode=4;fetch=64,decode=16;fetch=64,decode=16,assemble=4"}
  DECODE_S=${DECODE_S:-0.05}
fi
OUT=${OUT:-$(mktemp -d)}  # the benches' JSON, read by the summary
log=$OUT/gpu_check.log
mkdir -p "$OUT"
say() { echo "== $*" | tee -a "$log"; }
failures=0
step() {  # step <seconds> <name> <command...>: one failing or slow step does not stop the others
  local limit=$1 name=$2; shift 2
  say "$name: $*"
  local began=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}  # global, not local: the caller reads it (fallback_rc)
  say "$name: rc=$rc in $((SECONDS - began))s"
  [ "$rc" = 0 ] || failures=$((failures + 1))
}

say "machine: $(nproc) cores, $(uname -m); $(date -u +%FT%TZ)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
$PY - <<'PY' 2>&1 | tee -a "$log"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("torchvision", "simplejpeg", "turbojpeg", "ray", "faiss", "dagster"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(name, "not installed:", type(exc).__name__)
PY
# nvImageCodec (bench/gpu_wheels.sh carries it to the device): its fallback check, sweep rows and a feeder row
nv_fallback_rc="" MIXED_SWEEP=""
if $PY -c "from nvidia import nvimgcodec" 2>/dev/null; then
  # its fallback check fails loudly if nvImageCodec cannot decode into device memory (no nvjpeg codec loaded)
  say "nvimgcodec: $($PY -c "from nvidia import nvimgcodec; print(nvimgcodec.__version__, nvimgcodec.__file__)" 2>/dev/null)"
  if [ "${SMALL:-0}" != 1 ]; then
    # its host threads are the decode workers split across assembly workers: 16, 8 and 4 per decoder here
    SWEEP="$SWEEP;decoder=nvimgcodec;decoder=nvimgcodec,assemble=2,prefetch=6;decoder=nvimgcodec,assemble=4,prefetch=8"
    FEED="$FEED;fetch=64,decode=16,decoder=nvimgcodec"
    MIXED_SWEEP="decoder=nvimgcodec;decoder=nvimgcodec,assemble=2,prefetch=6"
  fi
  step 30 "nvimgcodec fallback" $PY bench/gpu_fallback_check.py --decoder nvimgcodec --device "$DEVICE"
  nv_fallback_rc=$rc
else
  say "nvimgcodec: not installed (bash bench/gpu_wheels.sh here, then carry .whl): no nvimgcodec rows"
fi
step 30 "nvjpeg fallback" $PY bench/gpu_fallback_check.py
fallback_rc=$rc
tail -n 3 "$log" | grep -q "fallback check: .*skipped" && fallback_rc=skipped  # no torchvision or no CUDA: not a pass
first=${MODELS%% *}
for model in $MODELS; do
  if [ "$model" = "$first" ]; then  # the headline: best of $REPEAT rounds, then the sweep
    step 150 "embed bench $model bf16" $PY bench/embed_bench.py --device "$DEVICE" --model "$model" --precision bf16 \
      --images "$IMAGES" --unique "$UNIQUE" --batch "$BATCH" --repeat "${REPEAT:-2}" --skip "${SKIP:-ray}" --sweep "$SWEEP" --out "$OUT"
  else
    step 50 "embed bench $model bf16" $PY bench/embed_bench.py --device "$DEVICE" --model "$model" --precision bf16 \
      --images "$IMAGES" --unique "$UNIQUE" --batch "$BATCH" --skip naive,ray --out "$OUT"
  fi
done
# the headline model on a corpus of many sizes, as a real one is (the rows above: one size): the GPU path resizes
# each size on its own, a few kernel launches per image from the assembly thread
step 60 "embed bench $first bf16, mixed sizes" $PY bench/embed_bench.py --device "$DEVICE" --model "$first" \
  --precision bf16 --mixed --images "$((IMAGES / 2))" --unique "$UNIQUE" --batch "$BATCH" --skip naive,ray \
  --sweep "$MIXED_SWEEP" --out "$OUT"
# the feeder alone (the real reader, nvjpeg on CUDA, a no-op model): the ceiling the host side sets
# shellcheck disable=SC2086  # FEED is a list of arguments
step 60 "feeder bench" $PY bench/feeder_bench.py --device "$DEVICE" $FEED --out "$OUT"
step 30 "decode bench (CPU, 1 thread)" $PY bench/decode_bench.py --seconds "$DECODE_S" --no-cosine
if [ "${PIL_DECODE:-0}" = 1 ]; then  # the same end to end without nvjpeg (PIL on the CPU cores feeding the GPU)
  step 50 "embed bench $first bf16, PIL decode" $PY bench/embed_bench.py --device "$DEVICE" --model "$first" \
    --precision bf16 --images "$((IMAGES / 4))" --unique "$UNIQUE" --batch "$BATCH" --no-gpu-decode --skip naive,ray \
    --out "$OUT/pil"
fi
$PY bench/gpu_summary.py "$OUT" "$fallback_rc" "$nv_fallback_rc" | tee -a "$log"
say "done: $failures step(s) failed; tables and JSON in $OUT"
exit $((failures > 0))
