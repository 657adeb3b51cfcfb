"""The examples of docs/nnx.md run as written."""

import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "nnx.md"


def test_nnx_doc_examples_run(capsys):
    # Every ```python block, in order, in one namespace, as a reader would paste them.
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)
    assert len(blocks) == 5
    namespace = {"__name__": "docs_nnx"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"{DOC}, python block {number}", "exec"), namespace)  # pylint: disable=exec-used
    # The last block prints the error of a layout that finds nothing, as the doc shows it.
    printed = capsys.readouterr().out
    assert printed.startswith(
        "cannot interpolate: bonsai_resnet_layout() finds no stage of blocks in the tree; it looks "
        "for lists of blocks (keys 0, 1, ... as nnx.List keeps them) at paths matching "
        "'layer\\\\d+/blocks'; the tree's top-level keys are ['blocks', 'embed', 'final_norm', "
        "'head'] (under 'blocks': [0, 1, 2]; "), printed
