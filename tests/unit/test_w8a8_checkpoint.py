"""The committed W8A8 test model (``tests/data/tiny-w8a8/``) is what llm-compressor's W8A8 scheme writes:
int8 weights with a scale per output channel, int8 activations per token (dynamic), the head left alone."""

from __future__ import annotations

import json
import struct
from pathlib import Path

W8A8 = Path(__file__).parents[1] / "data" / "tiny-w8a8"


def tensor_dtypes() -> dict[str, str]:
    """Each tensor's dtype from the safetensors header (8 bytes of length, then JSON)."""
    with (W8A8 / "model.safetensors").open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


def test_the_checkpoint_declares_w8a8_int8_as_compressed_tensors() -> None:
    config = json.loads((W8A8 / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["format"]) == ("compressed-tensors", "int-quantized")
    (group,) = config["config_groups"].values()
    weights, activations = group["weights"], group["input_activations"]
    assert (weights["num_bits"], weights["type"], weights["strategy"], weights["dynamic"]) == (
        8,
        "int",
        "channel",
        False,
    )
    assert (activations["num_bits"], activations["strategy"], activations["dynamic"]) == (8, "token", True)
    assert config["ignore"] == ["lm_head"]


def test_every_linear_but_the_head_is_stored_as_int8_with_a_float_scale_per_channel() -> None:
    dtypes = tensor_dtypes()
    projections = [n for n in dtypes if n.endswith("_proj.weight")]
    assert len(projections) == 14  # 2 layers × (q, k, v, o, gate, up, down)
    assert {dtypes[n] for n in projections} == {"I8"}
    assert {dtypes[n.removesuffix("weight") + "weight_scale"] for n in projections} == {"F32"}
    assert dtypes["lm_head.weight"] == "F32"
