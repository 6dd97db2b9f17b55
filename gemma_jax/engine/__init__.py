"""The inference engine: device functions (prefill / insert / generate) and the host scheduler."""
