"""rank_pattern / alpha_pattern keys: our RE2 matcher (`gemma_jax.weights.peft`) against peft's own
`get_pattern_key`, the keys we refuse, and a catastrophic-backtracking key through the real loader.

The reference is peft: `peft.utils.other.get_pattern_key(keys, module)` runs Python's `re.match` on
`(.*\\.)?(key)$` and returns the first key that matches (or the module name itself when none does, which
is our None). For every key `compile_patterns` accepts, our answer must be peft's: on a table of plain
names, suffixes and regexes, and on keys drawn by hypothesis from regex syntax (where Python raises, we
must have refused; where Python warns, we must have refused too).
"""

from __future__ import annotations

import json
import re
import time
import warnings

import jax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft.utils.other import get_pattern_key

from gemma_jax import config as C
from gemma_jax import finetune
from gemma_jax.lora import LoraError
from gemma_jax.weights.peft import (CONFIG_NAME, MAX_PATTERN_CHARS, MAX_PATTERN_PROGRAM, MAX_PATTERNS,
                                    _pattern_key, compile_patterns, load_adapter, save_adapter)

REDOS = ".*" * 10 + "!"  # Python's re: seconds per module name; RE2: microseconds
MODULES = [
    "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.11.mlp.down_proj",
    "model.layers.1.mlp.up_proj", "model.language_model.layers.2.self_attn.k_proj", "layers.0.mlp.gate_proj",
    "q_proj", "xq_proj", "model.layers.10.self_attn.o_proj", "a.b", "model.layers.3.self_attn.v_proj",
]
KEYS = [
    "q_proj", "self_attn.q_proj", "layers.1.self_attn.q_proj", r"layers\.\d+\.self_attn\.q_proj",
    r"layers\.1\.mlp\..*", "model.layers.0.self_attn.q_proj", "proj", "_proj", "q_proj$", "^model.*", ".*",
    "(q|k)_proj", "(?i:Q_PROJ)", r"\w+_proj", "[qk]_proj", "[^q]_proj", "layers.1", r"layers\.1\d\..*", "",
    "|", "q_proj)|(xyz", "q_proj)|(.*", "a{0}q_proj", r"\bq_proj", "down_proj|up_proj", r"mlp\.(up|down)_proj",
    ".*q_proj.*", "layers.[0-9]+.mlp.gate_proj", "q_pro", "model", "self_attn", "1.self_attn.q_proj",
    r"layers\.(\d|1[0-7])\.mlp\..*", "[]a]_proj", "[^]a]+", r"q\_proj", r"\x71_proj", "q{1}_proj", "q{1,}_proj",
    "(?s:.)*proj", "(?P<name>q)_proj", "b", "a.b", ".*.*.*!", "q_proj" + "|q_proj" * 20, r"[\d.a-z]+",
    "(?i:[Z-a])+", "[-a]+", "[a-]+", "q_proj\\n?", "layers.0.mlp.gate_proj", r"\Amodel.*",
]


def peft_key(keys, module):
    found = get_pattern_key(keys, module)
    return None if found == module and module not in keys else found


def ours(keys, module):
    return _pattern_key(compile_patterns(dict.fromkeys(keys, 1), "rank_pattern"), module)


@pytest.mark.parametrize("module", MODULES)
def test_matcher_equals_peft_on_the_table(module):
    for key in KEYS:
        assert ours([key], module) == peft_key([key], module), (key, module)
    assert ours(KEYS, module) == peft_key(KEYS, module)  # first key in dict order wins
    assert ours(KEYS[::-1], module) == peft_key(KEYS[::-1], module)


def test_matcher_answers_on_the_table():
    """A few answers by hand, so the table is not vacuous."""
    assert ours([r"layers\.\d+\.self_attn\.q_proj"], "model.layers.11.self_attn.q_proj") is not None
    assert ours(["q_proj"], "model.layers.0.self_attn.q_proj") == "q_proj"
    assert ours(["_proj"], "model.layers.0.self_attn.q_proj") is None  # a dotted suffix, not any suffix
    assert ours(["proj", "q_proj"], "q_proj") == "q_proj"
    assert ours(["q_proj)|(.*"], "a.b") == "q_proj)|(.*"  # the key can leave its group, as in peft
    assert ours([REDOS, "k_proj"], "model.layers.2.self_attn.k_proj") == "k_proj"


