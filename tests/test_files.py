"""Tests of the atomic result-file writers."""

import json
import os
import stat

import numpy as np
import pytest

from mlres_jax import files


def test_replaces_atomically_and_leaves_no_temporary_file(tmp_path):
    path = str(tmp_path / "summary.json")
    files.write_json(path, {"a": 1})
    files.write_json(path, {"a": 2})
    with open(path) as handle:
        assert json.load(handle) == {"a": 2}
    assert os.listdir(tmp_path) == ["summary.json"]


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "a.json")
    files.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        files.write_json(path, {"a": object()})  # not JSON-serialisable
    with open(path) as handle:
        assert json.load(handle) == {"a": 1}
    assert os.listdir(tmp_path) == ["a.json"]


def test_files_get_plain_permissions_not_temporary_0600(tmp_path):
    # A regression: tempfile creates 0600 files, so results were unreadable
    # for other users. Expected: 0666 less the umask, as open() would give.
    old = os.umask(0o022)
    try:
        path = str(tmp_path / "table.md")
        files.write_text(path, "| a |\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_csv_has_header_and_rows(tmp_path):
    path = str(tmp_path / "norms.csv")
    files.write_csv(path, [{"block": 1, "norm": 0.5}, {"block": 2, "norm": 0.25}])
    with open(path) as handle:
        assert handle.read() == "block,norm\n1,0.5\n2,0.25\n"


def _strict_loads(text):
    """json.loads that rejects NaN and Infinity, as strict parsers do."""

    def reject(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=reject)


def test_json_files_are_strict_json_with_null_for_missing_values(tmp_path):
    path = str(tmp_path / "x.json")
    files.write_json(
        path,
        {
            "nan": float("nan"),
            "values": (float("inf"), np.float32(1.5), -float("inf"), 2),
            "array": np.array([0.25, np.nan]),
            "ok": None,
        },
    )
    with open(path) as handle:
        data = _strict_loads(handle.read())
    assert data == {"nan": None, "values": [None, 1.5, None, 2], "array": [0.25, None], "ok": None}
    with pytest.raises(TypeError, match="cannot be written as JSON"):
        files.write_json(path, {"bad": object()})
    assert _strict_loads(open(path).read()) == data  # the earlier file is kept
