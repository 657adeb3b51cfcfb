"""The docs' examples run as written, and their links lead somewhere."""

import glob
import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "nnx.md"


def _python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_nnx_doc_examples_run(capsys):
    # Every ```python block, in order, in one namespace, as a reader would paste them.
    blocks = _python_blocks(DOC)
    assert len(blocks) == 5
    namespace = {"__name__": "docs_nnx"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"{DOC}, python block {number}", "exec"), namespace)  # pylint: disable=exec-used
    # The last block prints the error of a layout that finds nothing, as the doc shows it.
    printed = capsys.readouterr().out
    assert printed.startswith(
        "cannot interpolate: BONSAI_RESNET finds no stage of blocks in the tree; it looks "
        "for lists of blocks (keys 0, 1, ... as nnx.List keeps them) at paths matching "
        "'layer\\\\d+/blocks'; the tree's top-level keys are ['blocks', 'embed', 'final_norm', "
        "'head'] (under 'blocks': [0, 1, 2]; "
    ), printed


@pytest.mark.parametrize("name", ["README.md", "docs/growth-rules.md"])
def test_library_examples_run(name):
    # The README's library example and the growth of a flax-examples ResNet; each
    # asserts what its comments say (shapes, the paper's Table 2 numbers).
    (block,) = _python_blocks(ROOT / name)
    exec(compile(block, f"{name}, python block", "exec"), {"__name__": "docs_example"})  # pylint: disable=exec-used


def test_relative_links_lead_to_files():
    for path in [ROOT / "README.md", *map(pathlib.Path, glob.glob(str(ROOT / "docs" / "*.md")))]:
        for target in re.findall(r"\]\(([^)]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file = target.split("#")[0]
            assert not file or os.path.exists(path.parent / file), (path.name, target)
