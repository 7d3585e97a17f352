"""Files written whole or not at all: what the library and the commands save (head scores, surrogates, tables, plots)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside `path` (this process's own, ending in `suffix`: a writer that infers the format from the
    name gets its extension) to write to; when the block ends without an error it replaces `path` at once
    (os.replace), and in every case it is gone: `path` holds the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
