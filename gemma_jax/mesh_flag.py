"""The `--mesh data=D,model=M` flag of `gemma-jax serve` and `gemma-jax generate`.

The engine runs on a ("data", "model") mesh (`sharding.make_mesh`): the paged step replicated over "data",
heads / MLP hidden / vocabulary over "model" (`sharding.RULES`). The flag names that shape; without
it the shape follows one rule, so that a CPU host keeps serving from one device and a TPU VM uses
every chip:

- on CPU: the first device alone (1x1), whatever `--xla_force_host_platform_device_count` says
  (fake CPU devices are for tests; ask for them with the flag);
- on TPU / GPU: every device of the job (`jax.devices()`: all hosts of a multi-host slice), with
  `model` = the largest divisor of the device count that divides the model's query-head count
  and `data` = the rest. Gemma 7B (16 heads) on a v5e-8: data=1,model=8; Gemma 3 270M (4 heads)
  on a v5e-8: data=2,model=4.

An explicit shape must use every device: D*M == `jax.device_count()`, else SystemExit.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # jax is imported when a mesh is built, not when the CLI parses (`--help` stays instant)
    from jax.sharding import Mesh

    from gemma_jax.config import GemmaConfig


def parse_mesh(text: str) -> tuple[int, int]:
    """'data=D,model=M' (either order, both required, positive integers) -> (D, M); argparse type."""
    parts: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or name not in ("data", "model") or name in parts:
            raise argparse.ArgumentTypeError(f"expected data=D,model=M, not {text!r}")
        try:
            parts[name] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}={value!r} is not an integer") from None
        if parts[name] < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, not {parts[name]}")
    if set(parts) != {"data", "model"}:
        raise argparse.ArgumentTypeError(f"expected data=D,model=M, not {text!r}")
    return parts["data"], parts["model"]


def default_shape(num_devices: int, num_heads: int) -> tuple[int, int]:
    """(data, model) for `num_devices` accelerators: model = the largest divisor of `num_devices`
    that divides `num_heads`, data = the rest."""
    model = max(m for m in range(1, num_devices + 1) if num_devices % m == 0 and num_heads % m == 0)
    return num_devices // model, model


def build_mesh(shape: tuple[int, int] | None, config: GemmaConfig) -> Mesh:
    """The engine's mesh for `--mesh` (`shape`, or None for the default rule above)."""
    import jax

    from gemma_jax.sharding import make_mesh

    devices = jax.devices()
    if shape is None:
        if devices[0].platform == "cpu":
            return make_mesh(1, 1, devices=devices[:1])
        shape = default_shape(len(devices), config.num_heads)
    data, model = shape
    if data * model != len(devices):
        raise SystemExit(f"gemma-jax: --mesh data={data},model={model} uses {data * model} devices, but this "
                         f"job has {len(devices)} ({devices[0].platform}); data*model must equal the device count")
    return make_mesh(data, model, devices=devices)
