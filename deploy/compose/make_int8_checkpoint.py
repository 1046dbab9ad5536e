"""Write the pre-quantized bitsandbytes 8-bit (LLM.int8) checkpoint that compose.yaml's vLLM serves.

vLLM quantizes bitsandbytes in flight to 4-bit only; an 8-bit model is loaded from a checkpoint that was
saved already quantized. This is the recipe of configs/vllm/mistral7b-int8.sh (and of the H200 runs in
benchmarks/h200_vllm.sh): transformers loads the weights on the GPU with ``load_in_8bit=True,
llm_int8_threshold=0.0`` (every linear layer in INT8, no fp16 outlier columns) and saves them with the
tokenizer.

    python3 make_int8_checkpoint.py SOURCE DEST

SOURCE is a Hugging Face model id (a gated one needs HF_TOKEN) or a directory of weights; DEST is the
directory vLLM serves. The checkpoint is written beside DEST and renamed into place when complete, so
an interrupted run never leaves a half-written DEST; a DEST that already holds a config.json is left
as it is. compose.yaml runs this in the vLLM image (torch, transformers, accelerate and bitsandbytes
are there): ``docker compose --profile quantize run --rm int8-checkpoint``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    source, dest = argv[0], Path(argv[1])
    if (dest / "config.json").exists():
        print(f"{dest} already holds a checkpoint: left as it is")
        return 0
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quantization, device_map="cuda")
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(source).save_pretrained(partial)
    if dest.exists():  # an empty directory left by an earlier attempt
        dest.rmdir()
    partial.rename(dest)
    print(f"wrote the bitsandbytes 8-bit checkpoint of {source} to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
