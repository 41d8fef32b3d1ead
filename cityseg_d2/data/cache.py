"""On-disk cache of parsed dataset dicts, so that a warm start skips reading thousands of annotation files.

A cache file is named by the loader options and the selected image ids, and holds a fingerprint of the files
(sizes and mtimes), the options and the package version; any change to these rebuilds it. Files are written
atomically, so concurrent processes (e.g. one per GPU) never read a half-written cache.
"""
import hashlib
import logging
import os
import pickle
import tempfile

logger = logging.getLogger(__name__)

# Bump when the dicts' content changes without a package version change.
CACHE_FORMAT = 1


def cache_dir():
    """$CITYSEG_D2_CACHE_DIR, else ~/.cache/cityseg_d2."""
    return os.environ.get("CITYSEG_D2_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "cityseg_d2")


def _digest(obj):
    return hashlib.blake2b(repr(obj).encode(), digest_size=16).hexdigest()


def cache_path(options, image_ids):
    name = f"{options.get('split', 'dataset')}-{_digest((sorted(options.items()), image_ids))}.pkl"
    return os.path.join(cache_dir(), name)


def load_or_build(options, fingerprint, build):
    """build()'s result, from the cache when `options` and `fingerprint` (a list of (image_id, stats)) match."""
    from cityseg_d2 import __version__

    path = cache_path(options, [image_id for image_id, _ in fingerprint])
    key = _digest((CACHE_FORMAT, __version__, sorted(options.items()), fingerprint))
    try:
        with open(path, "rb") as f:
            if pickle.load(f) == key:
                return pickle.load(f)
    except FileNotFoundError:
        pass
    except Exception as e:  # a truncated or foreign file: rebuild it
        logger.warning(f"Ignoring unreadable cache file {path}: {e}")
    dicts = build()
    _write_atomically(path, key, dicts)
    return dicts


def _write_atomically(path, key, dicts):
    """Write to a temporary file and rename it: readers see the old file or the new one, never a partial one."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    except OSError as e:
        logger.warning(f"Cannot write the dataset cache {path} ({e}); set $CITYSEG_D2_CACHE_DIR to a writable folder")
        return
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(key, f, protocol=5)
            pickle.dump(dicts, f, protocol=5)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
