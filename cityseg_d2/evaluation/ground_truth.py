"""The ground truth of an image in the compact form the evaluators use, and a cache of it on disk.

An instanceIds PNG is decoded once into its regions (the distinct instanceIds values and their pixel counts) and
a run-length encoding of the image's region index in raster order. Decoding the 16-bit PNG is what used to
dominate the fast evaluator's time per image; the runs of a Cityscapes frame are some ten thousand numbers,
which load from a .npz file in well under a millisecond and expand to the full region map with one np.repeat.
"""

import hashlib
import logging
import os
import zipfile
from dataclasses import dataclass

import cv2
import numpy as np

from ..file_io import atomic_write
from .protocol import read_gt_instance_ids

logger = logging.getLogger(__name__)

# Bump when what a cache file holds changes; older files are then rebuilt.
CACHE_FORMAT = 1
CACHE_DIR = "cityscapes_gt_regions"


@dataclass
class GroundTruthRegions:
    """The regions of one instanceIds image and where they are.

    region_ids (M,): the distinct instanceIds values, increasing; region_areas (M,): their pixel counts;
    run_starts (R,): flat (row-major) index where each run of equal region index starts, the first 0;
    run_regions (R,): the region index of each run; shape: (height, width).
    """

    region_ids: np.ndarray
    region_areas: np.ndarray
    run_starts: np.ndarray
    run_regions: np.ndarray
    shape: tuple

    @classmethod
    def from_instance_ids(cls, gt_ids):
        # Pixels per value by OpenCV's histogram (several times faster than np.bincount; its float32 counts are
        # exact below 2**24 pixels), then each pixel's region index through a lookup table.
        if gt_ids.size < 2**24:
            counts = cv2.calcHist([gt_ids], [0], None, [65536], [0, 65536]).ravel().astype(np.int64)
        else:
            counts = np.bincount(gt_ids.ravel(), minlength=65536)
        region_ids = np.flatnonzero(counts)
        lookup = np.zeros(len(counts), np.uint8 if len(region_ids) <= 256 else np.uint16)
        lookup[region_ids] = np.arange(len(region_ids))
        flat = np.take(lookup, gt_ids).ravel()
        run_starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]])).astype(np.int32)
        return cls(region_ids, counts[region_ids], run_starts, flat[run_starts], tuple(gt_ids.shape))

    @classmethod
    def read(cls, gt_path):
        return cls.from_instance_ids(read_gt_instance_ids(gt_path))

    def region_map(self):
        """(H, W) region index of every pixel (uint8, uint16 beyond 256 regions)."""
        size = self.shape[0] * self.shape[1]
        lengths = np.diff(np.append(self.run_starts, size))
        return np.repeat(self.run_regions, lengths).reshape(self.shape)

    def to_array(self):
        """Everything as one int32 array (what a cache file holds): M, R, H, W, then region ids, areas, run starts
        and run regions (one array: numpy parses a header per array, which costs as much as reading the runs)."""
        head = [len(self.region_ids), len(self.run_starts), *self.shape]
        parts = [head, self.region_ids, self.region_areas, self.run_starts, self.run_regions]
        return np.concatenate([np.asarray(p, np.int32) for p in parts])

    @classmethod
    def from_array(cls, array):
        """Inverse of to_array; ValueError when the array does not describe a consistent image."""
        if array.dtype != np.int32 or array.ndim != 1 or len(array) < 4:
            raise ValueError("not an int32 vector with a header")
        num_regions, num_runs, height, width = (int(v) for v in array[:4])
        if len(array) != 4 + 2 * num_regions + 2 * num_runs or min(num_regions, num_runs, height, width) < 1:
            raise ValueError("inconsistent lengths")
        region_ids, region_areas, run_starts, run_regions = np.split(
            array[4:], np.cumsum([num_regions, num_regions, num_runs])
        )
        dtype = np.uint8 if num_regions <= 256 else np.uint16
        regions = cls(
            region_ids.astype(np.int64),
            region_areas.astype(np.int64),
            run_starts,
            run_regions.astype(dtype),
            (height, width),
        )
        consistent = (
            regions.region_areas.sum() == height * width
            and run_starts[0] == 0
            and np.all(np.diff(run_starts) > 0)
            and run_starts[-1] < height * width
            and run_regions.min() >= 0
            and run_regions.max() < num_regions
        )
        if not consistent:
            raise ValueError("inconsistent regions and runs")
        return regions


class GroundTruthCache:
    """GroundTruthRegions of instanceIds files, kept as .npz files in a folder (made when first needed).

    A cache file is named by the image and a hash of its path, and holds the size and mtime of the PNG it was made
    from: a changed PNG is decoded again. Files are written atomically (several evaluating processes may share
    the folder) and read without pickle; an unreadable one is rebuilt.
    """

    def __init__(self, folder):
        self.folder = folder

    def _path(self, gt_path):
        digest = hashlib.blake2b(os.path.abspath(gt_path).encode(), digest_size=6).hexdigest()
        stem = os.path.basename(gt_path).rsplit(".", 1)[0]
        return os.path.join(self.folder, f"{stem}-{digest}.npz")

    def load(self, gt_path):
        try:
            stat = os.stat(gt_path)
        except OSError:
            return GroundTruthRegions.read(gt_path)  # names the missing file
        source = np.array([CACHE_FORMAT, stat.st_size, stat.st_mtime_ns], np.int64)
        path = self._path(gt_path)
        try:
            with np.load(path, allow_pickle=False) as arrays:
                if np.array_equal(arrays["source"], source):
                    return GroundTruthRegions.from_array(arrays["regions"])
        except FileNotFoundError:
            pass
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            logger.warning(f"rebuilding the unreadable ground-truth cache file {path}: {e}")
        regions = GroundTruthRegions.read(gt_path)
        os.makedirs(self.folder, exist_ok=True)
        with atomic_write(path) as f:
            np.savez(f, source=source, regions=regions.to_array())
        return regions
