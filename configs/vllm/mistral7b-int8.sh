#!/usr/bin/env bash
# Mistral-7B INT8 (bitsandbytes LLM.int8) on vLLM, behind ecobatch.
#
# vLLM quantizes bitsandbytes in flight to 4-bit only; 8-bit is loaded from a PRE-QUANTIZED checkpoint.
# Make one once with transformers (needs bitsandbytes and a GPU):
#   python - <<'PY'
#   from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
#   q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
#   m = AutoModelForCausalLM.from_pretrained("$SRC", quantization_config=q, device_map="cuda")
#   m.save_pretrained("$DST"); AutoTokenizer.from_pretrained("$SRC").save_pretrained("$DST")
#   PY
# vLLM runs bitsandbytes 8-bit in eager mode (no CUDA graphs), and LLM.int8 spends more J/token than
# bf16 at small batches: measure both (`ecobatch profile`, benchmarks/).
set -euo pipefail
MODEL_DIR=${1:?usage: mistral7b-int8.sh PRE_QUANTIZED_INT8_DIR [extra vllm args]}
shift
# ecobatch reuses an idle connection for 2 s; vLLM keeping one 75 s (its default: 5) leaves no race
export VLLM_HTTP_TIMEOUT_KEEP_ALIVE=${VLLM_HTTP_TIMEOUT_KEEP_ALIVE:-75}
exec vllm serve "$MODEL_DIR" \
  --served-model-name mistral-7b-int8 \
  --quantization bitsandbytes \
  --max-model-len 4096 \
  --max-num-seqs 64 \
  --gpu-memory-utilization 0.90 \
  --port 8000 \
  "$@"
