"""Checks on an uploaded adapter file before anything else (the LoRA loader included) opens it.

The loader (`gemma_jax.weights.peft`) decides whether an adapter fits the model; this module only
makes sure that what reaches it is what it claims to be, so a hostile file is refused with a clear
reason instead of an allocation of 2^63 bytes, a read past the end, or an unpickler:

- adapter_config.json: at most `MAX_CONFIG_BYTES`, UTF-8, one JSON object, no duplicate keys, no
  NaN/Infinity literals, nesting Python's parser survives; every number finite and within a float
  (`1e999`, `10**400` are refused); the fields peft defines of the types peft gives them
  (`schemas/adapter_config.schema.json`, unknown keys allowed); rank_pattern / alpha_pattern keys
  that the loader can match in linear time (`gemma_jax.weights.peft.compile_patterns`: RE2, at most
  1024 keys of 512 characters);
- adapter_model.safetensors: the format as the safetensors library writes it (an 8-byte
  little-endian header length N <= `MAX_HEADER_BYTES` and <= the file; N bytes of JSON object; each
  tensor {dtype, shape, data_offsets} with dtype F32, F16 or BF16 and offsets that tile the data
  section exactly, in bounds, one tensor after another); every value finite. Pickles and zip
  archives (torch.save) are named as such; nothing here or anywhere in serving/ unpickles.

Every check reads a bounded amount: the header is read only once its length is known to be sane,
and the NaN scan walks a memory map in `_SCAN_ELEMENTS` slices.
"""

from __future__ import annotations

import functools
import json
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from gemma_jax.lora import LoraError
from gemma_jax.weights.peft import bad_number, compile_patterns
from serving.validation import json_type

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20  # a PEFT adapter_config.json is about 1 KB
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_NDIM = 8
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
# Non-finite values by bit pattern: the exponent bits all ones (NaN or +-Inf).
_EXPONENT_MASK = {"F16": 0x7C00, "BF16": 0x7F80}
_SCAN_ELEMENTS = 1 << 22


class AdapterFileError(ValueError):
    """The file is not what its name says; the message says why, for the client."""


def check_file(file_name: str, path: str | os.PathLike) -> None:
    """Raise AdapterFileError unless `path` is a plausible `file_name` (one of the two names)."""
    if file_name == CONFIG_NAME:
        check_config(path)
    elif file_name == WEIGHTS_NAME:
        check_safetensors(path)
    else:
        raise AdapterFileError(f"unexpected file name {file_name!r}")


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {duplicate!r}")
    return dict(pairs)


def _no_constants(literal: str) -> Any:
    raise ValueError(f"the literal {literal} is not allowed")


def _parse_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_strict_object, parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise AdapterFileError(f"{what} is not UTF-8") from None
    except RecursionError:
        raise AdapterFileError(f"{what} is nested too deeply") from None
    except ValueError as e:
        raise AdapterFileError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise AdapterFileError(f"{what} must be a JSON object")
    return value


def check_config(path: str | os.PathLike) -> dict[str, Any]:
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise AdapterFileError(f"{CONFIG_NAME} is {size} bytes; the limit is {MAX_CONFIG_BYTES}")
    config = _parse_object(Path(path).read_bytes(), CONFIG_NAME)
    bad = bad_number(config)
    if bad is not None:
        raise AdapterFileError(f"{CONFIG_NAME}: {bad[0]} must be a finite number that fits a float, got {bad[1]}")
    error = jsonschema.exceptions.best_match(_config_validator().iter_errors(config))
    if error is not None:
        raise AdapterFileError(_schema_message(error))
    try:
        for field in ("rank_pattern", "alpha_pattern"):
            compile_patterns(config.get(field) or {}, field)
    except LoraError as e:
        raise AdapterFileError(f"{CONFIG_NAME}: {e}") from None
    return config


CONFIG_SCHEMA_FILE = "adapter_config.schema.json"


