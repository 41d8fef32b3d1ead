"""Crash-safe file writes: a file is replaced whole or not at all, whenever the process is killed or the disk fills.

Used for checkpoints, `last_checkpoint` and the dataset cache. A write goes to a hidden temporary file in the same
folder (`.<name>.partial-<random>`, never matching `*.pth`), which is flushed to disk and renamed over the target;
the folder is then synced so that the rename itself survives a power cut.
"""

import contextlib
import glob
import os
import secrets

PARTIAL_MARKER = ".partial-"


def partial_files(directory):
    """The temporary files that writes into `directory` killed before their rename left behind."""
    return glob.glob(os.path.join(glob.escape(directory), f".*{PARTIAL_MARKER}*"))


def _fsync_directory(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """open(path, mode) for writing, except that `path` changes only when the block ends without an exception: then
    to the whole new content, durably. On an exception the temporary file is removed and `path` is left as it was."""
    if not ("w" in mode and "+" not in mode):
        raise ValueError(f"atomic_write writes a whole new file: mode {mode!r} is not 'w' or 'wb'")
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}{PARTIAL_MARKER}{secrets.token_hex(4)}")
    # os.open applies the umask like open() does (tempfile.mkstemp would make the file private to its owner).
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)
