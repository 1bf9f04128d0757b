"""Atomic file writes, tolerant JSONL reading and content hashes, shared by every stage.

Every file a stage writes goes to a temporary name beside its target and is `os.replace`d
into place, so a crash or a full disk never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from embedforge.errors import EmbedforgeError


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_path(path: Path) -> str:
    """Hash of a file, or of a folder's relative file names and contents (a saved model)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode("utf-8") + b"\0")
        digest.update(sha256_file(file).encode("ascii"))
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside `path`; on success move it into place, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(descriptor, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        _remove_quietly(temporary)
        if error.errno == errno.ENOSPC:
            raise EmbedforgeError(
                "No space left on the device while writing", where=str(path), fix="free disk space and rerun; the half-written file was removed"
            ) from error
        raise
    except BaseException:
        _remove_quietly(temporary)
        raise


@contextlib.contextmanager
def replace_folder(folder: Path) -> Iterator[Path]:
    """A temporary folder beside `folder` to write into; on success it replaces `folder`, so a
    crash never leaves half of one (a leftover temporary is cleared by the next attempt)."""
    folder = Path(folder)
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(temporary, folder)


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def write_json(path: Path, value: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(value, handle, ensure_ascii=False, indent=2, default=str)
        handle.write("\n")


def write_text(path: Path, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    count = 0
    with atomic_write(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise EmbedforgeError(f"Malformed JSON ({error.msg})", where=f"{path}, line {error.lineno}", fix="repair or delete the file") from error


def iter_jsonl(path: Path) -> Iterator[dict]:
    """Yield the JSON objects of a JSONL file.

    A torn last line (no trailing newline: the writer was killed mid-append) is skipped; a
    malformed line anywhere else is the user's to fix and raises with its line number.
    """
    path = Path(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError as error:
        raise EmbedforgeError("File not found", where=str(path), fix="check the path") from error
    with handle:
        line_number = 0
        for raw in handle:
            line_number += 1
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise EmbedforgeError(
                    "The file is not UTF-8 text", where=f"{path}, line {line_number}", fix="re-encode the file as UTF-8"
                ) from error
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                if not raw.endswith(b"\n"):
                    return  # torn last line of an interrupted append
                raise EmbedforgeError(
                    f"Malformed JSON line ({error.msg})", where=f"{path}, line {line_number}", fix="repair or remove that line"
                ) from error
            if not isinstance(value, dict):
                raise EmbedforgeError(
                    "Each JSONL line must be a JSON object", where=f"{path}, line {line_number}", fix="wrap the value in an object"
                )
            yield value


def read_jsonl(path: Path) -> list[dict]:
    return list(iter_jsonl(path))


class JsonlAppender:
    """Append-only JSONL ledger: each row reaches the operating system as soon as it is written.

    A flush is enough to survive the process being killed (SIGKILL, OOM, Ctrl-C): the data sits
    in the kernel. An fsync per row would also survive a power cut, but it blocks the event loop
    for milliseconds per LLM answer; rows are fsynced when the ledger is closed.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_torn_tail()
        self._handle = open(self.path, "a", encoding="utf-8")

    def _repair_torn_tail(self) -> None:
        # A killed writer may leave a line without its newline; cut it so the next append starts clean.
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            with open(self.path, "r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)

    def append(self, row: dict) -> None:
        self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def process_rank() -> int:
    """This process's rank under torchrun (0 when not distributed): only rank 0 writes."""
    return int(os.environ.get("RANK", "0"))


def check_writable_folder(path: Path, flag: str) -> None:
    """Fail at once, naming the flag, when `path` cannot hold our files: it names a file, or the
    folder cannot be made or written (read-only, no permission). A probe file is written and
    removed, since permission bits do not tell (root ignores them; a read-only mount ignores them)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EmbedforgeError(f"{flag} names a file, not a folder", where=str(path), fix=f"pass {flag} with a folder path (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(dir=path, prefix=".write-probe.")
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise EmbedforgeError(
            f"Cannot write to the {flag} folder ({error.strerror})", where=str(error.filename or path),
            fix=f"pass {flag} with a writable folder, or fix its permissions",
        ) from error


class FolderLock:
    """An exclusive lock on a folder for this process's life (fcntl on `<folder>/.lock`).

    A second process fails at once, naming the holder's PID. The kernel drops the lock of a
    process that dies however it dies (SIGKILL included), so a lock file left behind is simply
    taken over: there is no stale lock to clean up by hand.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self._handle = None

    def acquire(self) -> "FolderLock":
        import fcntl

        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise EmbedforgeError(
                f"Another embedforge process (PID {holder}) is working in this run directory",
                where=str(self.path.parent),
                fix="wait for it to finish or stop it, or use another --run; a lock of a killed process is taken over automatically",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing drops the lock
            self._handle = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
