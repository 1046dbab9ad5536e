"""A msgspec validation error in ecobatch's words: which field, and the limit it broke.

Request bodies (``fields``) and the config (``config``) are declared as msgspec ``Struct``s; msgspec
reports a bad value as ``Expected `int` >= 1 - at `$.max_tokens```. ``explain`` turns that into an
``Invalid``: the field's path as the config and OpenAI's ``param`` name it (``messages[0].role``,
``replicas[1].url``) and the limit in words (``>= 1``, ``an integer``, ``one of ['auto', 'flex']``,
``an http:// or https:// URL``), reading the choices of a ``Literal`` and the ``description`` of a
constrained type from the schema itself.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import msgspec.inspect as mi

__all__ = ["MISSING", "Invalid", "explain", "value_at"]

Problem = Literal["type", "limit", "unknown", "missing", "other"]
#: what ``value_at`` returns for a path the data does not hold
MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class Invalid:
    """One bad field. ``path`` is empty for the whole object; ``limit`` completes "must be …" (for
    ``other``: msgspec's own words); ``got`` names the type that came instead (``type`` only);
    ``known`` lists the fields the object does define (``unknown`` only)."""

    problem: Problem
    path: str
    limit: str
    got: str | None = None
    known: tuple[str, ...] = ()


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_TYPE = re.compile(r"Expected `(?P<want>[^`]+)`, got `(?P<got>[^`]+)`$")
_BOUND = re.compile(r"Expected `[^`]+` (?P<op>>=|<=|>|<) (?P<bound>\S+)$")
_LENGTH = re.compile(r"Expected `(?P<want>[^`]+)` of length (?P<op>>=|<=) (?P<n>\d+)$")
_PATTERN = re.compile(r"Expected `str` matching regex (?P<regex>.+)$")
_ENUM = re.compile(r"Invalid enum value ")
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<name>[^`]+)`$")
_REQUIRED = re.compile(r"Object missing required field `(?P<name>[^`]+)`$")
_NOUNS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "a boolean",
    "array": "a list",
    "object": "an object",
    "null": "null",
}
_STEP = re.compile(r"\.?([^.\[\]]+)|\[(\d+|\.\.\.)\]")


def _nouns(types: str, object_noun: str) -> str:
    """``int | null`` → ``an integer or null``."""
    words = [object_noun if t == "object" else _NOUNS.get(t, f"`{t}`") for t in types.split(" | ")]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@functools.cache
def _info(schema: Any) -> mi.Type:
    return mi.type_info(schema)


def _unwrap(t: mi.Type) -> list[mi.Type]:
    """The types a value of ``t`` may take: its members if a union, without annotations."""
    t = t.type if isinstance(t, mi.Metadata) else t
    if isinstance(t, mi.UnionType):
        return [m.type if isinstance(m, mi.Metadata) else m for m in t.types]
    return [t]


def _type_at(schema: Any, path: str) -> mi.Type | None:
    """The declared type of the field at ``path`` (``a.b[0].c``) in ``schema``, annotations kept."""
    t: mi.Type | None = _info(schema)
    for name, index in _STEP.findall(path):
        if t is None:
            return None
        step: mi.Type | None = None
        for member in _unwrap(t):
            if name and isinstance(member, mi.StructType):
                step = next((f.type for f in member.fields if f.encode_name == name), None)
            elif index == "..." and isinstance(member, mi.DictType):
                step = member.value_type
            elif index and isinstance(member, mi.ListType | mi.VarTupleType | mi.SetType):
                step = member.item_type
            if step is not None:
                break
        t = step
    return t


def _description(t: mi.Type | None) -> str | None:
    if t is None:
        return None
    for member in [t, *(t.types if isinstance(t, mi.UnionType) else ())]:
        if isinstance(member, mi.Metadata) and member.extra_json_schema:
            described = member.extra_json_schema.get("description")
            if described:
                return str(described)
    return None


def _choices(t: mi.Type | None) -> list[Any]:
    if t is None:
        return []
    return [v for m in _unwrap(t) if isinstance(m, mi.LiteralType) for v in m.values]


def explain(error: msgspec.ValidationError, schema: Any, *, object_noun: str = "an object") -> Invalid:
    """``error`` (raised converting data to ``schema``) as the field, the problem and the limit. A
    limit's ``description`` in the schema follows it in brackets (for a pattern, it is the limit)."""
    match = _AT.match(str(error))
    assert match is not None  # the pattern matches any text
    what, path = match["what"], (match["path"] or "").removeprefix(".")
    if m := _TYPE.match(what):
        return Invalid("type", path, _nouns(m["want"], object_noun), got=_nouns(m["got"], object_noun))
    declared = _type_at(schema, path)
    described = _description(declared)
    if m := _PATTERN.match(what):
        return Invalid("limit", path, described or f"a string matching {m['regex']}")
    limit = None
    if m := _BOUND.match(what):
        limit = f"{m['op']} {m['bound']}"
    elif m := _LENGTH.match(what):
        noun = _nouns(m["want"], object_noun)
        if (m["op"], m["n"]) == (">=", "1"):
            limit = f"a non-empty {noun.split(' ', 1)[1]}"
        else:
            limit = f"{noun} of length {m['op']} {m['n']}"
    elif _ENUM.match(what):
        limit = f"one of {_choices(declared)}"
    if limit is not None:
        return Invalid("limit", path, f"{limit} ({described})" if described else limit)
    if m := _UNKNOWN.match(what):
        owners = _unwrap(declared) if declared is not None else []
        known = [f.encode_name for s in owners if isinstance(s, mi.StructType) for f in s.fields]
        return Invalid("unknown", _join(path, m["name"]), "", known=tuple(sorted(known)))
    if m := _REQUIRED.match(what):
        return Invalid("missing", _join(path, m["name"]), "set")
    return Invalid("other", path, what)


def value_at(data: Any, path: str) -> Any:
    """The value at ``path`` in decoded data, or ``MISSING``."""
    for name, index in _STEP.findall(path):
        if name and isinstance(data, dict) and name in data:
            data = data[name]
        elif index.isdigit() and isinstance(data, list) and int(index) < len(data):
            data = data[int(index)]
        else:
            return MISSING
    return data
