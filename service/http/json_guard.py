"""JSON request bodies, parsed only once their shape is known to be safe to parse.

Python's ``json`` recurses once per nesting level (``RecursionError`` past about a thousand)
and refuses integers of more than 4300 digits with a bare ``ValueError``: both are properties
of the bytes, visible before parsing. :func:`parse_json` checks the body against
:class:`JsonLimits` by a scan at C speed (string literals blanked by one regular expression;
the nesting depth as a running sum, in numpy, over the brackets alone; a run of number
characters longer than the limit found by ``bytes.find`` on a translated copy), then parses it
strictly: UTF-8 only, no key twice in one object. The scan costs about a fifth of the parse it
guards. Every refusal is a ``RequestError(400)`` that says what is wrong and what is allowed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.validation import RequestError

__all__ = ["JsonLimits", "parse_json"]

# A string literal up to its closing quote, or to the end of the body when it has none (so an
# unterminated string costs one pass, not one pass per quote after it).
STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)
NOT_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")
# bracket -> 1 + its change of nesting depth: '[' and '{' open (2), ']' and '}' close (0)
DEPTH_STEP = bytes(2 if c in b"[{" else 0 if c in b"]}" else 1 for c in range(256))
# byte -> b"1" if it may be part of a number literal (outside strings), else b"0"
NUMBER_CHAR = bytes(0x31 if c in b"-+.0123456789eE" else 0x30 for c in range(256))


@dataclass(frozen=True)
class JsonLimits:
    """``max_depth``: arrays and objects nested in one another (a verb request needs 3, a
    nested image row 5); ``max_number_chars``: characters of one number literal (sign,
    digits, point, exponent; any float64 fits in 24)."""

    max_depth: int = 32
    max_number_chars: int = 100

    def check(self, body: bytes) -> None:
        """RequestError(400) if ``body`` nests deeper, or holds a longer number, than allowed."""
        bare = STRING.sub(b'""', body) if b'"' in body else body
        depth = max_depth(bare.translate(None, NOT_BRACKET), self.max_depth)
        if depth > self.max_depth:
            raise RequestError(400, f"the body nests arrays and objects {depth} levels deep; "
                               f"at most {self.max_depth} levels are allowed")
        chars = longest_number(bare.translate(NUMBER_CHAR), self.max_number_chars)
        if chars > self.max_number_chars:
            raise RequestError(400, f"the body has a number of {chars} characters; numbers "
                               f"may have at most {self.max_number_chars}")


def max_depth(brackets: bytes, bound: int) -> int:
    """The deepest nesting of a string of brackets; exact when it is above ``bound``."""
    if brackets.count(b"[") + brackets.count(b"{") <= bound:
        return 0  # it cannot nest deeper than it has openings: the usual small request
    step = np.frombuffer(brackets.translate(DEPTH_STEP), np.int8) - np.int8(1)
    return int(np.cumsum(step, dtype=np.int32).max())


def longest_number(mask: bytes, bound: int) -> int:
    """The length of the first run of number characters (``b"1"`` in ``mask``) longer than
    ``bound``, or 0 when there is none."""
    start = mask.find(b"1" * (bound + 1))
    if start < 0:
        return 0
    end = mask.find(b"0", start)
    return (len(mask) if end < 0 else end) - start


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise RequestError(400, f"the body gives the key {key[:64]!r} more than once "
                                   "in one object; give each key once")
            seen.add(key)
    return out


DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def parse_json(body: bytes, limits: JsonLimits) -> Any:
    """The JSON value of ``body`` (UTF-8), or RequestError(400) naming what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(400, f"the body is not valid UTF-8 (byte 0x{body[err.start]:02x} "
                           f"at position {err.start}); send JSON encoded as UTF-8") from None
    limits.check(body)
    try:
        return DECODER.decode(text)
    except json.JSONDecodeError as err:
        raise RequestError(400, f"the body is not valid JSON ({err.msg} at position "
                           f"{err.pos})") from None
    except (ValueError, RecursionError) as err:  # what the scan above exists to prevent
        raise RequestError(400, f"the body is not valid JSON ({str(err)[:100]})") from None
