"""The README's example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python example"
    namespace = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    state, record, spec = namespace["state"], namespace["record"], namespace["spec"]
    assert int(state.steps) == 100
    assert float(state.clock) == 100 * float(record.cycles(spec))