REFUSED = [  # (key, what the message says after "invalid rank_pattern / alpha_pattern key <key>: ")
    ("a{4294967296}", "the repetition number is too large"),
    ("(" * 5000 + ")" * 5000, f"10000 characters; the limit is {MAX_PATTERN_CHARS}"),
    ("q" * (MAX_PATTERN_CHARS + 1), f"{MAX_PATTERN_CHARS + 1} characters; the limit is {MAX_PATTERN_CHARS}"),
    (r"(a)\1", "backreference \\1"),
    (r"(a)(b)(c)(d)(e)(f)(g)(h)(i)(j)\12", "backreference \\1"),
    ("(?=q)q_proj", "RE2 cannot compile it (invalid perl operator: (?=)"),
    ("(?<!x)q_proj", "RE2 cannot compile it (invalid perl operator: (?<!)"),
    ("(?>q)_proj", "RE2 cannot compile it (invalid perl operator: (?>)"),
    (r"q_proj\Z", "RE2 cannot compile it (invalid escape sequence: \\Z)"),
    (r"\u0071_proj", "RE2 cannot compile it (invalid escape sequence: \\u)"),
    ("q*+", "RE2 cannot compile it (bad repetition operator: *+)"),
    ("[[:alpha:]_]+", "'[' inside a character class"),
    ("[a[:digit:]]+", "'[' inside a character class"),
    ("[a--z]", "'--' inside a character class"),
    ("[a&&b]", "'&&' inside a character class"),
    ("q{,3}_proj", "'{,' (a repetition in Python, literal text in RE2)"),
    ("(?i)q_proj", "global flags not at the start of the expression at position 8"),
    ("q_proj(", "missing ), unterminated subpattern at position 7"),
    ("(?i:ı)", "keys must be ASCII"),
    ("((a{100}){100}){100}", "RE2 cannot compile it (invalid repetition size: {100})"),
    (".{0,1000}" * 40, "RE2 cannot compile it (pattern too large - compile failed)"),
]


@pytest.mark.parametrize("key, reason", REFUSED, ids=[f"refused-{i}" for i in range(len(REFUSED))])
def test_refused_keys_are_refused_quickly(key, reason):
    start = time.perf_counter()
    with pytest.raises(LoraError) as e:
        compile_patterns({"q_proj": 4, key: 4}, "rank_pattern")
    took = time.perf_counter() - start
    assert str(e.value).startswith("invalid rank_pattern / alpha_pattern key '")
    assert reason in str(e.value), str(e.value)
    assert took < 0.1, took


def test_pattern_limits():
    start = time.perf_counter()
    with pytest.raises(LoraError, match=f"^alpha_pattern has {MAX_PATTERNS + 1} keys; the limit is {MAX_PATTERNS}$"):
        compile_patterns({f"k{i}": 1 for i in range(MAX_PATTERNS + 1)}, "alpha_pattern")
    with pytest.raises(LoraError, match=f"^rank_pattern's keys compile to over {MAX_PATTERN_PROGRAM} RE2 instructions"):
        compile_patterns({f"(?:.{{0,999}}a{i})": 1 for i in range(MAX_PATTERNS)}, "rank_pattern")
    assert time.perf_counter() - start < 0.5
    # the most a legitimate adapter needs: one key per module of a large model, in both dicts
    keys = {f"model.layers.{i // 7}.{t}": 4 for i, t in enumerate(["self_attn.q_proj"] * MAX_PATTERNS)}
    start = time.perf_counter()
    assert len(compile_patterns(keys, "rank_pattern")) == len(keys)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("module", ["model.ü.layers.0.self_attn.q_proj", "model.layers.0\x1c.q_proj",
                                    "m" * 600 + ".q_proj"])
def test_module_names_must_be_printable_ascii(module):
    with pytest.raises(LoraError, match="must be printable ASCII of at most 512 characters"):
        ours(["q_proj"], module)
    assert ours([], module) is None  # nothing to match: no constraint


# Keys drawn from regex syntax: every accepted key answers as peft does, on every module name.
TOKENS = list("ab.q_pj019[]^-{},*+?|()$:") + [r"\d", r"\w", r"\s", r"\b", r"\B", r"\.", r"\\", "(?:", "(?i:",
                                              r"\1", r"\12", "[:alpha:]", "{2}", "{1,3}", "{,2}", r"\A", r"\Z",
                                              "[^", "&&", "--", r"\x61", "(?P<n>", "(?="]
# Short names: Python's re itself must stay quick on whatever key is drawn (`.*` four times at most).
SUBJECTS = st.one_of(st.sampled_from(["q_proj", "a.b", "layers.0.q_proj", "xq_proj", "b"]),
                     st.text(alphabet="ab.q_pj019", max_size=12))


@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.lists(st.sampled_from(TOKENS), max_size=8).map("".join), modules=st.lists(SUBJECTS, min_size=1,
                                                                                       max_size=4))
def test_matcher_equals_peft_on_drawn_keys(key, modules):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a key Python warns about (a nested set...) must be refused before
        try:  # Python compiles it
            compiled = compile_patterns({key: 1}, "rank_pattern")
        except LoraError:
            return  # refused: never matched by either engine here
        for module in modules:
            try:
                want = peft_key([key], module)
            except re.error as e:
                pytest.fail(f"accepted {key!r}, which Python refuses: {e}")
            assert _pattern_key(compiled, module) == want, (key, module)


