#!/usr/bin/env bash
# The wheels gpu_check.sh's nvImageCodec rows need on the device machine (it reaches no registry): downloaded
# here into .whl/ (git-ignored, ~29 MB), carried to the device, installed there into /tmp/site. The device image's
# torch is a CUDA 13.0 build, so the cu13 nvImageCodec and a 13.0 nvjpeg (its GPU JPEG codec; without it
# nvImageCodec decodes on the CPU and the rows would measure that).
#   bash bench/gpu_wheels.sh
#   then on the device (carry .whl):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site OUT=$OUT bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "nvidia-nvimgcodec-cu13==0.9.0.20" "nvidia-nvjpeg==13.0.3.75"
ls -la .whl
