"""The README's offline Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_models_example_runs_and_its_comments_hold():
    namespace = {}
    exec(BLOCKS[0], namespace)
    out, maps = namespace["out"], namespace["maps"]
    assert tuple(out["last_hidden_state"].shape) == (2, 7, 7, 2048)
    assert tuple(out["pooler_output"].shape) == (2, 2048)
    assert len(out["hidden_states"]) == 5
    assert tuple(namespace["logits"].shape) == (1, 10) and namespace["logits"].dtype == "float32"
    assert list(maps) == ["stage2", "stage4"] and namespace["backbone"].channels == [512, 2048]
