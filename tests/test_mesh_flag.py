"""`--mesh data=D,model=M` (gemma_jax/mesh_flag.py) through the real `gemma-jax` parser and the serve
factory, on the 8 fake CPU devices of tests/conftest.py."""

import argparse

import jax
import numpy as np
import pytest

from gemma_jax import cli as core_cli
from gemma_jax.config import tiny_gemma3
from gemma_jax.engine.api import Request
from gemma_jax.mesh_flag import build_mesh, default_shape, parse_mesh
from serving import cli as serve_cli


def _parser():
    return core_cli.build_parser((*core_cli.COMMANDS, serve_cli._add_serve))


def test_parse_mesh():
    assert parse_mesh("data=1,model=8") == (1, 8)
    assert parse_mesh("model=4, data=2") == (2, 4)
    for bad in ("data=1", "data=1,model=8,data=2", "data=0,model=8", "data=x,model=8", "1x8", "data=1,pipe=8", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_mesh(bad)


def test_serve_and_generate_parse_the_flag(monkeypatch, capsys):
    assert _parser().parse_args(["serve", "--mesh", "data=2,model=4"]).mesh == (2, 4)
    assert _parser().parse_args(["generate", "hi", "--mesh", "data=1,model=8"]).mesh == (1, 8)
    assert _parser().parse_args(["serve"]).mesh is None
    monkeypatch.setenv("GEMMA_JAX_MESH", "data=4,model=2")
    assert _parser().parse_args(["serve"]).mesh == (4, 2)  # argparse parses a string default with `type`
    assert _parser().parse_args(["serve", "--mesh", "data=8,model=1"]).mesh == (8, 1)  # the flag wins
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--mesh", "model=8"])
    assert "expected data=D,model=M" in capsys.readouterr().err


def test_default_shape_rule():
    # the largest divisor of the device count that divides the head count, checked by brute force
    for devices in (1, 2, 4, 8, 16, 32):
        for heads in (1, 2, 4, 6, 8, 10, 16):
            data, model = default_shape(devices, heads)
            assert data * model == devices and heads % model == 0
            assert not any(devices % m == 0 and heads % m == 0 for m in range(model + 1, devices + 1))
    assert default_shape(8, 16) == (1, 8)  # Gemma 7B on a v5e-8
    assert default_shape(8, 4) == (2, 4)  # Gemma 3 270M on a v5e-8
    assert default_shape(8, 8) == (1, 8)  # Gemma 2B on a v5e-8
    assert default_shape(16, 16) == (1, 16)


def test_build_mesh_on_fake_cpu_devices():
    assert jax.device_count() == 8
    config = tiny_gemma3()
    mesh = build_mesh((2, 4), config)
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert list(mesh.devices.flat) == jax.devices()
    default = build_mesh(None, config)  # CPU: today's single device, fake devices or not
    assert dict(default.shape) == {"data": 1, "model": 1} and list(default.devices.flat) == jax.devices()[:1]
    for shape in ((1, 1), (2, 2), (4, 4)):
        with pytest.raises(SystemExit, match=r"data\*model must equal the device count"):
            build_mesh(shape, config)


def _greedy(backend, prompt_ids, max_tokens=8):
    from gemma_jax.sampling import SamplingParams

    backend.start()
    try:
        return backend.submit(Request(prompt_ids=tuple(prompt_ids), max_tokens=max_tokens,
                                      sampling=SamplingParams(temperature=0.0))).result(timeout=300).token_ids
    finally:
        backend.stop()


def test_serve_factory_builds_the_engine_on_the_asked_mesh():
    from serving.factory import build_backend

    flags = ["serve", "--random-weights", "tiny_gemma3_short", "--no-warmup", "--lora-slots", "0", "--max-batch", "2"]
    sharded = build_backend(_parser().parse_args([*flags, "--mesh", "data=2,model=4"]))
    engine = sharded.scheduler.engine
    assert dict(engine.mesh.shape) == {"data": 2, "model": 4}
    # the weights really are split: each of the 8 devices holds a quarter of the MLP hidden dimension
    # of the first layer's up projection (4 model shards; the data axis replicates them)
    leaves = jax.tree_util.tree_leaves_with_path(engine.params)
    hidden = engine.config.hidden_dim
    split = [leaf for path, leaf in leaves if hidden in leaf.shape and len(leaf.sharding.device_set) == 8]
    assert split, "no parameter with the MLP hidden dimension is on all 8 devices"
    for leaf in split:
        axis = leaf.shape.index(hidden)
        assert {s.data.shape[axis] for s in leaf.addressable_shards} == {hidden // 4}
    single = build_backend(_parser().parse_args(flags))  # no --mesh on CPU: one device, as before
    assert dict(single.scheduler.engine.mesh.shape) == {"data": 1, "model": 1}
    prompt = [2, 10, 20, 30, 40, 50]
    tokens = _greedy(sharded, prompt)
    assert len(tokens) == 8
    np.testing.assert_array_equal(tokens, _greedy(single, prompt))


def test_serve_factory_refuses_a_mesh_that_does_not_use_every_device():
    from serving.factory import build_backend

    args = _parser().parse_args(["serve", "--random-weights", "tiny_gemma3_short", "--no-warmup", "--lora-slots", "0",
                                 "--mesh", "data=1,model=4"])
    with pytest.raises(SystemExit, match="uses 4 devices, but this job has 8"):
        build_backend(args)
