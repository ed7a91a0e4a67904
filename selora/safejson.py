"""One JSON decoder for everything a client sends (request bodies, adapter configs, safetensors
headers): strict UTF-8, bounded nesting depth, bounded number literals, no duplicate keys, no
NaN/Infinity. Every failure is a ``JSONInputError`` (never a ``RecursionError``, a
``UnicodeDecodeError`` or Python's int-conversion ``ValueError``).

The depth is measured before parsing, on the bytes with their strings blanked out, so a
100,000-deep nesting costs one linear scan and no recursion.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np


class JSONInputError(ValueError):
    """Not JSON the server accepts; the subclass says why."""


class JSONEncodingError(JSONInputError):
    """The bytes are not UTF-8."""


class JSONSyntaxError(JSONInputError):
    """Not valid JSON, duplicate keys, or NaN/Infinity."""


class JSONLimitError(JSONInputError):
    """Valid JSON over a depth or number-length limit."""


@dataclass(frozen=True)
class JSONLimits:
    max_depth: int = 32  # nested arrays/objects
    max_number_chars: int = 40  # characters of one number literal


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NUMBER_RUN = re.compile(rb"[-+0-9.eE]+")
_OPEN = np.frombuffer(b"[{", np.uint8)
_CLOSE = np.frombuffer(b"]}", np.uint8)


def skeleton(data: bytes) -> bytes:
    """``data`` with every string's contents removed."""
    return _STRING.sub(b'""', data)


def nesting_depth(bare: bytes) -> int:
    """Deepest ``[``/``{`` nesting of a ``skeleton`` (an upper bound for invalid JSON)."""
    chars = np.frombuffer(bare, np.uint8)
    if chars.size == 0:
        return 0
    step = np.isin(chars, _OPEN).astype(np.int32) - np.isin(chars, _CLOSE).astype(np.int32)
    return int(np.cumsum(step).max(initial=0))


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise JSONSyntaxError(f"duplicate key {key[:64]!r}")
    return out


def _no_constant(name: str):
    raise JSONSyntaxError(f"{name} is not a JSON number")


def loads(data: bytes | str, limits: JSONLimits = JSONLimits(), what: str = "body") -> object:
    """Decode ``data`` within ``limits``; ``what`` names it in error messages."""
    if isinstance(data, str):
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError:
            raise JSONEncodingError(f"{what} is not valid UTF-8 text") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONEncodingError(f"{what} is not valid UTF-8 (byte {e.start})") from None
    bare = skeleton(data)
    depth = nesting_depth(bare)
    if depth > limits.max_depth:
        raise JSONLimitError(f"{what} nests {depth} levels deep; the limit is {limits.max_depth}")
    longest = max((len(m) for m in _NUMBER_RUN.findall(bare)), default=0)
    if longest > limits.max_number_chars:
        raise JSONLimitError(f"{what} holds a number of {longest} characters; the limit is {limits.max_number_chars}")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise JSONSyntaxError(f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
