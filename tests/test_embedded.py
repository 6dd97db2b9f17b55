"""The embedded default model: first use converts the GGUF into a native checkpoint in the cache
directory, later uses restore that checkpoint; `gemma-jax generate` prints the greedy continuation.

The cache directory is a fresh temporary one holding only a link to the real GGUF, so the first
`load_embedded` really converts. References: `load_gguf` on the GGUF itself (arrays),
`Tokenizer.from_gguf` (ids), and a greedy loop that recomputes the full forward for every token
(no KV cache) for the CLI's text.
"""

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import cli, embedded
from gemma_jax.mesh_flag import build_mesh
from gemma_jax.model import forward
from gemma_jax.quantize import quantize_params
from gemma_jax.tokenizer import Tokenizer, encode_chat
from gemma_jax.weights import native
from gemma_jax.weights.gguf import load_gguf
from gemma_jax.weights.load import CPU_DEFAULT

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, gguf_file):
    directory = tmp_path_factory.mktemp("gemma-jax-cache")
    (directory / gguf_file.name).symlink_to(gguf_file)
    return directory


@pytest.fixture(scope="module")
def first_load(cache):
    assert not (cache / embedded.CHECKPOINT_NAME).exists()
    return embedded.load_embedded(cache=cache)


def test_repo_notice_passes_on_the_gemma_terms():
    notice = (REPO / "NOTICE").read_text()
    assert "Apache License" in notice and "Version 2.0" in notice
    assert embedded.GEMMA_NOTICE in notice
    assert embedded.embedded_gguf.notice_path().read_text() in notice


def _leaves(params):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def test_first_use_converts_into_the_cache_dir(cache, first_load, gguf_file):
    config, params, tokenizer = first_load
    directory = cache / embedded.CHECKPOINT_NAME
    assert native.is_native_checkpoint(directory)
    assert (directory / "tokenizer.model").is_file()
    notice = (directory / "NOTICE").read_text()
    assert embedded.GEMMA_NOTICE in notice
    assert embedded.embedded_gguf.notice_path().read_text() in notice

    ref_config, ref_params = load_gguf(gguf_file, progress=False)
    assert config == ref_config
    got, want = _leaves(params), _leaves(ref_params)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    ref_tokenizer = Tokenizer.from_gguf(gguf_file)
    text = "<start_of_turn>user\nDéjà vu: 東京 🚀  spaces\tand tabs<end_of_turn>\n"
    assert tokenizer.encode(text) == ref_tokenizer.encode(text)
    assert tokenizer.vocab_size == config.vocab_size == 262_144


def test_second_load_restores_the_checkpoint(cache, first_load, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("the second load must not read the GGUF")

    monkeypatch.setattr(embedded, "load_gguf", no_conversion)
    monkeypatch.setattr(embedded.embedded_gguf, "gguf_path", no_conversion)
    config, params, tokenizer = embedded.load_embedded(cache=cache)
    assert config == first_load[0]
    got, want = _leaves(params), _leaves(first_load[1])
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert tokenizer.encode("hello world") == first_load[2].encode("hello world")

    _, params16, _ = embedded.load_embedded(dtype=jnp.bfloat16, cache=cache)
    embedding = params16["embedder"]["input_embedding"]
    assert embedding.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(embedding),
                                  np.asarray(first_load[1]["embedder"]["input_embedding"]).astype(jnp.bfloat16))


@functools.partial(jax.jit, static_argnames="config")
def _next_token(params, tokens, length, *, config):
    """Argmax after `length` real tokens of a padded [1, T] row (full recompute, no cache)."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    logits, _ = forward(params, tokens, positions, None, config=config)
    return jnp.argmax(logits[0, length - 1])


def _reference_greedy(config, params, prompt, max_tokens, width=64):
    ids = list(prompt)
    out = []
    for _ in range(max_tokens):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, : len(ids)] = ids
        token = int(_next_token(params, jnp.asarray(tokens), len(ids), config=config))
        if token in config.stop_ids:
            break
        out.append(token)
        ids.append(token)
    return out


def _cli_command() -> list[str]:
    script = shutil.which("gemma-jax")  # installed by `pip install -e .`; else the same main()
    return [script] if script else [sys.executable, "-m", "gemma_jax.cli"]


@pytest.mark.parametrize("flags", [[], ["--quantize", "none"]], ids=["default", "float32"])
def test_cli_generate_prints_the_greedy_continuation(cache, first_load, flags):
    """Default mode (the prompt as one chat-template user turn), through the console script; by
    default on a CPU the weights are `--quantize auto`'s (`load.CPU_DEFAULT`), so the reference
    loop runs on `quantize_params` of the float tree with that method."""
    config, params, tokenizer = first_load
    prompt = "Name three colours."
    env = dict(os.environ, GEMMA_JAX_CACHE=str(cache), PYTHONPATH=str(REPO))
    env.pop("GEMMA_JAX_QUANTIZE", None)
    run = subprocess.run([*_cli_command(), "generate", prompt, "--max-tokens", "12", *flags], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    if not flags:
        params = quantize_params(params, config, method=CPU_DEFAULT)
    expected = _reference_greedy(config, params, encode_chat(tokenizer, [{"role": "user", "content": prompt}]), 12)
    assert expected, "the reference produced no text"
    assert run.stdout == tokenizer.decode(expected) + "\n"
    assert run.stdout.strip()


def test_cli_generate_raw(first_load, monkeypatch, capsys):
    """--raw feeds the text verbatim after BOS (in-process, on the already loaded model)."""
    config, params, tokenizer = first_load
    mesh = build_mesh(None, first_load[0])
    monkeypatch.setattr(cli, "load_model", lambda checkpoint, dtype, quantize=None, mesh_shape=None: (*first_load, mesh))
    assert cli.main(["generate", "The capital of France is", "--raw", "--max-tokens", "8"]) == 0
    expected = _reference_greedy(config, params, tokenizer.encode("The capital of France is"), 8)
    out = capsys.readouterr().out
    assert out == tokenizer.decode(expected) + "\n"
    assert out.strip()


def test_stale_checkpoint_is_converted_again(cache, first_load):
    """A cached checkpoint another gemma-jax version wrote (here: a different format version) is
    replaced by a fresh conversion instead of failing."""
    config_file = cache / embedded.CHECKPOINT_NAME / "config.json"
    config_file.write_text(config_file.read_text().replace('"format_version": 1', '"format_version": 0'))
    with pytest.raises(ValueError, match="format_version"):
        native.load_checkpoint(cache / embedded.CHECKPOINT_NAME)
    config, params, _ = embedded.load_embedded(cache=cache)
    assert config == first_load[0]
    np.testing.assert_array_equal(np.asarray(params["final_norm"]["scale"]),
                                  np.asarray(first_load[1]["final_norm"]["scale"]))
    assert native.read_config(cache / embedded.CHECKPOINT_NAME) == config
