r"""PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`) -> `lora.Adapter`.

What Workers AI accepts, and so what we accept: a PEFT LoRA adapter (peft_type "LORA") on the
projections q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, rank at most a configured
maximum (32 by default; Workers AI started at 8), weights in safetensors. Anything that would change
what the adapter computes and that we do not implement is refused with a `LoraError` naming it, never
silently ignored: DoRA, biases, `modules_to_save`, extra trainable tokens, `fan_in_fan_out`, layer
replication, other PEFT methods. Pickle-based files (`adapter_model.bin`) are refused, never opened.

Semantics follow peft's `LoraLayer.update_layer`: per module, r = rank_pattern[match] or r, alpha =
alpha_pattern[match] or lora_alpha (patterns matched as peft's `get_pattern_key` does: the pattern
must match a dotted suffix of the module name), scaling = alpha / r, or alpha / sqrt(r) with
`use_rslora`. Dropout is a training-time option and is ignored.

`rank_pattern` / `alpha_pattern` keys are regular expressions from the uploader. They are never run by
Python's backtracking `re` (a key such as `.*.*.*.*.*.*.*.*.*.*!` takes seconds per module there): each
key is compiled by RE2 (google-re2, linear time in the module name) and matched as peft's
`get_pattern_key` does, `(.*\.)?(key)$` from the start of the name, first key in dict order wins.
Limits: at most `MAX_PATTERNS` (1024) keys per dict, `MAX_PATTERN_CHARS` (512) ASCII characters per
key; each key's RE2 program within `_RE2_MAX_MEM` (256 KiB) and all of a dict's programs
within `MAX_PATTERN_PROGRAM` (131072) instructions. A key is refused (LoraError naming it) where
Python's `re` would refuse it (peft would fail on it) or RE2 cannot compile it (backreferences,
lookaround, atomic groups, `\Z`, `\u`), and where the two engines read the same text differently:
`\1`..`\9` (a backreference in Python, octal in RE2), `{,n}` (a repetition in Python, literal text
in RE2), a `[` inside a character class (`[[:alpha:]]` is a POSIX class only in RE2) and the doubled
`--`, `&&`, `~~`, `||` that Python reserves inside classes. Module names matched are printable ASCII
of at most `MAX_MODULE_CHARS` characters; there, for every key accepted, the answer is peft's
(`tests/test_peft_patterns.py` checks against peft's own function).

Numbers: every number in the config must be finite and fit a float (`1e999` parses as infinity, and an
adapter scaled by it answers "" to every prompt; `10**400` overflows alpha / r).

`model_type` is not written by peft but Workers AI requires it; when present (or when the caller
requires it) it must name the base model's family: "gemma" for Gemma 1, "gemma3" / "gemma3_text"
for Gemma 3. The family is read off the architecture (QK-norm is what Gemma 3 added), not a name.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Mapping

import jax.numpy as jnp
import numpy as np
import re2

from gemma_jax.config import GemmaConfig
from gemma_jax.lora import DEFAULT_MAX_RANK, TARGETS, Adapter, LoraError, adapter_from_torch
from gemma_jax.weights.hf import hf_names, read_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# Options that change what an adapter computes and that we do not implement: (key, value meaning "off").
_UNSUPPORTED_OPTIONS = (
    ("fan_in_fan_out", False), ("lora_bias", False), ("layer_replication", None),
    ("target_parameters", None), ("trainable_token_indices", None), ("use_qalora", False),
    ("alora_invocation_tokens", None), ("use_bdlora", None),
)
MAX_PATTERNS = 1024  # keys per rank_pattern / alpha_pattern
MAX_PATTERN_CHARS = 512  # characters per key
MAX_PATTERN_PROGRAM = 1 << 17  # RE2 instructions over one dict's keys (a module-name key is about 60)
MAX_MODULE_CHARS = 512  # a module name matched against the keys
_RE2_MAX_MEM = 256 << 10  # per compiled key; a key past it is refused ("pattern too large")
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_PEFT_PREFIX = "base_model.model."


def model_types(config: GemmaConfig) -> tuple[str, ...]:
    """The adapter `model_type` values that fit a base model of this architecture."""
    return ("gemma3", "gemma3_text") if config.use_qk_norm else ("gemma",)


def load_adapter(source: str | os.PathLike | tuple, config: GemmaConfig, *, max_rank: int = DEFAULT_MAX_RANK,
                 dtype=jnp.float32, require_model_type: bool = False) -> Adapter:
    """Load and validate a PEFT LoRA adapter for a base model of `config`.

    source: a directory holding adapter_config.json + adapter_model.safetensors, or a pair of paths
    (config json, safetensors file) in either order. Raises LoraError with the reason.
    """
    config_path, weights_path = _resolve(source)
    try:
        with open(config_path) as f:
            adapter_config = json.load(f)
    except json.JSONDecodeError as e:
        raise LoraError(f"{CONFIG_NAME} is not valid JSON: {e}") from None
    except RecursionError:
        raise LoraError(f"{CONFIG_NAME} is nested too deeply") from None
    except ValueError as e:  # not UTF-8; an integer past Python's 4300-digit limit
        raise LoraError(f"{CONFIG_NAME} is not valid JSON: {e}") from None
    try:
        tensors = dict(read_safetensors(weights_path))
    except (KeyError, TypeError, ValueError) as e:  # a header that is JSON but not safetensors' layout
        raise LoraError(f"{WEIGHTS_NAME} is not a valid safetensors file ({type(e).__name__}: {e})") from None
    return adapter_from_peft(adapter_config, tensors, config, max_rank=max_rank, dtype=dtype,
                             require_model_type=require_model_type)


def _resolve(source) -> tuple[str, str]:
    if isinstance(source, (tuple, list)):
        paths = [os.fspath(p) for p in source]
        if len(paths) != 2:
            raise LoraError(f"an adapter is two files ({CONFIG_NAME} and {WEIGHTS_NAME}), got {len(paths)}")
        jsons = [p for p in paths if p.endswith(".json")]
        others = [p for p in paths if not p.endswith(".json")]
        if len(jsons) != 1:
            raise LoraError(f"an adapter is two files ({CONFIG_NAME} and {WEIGHTS_NAME}), got {paths}")
        config_path, weights_path = jsons[0], others[0]
    else:
        directory = os.fspath(source)
        if not os.path.isdir(directory):
            raise LoraError(f"adapter directory {directory} does not exist")
        config_path = os.path.join(directory, CONFIG_NAME)
        weights_path = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(weights_path):
            pickled = [n for n in sorted(os.listdir(directory)) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            if pickled:
                weights_path = os.path.join(directory, pickled[0])
            else:
                raise LoraError(f"missing {WEIGHTS_NAME} in {directory}")
    if not weights_path.endswith(".safetensors"):
        raise LoraError(f"adapter weights must be a .safetensors file, refusing {os.path.basename(weights_path)!r} "
                        "(pickle-based files are never loaded)")
    if not os.path.isfile(config_path):
        raise LoraError(f"missing {CONFIG_NAME} in {os.path.dirname(config_path) or '.'}")
    if not os.path.isfile(weights_path):
        raise LoraError(f"missing {WEIGHTS_NAME}: {weights_path}")
    return config_path, weights_path


def validate_config(adapter_config: Mapping, config: GemmaConfig, *, max_rank: int = DEFAULT_MAX_RANK,
                    require_model_type: bool = False) -> None:
    """Every check that needs only adapter_config.json. Raises LoraError."""
    _validate(adapter_config, config, max_rank=max_rank, require_model_type=require_model_type)


def _validate(adapter_config: Mapping, config: GemmaConfig, *, max_rank: int, require_model_type: bool):
    """validate_config, returning the compiled (rank_pattern, alpha_pattern) keys."""
    c = adapter_config
    if not isinstance(c, Mapping):
        raise LoraError(f"{CONFIG_NAME} must be a JSON object, got {type(c).__name__}")
    bad = bad_number(c)
    if bad is not None:
        raise LoraError(f"adapter {bad[0]} must be a finite number that fits a float, got {bad[1]}")
    for key, kind in (("rank_pattern", "positive integers"), ("alpha_pattern", "numbers")):
        if c.get(key) is not None and not isinstance(c[key], Mapping):
            raise LoraError(f"adapter {key} must be an object of module patterns to {kind}, "
                            f"got {type(c[key]).__name__}")
    for key in ("modules_to_save", "target_modules"):
        value = c.get(key)
        if not (value is None or (isinstance(value, str) and key == "target_modules")
                or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))):
            raise LoraError(f"adapter {key} must be {'a string, ' if key == 'target_modules' else ''}"
                            f"a list of module names or null, got {value!r:.80}")
    peft_type = c.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoraError(f"unsupported peft_type {peft_type!r}: only LoRA adapters ('LORA') are supported")
    model_type = c.get("model_type")
    if model_type is None and require_model_type:
        raise LoraError(f"{CONFIG_NAME} must give model_type ({' or '.join(repr(t) for t in model_types(config))})")
    if model_type is not None and model_type not in model_types(config):
        raise LoraError(f"adapter model_type {model_type!r} does not match the base model "
                        f"(expected {' or '.join(repr(t) for t in model_types(config))})")
    if c.get("use_dora"):
        raise LoraError("DoRA adapters (use_dora: true) are not supported")
    if c.get("bias", "none") != "none":
        raise LoraError(f"bias {c.get('bias')!r} is not supported: only adapters with bias 'none'")
    if c.get("modules_to_save"):
        raise LoraError(f"modules_to_save is not supported (got {list(c['modules_to_save'])}): "
                        "an adapter may only carry LoRA deltas")
    for key, off in _UNSUPPORTED_OPTIONS:
        if c.get(key, off) not in (off, None, False, [], {}):
            raise LoraError(f"unsupported adapter option {key}={c[key]!r}")
    targets = c.get("target_modules")
    if isinstance(targets, (list, tuple)):
        unknown = [t for t in targets if str(t).rsplit(".", 1)[-1] not in TARGETS]
        if unknown:
            raise LoraError(f"unknown target module(s) {unknown}: supported are {', '.join(TARGETS)}")
    r = c.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise LoraError(f"adapter rank r must be a positive integer, got {r!r}")
    ranks = {"r": r, **{f"rank_pattern[{k!r}]": v for k, v in (c.get("rank_pattern") or {}).items()}}
    for where, rank in ranks.items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise LoraError(f"adapter rank {where} must be a positive integer, got {rank!r}")
        if rank > max_rank:
            raise LoraError(f"adapter rank {where}={rank} exceeds the maximum rank {max_rank}")
    for where, alpha in {"lora_alpha": c.get("lora_alpha", 8),
                         **{f"alpha_pattern[{k!r}]": v for k, v in (c.get("alpha_pattern") or {}).items()}}.items():
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise LoraError(f"adapter {where} must be a number, got {alpha!r}")
    return (compile_patterns(c.get("rank_pattern") or {}, "rank_pattern"),
            compile_patterns(c.get("alpha_pattern") or {}, "alpha_pattern"))


def bad_number(value) -> tuple[str, str] | None:
    """(where, what) of the first number in a parsed JSON value that is not finite or does not fit a
    float (`where` as `alpha_pattern['q_proj']`), or None. Iterative: depth is the parser's business."""
    stack: list[tuple[str, object]] = [("", value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return where, "NaN" if math.isnan(v) else ("infinity" if v > 0 else "-infinity")
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > sys.float_info.max:
            try:
                return where, f"an integer of {len(str(abs(v)))} digits"
            except ValueError:  # past Python's int -> str limit
                return where, f"an integer of {v.bit_length()} bits"
        if isinstance(v, Mapping):
            items = [(f"{where}[{k!r}]" if where else str(k), x) for k, x in v.items()]
        elif isinstance(v, (list, tuple)):
            items = [(f"{where}[{i}]", x) for i, x in enumerate(v)]
        else:
            continue
        stack.extend(reversed(items))
    return None


def _ambiguity(key: str) -> str | None:
    """Where Python's `re` and RE2 would both accept `key` but read it differently: the reason, or None.

    Tokens as Python's parser reads them: a backslash and the character after it, or one character;
    a class starts at `[`, may begin with `^`, and a `]` first in it is a literal."""
    i, n, in_class, first = 0, len(key), False, False
    while i < n:
        c = key[i]
        if c == "\\":
            if not in_class and key[i + 1:i + 2] in tuple("123456789"):
                return f"backreference \\{key[i + 1]} (RE2 reads it as octal; write \\x.. for a character)"
            i, first = i + 2, False
            continue
        if in_class:
            if c == "]" and not first:
                in_class = False
            elif c == "[":
                return "'[' inside a character class (a POSIX class in RE2, a literal in Python): escape it"
            elif c in "-&~|" and key[i + 1:i + 2] == c and not first:
                return f"'{c}{c}' inside a character class (reserved by Python for set operations)"
            first = False
        elif c == "[":
            in_class, first = True, True
            if key[i + 1:i + 2] == "^":
                i += 1
        elif c == "{" and key[i + 1:i + 2] == ",":
            return "'{,' (a repetition in Python, literal text in RE2): write {0,n}"
        i += 1
    return None


def compile_patterns(patterns: Mapping, field: str) -> list[tuple[str, "re2._Regexp"]]:
    """rank_pattern / alpha_pattern -> [(key, RE2 program of peft's `(.*\\.)?(key)$`)] in dict order.
    Raises LoraError naming the dict or the key (limits and refusals: the module docstring)."""
    if len(patterns) > MAX_PATTERNS:
        raise LoraError(f"{field} has {len(patterns)} keys; the limit is {MAX_PATTERNS}")
    options = re2.Options()
    options.max_mem, options.log_errors = _RE2_MAX_MEM, False
    compiled, program = [], 0
    for key in patterns:
        def refuse(reason: str):
            return LoraError(f"invalid rank_pattern / alpha_pattern key {_short(key)}: {reason}")
        if not isinstance(key, str):
            raise refuse("keys must be strings")
        if len(key) > MAX_PATTERN_CHARS:
            raise refuse(f"{len(key)} characters; the limit is {MAX_PATTERN_CHARS}")
        if not key.isascii():
            raise refuse("keys must be ASCII")
        if (reason := _ambiguity(key)) is not None:
            raise refuse(reason)
        wrapped = rf"(.*\.)?({key})$"
        try:  # Python's verdict (peft's engine): compiling is cheap, only matching with `re` backtracks
            re.compile(wrapped)
        except (re.error, OverflowError, RecursionError, ValueError) as e:
            raise refuse(str(e)) from None
        try:
            program_ = re2.compile(wrapped, options)
        except re2.error as e:
            why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
            raise refuse(f"RE2 cannot compile it ({why})") from None
        program += program_.programsize
        if program > MAX_PATTERN_PROGRAM:
            raise LoraError(f"{field}'s keys compile to over {MAX_PATTERN_PROGRAM} RE2 instructions; "
                            "use fewer or simpler keys")
        compiled.append((key, program_))
    return compiled


def _short(key) -> str:
    text = repr(key)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _pattern_key(compiled: list[tuple[str, "re2._Regexp"]], module: str) -> str | None:
    """peft's `get_pattern_key` over `compile_patterns`' output: the first key whose pattern matches
    a dotted suffix of the module name (None: no key matches; peft then falls back to r / lora_alpha)."""
    if not compiled:
        return None
    if len(module) > MAX_MODULE_CHARS or not (module.isascii() and module.isprintable()):
        raise LoraError(f"module name {_short(module)} must be printable ASCII of at most {MAX_MODULE_CHARS} "
                        "characters to be matched against rank_pattern / alpha_pattern")
    for key, program in compiled:
        if program.match(module) is not None:
            return key
    return None


def adapter_from_peft(adapter_config: Mapping, tensors: Mapping[str, np.ndarray], config: GemmaConfig, *,
                      max_rank: int = DEFAULT_MAX_RANK, dtype=jnp.float32,
                      require_model_type: bool = False) -> Adapter:
    """Parsed adapter_config.json + safetensors tensors (name -> [r, in] / [out, r]) -> Adapter."""
    rank_keys, alpha_keys = _validate(adapter_config, config, max_rank=max_rank,
                                      require_model_type=require_model_type)
    c = adapter_config
    rank_pattern, alpha_pattern = c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}
    slots = {stem[: -len(".weight")]: slot for stem, slot in hf_names(config).items() if slot.target is not None}
    found: dict[str, dict[str, np.ndarray]] = {}
    for name, array in tensors.items():
        m = _KEY.match(name)
        stem = m and re.search(r"(?:^|\.)(layers\.\d+\.\w+\.\w+)$", m["module"])
        if not stem:
            raise LoraError(f"unexpected tensor {name!r} in the adapter")
        if stem[1] not in slots:
            layer = re.match(r"layers\.(\d+)\.\w+\.(\w+)$", stem[1])
            if int(layer[1]) >= config.num_layers:
                raise LoraError(f"tensor {name!r} is for layer {layer[1]} but the base model has "
                                f"{config.num_layers} layers")
            if layer[2] not in TARGETS:
                raise LoraError(f"unknown target module {layer[2]!r} in tensor {name!r}: "
                                f"supported are {', '.join(TARGETS)}")
            raise LoraError(f"unexpected tensor {name!r} in the adapter")
        found.setdefault(m["module"], {})[m["ab"]] = np.asarray(array)
    if not found:
        raise LoraError("the adapter has no LoRA tensors")
    torch_weights = {}
    for module, ab in found.items():
        missing = {"A", "B"} - set(ab)
        if missing:
            raise LoraError(f"{module}: lora_{missing.pop()}.weight is missing")
        stem = re.search(r"(?:^|\.)(layers\.(\d+)\.\w+\.(\w+))$", module)
        layer, target = int(stem[2]), stem[3]
        key = module[len(_PEFT_PREFIX):] if module.startswith(_PEFT_PREFIX) else module
        r_key, alpha_key = _pattern_key(rank_keys, key), _pattern_key(alpha_keys, key)
        r = rank_pattern[r_key] if r_key is not None else c["r"]
        alpha = alpha_pattern[alpha_key] if alpha_key is not None else c.get("lora_alpha", 8)
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2:
            raise LoraError(f"layer {layer} {target}: lora_A and lora_B must be matrices, "
                            f"got shapes {tuple(a.shape)} and {tuple(b.shape)}")
        if a.shape[0] != r or b.shape[1] != r:
            raise LoraError(f"layer {layer} {target}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                            f"do not have the adapter's rank {r}")
        scale = alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r
        torch_weights[(layer, target)] = (a.astype(np.float32), b.astype(np.float32), scale)
    return adapter_from_torch(config, torch_weights, dtype)


# --- saving: the inverse of load_adapter -----------------------------------------------------------
def adapter_to_peft(adapter: Adapter, *, base_model_name: str, model_type: str | None = None
                    ) -> tuple[dict, dict[str, np.ndarray]]:
    """An Adapter -> (adapter_config.json dict, PEFT-named float32 tensors lora_A [r, in] / lora_B [out, r]).

    r and lora_alpha are the most common (rank, scale) of the adapter's modules; a module with another
    rank or scale gets a `rank_pattern` / `alpha_pattern` entry under its full module name, so that
    peft and `adapter_from_peft` give every module back its own rank and scale. `model_type` (which
    Workers AI requires) defaults to the base model's family (`model_types(config)[0]`).
    """
    config = adapter.config
    stems = {(slot.path[0], slot.target.name): name[: -len(".weight")]
             for name, slot in hf_names(config).items() if slot.target is not None}
    tensors: dict[str, np.ndarray] = {}
    modules: dict[str, tuple[int, float]] = {}  # "model.layers.i.<parent>.<target>" -> (rank, alpha)
    for layer, targets in adapter.layers.items():
        for target, lw in targets.items():
            a, b = np.asarray(lw.a, np.float32), np.asarray(lw.b, np.float32)
            rank = a.shape[-1]
            module = f"model.{stems[(layer, target)]}"
            tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(np.moveaxis(a, -1, 0).reshape(rank, -1))
            tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(np.moveaxis(b, 0, -1).reshape(-1, rank))
            modules[module] = (rank, _number(float(lw.scale) * rank))
    if not modules:
        raise LoraError("the adapter has no LoRA weights")
    counts: dict[tuple[int, float], int] = {}
    for key in modules.values():
        counts[key] = counts.get(key, 0) + 1
    r, alpha = max(counts, key=counts.get)
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
        "model_type": model_types(config)[0] if model_type is None else model_type,
        "r": r, "lora_alpha": alpha, "target_modules": list(adapter.targets),
        "rank_pattern": {m: rank for m, (rank, _) in modules.items() if rank != r},
        "alpha_pattern": {m: a for m, (_, a) in modules.items() if a != alpha},
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    return adapter_config, tensors


def _number(x: float) -> int | float:
    """alpha = scale * r read back from a float32 scale: float32 rounding undone (16 for 15.9999995)."""
    rounded = round(x, 5)
    x = rounded if abs(x - rounded) <= 1e-6 * max(1.0, abs(x)) else x
    return int(x) if float(x).is_integer() else float(x)


def save_adapter(adapter: Adapter, directory: str | os.PathLike, *, base_model_name: str,
                 model_type: str | None = None) -> str:
    """Write `adapter` as a PEFT LoRA adapter directory: adapter_config.json + adapter_model.safetensors
    (float32), loadable by `load_adapter`, by peft's `PeftModel.from_pretrained` and by the finetunes
    API. Creates `directory` if needed; returns its absolute path."""
    from safetensors.numpy import save_file  # noqa: PLC0415 - only saving needs the writer

    adapter_config, tensors = adapter_to_peft(adapter, base_model_name=base_model_name, model_type=model_type)
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(adapter_config, f, indent=2)
    return directory
