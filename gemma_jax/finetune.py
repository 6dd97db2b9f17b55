"""LoRA fine-tuning through the pure `forward`: an `lora.Adapter` pytree trained with `jax.grad` + optax.

    adapter = init_adapter(config, jax.random.key(0), rank=8, alpha=16)
    batch = make_batch(tokenizer, [(prompt, completion), ...], length=32)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(adapter)
    step = make_train_step(config, optimizer)              # jitted
    adapter, opt_state, loss = step(adapter, opt_state, params, batch)
    weights.peft.save_adapter(adapter, "my-adapter", base_model_name="google/gemma-3-270m")

The adapter is applied functionally: its deltas are merged into a copy of the projection weights
inside the loss (`lora.apply_adapter`, the merge rule that `lora.merge_lora` jits, traced here with
no jit or sharding of its own), so the loss is differentiable w.r.t. A and B and the base `params`
are never modified.
Initialization is PEFT's default: A Kaiming-uniform (bound 1/sqrt(in_features)), B zeros, so step 0
is exactly the base model. The scales (alpha / r) are constants: their gradient is stopped, so adam
never moves them (a zero gradient gives a zero adam update).

The loss is next-token cross-entropy over the tokens of each example's completion (and its EOS);
prompt and padding tokens are masked out. Rows are right-padded, positions are 0..T-1: causal
attention keeps the padding from touching the tokens before it.

Shape letters: the legend in `projections.py`; here also T = the padded example length.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gemma_jax import lora as lora_lib
from gemma_jax import projections
from gemma_jax.config import GemmaConfig
from gemma_jax.lora import Adapter, LoraWeights, apply_adapter  # also `finetune.apply_adapter`, as before
from gemma_jax.model import forward


@flax.struct.dataclass
class Batch:
    """Right-padded examples: tokens [B, T] int32 (BOS first), loss_mask [B, T] float32: 1 where the
    token is one the model should learn to predict (completion + EOS), else 0."""

    tokens: jax.Array
    loss_mask: jax.Array


def init_adapter(config: GemmaConfig, key: jax.Array, *, rank: int, alpha: float | None = None,
                 targets: Iterable[str] = lora_lib.TARGETS, layers: Iterable[int] | None = None,
                 dtype=jnp.float32) -> Adapter:
    """A fresh adapter as PEFT initializes one: A ~ U(-1/sqrt(in), 1/sqrt(in)) (`kaiming_uniform_`
    with a=sqrt(5)), B = 0, scale = alpha / rank (alpha defaults to rank: scale 1)."""
    targets = tuple(targets)
    unknown = [t for t in targets if t not in projections.TARGETS]
    if unknown:
        raise lora_lib.LoraError(f"unknown target module(s) {unknown}: supported are {', '.join(lora_lib.TARGETS)}")
    layers = range(config.num_layers) if layers is None else tuple(layers)
    scale = (rank if alpha is None else alpha) / rank
    out: dict[str, dict[str, LoraWeights]] = {}
    keys = iter(jax.random.split(key, len(layers) * len(targets)))
    for i in layers:
        for name in targets:
            t = projections.TARGETS[name]
            bound = 1.0 / math.sqrt(t.in_features(config))
            a = jax.random.uniform(next(keys), (*t.in_shape(config), rank), dtype, -bound, bound)  # [*ins, R]
            b = jnp.zeros((rank, *t.out_shape(config)), dtype)  # [R, *outs]
            # a buffer of its own per scale: the train step donates every leaf of the adapter
            out.setdefault(f"layer_{i}", {})[name] = LoraWeights(a=a, b=b, scale=jnp.full((), scale, jnp.float32))
    return Adapter(layers=out, config=config)


def make_batch(tokenizer, examples: Sequence[tuple[str, str]], length: int, *, eos_id: int | None = None) -> Batch:
    """(prompt, completion) pairs -> a Batch: BOS + prompt + completion + EOS, right-padded with the
    pad id to `length`; the loss covers the completion and the EOS. ValueError if one is too long."""
    eos = tokenizer.eos_id if eos_id is None else eos_id
    tokens = np.full((len(examples), length), max(tokenizer.pad_id, 0), np.int32)
    mask = np.zeros((len(examples), length), np.float32)
    for row, (prompt, completion) in enumerate(examples):
        head = tokenizer.encode(prompt, add_bos=True)
        tail = [*tokenizer.encode(completion, add_bos=False), eos]
        ids = head + tail
        if len(ids) > length:
            raise ValueError(f"example {row} is {len(ids)} tokens, longer than length={length}")
        tokens[row, :len(ids)] = ids
        mask[row, len(head):len(ids)] = 1.0
    return Batch(tokens=jnp.asarray(tokens), loss_mask=jnp.asarray(mask))


def freeze_scales(adapter: Adapter) -> Adapter:
    """The same adapter with the gradient of every scale stopped (only A and B are trained)."""
    return jax.tree.map(lambda w: w.replace(scale=jax.lax.stop_gradient(w.scale)), adapter,
                        is_leaf=lambda x: isinstance(x, LoraWeights))


def token_losses(adapter: Adapter, params, tokens: jax.Array, *, config: GemmaConfig) -> jax.Array:
    """[B, T-1] float32: -log p(tokens[:, t+1] | tokens[:, :t+1]) under params + adapter."""
    merged = apply_adapter(params, freeze_scales(adapter))
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)  # [B, T]
    logits, _ = forward(merged, tokens, positions, config=config)  # [B, T, V]
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def loss_fn(adapter: Adapter, params, batch: Batch, *, config: GemmaConfig) -> jax.Array:
    """Mean next-token cross-entropy over the masked (completion) tokens: a scalar."""
    mask = batch.loss_mask[:, 1:]  # the token predicted at t is tokens[t + 1]
    losses = token_losses(adapter, params, batch.tokens, config=config)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_train_step(config: GemmaConfig, optimizer: optax.GradientTransformation):
    """A jitted `step(adapter, opt_state, params, batch) -> (adapter, opt_state, loss)`: one
    `jax.value_and_grad` of `loss_fn` w.r.t. the adapter and one optimizer update. The adapter and
    optimizer state are donated; `params` is only read."""

    def step(adapter: Adapter, opt_state, params, batch: Batch):
        loss, grads = jax.value_and_grad(loss_fn)(adapter, params, batch, config=config)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))
