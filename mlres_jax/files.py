"""Result files written atomically: a temporary file beside the target, then a rename.

A reader never sees a half-written ``summary.json``, CSV or PNG, and a crash
during a write leaves the previous version in place. The one place for this
concept: training, the analyses and the benchmarks all write through here.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from typing import Any, Callable, IO, Mapping, Sequence


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
    handle = tempfile.NamedTemporaryFile(mode, dir=folder, delete=False,
                                         suffix=".tmp")
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


def write_json(path: str, payload: Any) -> None:
    """Writes ``payload`` as indented JSON to ``path`` atomically."""
    write_atomically(path, lambda handle: json.dump(payload, handle, indent=2))


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
    write_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=dpi),
                     mode="wb")
