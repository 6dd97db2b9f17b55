"""Test-wide setup: 8 fake CPU devices (for sharding tests) and the embedded GGUF fixture.

XLA_FLAGS must be set before jax is first imported, which is why it happens here at import time.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gguf_file():
    """Path of the real Gemma 3 270M GGUF (assembled once into the gemma-jax cache dir)."""
    from gemma_jax.embedded_gguf import gguf_path

    return gguf_path()
