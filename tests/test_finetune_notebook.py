"""notebooks/finetune_lora.ipynb runs top to bottom in small mode (GEMMA_JAX_NOTEBOOK_SMALL=1): a tiny
Gemma 3 over the real tokenizer, a LoRA adapter trained with jax.grad, saved for PEFT, uploaded to a
real `gemma-jax serve` subprocess on 127.0.0.1 through the finetunes API and used with `lora`.

Checked from the notebook's own variables: the loss went down; the saved files load back
(`load_adapter`) into exactly the trained adapter; the server answered a prompt seen in training
with the learned phrase when the adapter is named, and with something else without it; and that
text is what the merged weights give with a plain greedy loop in this process
(the full forward, no cache), so the server applied this adapter, not just some change.
"""

import json
from pathlib import Path

import numpy as np

import jax

from gemma_jax.lora import merge_lora
from gemma_jax.model import forward
from gemma_jax.weights.peft import load_adapter

def greedy(config, params, ids, max_tokens, pad_to=64):
    """Greedy tokens by a full forward (no cache) over the sequence padded to `pad_to`, stopping
    after a stop id (included)."""
    step = jax.jit(lambda p, t: forward(p, t, np.arange(pad_to)[None], config=config)[0])
    seq, drawn = list(ids), []
    while len(drawn) < max_tokens and not (drawn and drawn[-1] in config.stop_ids):
        tokens = np.zeros((1, pad_to), np.int32)
        tokens[0, :len(seq)] = seq
        drawn.append(int(np.argmax(np.asarray(step(params, tokens))[0, len(seq) - 1])))
        seq.append(drawn[-1])
    return drawn


NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "finetune_lora.ipynb"


def test_finetune_notebook_runs_in_small_mode(gguf_file, monkeypatch):
    monkeypatch.setenv("GEMMA_JAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("GEMMA_JAX_CACHE", str(gguf_file.parent))
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the server subprocess: one CPU device, as a user has
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    namespace: dict = {}
    try:
        for source in code:
            exec(compile(source, str(NOTEBOOK), "exec"), namespace)  # noqa: S102 - our own notebook
    finally:
        server = namespace.get("server")
        if server is not None and server.poll() is None:
            server.kill()
    assert namespace["SMALL"] is True and namespace["config"].num_layers == 6
    losses = namespace["losses"]
    assert len(losses) == namespace["STEPS"] and losses[-1] < losses[0]

    config, params, tokenizer = namespace["config"], namespace["params"], namespace["tokenizer"]
    adapter = namespace["adapter"]
    saved = load_adapter(namespace["ADAPTER_DIR"], config, require_model_type=True)
    for name, targets in adapter.layers.items():
        for t, w in targets.items():
            np.testing.assert_array_equal(saved.layers[name][t].a, w.a)
            np.testing.assert_array_equal(saved.layers[name][t].b, w.b)

    phrase, prompt = namespace["PHRASE"], namespace["EVAL_PROMPTS"][0]
    base, tuned = namespace["base_texts"][0], namespace["tuned_texts"][0]
    assert prompt in namespace["PROMPTS"]
    assert tuned == phrase and base != tuned  # generation stops at the learned EOS
    drawn = greedy(config, merge_lora(params, saved), tokenizer.encode(prompt), 24)
    assert tokenizer.decode([i for i in drawn if i not in config.stop_ids]) == tuned
    assert namespace["server"].returncode == 0  # stopped cleanly by SIGTERM
