"""On-disk cache of parsed dataset dicts, so that a warm start skips reading thousands of annotation files.

A cache file is named by the loader options and the selected image ids, and holds a fingerprint of the files
(sizes and mtimes), the options and the package version; any change to these rebuilds it. Every image was opened
and checked whole when the dicts were built, so a hit also means that they are still readable.

Files are JSON, not pickle: a cache file someone else wrote (a shared cache folder, a copied home directory) is
data, never code that loading it would run. They are written atomically (cityseg_d2.file_io), so concurrent
processes (e.g. one per GPU) never read a half-written cache.
"""

import hashlib
import json
import logging
import os

from detectron2.structures import BoxMode

from ..file_io import atomic_write

logger = logging.getLogger(__name__)

# Bump when the dicts' content changes without a package version change.
CACHE_FORMAT = 2


def cache_dir():
    """$CITYSEG_D2_CACHE_DIR, else ~/.cache/cityseg_d2."""
    return os.environ.get("CITYSEG_D2_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "cityseg_d2")


def _digest(obj):
    return hashlib.blake2b(repr(obj).encode(), digest_size=16).hexdigest()


def cache_path(options, image_ids):
    name = f"{options.get('split', 'dataset')}-{_digest((sorted(options.items()), image_ids))}.json"
    return os.path.join(cache_dir(), name)


def _read(path, key):
    """The dicts of the cache file at `path` if it was written for `key`, else None."""
    with open(path, "rb") as f:
        content = json.load(f)
    if not isinstance(content, dict) or content.get("key") != key:
        return None
    dicts = content["dicts"]
    for record in dicts:
        for annotation in record["annotations"]:
            annotation["bbox_mode"] = BoxMode(annotation["bbox_mode"])
    return dicts


def load_or_build(options, fingerprint, build):
    """build()'s result, from the cache when `options` and `fingerprint` (a list of (image_id, stats)) match."""
    from cityseg_d2 import __version__

    path = cache_path(options, [image_id for image_id, _ in fingerprint])
    key = _digest((CACHE_FORMAT, __version__, sorted(options.items()), fingerprint))
    try:
        dicts = _read(path, key)
        if dicts is not None:
            return dicts
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as e:  # a truncated or foreign file: rebuild it
        logger.warning(f"Ignoring unreadable cache file {path}: {e}")
    dicts = build()
    _write(path, key, dicts)
    return dicts


def _write(path, key, dicts):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_write(path, "w") as f:
            json.dump({"key": key, "dicts": dicts}, f, separators=(",", ":"))
    except OSError as e:
        logger.warning(f"Cannot write the dataset cache {path} ({e}); set $CITYSEG_D2_CACHE_DIR to a writable folder")
