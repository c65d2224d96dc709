"""The files of a checkpoint folder: read only what lies inside it, write a whole folder or nothing.

- `inside` resolves a name a checkpoint gives (an index's `weight_map` entry, a tokenizer file, a file of
  `params/`) and refuses one that resolves outside the folder: `../x`, an absolute path, or a symbolic link
  pointing elsewhere. The Hugging Face hub cache keeps a snapshot's files as links into the repository's
  `blobs/` folder; those, and only those, are followed out of the snapshot folder.
- `read_json` reads a JSON object, naming the file when it is missing, not JSON or not an object.
- `writing` yields a temporary folder beside the target that becomes the target when the block ends
  without an error, and is removed otherwise: on an exception, Ctrl-C or SIGTERM (after orbax's writer
  threads have finished). A run killed outright leaves its temporary folder; the next write of the same
  target removes it. A failed write (disk full, a file-size limit) is one line naming the folder.
- `write_checksums` / `verify_checksums`: the size and SHA-256 of every file of a written folder, kept in
  `checksums.json`, so a missing, truncated or silently altered file is named at load.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import warnings
from typing import Any, Iterator

CHECKSUMS_FILE = "checksums.json"


class FileError(ValueError):
    """A checkpoint file that cannot be used; the message names it."""


class WriteError(OSError):
    """A folder could not be written; the message names it. Nothing was left behind."""


def error_line(e: BaseException) -> str:
    """'Type: the first line of the message', to quote a library's error inside a one-line one."""
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:200]}"


# --- reading inside a folder ----------------------------------------------------------------------------
def _roots(folder: str) -> list[str]:
    """The real folders a checkpoint's files may resolve into: itself, and the hub cache's blobs."""
    real = os.path.realpath(folder)
    roots = [real]
    parent = os.path.dirname(real)
    blobs = os.path.join(os.path.dirname(parent), "blobs")
    if os.path.basename(parent) == "snapshots" and os.path.isdir(blobs):
        roots.append(blobs)
    return roots


def inside(folder: str | os.PathLike, name: Any, origin: str | None = None) -> str:
    """The path of `name` within `folder`; a FileError (naming `origin`, where the name came from) when
    the name is not a relative file name or resolves outside the folder."""
    folder = os.fspath(folder)
    what = f"{origin}: " if origin else ""
    if not isinstance(name, str) or not name or "\0" in name:
        raise FileError(f"{what}{name!r} is not a file name")
    if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir:
        raise FileError(f"{what}{name!r} lies outside the checkpoint folder {folder}; refused")
    path = os.path.join(folder, name)
    real = os.path.realpath(path)
    if not any(real == root or real.startswith(root + os.sep) for root in _roots(folder)):
        raise FileError(f"{what}{path} resolves to {real}, outside the checkpoint folder {folder}; refused")
    return path


def optional_file(folder: str | os.PathLike, name: str) -> str | None:
    """`inside(folder, name)` when such a file exists (a dangling link counts as absent), else None."""
    path = os.path.join(os.fspath(folder), name)
    if not os.path.lexists(path):
        return None
    path = inside(folder, name)
    if os.path.exists(path) and not os.path.isfile(path):
        raise FileError(f"{path}: not a file")
    return path if os.path.isfile(path) else None


def check_tree_inside(folder: str | os.PathLike, sub: str) -> str:
    """`folder/sub` and everything under it, checked to resolve inside `folder`; returns the path."""
    folder = os.fspath(folder)
    top = inside(folder, sub)
    for parent, dirs, names in os.walk(top):
        for name in dirs + names:
            inside(folder, os.path.relpath(os.path.join(parent, name), folder))
    return top


def snapshot(folder: str | os.PathLike, names: tuple[str, ...]) -> dict[str, bytes]:
    """The contents of those files of `names` that `folder` holds, read now. A model keeps what it was
    loaded with: saved or exported later, it writes these bytes, whatever the folder holds by then."""
    out = {}
    for name in names:
        path = optional_file(folder, name)
        if path is not None:
            try:
                with open(path, "rb") as f:
                    out[name] = f.read()
            except OSError as e:
                raise FileError(f"{path}: unreadable ({e.strerror})") from None
    return out


def parse_json(data: bytes | str, path: str, what: str = "a JSON object") -> dict[str, Any]:
    """The JSON object in `data`, read from `path`; a FileError naming the file when it is not one."""
    try:
        data = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FileError(f"{path}: expected {what} at the top level, got a JSON {_json_kind(data)}")
    return data


