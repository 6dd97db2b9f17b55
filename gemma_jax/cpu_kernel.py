"""A matmul of ours for block-quantized int8 weights on a CPU, run by XLA as an FFI custom call.

    block_matmul(x [M, I] float, w [O, I] int8, scale [O, I // BLOCK] float) -> y [M, O] float32
    y[m, o] = sum_i x[m, i] * w[o, i] * scale[o, i // BLOCK]

XLA:CPU has no product that reads int8 weights with float activations as stored: it converts the
whole weight to float first (`quantize.py`). `cpu_kernel.cc` does: each block of 32 weights is
widened to float32 in registers (AVX2 + FMA where the compiler targets them, a portable loop
otherwise) and dotted with every row of x, the outputs split over XLA's intra-op threads. It reads
one byte per weight plus one float32 scale per block, once per call, whatever the number of rows.

The kernel is compiled on first use, for the machine it runs on (`-O3 -march=native`, by `$CXX`,
else `c++`), against the XLA FFI headers jaxlib ships (`jax.ffi.include_dir()`), into the gemma-jax
cache directory (`kernels/`, keyed by the source, the compiler command, jaxlib's version and the
CPU), then loaded and registered with XLA as the custom call target `TARGET`. Where that fails (no
compiler), or off a CPU, `block_matmul` runs the same product in XLA on the dequantized weight
(`reference_block_matmul`: correct, but it converts the whole weight, as XLA:CPU does for int8),
and `available()` says which one runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

from gemma_jax.embedded_gguf import cache_dir

BLOCK = 32  # weights per scale along the input (the kernel's kBlock)
TARGET = "gemma_jax_block_matmul"  # the custom call target, as registered with XLA
SOURCE = Path(__file__).with_name("cpu_kernel.cc")
KERNELS_SUBDIR = "kernels"
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
_NATIVE = ("-march=native",)  # tried first; a compiler without it (or a CPU it cannot name) builds without

log = logging.getLogger(__name__)


def _cpu_id() -> str:
    """What -march=native targets on this machine: its model and flags (Linux), else the machine."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.machine() + platform.processor()


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX", "c++"))


def library_path() -> Path:
    """Where the compiled kernel for this source, compiler, jaxlib and CPU lives (built or not)."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_compiler() + list(_FLAGS)).encode(), jaxlib.__version__.encode(),
                 _cpu_id().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / KERNELS_SUBDIR / f"block_matmul-{key.hexdigest()[:16]}.so"


def build(path: Path | None = None) -> Path:
    """Compile `cpu_kernel.cc` into `path` (default `library_path()`) unless it is there; returns
    the path. Written under a temporary name and renamed, so concurrent builders never load half a
    file. Raises RuntimeError with the compiler's message when no attempt compiles."""
    path = path or library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for native in (_NATIVE, ()):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        cmd = [*_compiler(), *_FLAGS, *native, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:  # no compiler at all
            os.unlink(tmp)
            raise RuntimeError(f"cannot run {cmd[0]!r} to build {SOURCE.name}: {e}") from e
        if done.returncode == 0:
            os.replace(tmp, path)
            return path
        os.unlink(tmp)
        errors.append(f"$ {shlex.join(cmd)}\n{done.stderr.strip()[-2000:]}")
    raise RuntimeError(f"could not compile {SOURCE.name}:\n" + "\n".join(errors))


@functools.cache
def available() -> bool:
    """Whether the kernel is built, loaded and registered with XLA's CPU backend (once a process)."""
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(lib, TARGET)), platform="cpu")
    except (RuntimeError, OSError, AttributeError) as e:
        log.warning("block-quantized matmuls run in XLA on dequantized weights (slow): %s", e)
        return False
    return True


def reference_block_matmul(x: jax.Array, w: jax.Array, scale: jax.Array) -> jax.Array:
    """`block_matmul` in XLA: the weight dequantized to float32, then one dot. [M, O] float32."""
    o, i = w.shape
    dequantized = (w.reshape(o, i // BLOCK, BLOCK).astype(jnp.float32) * scale.astype(jnp.float32)[..., None])
    return jnp.dot(x.astype(jnp.float32), dequantized.reshape(o, i).T, preferred_element_type=jnp.float32)


def block_matmul(x: jax.Array, w: jax.Array, scale: jax.Array) -> jax.Array:
    """x [M, I] . (w [O, I] int8 * scale [O, I // BLOCK], per block)^T -> [M, O] float32 (module
    docstring): the kernel on a CPU where `available()`, else `reference_block_matmul`."""
    m, i = x.shape
    o = w.shape[0]
    if w.shape != (o, i) or i % BLOCK or scale.shape != (o, i // BLOCK):
        raise ValueError(f"block_matmul: x {x.shape}, w {w.shape}, scale {scale.shape}: "
                         f"expected [M, I], [O, I], [O, I // {BLOCK}] with I a multiple of {BLOCK}")
    if jax.default_backend() != "cpu" or not available():
        return reference_block_matmul(x, w, scale)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, o), jnp.float32), vmap_method="sequential")
    return call(x.astype(jnp.float32), w, scale.astype(jnp.float32))
