"""Writing .npz files so that a reader (another evaluating process, a later run) never sees half of one."""

import os
import tempfile

import numpy as np


def save_npz_atomically(path, arrays):
    """np.savez(path, **arrays) through a temporary file in the same folder, renamed into place; returns path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            np.savez(f, **arrays)
        os.replace(temp_path, path)
    except BaseException:
        os.unlink(temp_path)
        raise
    return path
