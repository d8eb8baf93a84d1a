"""Where documents come from: files, globs and folders, local or any fsspec URL, compressed or not.

Readers work on the decompressed byte stream and report positions as (byte offset, line, record), so a stream
can continue from any record boundary: uncompressed files seek there directly, compressed ones decompress up to
it without parsing (bounded by the file's size, never by how far training has got).
"""

from __future__ import annotations

import glob as globlib
import io
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec

GLOB_CHARS = set("*?[")
COMPRESSED = (".gz", ".bz2", ".zst", ".zstd", ".xz")


@dataclass(frozen=True)
class Position:
    """Where a reader continues: offset in the decompressed bytes, 1-based line there, records before it."""

    offset: int = 0
    line: int = 1
    record: int = 0


def expand(sources: list[str]) -> list[str]:
    """Every file that `sources` name (files, globs, folders searched recursively), as URLs, sorted per source.

    Raises:
        FileNotFoundError: a source that matches no file.
    """
    files: list[str] = []
    for source in sources:
        fs, path = fsspec.core.url_to_fs(source)
        if GLOB_CHARS & set(path):
            # like glob.glob: a wildcard does not match dot-files unless the pattern itself starts with a dot
            dots = path.rsplit("/", 1)[-1].startswith(".")
            found = sorted(p for p in fs.glob(path) if fs.isfile(p) and (dots or not _hidden(p.rsplit("/", 1)[-1])))
        elif fs.isdir(path):
            root = path.rstrip("/")
            found = sorted(p for p in fs.find(path) if not _hidden(p[len(root):]))
        elif fs.exists(path):
            found = [path]
        else:
            found = []
        if not found:
            raise FileNotFoundError(f"data source {source!r} matches no file")
        files += [source if p == path and "://" in source else _url(fs, p) for p in found]
    return files


def _hidden(path: str) -> bool:
    return any(part.startswith(".") for part in path.split("/") if part)


def _url(fs, path: str) -> str:
    return path if fs.protocol in ("file", ("file", "local")) else fs.unstrip_protocol(path)


def local_exists(source: str) -> bool | None:
    """For config checks: whether a local path or glob matches something; None for URLs (checked at start)."""
    if "://" in source:
        return None
    if GLOB_CHARS & set(source):
        return bool(globlib.glob(source, recursive=True))
    import os

    return os.path.exists(source)


def open_binary(url: str):
    """The decompressed byte stream of `url` (compression from the extension)."""
    raw = fsspec.open(url, mode="rb", compression="infer").open()
    return io.BufferedReader(raw) if url.endswith(COMPRESSED) and not isinstance(raw, io.BufferedReader) else raw


def _skip_to(f, offset: int) -> None:
    """Seek, or where the stream cannot (zstd), decompress and discard up to `offset`."""
    try:
        f.seek(offset)
        return
    except (io.UnsupportedOperation, OSError):
        pass
    left = offset
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            break
        left -= len(chunk)


class Oversize(bytes):
    """Stands for a line longer than the limit: its content is not kept, its length is (for offsets)."""

    def __new__(cls, size: int):
        obj = super().__new__(cls, b"")
        obj.size = size
        return obj

    def __len__(self) -> int:
        return self.size


MAX_LINE_BYTES = 64 << 20


def lines_from(url: str, start: Position, max_line: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes, int]]:
    """Yield (line number, raw line, start offset) from `start` on. A line over `max_line` bytes is never held in
    memory: it is read through in chunks and yielded as an Oversize marker."""
    f = open_binary(url)
    try:
        if start.offset:
            _skip_to(f, start.offset)
        offset, lineno = start.offset, start.line
        while raw := f.readline(max_line + 1):
            if len(raw) > max_line and not raw.endswith(b"\n"):
                size = len(raw)
                while (chunk := f.readline(1 << 20)) and not chunk.endswith(b"\n"):
                    size += len(chunk)
                raw = Oversize(size + len(chunk))
            yield lineno, raw, offset
            offset += len(raw)
            lineno += 1
    finally:
        f.close()
