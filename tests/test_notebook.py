"""notebooks/quickstart.ipynb runs top to bottom (its cells assert what they show)."""

import json
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(gguf_file):
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert len(code) >= 5
    namespace: dict = {}
    for source in code:
        exec(compile(source, str(NOTEBOOK), "exec"), namespace)  # noqa: S102 - our own notebook
    texts = namespace["texts"]
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    assert texts[0].startswith(" the capital")  # greedy, same as tests/test_serving_real_model.py
    assert namespace["logits"].shape[-1] == namespace["model"].config.vocab_size
