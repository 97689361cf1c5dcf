"""Directories and files other local users cannot hijack (docs/security.md).

Used by the shader cache (``shader/_compiler.py``, ``shader/__init__.py``) and
the profiler's trace and capture files (``profiler.py``). Pure Python, no torch.

* :func:`private_dir` opens a directory this user alone can write: created
  with mode 0700 (explicitly, whatever the umask), refused when it is owned by
  another user, is a symbolic link where one is not expected, or is group- or
  world-writable -- or, for a directory the package manages itself (a default
  location), repaired with a warning.
* :meth:`PrivateDir.write` writes a file to a fresh temporary name opened
  ``O_CREAT|O_EXCL|O_NOFOLLOW`` with an explicit mode, then renames it into
  place: nothing planted at either name is ever followed or written through,
  and readers never see a partial file.
* :meth:`PrivateDir.open_verified` opens a file and checks its SHA-256 before
  anyone uses it (a shared library is then loaded through the verified
  directory descriptor, :meth:`PrivateDir.load_path`).

Every operation inside a :class:`PrivateDir` goes through its directory file
descriptor, so renaming or replacing a directory above it after the check
changes nothing that is read, written or loaded.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import stat
import warnings
from pathlib import Path

__all__ = ["InsecureDirectoryError", "PrivateDir", "private_dir", "write_at", "write_file", "sha256_fd"]

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class InsecureDirectoryError(PermissionError):
    """A directory another local user can write (or owns) was not used."""


def _euid() -> int:
    return os.geteuid()


def _problem(st: os.stat_result) -> str | None:
    """Why a directory with this ``fstat`` is not private to this user, or None."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != _euid():
        return f"is owned by another user (uid {st.st_uid}; this process runs as uid {_euid()})"
    if st.st_mode & 0o022:
        return f"is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _makedirs_private(path: Path) -> None:
    """Create ``path`` and its missing parents, each with mode 0700 (set
    explicitly on the new directory's descriptor, so the umask plays no part).
    Existing directories are left as they are (the leaf is checked after)."""
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue  # a concurrent creator: checked like any existing directory
        try:
            fd = os.open(d, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)
        except OSError:
            continue  # replaced in between: the leaf check refuses it
        try:
            if os.fstat(fd).st_uid == _euid():
                os.fchmod(fd, 0o700)
        finally:
            os.close(fd)


def _tmp_name(name: str) -> str:
    """A fresh temporary name beside ``name`` (not guessable: 64 random bits)."""
    return f".{name}.{secrets.token_hex(8)}.tmp"


def write_at(dir_fd: int, name: str, data: bytes, mode: int = 0o600) -> None:
    """Atomically (re)place ``name`` in the directory ``dir_fd`` with ``data``: a fresh
    temporary name opened ``O_CREAT|O_EXCL|O_NOFOLLOW`` with ``mode`` (set explicitly),
    then ``rename``. Nothing planted at either name is opened or written through."""
    for _ in range(100):
        tmp = _tmp_name(name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, mode,
                         dir_fd=dir_fd)
        except FileExistsError:
            continue  # something is planted at that name: never opened, another name is drawn
        break
    else:  # pragma: no cover
        raise FileExistsError(errno.EEXIST, f"no free temporary name for {name}")
    try:
        try:
            os.fchmod(fd, mode)  # the mode asked for, not the umask's
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def write_file(path: str | os.PathLike, data: bytes | str, mode: int = 0o600) -> None:
    """Atomically (re)place the file at ``path`` with ``data``, safely in a
    shared directory such as /tmp: a fresh ``O_EXCL|O_NOFOLLOW`` temporary
    name, then ``rename``. A symbolic or hard link planted at ``path`` is
    replaced, never written through. Missing parent directories are created
    with mode 0700."""
    if isinstance(data, str):
        data = data.encode()
    path = Path(os.path.abspath(os.fspath(path)))
    _makedirs_private(path.parent)
    dir_fd = os.open(path.parent, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    try:
        try:
            write_at(dir_fd, path.name, data, mode)
        except PermissionError as e:
            raise PermissionError(
                e.errno, f"cannot write {path}: {e.strerror} (in a shared directory, a file of that "
                f"name that belongs to another user cannot be replaced)") from None
    finally:
        os.close(dir_fd)


def sha256_fd(fd: int) -> str:
    """SHA-256 of the whole file behind ``fd`` (read with pread: a file
    truncated meanwhile gives a short read, never a SIGBUS)."""
    h = hashlib.sha256()
    off = 0
    while True:
        chunk = os.pread(fd, 1 << 20, off)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)
        off += len(chunk)


