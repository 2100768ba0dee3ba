"""Writing files so that a crash never leaves a half-written one behind, and reading paths named
by data files only inside their root."""
import contextlib
import errno
import os
import tempfile

from .cli import UserError

# Failures of the storage itself (not of the caller's data): full disk, quota, read-only, I/O,
# no permission, a path whose parent is a file.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES,
                errno.EPERM, errno.ENOTDIR, errno.EEXIST)


class OutputWriteError(UserError):
    """Writing ``path`` failed for a reason of the storage (see :data:`WRITE_ERRNOS`). The
    temporary file is removed and the previous ``path``, if any, is untouched; the message says
    so in one line (the tools print it without a traceback, exit status 1). Not an ``OSError``:
    callers that skip one bad input on an ``OSError`` must not skip a full disk."""

    def __init__(self, path, error, note=""):
        self.path = os.fspath(path)
        self.error = error
        what = "its previous version is intact" if os.path.exists(self.path) else "it was not created"
        super().__init__(f"cannot write {self.path}: {error.strerror or error} "
                         f"(errno {error.errno}); {what}{'; ' + note if note else ''}")

# mkstemp creates 0600 files; the final file gets the usual 0666 & ~umask, like open() would.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    The rename is atomic on POSIX file systems, so readers see either the old file or the
    complete new one. On an exception the temporary file is removed and ``path`` is untouched.
    The temporary name keeps the extension, so writers that infer the format from it work.
    A storage failure (full disk, quota, ...) is raised as :class:`OutputWriteError` naming
    ``path``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    stem, ext = os.path.splitext(os.path.basename(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=directory)
    except OSError as e:
        if e.errno in WRITE_ERRNOS:
            raise OutputWriteError(path, e) from e
        raise
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            raise OutputWriteError(path, e) from e
        raise


def check_output_folder(path) -> str:
    """Before any work: the folder ``path`` exists or can be created, and files can be written in
    it; else an :class:`OutputWriteError` naming it (a parent that is a file, a read-only file
    system, no permission). Nothing is created: a run refused later for bad input leaves no
    folder behind."""
    path = os.fspath(path)
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        code, note = errno.ENOTDIR, f"{existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        code, note = (errno.EROFS, "a read-only file system") if read_only else \
            (errno.EACCES, f"{existing} is not writable by this user")
    else:
        return path
    raise OutputWriteError(path, OSError(code, os.strerror(code), path), f"{note}; nothing was written")


def write_text_atomic(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


class OutsideRootError(ValueError):
    """A path read from a data file leads outside the folder it is relative to."""


def confined_path(root, entry) -> str:
    """``root/entry`` for a path ``entry`` that a data file (a COCO ``file_name``, a list file,
    a VRT source, a zones file) gives relative to ``root``; :class:`OutsideRootError` when it is
    absolute or climbs out of ``root`` with ``..``, so that a file from elsewhere (a labelling
    service, a supplier) cannot make a tool read or copy files elsewhere on the machine.

    The check is on the path as written, normalised (``a/../b`` is ``b``), and the normalised
    path is what is returned and opened. Links inside ``root`` are followed: they are made by
    whoever owns the folder (datasets are often links into shared storage), not by the data
    file."""
    text = os.fspath(entry)
    norm = os.path.normpath(text)
    if os.path.isabs(norm) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        where = "an absolute path" if os.path.isabs(norm) else "outside it"
        raise OutsideRootError(f"{text!r} is {where}: paths in the file must be relative to "
                               f"{os.fspath(root)} and stay inside it")
    return os.path.join(os.fspath(root), norm)
