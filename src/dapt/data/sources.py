"""Where documents come from: files, globs and folders, local or any fsspec URL, compressed or not.

Readers work on the decompressed byte stream and report positions as (byte offset, line, record), so a stream
can continue from any record boundary: uncompressed files seek there directly, compressed ones decompress up to
it without parsing (bounded by the file's size, never by how far training has got).
"""

from __future__ import annotations

import errno
import glob as globlib
import io
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec

from dapt.config.schema import BadInput

log = logging.getLogger("dapt")

GLOB_CHARS = set("*?[")
COMPRESSED = (".gz", ".bz2", ".zst", ".zstd", ".xz")


@dataclass(frozen=True)
class Position:
    """Where a reader continues: offset in the decompressed bytes, 1-based line there, records before it."""

    offset: int = 0
    line: int = 1
    record: int = 0


def expand(sources: list[str], fmt: str = "") -> list[str]:
    """Every file that `sources` name (files, globs, folders searched recursively), as URLs, sorted per source.
    fmt="arrow": the shards of `datasets` folders (in the order their state.json lists them), no metadata files.

    Raises:
        FileNotFoundError: a source that matches no file.
        ValueError: fmt="arrow" and a source is a DatasetDict folder (it holds several splits: name one).
    """
    files: list[str] = []
    for source in sources:
        fs, path = fsspec.core.url_to_fs(source)
        local = fs.protocol in ("file", ("file", "local"))
        skipped: list[str] = []
        empty: list[str] = []
        if GLOB_CHARS & set(path):
            # like glob.glob: a wildcard does not match dot-files unless the pattern itself starts with a dot
            dots = path.rsplit("/", 1)[-1].startswith(".")
            matched = [p for p in fs.glob(path) if dots or not _hidden(p.rsplit("/", 1)[-1])]
            found = sorted(p for p in matched if (_regular(p, skipped, empty) if local else fs.isfile(p)))
        elif local and os.path.isdir(path):
            found = sorted(_walk(path, skipped, empty))
        elif fs.isdir(path):
            root = path.rstrip("/")
            found = sorted(p for p in fs.find(path) if not _hidden(p[len(root) :]))
        elif local and (os.path.exists(path) or os.path.islink(path)):
            found = [path] if _regular(path, skipped, empty) else []
            if skipped:
                raise BadInput(f"data source {source!r} is not a readable regular file: {skipped[0]}")
        elif fs.exists(path):
            found = [path]
        else:
            found = []
        if skipped:
            _warn_once(
                f"data source {source!r}: left out {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} "
                f"that are not readable regular files: {'; '.join(skipped[:10])}"
                + (f"; and {len(skipped) - 10} more" if len(skipped) > 10 else "")
            )
        if fmt == "arrow":
            found = arrow_shards(fs, path, found, source)
        if not found:
            raise BadInput(f"data source {source!r} matches no {'.arrow ' * (fmt == 'arrow')}file")
        for p in empty:
            _warn_once(f"data source {source!r}: {p} is empty")
        files += [source if p == path and "://" in source else _url(fs, p) for p in found]
    return files


def arrow_shards(fs, path: str, found: list[str], source: str) -> list[str]:
    """The Arrow shards of a save_to_disk folder in its own order (state.json), or the .arrow files among `found`."""
    root = path.rstrip("/")
    if not fs.isdir(root):
        return [p for p in found if p.endswith(".arrow")]
    if fs.exists(f"{root}/dataset_dict.json"):
        splits = json.loads(fs.cat_file(f"{root}/dataset_dict.json")).get("splits", [])
        raise BadInput(
            f"data source {source!r} is a DatasetDict folder with the splits {', '.join(splits)}: name one split's "
            f"folder (e.g. {source.rstrip('/')}/{splits[0] if splits else 'train'}) in data.train, data.valid or "
            "data.test"
        )
    if fs.exists(f"{root}/state.json"):
        try:
            shards = [s["filename"] for s in json.loads(fs.cat_file(f"{root}/state.json"))["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise BadInput(
                f"data source {source!r}: {root}/state.json is not a datasets save_to_disk state "
                f"({type(e).__name__}: {e}); save the dataset again, or name its .arrow files"
            ) from None
        return [f"{root}/{name}" for name in shards]
    return [p for p in found if p.endswith(".arrow")]


def _walk(root: str, skipped: list[str], empty: list[str]) -> list[str]:
    """Regular files below a local folder, following symlinked folders once each (a link back to a folder already
    walked is a loop and is left out); dot-files and dot-folders are left out."""
    found: list[str] = []
    seen: set[tuple[int, int]] = set()

    def visit(folder: str) -> None:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            skipped.append(f"{folder} (a symlink loop: that folder is already read)")
            return
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            skipped.append(f"{folder} (cannot list it: {e.strerror})")
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            st = _stat(entry.path, skipped)
            if st is not None and stat.S_ISDIR(st.st_mode):
                visit(entry.path)
            elif st is not None and _regular(entry.path, skipped, empty, st):
                found.append(entry.path)

    visit(root)
    return found


def _stat(path: str, skipped: list[str]) -> os.stat_result | None:
    """os.stat following links; None (and the reason in `skipped`) for a dangling link or a link loop."""
    try:
        return os.stat(path)
    except OSError as e:
        skipped.append(f"{path} ({_link_problem(e)})")
        return None


def _regular(path: str, skipped: list[str], empty: list[str], st: os.stat_result | None = None) -> bool:
    """Whether `path` is a regular file that can be opened (not a FIFO, socket or device, which could block);
    an empty one is also noted in `empty`."""
    st = st or _stat(path, skipped)
    if st is None:
        return False
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return False
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        skipped.append(f"{path} ({kind}, not a regular file)")
        return False
    if not os.access(path, os.R_OK):
        skipped.append(f"{path} (no permission to read it)")
        return False
    if st.st_size == 0:
        empty.append(path)
    return True


def _link_problem(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "a symlink loop"
    if e.errno == errno.ENOENT:
        return "a dangling symlink"
    return e.strerror or str(e)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


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
    return (
        io.BufferedReader(raw) if url.endswith(COMPRESSED) and not isinstance(raw, io.BufferedReader) else raw
    )


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
            # most lines hold no \r (13, found by memchr: a bytes needle costs 7x), or only in their \r\n end; an
            # Oversize marker holds no bytes
            if 13 not in raw or 13 not in raw[:-2]:
                yield lineno, raw, offset
                offset += len(raw)
                lineno += 1
                continue
            for piece in filter(None, _lone_cr.split(raw)):
                yield lineno, piece, offset
                offset += len(piece)
                lineno += 1
    finally:
        f.close()


# a line end of its own: \r not followed by \n (files saved with classic Mac line endings, some log exporters)
_lone_cr = re.compile(rb"(?<=\r)(?!\n)")