# --- the real loader: 126 modules (Gemma 3 270M: 18 layers x 7 projections) -----------------------
@pytest.fixture(scope="module")
def adapter_270m(tmp_path_factory):
    config = C.gemma3_270m()
    adapter = finetune.init_adapter(config, jax.random.key(0), rank=1, alpha=2.0)
    directory = save_adapter(adapter, tmp_path_factory.mktemp("a270m"), base_model_name="google/gemma-3-270m")
    return config, directory


def _with_patterns(directory, **patterns):
    path = f"{directory}/{CONFIG_NAME}"
    with open(path) as f:
        saved = json.load(f)
    saved.update(patterns)
    with open(path, "w") as f:
        json.dump(saved, f)


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_catastrophic_key_through_the_real_loader(adapter_270m, field):
    """`.*` x 10 + `!` against 126 module names: Python's re would take seconds per module (minutes in
    all, holding the GIL); through RE2 the whole load stays under a second."""
    config, directory = adapter_270m
    _with_patterns(directory, rank_pattern={}, alpha_pattern={})
    start = time.perf_counter()
    base = load_adapter(directory, config)
    plain = time.perf_counter() - start
    value = 1 if field == "rank_pattern" else 99
    _with_patterns(directory, **{field: {REDOS: value, r"layers\.(\d|1[0-7])\.mlp\.up_proj": value}})
    start = time.perf_counter()
    adapter = load_adapter(directory, config)
    took = time.perf_counter() - start
    print(f"126 modules: load without patterns {plain:.3f}s, with the catastrophic key {took:.3f}s")
    assert took < 1.0, took
    modules = [(layer, t) for layer in adapter.layers for t in adapter.layers[layer]]
    assert len(modules) == 126
    for layer, t in modules:  # the second key matched 18 modules; the first none
        scale, want = float(adapter.layers[layer][t].scale), float(base.layers[layer][t].scale)
        if field == "alpha_pattern" and t == "up_proj":
            want = 99.0
        assert scale == pytest.approx(want), (layer, t)


# --- the loader on its own (notebook users call it directly): LoraError, never a crash --------------
GOOD = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}


@pytest.mark.parametrize("changes, message", [
    ({"rank_pattern": [1]}, "adapter rank_pattern must be an object of module patterns to positive integers, "
                            "got list"),
    ({"alpha_pattern": "x"}, "adapter alpha_pattern must be an object of module patterns to numbers, got str"),
    ({"modules_to_save": 5}, "adapter modules_to_save must be a list of module names or null, got 5"),
    ({"target_modules": [1]}, "adapter target_modules must be a string, a list of module names or null, got [1]"),
    ({"lora_alpha": 10**400}, "adapter lora_alpha must be a finite number that fits a float, "
                              "got an integer of 401 digits"),
    ({"lora_alpha": float("inf")}, "adapter lora_alpha must be a finite number that fits a float, got infinity"),
    ({"lora_alpha": float("-inf")}, "adapter lora_alpha must be a finite number that fits a float, got -infinity"),
    ({"alpha_pattern": {"q_proj": float("nan")}},
     "adapter alpha_pattern['q_proj'] must be a finite number that fits a float, got NaN"),
    ({"loftq_config": {"a": [1, 2**1100]}},
     "adapter loftq_config['a'][1] must be a finite number that fits a float, got an integer of 332 digits"),
    ({"rank_pattern": {"a{4294967296}": 4}},
     "invalid rank_pattern / alpha_pattern key 'a{4294967296}': the repetition number is too large"),
    ({"alpha_pattern": {f"k{i}": 1 for i in range(MAX_PATTERNS + 1)}},
     f"alpha_pattern has {MAX_PATTERNS + 1} keys; the limit is {MAX_PATTERNS}"),
])
def test_loader_refuses_configs(changes, message):
    from gemma_jax.weights.peft import validate_config

    with pytest.raises(LoraError) as e:
        validate_config({**GOOD, **changes}, C.tiny_mha())
    assert str(e.value) == message


def test_loader_refuses_config_files(tmp_path, adapter_270m):
    """What `load_adapter` reads from disk: a 1e999 literal, a 5000-digit integer, deep nesting."""
    config, directory = adapter_270m
    weights = f"{directory}/adapter_model.safetensors"
    for text, message in [('{"r": 1, "lora_alpha": 1e999}', "lora_alpha must be a finite number"),
                          ('{"r": 1, "lora_alpha": 1' + "0" * 5000 + "}", "is not valid JSON: Exceeds the limit"),
                          ("[" * 100_000 + "]" * 100_000, "is nested too deeply")]:
        (tmp_path / CONFIG_NAME).write_text(text)
        with pytest.raises(LoraError, match=re.escape(message)):
            load_adapter((tmp_path / CONFIG_NAME, weights), config)