def read_json(path: str, what: str = "a JSON object") -> dict[str, Any]:
    """The JSON object in `path`; a FileError naming the file when it is unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise FileError(f"{path}: unreadable ({e.strerror})") from None
    if not isinstance(data, dict):
        raise FileError(f"{path}: expected {what} at the top level, got a JSON {_json_kind(data)}")
    return data


def _json_kind(value: Any) -> str:
    kinds = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


# --- writing a whole folder or nothing ------------------------------------------------------------------
PARTIAL = ".partial-"  # temporary folders are named .<target>.partial-<pid>-<random>


def _remove_stale(target: str) -> None:
    """Removes temporary folders a killed write of `target` left behind (their process is gone)."""
    parent, base = os.path.split(target)
    pattern = re.compile(re.escape(f".{base}{PARTIAL}") + r"(\d+)-\w+$")
    for name in os.listdir(parent):
        match = pattern.match(name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Interrupted(KeyboardInterrupt):
    """A write stopped by Ctrl-C or SIGTERM; the message says what was cleaned up."""


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[list[str]]:
    """Within the block SIGTERM, like Ctrl-C (SIGINT), raises KeyboardInterrupt, naming the signal, so
    clean-up code runs. The signals received are also listed in the yielded list: a KeyboardInterrupt
    can land where it is swallowed (a garbage-collection callback, a library's clean-up), and the
    caller checks the list before it commits anything."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        received.append(signal.Signals(signum).name)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """orbax logs every failed background write with its traceback (hundreds of lines for a full disk),
    and tensorstore's callbacks into orbax's closed event loop print one more traceback each; the error
    itself still reaches the caller, which reports it in one line. (asyncio logs the failed futures orbax
    never awaited when they are collected: they are collected here, quietly.)"""
    loggers = [logging.getLogger(name) for name in _ORBAX_LOGGERS]
    levels, hook = [logger.level for logger in loggers], sys.unraisablehook
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = _quiet_hook(hook)
    try:
        yield
    except BaseException:
        _quiet_leftovers()
        raise
    finally:
        gc.collect()
        if not _failed_writes:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
            sys.unraisablehook = hook


_ORBAX_LOGGERS = ("absl", "asyncio")
_failed_writes: list[bool] = []


def _quiet_hook(hook):
    def quiet(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)):
            hook(unraisable)
    return quiet


def _quiet_leftovers() -> None:
    """After a failed write, orbax's unfinished writes live on in its background threads and would each
    print a traceback or a never-awaited warning whenever they are collected, at exit at the latest:
    they stay quiet for the rest of the process (the failure itself has been raised)."""
    _failed_writes.append(True)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def describe_write_error(e: BaseException) -> str | None:
    """A short reason for a failed write (disk full, a file-size limit, ...), or None if `e` is not one."""
    if isinstance(e, OSError) and e.errno is not None:
        return os.strerror(e.errno)
    match = _OS_ERROR_CODE.search(str(e))  # tensorstore's errors (through orbax) carry the OS error code
    return os.strerror(int(match.group(1))) if match else None


@contextlib.contextmanager
def writing(target: str | os.PathLike) -> Iterator[str]:
    """Yields an empty temporary folder beside `target`, renamed to `target` if the block succeeds.

    Refuses an existing target, and an unwritable parent folder, before the block runs.
    """
    target = os.path.abspath(os.fspath(target))
    if os.path.lexists(target):
        raise WriteError(f"{target}: output folder already exists")
    parent = os.path.dirname(target)
    if os.path.lexists(parent) and not os.path.isdir(parent):
        raise WriteError(f"{target}: cannot write here ({parent} is not a folder)")
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_stale(target)
        tmp = os.path.join(parent, f".{os.path.basename(target)}{PARTIAL}{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(tmp)
    except OSError as e:
        raise WriteError(f"{target}: cannot write here ({e.strerror})") from None
    try:
        with _signals_interrupt() as received, _quiet_orbax():
            yield tmp
            if received:  # raised where something swallowed it: the write is still stopped
                raise KeyboardInterrupt(received[0])
            os.rename(tmp, target)
    except KeyboardInterrupt as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = f"by {e.args[0]}" if e.args else "by Ctrl-C"
        raise Interrupted(f"{target}: interrupted {why}; nothing was written") from None
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = describe_write_error(e)
        if reason is not None:
            raise WriteError(f"{target}: writing failed ({reason}); nothing was written") from None
        raise


def replace_folder(target: str, write) -> None:
    """Replaces the folder `target` with the one `write(path)` makes: the new folder is written whole
    beside it first, then swapped in; if writing fails, `target` is left as it was."""
    target = os.path.abspath(target)
    fresh = f"{target}{PARTIAL}{os.getpid()}-new"
    old = f"{target}{PARTIAL}{os.getpid()}-old"
    for leftover in (fresh, old):
        shutil.rmtree(leftover, ignore_errors=True)
    write(fresh)
    os.rename(target, old)
    os.rename(fresh, target)
    shutil.rmtree(old, ignore_errors=True)


# --- one writer at a time -----------------------------------------------------------------------------
class Busy(ValueError):
    """Another process holds the lock; the message names it."""


@contextlib.contextmanager
def exclusive(lock_path: str, what: str) -> Iterator[None]:
    """Holds an exclusive lock on `lock_path` (created, with this process's id and command in it) for the
    block; a second holder is refused at once with a Busy naming the first. The operating system drops
    the lock of a killed process, so a stale file never blocks; the file is removed at the end."""
    import fcntl
    os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise Busy(f"{what} is in use by {holder} (lock {lock_path}); wait for it to finish") from None
        try:  # the file may have been removed by the holder that just let go: lock the one at the path
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} ({' '.join(sys.argv)[:200]})".encode(), 0)
        try:
            yield
        finally:
            os.unlink(lock_path)
    finally:
        os.close(fd)


def check_writable(target: str | os.PathLike, what: str) -> None:
    """Refuses, before any work, a `target` whose folder cannot be written (by making and removing a
    temporary folder beside it)."""
    target = os.path.abspath(os.fspath(target))
    existing = os.path.dirname(target)  # the nearest folder that exists: the rest is made when writing
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise WriteError(f"{what} {target}: cannot write there ({existing} is not a folder)")
    try:
        probe = os.path.join(existing, f".{os.path.basename(target)}{PARTIAL}{os.getpid()}-probe")
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        raise WriteError(f"{what} {target}: cannot write there ({e.strerror})") from None


# --- checksums ------------------------------------------------------------------------------------------
def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(folder: str) -> list[str]:
    out = []
    for parent, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(parent, n), folder) for n in names]
    return sorted(n for n in out if n != CHECKSUMS_FILE)


def _digests(folder: str, names: list[str]) -> list[str]:
    # hashlib releases the GIL on large buffers: files hash in parallel.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda n: _sha256(os.path.join(folder, n)), names))


def write_atomically(path: str, text: str) -> None:
    """Writes `text` into `path` through a temporary file renamed over it: a reader sees the old file or
    the new one, never half of one."""
    tmp = f"{path}{PARTIAL}{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_checksums(folder: str) -> None:
    """Writes `checksums.json`: {relative path: {"size", "sha256"}} for every file under `folder`."""
    names = _files(folder)
    sums = {n: {"size": os.path.getsize(os.path.join(folder, n)), "sha256": d}
            for n, d in zip(names, _digests(folder, names))}
    with open(os.path.join(folder, CHECKSUMS_FILE), "w") as f:
        json.dump(sums, f, indent=0, sort_keys=True)


def verify_checksums(folder: str) -> bool:
    """Checks every file `checksums.json` lists (present, same size, same SHA-256); a FileError names the
    first that differs. Returns False when the folder has no `checksums.json` (written before it existed)."""
    path = optional_file(folder, CHECKSUMS_FILE)
    if path is None:
        return False
    listed = read_json(path, "an object of file checksums")
    for name, entry in listed.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str)):
            raise FileError(f"{path}: entry {name!r} must be {{\"size\": int, \"sha256\": str}}")
        file = inside(folder, name, path)
        if not os.path.isfile(file):
            raise FileError(f"{file}: missing (listed in {CHECKSUMS_FILE}); the checkpoint folder is incomplete")
        size = os.path.getsize(file)
        if size != entry["size"]:
            raise FileError(f"{file}: {size} bytes, {CHECKSUMS_FILE} says {entry['size']}; the file is damaged")
    names = list(listed)
    for name, digest in zip(names, _digests(folder, names)):
        if digest != listed[name]["sha256"]:
            raise FileError(f"{os.path.join(folder, name)}: its SHA-256 differs from {CHECKSUMS_FILE}; "
                            "the file is damaged")
    return True
