"""JSON from the wire, parsed within bounds: size, nesting depth, finite numbers (one place for every intake)."""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32


class JsonBoundsError(ValueError):
    """JSON refused at intake; the message names what was sent and which bound it broke."""


class NotJsonError(JsonBoundsError):
    """Text that is not JSON at all (as opposed to JSON beyond a bound)."""


def _no_constant(name: str) -> Any:
    raise JsonBoundsError(f"{name} is not a finite number")


def loads_bounded(text: str | bytes, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """The parsed value of `text`, or JsonBoundsError: more than `max_bytes`, nested deeper than `max_depth`,
    NaN or Infinity, or not JSON at all. `what` names the input in the message ("args_json", "progress")."""
    if len(text) > max_bytes:
        raise JsonBoundsError(f"{what} is {len(text)} bytes long, more than the {max_bytes} allowed")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except JsonBoundsError as e:
        raise JsonBoundsError(f"{what}: {e}") from None
    except RecursionError:
        raise JsonBoundsError(f"{what} is nested deeper than {max_depth} levels") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise NotJsonError(f"{what} is not valid JSON: {e}") from None
    _check_depth(value, what, max_depth)
    return value


def _check_depth(value: Any, what: str, max_depth: int) -> None:
    # Iterative: the value may be nested as deep as the parser allowed, and must not recurse here.
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            raise JsonBoundsError(f"{what} is nested deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def loads_object(text: str | bytes, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """loads_bounded that also requires a JSON object ("" counts as {})."""
    if not (text.strip() if isinstance(text, str) else text.strip()):
        return {}
    value = loads_bounded(text, what, max_bytes, max_depth)
    if not isinstance(value, dict):
        raise JsonBoundsError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value
