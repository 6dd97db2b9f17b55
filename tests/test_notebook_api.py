"""The notebook API (generate / stream / logits) against the plain model and the tokenizer."""

import numpy as np

from engine_reference import _full_forward, naive_greedy, tiny_paged, trained_tokenizer
from gemma_jax.notebook import Model, encode, generate, logits, stream


def test_generate_stream_and_logits():
    config, params, engine = tiny_paged("tiny_gemma3", warm=True)
    tok = trained_tokenizer()
    model = Model(config, params, tok, engine=engine)
    try:
        prompts = ["hello world", "the quick brown fox jumps", "café"]
        ids = [encode(model, p) for p in prompts]
        assert all(i[0] == tok.bos_id and i[1:] == tok.encode(p, add_bos=False) for i, p in zip(ids, prompts))
        want = [naive_greedy(config, params, [i], 12)[0] for i in ids]
        texts = generate(model, prompts, temperature=0, max_tokens=12)
        assert texts == [tok.decode([t for t in w if t not in config.stop_ids]) for w in want]
        assert "".join(stream(model, prompts[1], temperature=0, max_tokens=12)) == texts[1]
        sampled = generate(model, prompts[0], temperature=1.0, seed=3, max_tokens=10)
        assert sampled == generate(model, [prompts[0]], temperature=1.0, seed=3, max_tokens=10)
        # Chat prompts use the template; over-long max_tokens is cut to the room left, not refused.
        chat_ids = encode(model, "hello", chat=True)
        assert chat_ids == encode(model, [{"role": "user", "content": "hello"}])
        assert len(generate(model, chat_ids, temperature=0, max_tokens=1000)) == 1

        out = logits(model, ids[1])  # [T, V]
        padded = np.zeros((1, config.limits.max_total_tokens), np.int32)
        padded[0, : len(ids[1])] = ids[1]
        ref = np.asarray(_full_forward(config)(params, padded))[0, : len(ids[1])]
        assert out.shape == (len(ids[1]), config.vocab_size)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
        assert int(np.argmax(out[-1])) == want[1][0]
    finally:
        model.close()


def test_top_level_exports_are_the_notebook_api():
    import gemma_jax
    from gemma_jax import notebook

    for name in ("Model", "load", "generate", "stream", "logits", "encode"):
        assert getattr(gemma_jax, name) is getattr(notebook, name)
