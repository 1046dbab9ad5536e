"""What checking a request body costs: decoding and validating a chat body, per library.

Rows (microseconds per body, best of 7 repeats of 20,000):

* ``ecobatch``: the proxy's own path for one chat body (``msgspec.json.decode``, ``parse_chat`` against
  ``fields.ChatBody``, ``check_fields`` for the simulated engine), a ``GenerationRequest`` included;
* ``msgspec: decode, convert to ChatBody``: the schema check alone, as ecobatch does it (the decoded
  body is kept, to pass on as sent);
* ``msgspec: decode into ChatBody``: one pass straight into the Struct (the body's other fields lost);
* ``pydantic: model_validate_json``: the same schema as a pydantic model (``extra="allow"`` keeps the
  other fields), if pydantic is installed;
* ``pydantic: validate_json + model_dump``: and the body back as a dict, to pass on.

    python benchmarks/request_schema.py --out benchmarks/results/request-schema.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from ecobatch.fields import BASIC_FIELDS, ChatBody, check_fields
from ecobatch.serving.openai_api import parse_chat

BODIES = {
    "overhead.py's chat body": b'{"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 4}',
    "a typical chat body": json.dumps(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Write one sentence about the energy a GPU uses per token."},
            ],
            "max_tokens": 128,
            "temperature": 0.7,
            "top_p": 0.95,
            "stream": False,
        }
    ).encode(),
}


def _ecobatch(raw: bytes) -> Any:
    request = parse_chat(msgspec.json.decode(raw), "m")
    check_fields(request, BASIC_FIELDS, "simulated")
    return request


_into = msgspec.json.Decoder(ChatBody)
CANDIDATES: dict[str, Callable[[bytes], Any]] = {
    "ecobatch (decode, validate, check fields)": _ecobatch,
    "msgspec: decode, convert to ChatBody": lambda raw: msgspec.convert(msgspec.json.decode(raw), ChatBody),
    "msgspec: decode into ChatBody": _into.decode,
}

try:
    import pydantic
except ImportError:  # not a dependency: the comparison row is left out
    pydantic = None

if pydantic is not None:
    Field = pydantic.Field

    class TextPart(pydantic.BaseModel):
        type: Literal["text"]
        text: str

    class Message(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="allow")
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: str | list[TextPart] | None = None

    class StreamOptions(pydantic.BaseModel):
        include_usage: bool | None = None

    Tokens = Annotated[int, Field(ge=1, strict=True)]

    class PydanticChat(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="allow")
        messages: Annotated[list[Message], Field(min_length=1)]
        model: str | None = None
        max_tokens: Tokens | None = None
        max_completion_tokens: Tokens | None = None
        temperature: Annotated[float, Field(ge=0, le=2)] | None = None
        top_p: Annotated[float, Field(ge=0, le=1)] | None = None
        n: Annotated[int, Field(strict=True)] | None = None
        stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None = None
        stream: Annotated[bool, Field(strict=True)] | None = None
        stream_options: StreamOptions | None = None
        seed: Annotated[int, Field(strict=True)] | None = None
        ignore_eos: Annotated[bool, Field(strict=True)] | None = None
        user: str | None = None
        service_tier: Literal["auto", "default", "flex", "priority"] | None = None

    def _dumped(raw: bytes) -> Any:
        return PydanticChat.model_validate_json(raw).model_dump(exclude_unset=True)

    CANDIDATES["pydantic: model_validate_json"] = PydanticChat.model_validate_json
    CANDIDATES["pydantic: validate_json + model_dump"] = _dumped


def main(out: Path | None) -> None:
    versions = f"msgspec {msgspec.__version__}" + (f", pydantic {pydantic.VERSION}" if pydantic else "")
    lines = [
        f"microseconds per body, best of 7 × 20,000 ({versions}; Python {platform.python_version()})",
        "",
        "| | " + " | ".join(BODIES) + " |",
        "|---|" + "---|" * len(BODIES),
    ]
    print("\n".join(lines))
    rows: dict[str, dict[str, float]] = {}
    for label, check in CANDIDATES.items():
        cells = []
        for body, raw in BODIES.items():
            check(raw)
            best_s = min(timeit.repeat(functools.partial(check, raw), number=20_000, repeat=7)) / 20_000
            rows.setdefault(label, {})[body] = best_s * 1e6
            cells.append(f"{best_s * 1e6:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        print(lines[-1])
    if out is not None:
        command = "python benchmarks/request_schema.py " + " ".join(sys.argv[1:])
        python = platform.python_version()
        result = {"command": command, "versions": versions, "python": python, "microseconds": rows}
        out.write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text("\n".join([f"`{command}`", "", *lines]) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the table as JSON here (and as Markdown beside it)")
    main(parser.parse_args().out)
