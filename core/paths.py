"""What a path option may be (core.domains): an existing file or folder to read, or where a
command writes. Checked where the value enters, so a wrong path is one line before any work."""

from __future__ import annotations

import os
from pathlib import Path

from core.domains import Text, quote


class InputPath(Text):
    """An existing file (folder=False) or folder to read."""

    folder = False

    def __init__(self, what: str | None = None):
        kind = "folder" if self.folder else "file"
        super().__init__(f"an existing {what or kind}", metavar="DIR" if self.folder else "FILE")

    def check(self, value) -> str | None:
        if not isinstance(value, str) or not value.strip():
            return f"must be {self.allowed}, got {quote(value)}"
        path = Path(value).expanduser()
        if not path.exists():
            return f"must be {self.allowed}; {value} does not exist"
        if path.is_dir() != self.folder:
            return f"must be {self.allowed}, got the {'file' if self.folder else 'folder'} {value}"
        return None


class InputFile(InputPath):
    folder = False


class InputDir(InputPath):
    folder = True


class OutputPath(Text):
    """Where a command writes: a folder (kind "dir") or a file ("file"), local or (url=True) an
    fsspec URL. It may exist already (runs resume); it must not be of the other kind, and no
    part of its parent may be a file."""

    def __init__(self, kind: str = "dir", url: bool = False):
        self.kind, self.url = kind, url
        super().__init__(f"a path for a {'folder' if kind == 'dir' else 'file'} to write"
                         + (" (or an fsspec URL)" if url else ""), metavar="DIR" if kind == "dir" else "FILE")

    def check(self, value) -> str | None:
        if not isinstance(value, str) or not value.strip():
            return f"must be {self.allowed}, got {quote(value)}"
        if self.url and "://" in value:
            return None
        path = Path(value).expanduser()
        if self.kind == "dir" and path.exists() and not path.is_dir():
            return f"must be {self.allowed}, but {value} is a file"
        if self.kind == "file" and path.is_dir():
            return f"must be {self.allowed}, but {value} is a folder"
        blocked = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            return f"must be {self.allowed}; {blocked} is a file, not a writable folder"
        return None


def write_atomically(path: str | Path, text: str) -> None:
    """Write text to path through a temporary file beside it and a rename: a kill mid-write leaves
    the previous file whole, and a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: ranks never share one
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
