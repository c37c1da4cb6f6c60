"""Files the command line writes for the operator (certificates, keys, PKCS#12, exports)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import click

from sekisho.errors import PATH_SHOWN, InputError, NotFound, OutputError, TooLarge, shown

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def synced_private_temp(directory: Path, name: str, data: bytes) -> Path:
    """A new owner-only (0600, whatever the umask) file in ``directory`` holding ``data``,
    synced: ``.<name>.<random>.tmp``, to be linked or renamed to ``name`` by the caller, who
    removes it afterwards. Removed here if writing fails. OSError as raised."""
    tmp = directory / f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, _NEW_FILE, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def private_temps(path: Path) -> list[Path]:
    """The temporaries ``synced_private_temp`` made for ``path`` and left behind (a process
    killed while writing one): for its owner to remove."""
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


def create_synced(path: Path, data: bytes) -> None:
    """A new owner-only file ``path`` holding ``data``, on disk when this returns: written to
    a synced temporary file beside it, linked to its name only once whole (``link`` fails
    with FileExistsError if the name exists, where ``rename`` would replace it), then the
    directory synced. A failure part way (disk full, a crash) leaves no truncated or empty
    file under the name to block it; a link whose directory sync fails is taken back.
    OSError as raised."""
    tmp = synced_private_temp(path.parent, path.name, data)
    try:
        os.link(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    try:
        sync_directory(path.parent)
    except OSError:  # whole, but not known to be on disk
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def replace_synced(path: Path, data: bytes, mode: int = 0o600) -> None:
    """``path`` replaced whole by ``data`` (its directory made if missing): a synced
    temporary file of a random name beside it (O_EXCL, never through a link planted there),
    given ``mode`` whatever the umask, renamed over it, the directory then synced. A failure
    before the rename leaves the old file as it was and no temporary behind; one in the
    directory's sync after it leaves the new file in place. OSError as raised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = synced_private_temp(path.parent, path.name, data)
    try:
        if mode != 0o600:
            tmp.chmod(mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    sync_directory(path.parent)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (a directory as it is; a file created owner-only
    if missing, never through a symlink): other processes and threads that ask wait.
    OSError as raised."""
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def sync_directory(directory: Path) -> None:
    """fsync a directory: the names created or linked in it are on disk (OSError as raised)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NewFiles:
    """Output files, created before anything is issued or exported, so that an unwritable path
    fails first. Each is a new file (O_EXCL: an existing file, or a symlink planted in a shared
    directory, is refused rather than written through or left with its old mode), mode 0600,
    written later through the descriptor opened here, and synced with its directory once
    written (a certificate the store has committed must not come with a key file a power
    loss empties). ``discard()`` removes them all; ``discard_unfinished()`` those not yet
    written whole. A failure to write is an OutputError (exit 74)."""

    def __init__(self, paths: list[Path]) -> None:
        self._open: dict[Path, int] = {}
        self._created: list[Path] = []
        self._finished: set[Path] = set()
        for path in paths:
            try:
                fd = os.open(path, _NEW_FILE, 0o600)
            except OSError as exc:
                self.discard()
                if exc.errno == errno.EEXIST:
                    raise InputError(
                        f"{shown(path, PATH_SHOWN)} exists: choose a new file name"
                    ) from None
                raise InputError(
                    f"cannot write {shown(path, PATH_SHOWN)}: {exc.strerror or exc}"
                ) from None
            self._open[path] = fd
            self._created.append(path)

    def write(self, path: Path, data: bytes) -> None:
        with self.open_binary(path) as fh:
            fh.write(data)

    def open_binary(self, path: Path) -> contextlib.AbstractContextManager[IO[bytes]]:
        return self._written(path, "wb")

    def open_text(self, path: Path) -> contextlib.AbstractContextManager[IO[str]]:
        return self._written(path, "w", encoding="utf-8", newline="")

    @contextlib.contextmanager
    def _written(self, path: Path, mode: str, **options: Any) -> Iterator[IO[Any]]:
        """The file's descriptor as a file object; once the block wrote it, synced with its
        directory and counted as written whole."""
        with self._errors(path):
            with os.fdopen(self._open.pop(path), mode, **options) as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            sync_directory(path.parent)
        self._finished.add(path)

    @staticmethod
    @contextlib.contextmanager
    def _errors(path: Path) -> Iterator[None]:
        try:
            yield
        except OSError as exc:  # disk full, quota, I/O error while writing
            raise OutputError(
                f"cannot write {shown(path, PATH_SHOWN)}: {exc.strerror or exc}"
            ) from None

    def discard(self) -> None:
        self._remove(self._created)

    def discard_unfinished(self) -> None:
        """Remove the files not written whole; keep those that were."""
        self._remove([p for p in self._created if p not in self._finished])

    def _remove(self, paths: list[Path]) -> None:
        for fd in self._open.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._open.clear()
        for path in list(paths):
            with contextlib.suppress(OSError):
                path.unlink()
            self._created.remove(path)
            self._finished.discard(path)

    def __enter__(self) -> NewFiles:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        """On an exception, nothing this object created is left behind."""
        if exc_type is not None:
            self.discard()


class FileRefused(Exception):
    """A named file that is not read; the message says why, after the file's name."""


class FileTooLarge(FileRefused):
    pass


def open_regular(
    path: Path,
    *,
    follow_symlinks: bool = True,
    check: Callable[[os.stat_result], None] | None = None,
) -> IO[bytes]:
    """``path`` opened for reading if it is a regular file, checked on the descriptor it is
    read from: a FIFO, a device such as /dev/zero or a directory is refused unread (never
    waited on), as is a symbolic link when ``follow_symlinks`` is false (FileRefused); ``check``
    may refuse by the file's status (raising FileRefused, or an error of its own). Other OS
    errors pass through (FileNotFoundError for a missing file)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise FileRefused("is a symbolic link; name the file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused("is not a regular file")
        if check is not None:
            check(st)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(
    path: Path,
    limit: int,
    *,
    follow_symlinks: bool = True,
    check: Callable[[os.stat_result], None] | None = None,
) -> bytes:
    """The content of a regular file (``open_regular``), at most ``limit`` bytes."""
    with open_regular(path, follow_symlinks=follow_symlinks, check=check) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(f"is larger than {limit} bytes")
    return data


class InputFile(click.Path):
    """An input file named on the command line: one that does not exist is not found (exit
    66, sysexits' EX_NOINPUT, as for every file a command reads), not a usage error (64);
    a directory is refused by click as before."""

    def __init__(self) -> None:
        super().__init__(path_type=Path, dir_okay=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        path = super().convert(value, param, ctx)
        try:
            os.lstat(path)
        except FileNotFoundError:
            raise NotFound(f"no such file: {shown(path, PATH_SHOWN)}") from None
        except OSError:
            pass  # (a directory it cannot search: the command's read says why, 65)
        return path


def read_input(path: Path, what: str, limit: int) -> bytes:
    """The content of a file the operator named (``read_regular``): not found (exit 66) when
    it does not exist, bad input (65) when it is not a regular file or cannot be read,
    TooLarge over ``limit`` bytes."""
    try:
        return read_regular(path, limit)
    except FileNotFoundError:
        raise NotFound(f"no such file: {what} {shown(path, PATH_SHOWN)}") from None
    except FileTooLarge as exc:
        raise TooLarge(f"{what} {shown(path, PATH_SHOWN)} {exc}") from None
    except FileRefused as exc:
        raise InputError(f"{what} {shown(path, PATH_SHOWN)} {exc}") from None
    except OSError as exc:
        raise InputError(
            f"cannot read {what} {shown(path, PATH_SHOWN)}: {exc.strerror or exc}"
        ) from None
