"""The grader's own input and output, safe against what a submission plants.

Reading
    :func:`read_regular` opens with ``O_NOFOLLOW | O_NONBLOCK`` (a symlink is
    refused, a FIFO never blocks), checks with ``fstat`` that it opened a
    regular file, and reads at most ``cap`` bytes. :func:`read_notebook`
    parses with nbformat, upgrades older formats (nbformat 3 is graded, not
    rejected) and validates. :func:`find_submissions` walks the submissions
    folder without following links and reports what it skipped and why.

Writing
    :func:`write_atomic` writes a temporary file in the output folder
    (``O_CREAT | O_EXCL | O_NOFOLLOW``, relative to a descriptor of the
    folder, itself opened with ``O_NOFOLLOW``) and renames it over the
    target: a symlink or FIFO planted at the target's path is replaced, never
    written through or opened.

Text
    :func:`csv_cell` neutralises spreadsheet formulas (a cell beginning with
    ``= + - @``, a tab or a carriage return, also after leading spaces, gets a
    leading ``'``); :func:`md_text` escapes Markdown and HTML (``<`` becomes
    ``&lt;``; no raw HTML from an exception message reaches a table);
    :func:`student_name` NFC-normalises and strips names, and
    :func:`name_collisions` finds names that are the same or look alike.

Integrity
    :func:`digest` hashes files and folders (names, sizes, contents); the
    batch compares the solution, the package and the output folder at the
    start and before writing.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat
import unicodedata

MAX_NOTEBOOK_BYTES = 20_000_000


class UnsafeFile(ValueError):
    """A path the grader will not read: not a regular file, too big, a link."""


def read_regular(path: str, cap: int = MAX_NOTEBOOK_BYTES) -> bytes:
    """The bytes of a regular file at ``path`` (at most ``cap``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(f"{path} is a symbolic link; the grader reads only regular files") from None
        if exc.errno == errno.ENXIO:
            raise UnsafeFile(f"{path} is a socket or FIFO without a writer; the grader reads only regular files") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
            raise UnsafeFile(f"{path} is {kind}; the grader reads only regular files")
        if st.st_size > cap:
            raise UnsafeFile(f"{path} is {st.st_size:,} bytes, over the cap of {cap:,}")
        chunks, left = [], cap + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > cap:
            raise UnsafeFile(f"{path} grew over the cap of {cap:,} bytes while being read")
        return data
    finally:
        os.close(fd)


def read_notebook(path: str, cap: int = MAX_NOTEBOOK_BYTES):
    """``(notebook, notes)``: the notebook as an nbformat 4 ``NotebookNode``
    and what was odd about the file (an older format upgraded, a schema
    problem). Raises :class:`UnsafeFile` or ``ValueError`` (not JSON, no
    cells) with the reason."""
    import nbformat

    data = read_regular(path, cap)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    notes = []
    try:
        nb = nbformat.reads(text, as_version=nbformat.NO_CONVERT)
    except Exception as exc:
        raise ValueError(f"not a notebook ({type(exc).__name__}: {str(exc)[:120]})") from None
    major = nb.get("nbformat")
    if not isinstance(major, int):
        raise ValueError("not a notebook (no nbformat version)")
    if major != 4:
        try:
            nb = nbformat.convert(nb, 4)
        except Exception as exc:
            raise ValueError(f"nbformat {major} notebook that nbformat cannot upgrade ({str(exc)[:120]})") from None
        notes.append(f"nbformat {major} notebook, upgraded to 4 for grading")
    try:
        nbformat.validate(nb)
    except Exception as exc:
        notes.append(f"notebook does not validate against the nbformat schema ({str(exc).splitlines()[0][:120]})")
    cells = nb.get("cells")
    if not isinstance(cells, list):
        raise ValueError("not a notebook (no list of cells)")
    for i, cell in enumerate(cells):
        if not isinstance(cell, dict) or not isinstance(cell.get("cell_type"), str):
            raise ValueError(f"not a notebook (cell {i} has no type)")
        src = cell.get("source", "")
        if isinstance(src, list):
            cell["source"] = "".join(str(s) for s in src)
        elif not isinstance(src, str):
            raise ValueError(f"not a notebook (cell {i} has no source text)")
    return nb, notes


def find_submissions(folder: str) -> tuple[list[tuple[str, str]], list[str]]:
    """``([(student, path), ...], skipped)``: every ``*.ipynb`` under
    ``folder`` (``alice.ipynb`` is student ``alice``; ``alice/lab.ipynb`` is
    ``alice/lab``), links never followed; ``skipped`` says what was left out
    and why (symbolic links, FIFOs, devices)."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        raise FileNotFoundError(f"submissions folder {folder!r} does not exist") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise FileNotFoundError(f"submissions folder {folder!r} is not a folder (a symbolic link is not followed)")
    found, skipped = [], []
    for base, dirs, files in os.walk(folder, followlinks=False):
        keep = []
        for d in sorted(dirs):
            p = os.path.join(base, d)
            if d.startswith("."):
                continue
            if os.path.islink(p):
                skipped.append(f"{os.path.relpath(p, folder)}: a symbolic link to a folder (not followed)")
            else:
                keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            if not f.endswith(".ipynb") or f.startswith("."):
                continue
            p = os.path.join(base, f)
            rel = os.path.relpath(p, folder)
            if os.path.islink(p):
                skipped.append(f"{rel}: a symbolic link (not followed; scored as not a notebook)")
            # links, FIFOs and devices keep their row: reading them is refused with the reason
            found.append((os.path.splitext(rel)[0].replace(os.sep, "/"), p))
    return sorted(found), skipped


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------

def open_out_dir(path: str) -> int:
    """A descriptor of the output folder (made if missing; a symbolic link
    or anything but a folder at its path is refused)."""
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise UnsafeFile(f"output folder {path!r} exists and is not a folder") from None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeFile(f"output folder {path!r} is a symbolic link or not a folder; pass a real folder") from None
        raise


def write_atomic(out_dir: str | int, name: str, data: str | bytes) -> None:
    """Write ``out_dir/name`` through a temporary file renamed into place
    (``name`` is one path component; ``out_dir`` a path or a descriptor from
    :func:`open_out_dir`)."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"output name {name!r} must be one plain file name")
    if isinstance(data, str):
        data = data.encode("utf-8")
    dfd = open_out_dir(out_dir) if isinstance(out_dir, str) else out_dir
    tmp = f".{name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise UnsafeFile(f"{name} in the output folder is a folder; remove it or choose another --out")
        except FileNotFoundError:
            pass
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise
    finally:
        if isinstance(out_dir, str):
            os.close(dfd)


# --------------------------------------------------------------------------
# Text in tables
# --------------------------------------------------------------------------

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def csv_cell(value) -> str:
    """A CSV cell a spreadsheet will not run: text beginning (after any
    spaces) with ``= + - @`` (or their full-width forms), a tab or a carriage
    return gets a leading apostrophe. Numbers are passed as they are."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:g}"
    s = str(value)
    if s.lstrip(" ").startswith(_FORMULA_START) or s.startswith(_FORMULA_START):
        return "'" + s
    return s


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~#!$])")


def md_text(value, cap: int | None = None) -> str:
    """Text for a Markdown table cell or line: HTML characters as entities,
    Markdown punctuation backslash-escaped, line breaks as spaces."""
    s = str(value)
    s = "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in s)
    if cap is not None and len(s) > cap:
        s = s[: cap - 1] + "…"
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    return _MD_SPECIAL.sub(r"\\\1", s)


def student_name(raw: str) -> str:
    """A student's name as the tables show it: NFC, stripped, control
    characters removed."""
    s = unicodedata.normalize("NFC", str(raw))
    s = "".join(ch for ch in s if unicodedata.category(ch)[0] != "C")
    return s.strip()


def look_alike_key(name: str) -> str:
    """Names with the same key look the same to a person: NFKC, case-folded,
    spaces collapsed and stripped."""
    s = unicodedata.normalize("NFKC", name).casefold()
    s = "".join(ch for ch in s if unicodedata.category(ch) not in ("Cc", "Cf"))
    return re.sub(r"\s+", " ", s).strip()


def name_collisions(raw_names) -> dict[str, list[str]]:
    """``{raw name: [the other raw names that look the same]}`` for every
    name that shares its normalised or look-alike form with another."""
    groups: dict[str, list[str]] = {}
    for raw in raw_names:
        groups.setdefault(look_alike_key(student_name(raw)), []).append(raw)
    out = {}
    for names in groups.values():
        if len(names) > 1:
            for n in names:
                out[n] = [m for m in names if m != n]
    return out


# --------------------------------------------------------------------------
# Integrity
# --------------------------------------------------------------------------

def digest(*paths: str, skip=("__pycache__",), suffixes=(".pyc",)) -> str:
    """A SHA-256 over files and folders (relative names, types, contents);
    symbolic links are hashed as their target text, never followed."""
    h = hashlib.sha256()
    for top in paths:
        h.update(b"\0top\0" + os.fsencode(os.path.abspath(top)))
        if not os.path.lexists(top):
            h.update(b"\0missing")
            continue
        entries = []
        if os.path.isdir(top) and not os.path.islink(top):
            for base, dirs, files in os.walk(top, followlinks=False):
                dirs[:] = sorted(d for d in dirs if d not in skip)
                entries += [os.path.join(base, f) for f in sorted(files) if not f.endswith(suffixes)]
                entries += [os.path.join(base, d) for d in dirs if os.path.islink(os.path.join(base, d))]
        else:
            entries = [top]
        for p in entries:
            h.update(b"\0f\0" + os.fsencode(os.path.relpath(p, top)))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                h.update(b"L" + os.fsencode(os.readlink(p)))
            elif stat.S_ISREG(st.st_mode):
                h.update(b"R%d\0" % st.st_size)
                with open(p, "rb", opener=lambda q, fl: os.open(q, fl | os.O_NOFOLLOW | os.O_NONBLOCK)) as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            else:
                h.update(b"S%d" % stat.S_IFMT(st.st_mode))
    return h.hexdigest()
