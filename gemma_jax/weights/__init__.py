"""Weight formats: HF safetensors, Kaggle/DeepMind Flax trees, GGUF, and our native orbax checkpoints."""
