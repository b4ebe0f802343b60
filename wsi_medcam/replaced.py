"""Files that appear whole or not at all: written under a hidden sibling name and renamed over the
target when complete (one ``os.replace``, atomic on POSIX file systems), so a kill, a full disk or
an exception leaves the earlier file or no file, never half of one that a viewer or a rerun would
take for finished.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced(path: Path | str) -> Iterator[Path]:
    """Yield ``.<name>.partial`` beside ``path`` to write; it is renamed to ``path`` when the block
    ends and removed when the block raises (writers given it must be told the format: its suffix is
    ``.partial``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_text(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`replaced`."""
    with replaced(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
