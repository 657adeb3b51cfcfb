"""Result files written atomically: a temporary file beside the target, then a rename.

A reader never sees a half-written ``summary.json``, CSV or PNG, and a crash
during a write leaves the previous version in place. The one place for this
concept: training, the analyses and the benchmarks all write through here.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: str, write: Callable[[IO], None], mode: str = "w") -> None:
    """Calls ``write(handle)`` on a temporary file, then renames it to ``path``.

    The file gets the permissions of a plainly created file (0666 less the
    umask), not the 0600 of a temporary file.

    Raises:
      OSError: if the folder cannot be created or written; ``path`` is then
        left as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(mode, dir=folder, delete=False, suffix=".tmp")
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o666 & ~_umask())
        os.replace(handle.name, path)
    except BaseException:
        if os.path.exists(handle.name):
            os.remove(handle.name)
        raise


def write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` atomically."""
    write_atomically(path, lambda handle: handle.write(text))


def json_compatible(payload: Any) -> Any:
    """``payload`` with every value strict JSON can hold.

    JSON has no NaN or infinity (Python's ``json`` writes them as ``NaN``,
    which strict parsers reject): a non-finite float becomes None (``null``,
    a missing value). numpy scalars and arrays become Python numbers and
    lists, tuples become lists; mapping keys must be strings already.

    Raises:
      TypeError: for a value JSON cannot represent (e.g. an object).
    """
    if isinstance(payload, Mapping):
        return {key: json_compatible(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [json_compatible(value) for value in payload]
    if isinstance(payload, np.ndarray):
        return json_compatible(payload.tolist())
    if isinstance(payload, np.generic):
        payload = payload.item()
    if isinstance(payload, float) and not math.isfinite(payload):
        return None
    if payload is None or isinstance(payload, (str, bool, int, float)):
        return payload
    raise TypeError(f"{type(payload).__name__} value {payload!r} cannot be written as JSON")


def write_json(path: str, payload: Any) -> None:
    """Writes ``payload`` as indented, strictly valid JSON to ``path`` atomically.

    Non-finite numbers are written as ``null`` (`json_compatible`); every
    JSON file the project writes goes through here or `json_compatible`.
    """
    text = json.dumps(json_compatible(payload), indent=2, allow_nan=False)
    write_atomically(path, lambda handle: handle.write(text))


def write_csv(path: str, records: Sequence[Mapping[str, Any]]) -> None:
    """Writes records (dicts with the same keys) as CSV with a header, atomically."""

    def write(handle):
        fields = list(records[0]) if records else []
        writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)

    write_atomically(path, write)


def save_figure(figure, path: str, dpi: int = 150) -> None:
    """Writes a matplotlib ``Figure`` as a PNG to ``path`` atomically."""
    write_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=dpi), mode="wb")
