"""Who writes into OUTPUT_DIR, and what a training may do with what is already there.

- One writer at a time: a training (or --eval-only run) holds an exclusive lock on OUTPUT_DIR/.lock (flock, so the
  kernel releases it when the process ends, even by kill -9: a stale lock is simply taken over). Another run into
  the same folder refuses in one line naming the holder.
- A folder that holds a training (checkpoints, last_checkpoint or metrics.json) is continued only with --resume and
  replaced only with --overwrite; --resume refuses a SOLVER.MAX_ITER below the checkpoint's iteration.
- Nothing is written before every check has passed: check_output_dir only reads; claim_output_dir, the first write,
  takes the lock, checks again under it and removes what killed writes left (cityseg_d2.file_io).
"""

import datetime
import fcntl
import glob
import json
import logging
import os
import socket
import sys

from ..errors import OutputDirError
from ..file_io import partial_files
from .checkpoint import FINAL_CHECKPOINT, LAST_CHECKPOINT, resume_point

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.json"
# Held locks of this process by real path: released by release_output_dir, or by the kernel when the process ends.
_held = {}


def training_files(output_dir):
    """The files by which OUTPUT_DIR holds a training: checkpoints, last_checkpoint, metrics.json."""
    names = [LAST_CHECKPOINT, METRICS_FILE]
    found = [name for name in names if os.path.isfile(os.path.join(output_dir, name))]
    return found + sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(output_dir), "*.pth")))


def _holder(lock_path):
    """What the lock file says of the run holding it."""
    try:
        with open(lock_path) as f:
            info = json.load(f)
        return f"pid {info['pid']} on {info['host']}, since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that did not say which"


def _locked_by_another(output_dir):
    """The holder's description when another process holds OUTPUT_DIR's lock, else None (reads only)."""
    lock_path = os.path.join(output_dir, LOCK_FILE)
    if os.path.realpath(output_dir) in _held:
        return None
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(lock_path)
    finally:
        os.close(fd)
    return None


def check_output_dir(cfg, resume=False, overwrite=False, eval_only=False):
    """Refuse, in one OutputDirError line, an OUTPUT_DIR that another run holds, that is not a folder, or whose
    training this run would overwrite (no --resume or --overwrite) or could not continue (MAX_ITER). Reads only."""
    output_dir = cfg.OUTPUT_DIR
    if not output_dir:
        raise OutputDirError("OUTPUT_DIR is empty: set it to the folder for checkpoints, logs and results")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputDirError(f"OUTPUT_DIR {output_dir} is a file, not a folder: choose another OUTPUT_DIR")
    if not os.path.isdir(output_dir):
        return
    holder = _locked_by_another(output_dir)
    if holder:
        raise OutputDirError(
            f"OUTPUT_DIR {output_dir} is in use by another run ({holder}): wait for it to end, or choose another "
            "OUTPUT_DIR"
        )
    files = training_files(output_dir)
    if eval_only or not files:
        return
    if resume:
        _check_resumable(cfg)
    elif not overwrite:
        state = "a finished training" if FINAL_CHECKPOINT in files else "an unfinished training"
        raise OutputDirError(
            f"OUTPUT_DIR {output_dir} holds {state} ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''}): "
            "pass --resume to continue it, --overwrite to replace it, or choose another OUTPUT_DIR"
        )


def _check_resumable(cfg):
    point = resume_point(cfg.OUTPUT_DIR)
    if point is None or point[1] is None:
        return  # no checkpoint, or weights without a training state: training starts at iteration 0
    path, iteration = point
    done, max_iter = iteration + 1, cfg.SOLVER.MAX_ITER
    if done > max_iter:
        raise OutputDirError(
            f"--resume: {path} has trained {done} iterations but SOLVER.MAX_ITER is {max_iter}: raise SOLVER.MAX_ITER "
            f"to at least {done} (or pass --overwrite to start afresh)"
        )


class _Lock:
    def __init__(self, output_dir):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise OutputDirError(
                f"OUTPUT_DIR {output_dir} is in use by another run ({_holder(self.path)}): wait for it to end, or "
                "choose another OUTPUT_DIR"
            ) from None
        if os.fstat(self.fd).st_size:  # a holder that ended without release(): killed, or the machine went down
            logger.warning(f"Taking over {self.path} from {_holder(self.path)}, which ended without releasing it")
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": sys.argv,
        }
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(info).encode(), 0)

    def release(self):
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def claim_output_dir(cfg, resume=False, overwrite=False, eval_only=False):
    """Make OUTPUT_DIR, hold its lock until release_output_dir (or the end of the process), check it again under
    the lock, remove what killed writes left in it and, with --overwrite, the previous training's files."""
    output_dir = cfg.OUTPUT_DIR
    key = os.path.realpath(output_dir)
    if key in _held:
        return
    check_output_dir(cfg, resume, overwrite, eval_only)
    created = not os.path.isdir(output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
        lock = _Lock(output_dir)
    except OSError as e:
        raise OutputDirError(
            f"cannot write to OUTPUT_DIR {output_dir} ({e.strerror}): choose another OUTPUT_DIR"
        ) from e
    _held[key] = lock
    try:
        check_output_dir(cfg, resume, overwrite, eval_only)  # again: another run may have ended or written meanwhile
        for path in partial_files(output_dir):
            logger.info(f"Removing {path}, left by a write that was killed")
            os.unlink(path)
        if overwrite and not resume and not eval_only:
            for name in training_files(output_dir):
                logger.warning(f"--overwrite: removing {os.path.join(output_dir, name)}")
                os.unlink(os.path.join(output_dir, name))
    except BaseException:
        release_output_dir(output_dir)
        if created:
            os.remove(lock.path)
            os.rmdir(output_dir)
        raise


def release_output_dir(output_dir):
    """Release this process's lock on OUTPUT_DIR, if it holds one."""
    lock = _held.pop(os.path.realpath(output_dir), None)
    if lock:
        lock.release()
