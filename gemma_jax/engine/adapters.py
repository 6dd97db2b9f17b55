"""The host side of an engine's LoRA bank: names, free ids per rank bucket, one lock.

    slots = AdapterSlots(config, adapter_slots=8, rank=32, dtype=jnp.float32, mesh=mesh)
    index = slots.load("ft-1", "/path/to/peft")      # -> device id (> 0)
    with slots.lock: step(params, slots.bank, ...)    # a dispatch reads the bank under the lock

The bank itself is `lora.AdapterBank` (id 0 = base model, rank buckets, `adapter_slots` ids each).
Loading or unloading an adapter rewrites one slot of the smallest bucket that holds its rank in
place (same shapes: nothing that takes the bank recompiles); at most `adapter_slots` adapters are
loaded at once. An unloaded adapter's name disappears at once, but its slot keeps its weights until
a later load reuses it (a bucket's free ids are reused oldest-freed first), so requests already
admitted on it finish as they started. Both engines (`engine.Engine`, `paged.PagedEngine`) hold one.
"""

from __future__ import annotations

import collections
import os
import threading

from gemma_jax import lora as lora_lib
from gemma_jax.config import GemmaConfig
from gemma_jax.engine.api import UnknownAdapter


class AdapterSlots:
    """`adapter_slots` LoRA adapters by name over one `lora.AdapterBank` (None when adapter_slots is 0)."""

    def __init__(self, config: GemmaConfig, *, adapter_slots: int, rank: int, dtype, mesh,
                 rank_buckets=None):
        self.config = config
        self.adapter_slots = max(int(adapter_slots), 0)
        self.bank: lora_lib.AdapterBank | None = None
        if self.adapter_slots > 0:
            if rank_buckets is None:
                rank_buckets = lora_lib.default_rank_buckets(mesh.devices.flat[0].platform)
            self.bank = lora_lib.make_bank(config, self.adapter_slots + 1, int(rank), dtype, mesh,
                                           rank_buckets=rank_buckets)
        self._names: dict[str, int] = {}
        buckets = range(len(self.bank.ranks)) if self.bank is not None else ()
        self._free = [collections.deque(self.bank.bucket_ids(k)) for k in buckets]
        self.lock = threading.Lock()  # bank updates (donated) vs dispatches that read it

    @property
    def dtype(self):
        return None if self.bank is None else next(iter(self.bank.layer(0).values()))[0].a.dtype

    def load(self, name: str, adapter: "lora_lib.Adapter | str | os.PathLike", *,
             require_model_type: bool = False) -> int:
        """Put an adapter (an `lora.Adapter`, or a PEFT directory, validated here) into a free id of
        the smallest rank bucket that holds it, under `name`; returns the id. Raises LoraError (a
        ValueError) if it does not fit or the name is taken, BankFull if the bank is full."""
        if self.bank is None:
            raise lora_lib.LoraError("this engine has no adapter bank (adapter_slots=0)")
        if not isinstance(adapter, lora_lib.Adapter):
            from gemma_jax.weights.peft import load_adapter as load_peft

            adapter = load_peft(adapter, self.config, max_rank=self.bank.rank, dtype=self.dtype,
                                require_model_type=require_model_type)
        with self.lock:
            if name in self._names:
                raise lora_lib.LoraError(f"an adapter named {name!r} is already loaded")
            if len(self._names) >= self.adapter_slots:
                raise lora_lib.BankFull(f"the adapter bank is full ({len(self._names)} adapters loaded)")
            free = self._free[self.bank.bucket_for(adapter.rank)]  # refuses a rank above the maximum
            index = free[0]  # a bucket has adapter_slots ids: one is free while fewer are loaded
            self.bank = lora_lib.bank_add(self.bank, index, adapter)  # validates; donates the old bucket
            free.popleft()
            self._names[name] = index
        return index

    def unload(self, name: str) -> None:
        """Forget `name` (UnknownAdapter if not loaded); its id is reused by a later load."""
        with self.lock:
            if name not in self._names:
                raise UnknownAdapter(f"no LoRA adapter named {name!r} is loaded")
            index = self._names.pop(name)
            self._free[self.bank.locate(index)[0]].append(index)

    def names(self) -> dict[str, int]:
        """Loaded adapters: name -> id."""
        with self.lock:
            return dict(self._names)

    def id_of(self, name: str) -> int:
        """The device id of a loaded adapter; UnknownAdapter if there is none by that name."""
        with self.lock:
            found = self._names.get(name)
        if found is None:
            raise UnknownAdapter(f"no LoRA adapter named {name!r} is loaded")
        return found
