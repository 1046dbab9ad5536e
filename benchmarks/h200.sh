#!/usr/bin/env bash
# GPU runs on the device machine (H200), in stages, from the repo root:
#   bash benchmarks/h200.sh setup              # wheels into /tmp/site; random Mistral-7B (fp16) in /tmp/m7
#   bash benchmarks/h200.sh calibrate DTYPE    # ecobatch calibrate -> $OUT/h200-mistral7b-DTYPE.{yaml,csv,png}
#   bash benchmarks/h200.sh gputest DTYPE      # pytest -m gpu (serving + energy conservation) -> $OUT
# Needs .whl/ carried (bitsandbytes 0.50.2, openai + deps, pytest-aiohttp, pytest-asyncio).
set -euo pipefail
export PYTHONPATH=$PWD/proxy:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
stage=${1:?stage}; shift
case "$stage" in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    python3 -c "import bitsandbytes, openai, pytest_asyncio; print('bnb', bitsandbytes.__version__)" || echo "WARNING: carried wheels incomplete"
    nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.sm --format=csv
    t=$(date +%s)
    [ -f /tmp/m7/config.json ] || python3 -m ecobatch.testing.models /tmp/m7 --shape 7b --dtype float16 --device cuda 2>&1 | grep -v -i warn | tail -2
    echo "model ready in $(( $(date +%s) - t )) s"; du -sh /tmp/m7 ;;
  calibrate)
    dtype=${1:?dtype}; shift
    python3 -m ecobatch.cli calibrate --backend hf-bnb --model /tmp/m7 --model-label "Mistral-7B architecture, random weights" \
      --dtype "$dtype" --new-tokens 256 --prompt-tokens 128 --out "$OUT/h200-mistral7b-$dtype.yaml" "$@" ;;
  gputest)
    ECOBATCH_GPU_DTYPE=${1:-int8} ECOBATCH_GPU_MODEL=/tmp/m7 ECOBATCH_RESULTS_DIR=$OUT \
      python3 -m pytest -m gpu tests/gpu -p no:cacheprovider -x -q -s ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