@functools.cache
def _config_validator() -> jsonschema.protocols.Validator:
    """The schema's validator, where "integer" means a JSON integer (`8.0` is not a rank)."""
    schema = json.loads(resources.files("serving").joinpath("schemas", CONFIG_SCHEMA_FILE).read_text("utf-8"))
    base = jsonschema.Draft202012Validator
    base.check_schema(schema)
    checker = base.TYPE_CHECKER.redefine(
        "integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool))
    return jsonschema.validators.extend(base, type_checker=checker)(schema)


def _describe(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value) if len(repr(value)) <= 40 else f"a number of {len(repr(value))} digits"
    return json_type(value)


def _schema_message(error: jsonschema.ValidationError) -> str:
    """`adapter_config.json: rank_pattern must be an object of module patterns to positive integers,
    got array`; below the top level, where: `..., got 0 at rank_pattern['q_proj']`."""
    path = list(error.absolute_path)
    if not path:
        return f"{CONFIG_NAME} must be a JSON object"
    field = path[0]
    expected = _config_validator().schema["properties"][field]["description"]
    got = _describe(error.instance)
    if len(path) > 1:
        got += " at " + field + "".join(f"[{p!r}]" for p in path[1:])
    return f"{CONFIG_NAME}: {field} must be {expected}, got {got}"


def _not_safetensors(reason: str) -> AdapterFileError:
    return AdapterFileError(f"{WEIGHTS_NAME} is not a safetensors file: {reason}")


def _sniff(head: bytes) -> str | None:
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "it is a Python pickle (pickles are never loaded; save with safetensors)"
    if head.startswith(b"PK\x03\x04"):
        return "it is a zip archive such as torch.save writes (never loaded; save with safetensors)"
    return None


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_safetensors(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors' {name: (dtype, shape)} if the file is a sound safetensors file of finite floats."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if (sniffed := _sniff(head)) is not None:
            raise _not_safetensors(sniffed)
        if len(head) < 8:
            raise _not_safetensors(f"{size} bytes is shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            raise _not_safetensors(f"header length {n} is over the limit of {MAX_HEADER_BYTES} bytes")
        if n > size - 8:
            raise _not_safetensors(f"header length {n} is past the end of the file ({size} bytes)")
        raw = f.read(n)
    if not raw.startswith(b"{"):
        raise _not_safetensors("the header is not a JSON object")
    header = _parse_object(raw, f"the header of {WEIGHTS_NAME}")
    data_len = size - 8 - n
    tensors = _tensor_table(header, data_len)
    _check_finite(path, 8 + n, data_len, header)
    return tensors


def _tensor_table(header: dict[str, Any], data_len: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _not_safetensors("__metadata__ must map strings to strings")
    spans, tensors = [], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _not_safetensors(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise AdapterFileError(f"{WEIGHTS_NAME}: tensor {name!r} has dtype {dtype!r}; adapter weights "
                                   f"must be one of {', '.join(DTYPE_BYTES)}")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_count(d) for d in shape):
            raise _not_safetensors(f"tensor {name!r} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise _not_safetensors(f"tensor {name!r} has data_offsets {offsets!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise _not_safetensors(f"tensor {name!r} of {dtype} {shape} needs "
                                   f"{math.prod(shape) * DTYPE_BYTES[dtype]} bytes, its offsets give {end - begin}")
        spans.append((begin, end, name))
        tensors[name] = (dtype, tuple(shape))
    if not tensors:
        raise _not_safetensors("it holds no tensors")
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise _not_safetensors(f"tensor {name!r} starts at byte {begin}, expected {at} (gap or overlap)")
        at = end
    if at > data_len:
        raise _not_safetensors(f"truncated: the tensors need {at} bytes of data, the file holds {data_len}")
    if at < data_len:
        raise _not_safetensors(f"{data_len - at} bytes after the last tensor")
    return tensors


def _check_finite(path: str | os.PathLike, offset: int, data_len: int, header: dict[str, Any]) -> None:
    if data_len == 0:
        return
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(data_len,))
    try:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype, width = info["dtype"], DTYPE_BYTES[info["dtype"]]
            step = _SCAN_ELEMENTS * width
            for start in range(begin, end, step):
                block = data[start:min(end, start + step)]
                if dtype == "F32":
                    bad = not np.isfinite(block.view("<f4")).all()
                else:
                    mask = _EXPONENT_MASK[dtype]
                    bad = bool(((block.view("<u2") & mask) == mask).any())
                if bad:
                    raise AdapterFileError(f"{WEIGHTS_NAME}: tensor {name!r} holds NaN or infinite values")
    finally:
        del data
