"""JSON the server reads and writes: what it refuses on the way in, and what it never emits.

Python's `json` accepts `NaN`, `Infinity` and `1e999` (as inf) and lone UTF-16 surrogates (`"\\ud800"`), none of
which a browser's `JSON.parse` or SQLite's UTF-8 text can take back; and nesting deep enough to exhaust the
interpreter's stack. A request carrying any of them is refused with the path of the offending value, before it
reaches validation or the store. On the way out, a non-finite number a node produced becomes `null`, so a
history entry or an event is always readable by every client.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 100
"""Deepest nesting accepted in a request body. ComfyUI's UI workflows nest about 8 levels deep."""


class JsonValueError(ValueError):
    """A parsed JSON value the server refuses; the message names where it is (`prompt.3.inputs.cfg`)."""


def _where(path: list[str]) -> str:
    return ".".join(path) if path else "the top level"


def _check_string(text: str, path: list[str]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise JsonValueError(f"the string at {_where(path)} is not valid Unicode (it holds a lone surrogate "
                             f"such as \\ud800)") from None


def check_json_value(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise JsonValueError for a non-finite number, an unencodable string or nesting deeper than max_depth.

    Iterative, so that a value nested as deep as the parser allowed cannot exhaust the stack here either.
    """
    stack: list[tuple[Any, list[str]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if len(path) > max_depth:
            raise JsonValueError(f"the JSON is nested more than {max_depth} levels deep (at {_where(path[:8])}...)")
        if isinstance(item, float) and not math.isfinite(item):
            raise JsonValueError(f"the number at {_where(path)} is {item!r}: only finite numbers are accepted")
        if isinstance(item, str):
            _check_string(item, path)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_string(key, path)
                stack.append((child, [*path, str(key)]))
        elif isinstance(item, list):
            stack.extend((child, [*path, str(index)]) for index, child in enumerate(item))


def parse_json(raw: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse and check a request body; raises JsonValueError with a readable message for anything refused."""
    try:
        value = json.loads(raw)
    except UnicodeDecodeError:
        raise JsonValueError("the request body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise JsonValueError(f"malformed JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise JsonValueError(f"the JSON is nested more than {max_depth} levels deep") from None
    check_json_value(value, max_depth)
    return value


def finite(value: Any) -> Any:
    """A copy of value with every non-finite float replaced by None (JSON's null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(child) for key, child in value.items()}
    if isinstance(value, list | tuple):
        return [finite(child) for child in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` that never writes NaN or Infinity (they become null)."""
    try:
        return json.dumps(value, allow_nan=False, **kwargs)
    except ValueError:
        return json.dumps(finite(value), allow_nan=False, **kwargs)