class PrivateDir:
    """An open directory that only this user can write. Its operations take
    names inside it (no slashes) and go through its descriptor."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        st = os.fstat(fd)
        self._ident = (st.st_dev, st.st_ino)

    # ----------------------------------------------------------------- state
    def still_valid(self) -> bool:
        """The path still names this directory, and it is still private."""
        try:
            st = os.stat(self.path, follow_symlinks=True)
            own = os.fstat(self.fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._ident and _problem(own) is None

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:  # pragma: no cover
            pass

    # ----------------------------------------------------------------- files
    def write(self, name: str, data: bytes | str, mode: int = 0o600) -> None:
        """Atomically (re)place ``name`` with ``data`` (temporary name opened
        ``O_EXCL|O_NOFOLLOW``, explicit ``mode``, then ``rename``)."""
        write_at(self.fd, name, data.encode() if isinstance(data, str) else data, mode)

    def open_file(self, name: str) -> int | None:
        """A read-only descriptor of the regular file ``name`` owned by this
        user, or None (missing, a symbolic link, not a regular file, or owned
        by someone else)."""
        try:
            fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=self.fd)
        except OSError:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != _euid():
            os.close(fd)
            return None
        return fd

    def read_small(self, name: str, limit: int = 4096) -> bytes | None:
        fd = self.open_file(name)
        if fd is None:
            return None
        try:
            return os.read(fd, limit)
        finally:
            os.close(fd)

    def open_verified(self, name: str, digest: str) -> int | None:
        """A descriptor of ``name`` if its SHA-256 is ``digest`` (hex), else
        None: missing, truncated, zero-filled or modified files are never
        handed out."""
        fd = self.open_file(name)
        if fd is None:
            return None
        if digest and sha256_fd(fd) == digest:
            return fd
        os.close(fd)
        return None

    def unlink(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.fd)
        except OSError:
            pass

    def load_path(self, name: str) -> str:
        """A path naming ``name`` through this directory's descriptor, for
        ``dlopen`` (which takes paths): what was verified is what is loaded,
        whatever happens to the directories above."""
        proc = f"/proc/self/fd/{self.fd}"
        if os.path.isdir(proc):
            return f"{proc}/{name}"
        return str(self.path / name)  # pragma: no cover (no /proc)

    # ----------------------------------------------------------------- subdirectories
    def make_subdir(self, prefix: str) -> tuple[str, int]:
        """Create a fresh private subdirectory ``<prefix><random>`` (mode
        0700); returns its name and descriptor, for :meth:`remove_subdir`."""
        for _ in range(100):
            name = prefix + secrets.token_hex(8)
            try:
                os.mkdir(name, 0o700, dir_fd=self.fd)
            except FileExistsError:
                continue
            fd = os.open(name, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=self.fd)
            os.fchmod(fd, 0o700)
            return name, fd
        raise FileExistsError(errno.EEXIST, "no free directory name")  # pragma: no cover

    def remove_subdir(self, name: str, fd: int) -> None:
        """Remove a subdirectory made by :meth:`make_subdir` (flat: its files
        and then itself), then close ``fd``."""
        try:
            for entry in os.listdir(fd):
                try:
                    os.unlink(entry, dir_fd=fd)
                except IsADirectoryError:
                    shutil.rmtree(os.path.join(self.path, name, entry), ignore_errors=True)
                except OSError:
                    pass
            os.rmdir(name, dir_fd=self.fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def private_dir(path: str | os.PathLike, *, purpose: str, hint: str, managed: bool = False,
                keep_contents: bool = False) -> PrivateDir:
    """Open (creating it and its parents with mode 0700) a directory only this
    user can write.

    ``purpose`` and ``hint`` word the error ("the shader cache", "set
    TORCH_MPS_EXT_SHADER_CACHE to ..."). A directory that is another user's,
    group- or world-writable, or not a directory raises
    :class:`InsecureDirectoryError` -- unless ``managed`` (a default location
    the package owns) and the directory is this user's own: then it is made
    private again with a warning, emptied first unless ``keep_contents``
    (what others could write in it cannot be trusted). A managed location
    must not be a symbolic link; a location the user configured may be one
    (the directory it points to is what is checked).
    """
    path = Path(os.path.abspath(os.fspath(path)))
    _makedirs_private(path)
    flags = os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC | (_O_NOFOLLOW if managed else 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP or (managed and os.path.islink(path)):
            problem = "is a symbolic link"
        elif e.errno == errno.ENOTDIR:
            problem = "is not a directory"
        else:
            raise
        raise InsecureDirectoryError(f"{purpose} {path} {problem}; not used. {hint}") from None
    st = os.fstat(fd)
    problem = _problem(st)
    if problem is None:
        if managed and st.st_mode & 0o077:
            os.fchmod(fd, 0o700)  # e.g. 0755 from a version that used the umask
        return PrivateDir(path, fd)
    os.close(fd)
    if managed and stat.S_ISDIR(st.st_mode) and st.st_uid == _euid():
        if keep_contents:
            fd = os.open(path, flags)
            os.fchmod(fd, 0o700)
            what = "made private (mode 0700)"
        else:
            shutil.rmtree(path)  # symlink-safe: never follows links inside
            _makedirs_private(path)
            fd = os.open(path, flags)
            what = "emptied (files others could have planted in it are not used) and re-created with mode 0700"
        warnings.warn(f"{purpose} {path} {problem}; it was {what}", RuntimeWarning, stacklevel=3)
        if _problem(os.fstat(fd)) is None:
            return PrivateDir(path, fd)
        os.close(fd)  # pragma: no cover (replaced concurrently)
        problem = "could not be made private"
    raise InsecureDirectoryError(f"{purpose} {path} {problem}; not used (another user could plant "
                                 f"files in it). {hint}")
