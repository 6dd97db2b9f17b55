"""LoRA fine-tuning (`gemma_jax.finetune`) and saving adapters in PEFT format (`weights.peft.save_adapter`).

References: peft itself. Our adapter is saved with `save_adapter`, loaded by
`peft.PeftModel.from_pretrained` onto the transformers model with the same random weights
(`hf_reference.py`), and torch autograd through peft gives the masked next-token loss and the
gradient of every lora_A / lora_B, which must equal our `jax.value_and_grad` through the pure
forward (so the files, the loss and the gradients are all checked at once, ranks and alphas mixed
through rank_pattern / alpha_pattern). The round trip save -> `load_adapter` is exact; training on a
tiny model lowers the loss and moves only A and B.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch

from gemma_jax import config as C
from gemma_jax import finetune, projections
from gemma_jax.lora import TARGETS, Adapter, LoraWeights, merge_lora
from gemma_jax.model import forward
from gemma_jax.params import init_params
from gemma_jax.weights.hf import params_from_hf_state
from gemma_jax.weights.peft import CONFIG_NAME, adapter_to_peft, load_adapter, save_adapter
from hf_reference import random_hf_gemma, random_hf_gemma3, state_numpy
from real_backend import tiny_model, train_tokenizer

_forward = jax.jit(forward, static_argnames="config")
_token_losses = jax.jit(finetune.token_losses, static_argnames="config")
_loss = jax.jit(finetune.loss_fn, static_argnames="config")
TINY = {"gqa": (C.tiny_gqa(), random_hf_gemma), "gemma3": (C.tiny_gemma3(), random_hf_gemma3)}


def random_adapter(config, seed: int, rank: int = 4, alpha: float = 8.0) -> Adapter:
    """Non-zero A and B on every target; layer 1's q_proj rank 2 alpha 3 and its down_proj alpha 5
    (so saving needs rank_pattern and alpha_pattern)."""
    adapter = finetune.init_adapter(config, jax.random.key(seed), rank=rank, alpha=alpha)
    rng = np.random.default_rng(seed)
    layers = {}
    for name, targets in adapter.layers.items():
        layers[name] = {}
        for t, w in targets.items():
            r, scale = rank, alpha / rank
            if name == "layer_1" and t == "q_proj":
                r, scale = 2, 3.0 / 2
            elif name == "layer_1" and t == "down_proj":
                scale = 5.0 / rank
            a = rng.normal(0, 0.3, (*w.a.shape[:-1], r)).astype(np.float32)
            b = rng.normal(0, 0.3, (r, *w.b.shape[1:])).astype(np.float32)
            layers[name][t] = LoraWeights(a=jnp.asarray(a), b=jnp.asarray(b), scale=jnp.float32(scale))
    return Adapter(layers=layers, config=config)


def _tokens_and_mask(config, seed=0, batch=3, length=12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, config.vocab_size, (batch, length)).astype(np.int32)
    mask = np.zeros((batch, length), np.float32)
    for row, (start, end) in enumerate([(4, 12), (2, 7), (5, 9)][:batch]):
        mask[row, start:end] = 1.0
        tokens[row, end:] = 0  # padding after the example
    return tokens, mask


def _flat(adapter: Adapter) -> dict[str, np.ndarray]:
    return adapter_to_peft(adapter, base_model_name="x")[1]


@pytest.mark.parametrize("name", list(TINY))
def test_loss_and_gradients_equal_peft(name, tmp_path):
    config, make = TINY[name]
    hf = make(config, seed=5)
    params = params_from_hf_state(state_numpy(hf), config)
    adapter = random_adapter(config, seed=1)
    tokens, mask = _tokens_and_mask(config)
    batch = finetune.Batch(tokens=jnp.asarray(tokens), loss_mask=jnp.asarray(mask))

    save_adapter(adapter, tmp_path, base_model_name="tiny")
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8
    assert saved["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 2}
    assert saved["alpha_pattern"] == {"model.layers.1.self_attn.q_proj": 3, "model.layers.1.mlp.down_proj": 5}
    # The reference: peft in float64 (transformers still runs its RMSNorms, rope and eager softmax in
    # float32 inside a .double() Gemma, so it is off the exact gradients by up to 4.1e-5 of each
    # tensor's max). Ours are float32 and off the exact ones by up to 2.1e-4 (gemma3; peft's float32
    # 1.5e-5): XLA:CPU's float32 rsqrt in RMSNorm reads 0.11 ulp low on average (torch's and numpy's
    # are unbiased), and these tiny random models' LoRA gradients amplify it; with rsqrt rounded
    # correctly ours are 5.9e-5 off. With every norm, rope and softmax in float64 on both sides, ours
    # equal peft's to 1e-13 (measured 2026-12-06, 2-core EPYC): no modelling difference. The earlier
    # float32-vs-float32 check at 2e-4 passed on a Xeon and failed here on one element of 512.
    model = peft.PeftModel.from_pretrained(hf, tmp_path, is_trainable=True).double()
    model.train()  # dropout is 0: train mode only turns gradients on

    logits = model(torch.as_tensor(tokens, dtype=torch.long)).logits
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -torch.gather(logp, -1, torch.as_tensor(tokens[:, 1:], dtype=torch.long)[..., None])[..., 0]
    m = torch.as_tensor(mask[:, 1:], dtype=torch.float64)
    ref_loss = (nll * m).sum() / m.sum()
    ref_loss.backward()
    ref_grads = {n.replace(".default", ""): p.grad.numpy() for n, p in model.named_parameters() if "lora_" in n}

    # the saved files, in peft, give the logits of our merged forward
    merged_logits, _ = _forward(merge_lora(params, adapter), jnp.asarray(tokens),
                                jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape), config=config)
    np.testing.assert_allclose(merged_logits, logits.detach().numpy(), rtol=2e-4, atol=2e-4)

    loss, grads = jax.jit(jax.value_and_grad(finetune.loss_fn), static_argnames="config")(
        adapter, params, batch, config=config)
    np.testing.assert_allclose(float(loss), float(ref_loss.detach()), rtol=1e-5)
    ours = _flat(grads)
    assert set(ours) == set(ref_grads) and len(ours) == 2 * len(TARGETS) * config.num_layers
    for key, g in ours.items():
        scale = np.max(np.abs(ref_grads[key]))
        assert scale > 0, key
        np.testing.assert_allclose(g, ref_grads[key], rtol=0, atol=5e-4 * scale, err_msg=key)
    assert all(float(w.scale) == 0.0 for layer in grads.layers.values() for w in layer.values())  # not trained


def test_save_then_load_is_exact(tmp_path):
    config = C.tiny_gemma3()
    adapter = random_adapter(config, seed=2)
    assert save_adapter(adapter, tmp_path / "a", base_model_name="google/gemma-3-270m") == str(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert saved["model_type"] == "gemma3" and saved["base_model_name_or_path"] == "google/gemma-3-270m"
    assert saved["peft_type"] == "LORA" and saved["target_modules"] == list(TARGETS)
    back = load_adapter(tmp_path / "a", config, require_model_type=True)
    assert back.layers.keys() == adapter.layers.keys()
    for name, targets in adapter.layers.items():
        assert back.layers[name].keys() == targets.keys()
        for t, w in targets.items():
            got = back.layers[name][t]
            np.testing.assert_array_equal(got.a, w.a, err_msg=f"{name} {t}")
            np.testing.assert_array_equal(got.b, w.b, err_msg=f"{name} {t}")
            assert float(got.scale) == float(w.scale), (name, t)


def test_init_is_the_base_model_and_apply_equals_merge():
    config = C.tiny_gemma3()
    params = init_params(config, jax.random.key(0), jnp.float32)
    adapter = finetune.init_adapter(config, jax.random.key(1), rank=8, alpha=16)
    tokens, _ = _tokens_and_mask(config)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    base, _ = _forward(params, jnp.asarray(tokens), positions, config=config)
    base_nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(base[:, :-1], axis=-1)), tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(_token_losses(adapter, params, jnp.asarray(tokens), config=config),
                               base_nll, rtol=1e-6, atol=1e-6)  # B = 0: exactly the base model
    for layer in adapter.layers.values():
        for t, w in layer.items():
            bound = 1 / np.sqrt(projections.TARGETS[t].in_features(config))
            assert 0.5 * bound < np.max(np.abs(w.a)) <= bound and not np.any(w.b) and float(w.scale) == 2.0

    trained = random_adapter(config, seed=3)
    merged = merge_lora(params, trained)
    applied = jax.jit(finetune.apply_adapter)(params, trained)
    for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(merged),
                                 jax.tree_util.tree_leaves_with_path(applied), strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("spm"))


def test_make_batch_masks_the_completion(spm_tokenizer):
    tok = spm_tokenizer
    batch = finetune.make_batch(tok, [("hello world", " the quick fox"), ("the lazy dog", " jumps")], length=32)
    for row, (prompt, completion) in enumerate([("hello world", " the quick fox"), ("the lazy dog", " jumps")]):
        head = tok.encode(prompt, add_bos=True)
        tail = tok.encode(completion, add_bos=False) + [tok.eos_id]
        want = head + tail + [tok.pad_id] * (32 - len(head) - len(tail))
        assert list(np.asarray(batch.tokens[row])) == want
        assert list(np.asarray(batch.loss_mask[row])) == [0.0] * len(head) + [1.0] * len(tail) + [0.0] * (
            32 - len(head) - len(tail))
    with pytest.raises(ValueError, match="longer than length=8"):
        finetune.make_batch(tok, [("hello world", " the quick fox")], length=8)


def _hits(params, adapter, batch, config) -> float:
    """Fraction of the completion tokens that are the argmax of the logits before them."""
    logits, _ = _forward(finetune.apply_adapter(params, adapter), batch.tokens,
                         jnp.broadcast_to(jnp.arange(batch.tokens.shape[1]), batch.tokens.shape), config=config)
    mask = np.asarray(batch.loss_mask[:, 1:]) > 0
    return float(np.mean(np.asarray(jnp.argmax(logits[:, :-1], -1))[mask] == np.asarray(batch.tokens[:, 1:])[mask]))


def test_training_lowers_the_loss_and_moves_only_a_and_b(spm_tokenizer):
    """A random tiny model's flat output head bounds how low the loss can go (the adapter cannot
    change the embedding or the final norm), so what training must achieve is the argmax: after it,
    every completion token is the greedy choice, which it is not for the base model."""
    tok = spm_tokenizer
    config, params = tiny_model(tok)
    before = jax.tree.map(np.asarray, params)
    examples = [(p, " the quick brown fox") for p in ("hello world", "a tiny tokenizer", "the lazy dog", "serving")]
    batch = finetune.make_batch(tok, examples, length=32)
    adapter = finetune.init_adapter(config, jax.random.key(0), rank=4, alpha=8)
    start = jax.tree.map(np.asarray, adapter)
    assert _hits(params, adapter, batch, config) < 0.5
    optimizer = optax.adam(3e-2)
    opt_state = optimizer.init(adapter)
    step = finetune.make_train_step(config, optimizer)
    losses = []
    for _ in range(20):
        adapter, opt_state, loss = step(adapter, opt_state, params, batch)
        losses.append(float(loss))
    base = float(_loss(finetune.init_adapter(config, jax.random.key(0), rank=4), params, batch, config=config))
    assert losses[0] == pytest.approx(base, rel=1e-5)  # step 0 is evaluated at B = 0: the base model's loss
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.85 * losses[0], losses
    assert float(_loss(adapter, params, batch, config=config)) < losses[-1]
    assert _hits(params, adapter, batch, config) == 1.0
    for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(before),
                                 jax.tree_util.tree_leaves_with_path(params), strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))  # the base is only read
    for name, targets in adapter.layers.items():
        for t, w in targets.items():
            assert float(w.scale) == float(start.layers[name][t].scale) == 2.0
            assert np.any(w.b) and not np.array_equal(w.a, start.layers[name][t].a)
