"""Request bodies: strict JSON parsing, the seed's input schema, and Workers AI-style messages.

The schema is Workers AI's own for `@hf/google/gemma-7b-it`, byte for byte, shipped as package data
(`schemas/gemma-7b-it.input.schema.json`). Failures are reported in the shape Workers AI uses, e.g.

    AiError: Bad input: Error: oneOf at '/' not met, 0 matches: required properties at '/' are
    'prompt', Type mismatch of '/temperature', 'string' not in 'number', ...

Two deliberate departures, both documented in serving/README.md:

- JSON's grammar has no NaN/Infinity; Python's `json` accepts them and the schema's `minimum`/
  `maximum` never reject NaN, so they are refused at parse time (invalid JSON, 5006). So are what
  RFC 8259 leaves to the parser and a tokenizer or database could trip on later: duplicate keys (one
  reading, not "the last wins"), strings that are not Unicode text (a lone surrogate such as
  `"\ud800"`, which has no UTF-8 form), and nesting deeper than `MAX_DEPTH`.
- `"raw": "true"` / `"stream": "false"` (a string where the schema says boolean) are coerced to the
  boolean before validation, because the product page's own curl example sends `"raw": "true"`.
  Only the exact strings "true" and "false" are coerced; anything else still fails the schema.

Numbers: every numeric field of every route (Workers AI's and OpenAI's) is checked by one rule,
`NUMBERS` / `check_numbers`, so no route lets a value through that another refuses or that the engine
cannot hold (an int32 top_k, a float32 temperature). On the run route the seed's schema applies first
(its ranges lie inside these), and only the fields it names are checked (Workers AI ignores others).
`max_tokens` is only typed here: its range is the engine's (at least
1, else 5006; within the context window, else 5021), checked where every request is admitted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from importlib import resources
from typing import Any

import jsonschema

from serving import errors

SCHEMA_FILE = "gemma-7b-it.input.schema.json"
COERCED_BOOLEANS = ("raw", "stream")


@functools.cache
def input_schema() -> dict[str, Any]:
    return json.loads(resources.files("serving").joinpath("schemas", SCHEMA_FILE).read_text("utf-8"))


@functools.cache
def _validator() -> jsonschema.Draft7Validator:
    schema = input_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


MAX_DEPTH = 32  # arrays / objects inside each other; the schemas need 3


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {duplicate[:64]!r}")
    return out


def _check_tree(value: Any) -> None:
    """Depth at most MAX_DEPTH and every string (key or value) encodable as UTF-8; no recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a string holds a lone surrogate (not Unicode text)") from None
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def parse_json(data: bytes) -> Any:
    """Strict JSON (UTF-8, no NaN/Infinity, unique keys, Unicode strings, bounded depth); raises
    ApiError 5006 on anything else."""
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
        _check_tree(value)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise errors.invalid_json(str(e) or type(e).__name__) from None
    return value


def coerce_compat(body: Any) -> Any:
    """`"true"`/`"false"` strings for `raw`/`stream` become booleans (see the module docstring)."""
    if not isinstance(body, dict):
        return body
    out = dict(body)
    for key in COERCED_BOOLEANS:
        if out.get(key) in ("true", "false"):
            out[key] = out[key] == "true"
    return out


def validate_input(body: Any) -> dict[str, Any]:
    """The coerced body if it satisfies the seed's schema, else ApiError 5006 naming what failed."""
    body = coerce_compat(body)
    failures = [_describe(e) for e in _validator().iter_errors(body)]
    if failures:
        raise errors.bad_input("Error: " + ", ".join(failures))
    check_numbers(body, _schema_fields())  # fields the schema does not name are ignored, as Workers AI does
    return body


@dataclasses.dataclass(frozen=True)
class Number:
    """One numeric field's rule: an integer (JSON's sense: 5.0 is one) or any number, in [lo, hi]."""

    integer: bool
    lo: float | None = None
    hi: float | None = None


NUMBERS: dict[str, Number] = {
    "temperature": Number(False, 0, 5),
    "top_p": Number(False, 0, 2),
    "top_k": Number(True, 1, 50),
    "seed": Number(True, 0, 2**63 - 1),
    "repetition_penalty": Number(False, 0, 2),
    "frequency_penalty": Number(False, -2, 2),
    "presence_penalty": Number(False, -2, 2),
    "max_tokens": Number(True),  # the engine's range (module docstring)
    "max_completion_tokens": Number(True),
    "n": Number(True, 1, 1),
}


@functools.cache
def _schema_fields() -> frozenset[str]:
    """The fields the seed's schema names (either form): the only ones the run route reads."""
    return frozenset(k for branch in input_schema()["oneOf"] for k in branch.get("properties", {}))


def check_numbers(body: dict[str, Any], names=None) -> None:
    """ApiError 5006 naming the first field of `body` that breaks its `NUMBERS` rule (absent or null
    fields are not checked; `names`: only these fields, e.g. the ones a route reads)."""
    for key, rule in NUMBERS.items():
        if names is not None and key not in names:
            continue
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise errors.bad_input(f"Error: '{key}' must be {'an integer' if rule.integer else 'a number'}")
        if rule.integer and isinstance(value, float) and not value.is_integer():
            raise errors.bad_input(f"Error: '{key}' must be an integer, got {value!r}")
        if (rule.lo is not None and value < rule.lo) or (rule.hi is not None and value > rule.hi):
            allowed = f"{rule.lo}" if rule.lo == rule.hi else f"between {rule.lo} and {rule.hi}"
            raise errors.bad_input(f"Error: '{key}' must be {allowed}, got {value!r}")


# -- messages in Workers AI's words -----------------------------------------------------------------
def pointer(path) -> str:
    """A JSON pointer for a jsonschema path: `/`, `/temperature`, `/messages/0/content`."""
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in path]
    return "/" + "/".join(parts)


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    for kind, name in ((float, "number"), (str, "string"), (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null"


def _describe(error: jsonschema.ValidationError) -> str:
    where = pointer(error.absolute_path)
    kind, rule, value = error.validator, error.validator_value, error.instance
    if kind == "oneOf":
        if error.context:
            branches = {e.schema_path[0] for e in error.context}
            matches = len(rule) - len(branches)
        else:  # valid under more than one branch (e.g. both `prompt` and `messages`)
            matches = sum(1 for s in rule if jsonschema.Draft7Validator(s).is_valid(value))
        head = f"oneOf at '{where}' not met, {matches} matches"
        if not error.context:
            return head
        ordered = sorted(error.context, key=lambda e: e.schema_path[0])  # stable: keeps yield order
        details = list(dict.fromkeys(_describe(e) for e in ordered))
        return f"{head}: " + ", ".join(details)
    if kind == "required":
        return f"required properties at '{where}' are '{','.join(rule)}'"
    if kind == "type":
        wanted = rule if isinstance(rule, str) else ",".join(rule)
        return f"Type mismatch of '{where}', '{json_type(value)}' not in '{wanted}'"
    if kind == "minimum":
        return f"Value of '{where}' is {value}, must be >= {rule}"
    if kind == "maximum":
        return f"Value of '{where}' is {value}, must be <= {rule}"
    if kind == "minLength":
        return f"Length of '{where}' is {len(value)}, must be >= {rule}"
    if kind == "maxLength":
        return f"Length of '{where}' is {len(value)}, must be <= {rule}"
    return f"{kind} at '{where}' not met"
