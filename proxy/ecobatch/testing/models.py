"""Build random-weight Mistral models with a trained BPE tokenizer and a chat template.

No weights can be downloaded here, and shapes (not values) set speed and energy, so tests build a tiny
model in seconds and GPU runs build a Mistral-7B-architecture model. Both are saved with
``save_pretrained`` and loaded back through the real code paths (``from_pretrained``, vLLM's model path).
"""

from __future__ import annotations

import random
from pathlib import Path

from ..tools.plan import ModelShape

__all__ = ["MISTRAL_7B", "TINY_MISTRAL", "ModelShape", "build_random_mistral", "build_tokenizer"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


# head_dim 64: vLLM's CPU attention fails at the first forward with head_dim 16.
TINY_MISTRAL = ModelShape(512, 256, 512, 2, 4, 2, 64, 1024)
MISTRAL_7B = ModelShape()  # Mistral-7B's shape: the defaults


def build_tokenizer(out_dir: Path, vocab_size: int, n_sentences: int = 4000) -> object:
    """Train a byte-level BPE tokenizer on random words and save it (with a chat template) to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    text = [" ".join(rng.choice(words) for _ in range(30)) + "." for _ in range(n_sentences)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # type: ignore[assignment]
    tok.decoder = decoders.ByteLevel()  # type: ignore[assignment]
    trainer = trainers.BpeTrainer(  # type: ignore[call-arg]
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))
    return hf_tok


def build_random_mistral(
    out_dir: str | Path,
    shape: ModelShape = TINY_MISTRAL,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
) -> Path:
    """Save a random-weight MistralForCausalLM and its tokenizer to out_dir; return the directory."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, shape.vocab_size)
    cfg = MistralConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tok.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tok.eos_token_id,  # type: ignore[attr-defined]
        pad_token_id=tok.eos_token_id,  # type: ignore[attr-defined]
        tie_word_embeddings=False,
        dtype=dtype,  # recorded in config.json; vLLM reads it as the checkpoint's dtype
    )
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        model = MistralForCausalLM(cfg).to(torch_dtype)
    model.save_pretrained(str(out))
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build a random-weight Mistral model directory.")
    parser.add_argument("out_dir")
    parser.add_argument("--shape", choices=["tiny", "7b"], default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    chosen = TINY_MISTRAL if args.shape == "tiny" else MISTRAL_7B
    print(build_random_mistral(args.out_dir, chosen, args.dtype, args.device))
