"""The Trainer's hooks and writer where detectron2's defaults lose work or write what readers reject.

- EvalHook: detectron2's, but the evaluation after training runs in the last iteration and is logged at it, like the
  final checkpoint.
- StopOnSignal: SIGTERM (clusters and Ray send it before preemption) or SIGINT (Ctrl-C) saves a checkpoint at the
  current iteration and stops training with one line saying how to resume; keep_workers_through_stop_signals keeps
  the data-loader workers alive meanwhile.
- MetricsWriter: metrics.json as valid JSON lines (NaN and inf as null), every scalar at its own iteration.
"""

import functools
import json
import logging
import math
import os
import signal
import threading
from collections import defaultdict

from detectron2.engine import HookBase, hooks
from detectron2.utils.events import JSONWriter, get_event_storage
from torch.utils.data import DataLoader

from ..errors import TrainingInterrupted

logger = logging.getLogger(__name__)


class EvalHook(hooks.EvalHook):
    """detectron2's EvalHook, except that the evaluation after the last iteration runs in that iteration's
    after_step: every writer logs it at that iteration, like the model_final.pth saved there (detectron2 runs it in
    after_train, logged one past the last iteration, and also after a failure in the last iteration). A training
    resumed with nothing left to train evaluates its final model again in after_train, at the same iteration."""

    def __init__(self, eval_period, eval_function):
        super().__init__(eval_period, eval_function, eval_after_train=False)

    def after_step(self):
        super().after_step()  # the periodic evaluations, but not after the last iteration
        if self.trainer.iter + 1 == self.trainer.max_iter:
            self._do_eval()

    def after_train(self):
        trainer = self.trainer
        if trainer.start_iter >= trainer.max_iter:
            storage = trainer.storage
            finished_at, storage.iter = storage.iter, trainer.max_iter - 1
            try:
                self._do_eval()
            finally:
                storage.iter = finished_at
        super().after_train()  # releases the evaluation function


class StopOnSignal(HookBase):
    """On SIGTERM or SIGINT, finish the current iteration, save a checkpoint at it and stop with TrainingInterrupted,
    whose message ends with the trainer's `resume_hint`.

    A second signal acts at once (the previous handler is back). Handlers can be set in the main thread only: in
    another one (a Ray Tune trial) this hook does nothing, and Tune's own checkpoints cover preemption.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpointer):
        self._checkpointer = checkpointer
        self._previous = {}
        self._received = None

    def _receive(self, signum, frame):
        self._received = signum
        signal.signal(signum, self._previous[signum])

    def before_train(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._receive) for signum in self.SIGNALS}

    def after_step(self):
        if self._received is None:
            return
        iteration = self.trainer.iter
        logger.warning(
            f"{signal.Signals(self._received).name}: saving a checkpoint at iteration {iteration}, then stopping"
        )
        name = f"model_{iteration:07d}"
        self._checkpointer.save(name, iteration=iteration)
        path = os.path.join(self._checkpointer.save_dir, name + ".pth")
        raise TrainingInterrupted(
            f"{signal.Signals(self._received).name} stopped training after iteration {iteration + 1} of "
            f"{self.trainer.max_iter}, saved in {path}; {self.trainer.resume_hint}",
            self._received,
        )

    def after_train(self):
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._receive:
                signal.signal(signum, previous)


def _ignoring_stop_signals(worker_init_fn, worker_id):
    for signum in StopOnSignal.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def keep_workers_through_stop_signals(loader):
    """`loader`, whose DataLoader workers ignore SIGTERM and SIGINT. A scheduler that signals the whole process group
    (Slurm) and Ctrl-C reach the workers too: torch's workers die of SIGTERM, and the training process then fails
    with a traceback before StopOnSignal can save. They still end with the training process (torch's watchdog).
    `loader` is a DataLoader or wraps one (detectron2's AspectRatioGroupedDataset.dataset, a prefetcher's .loader)."""
    inner = loader
    while not isinstance(inner, DataLoader) and (hasattr(inner, "loader") or hasattr(inner, "dataset")):
        inner = getattr(inner, "loader", None) or inner.dataset
    if isinstance(inner, DataLoader) and inner.num_workers > 0:
        inner.worker_init_fn = functools.partial(_ignoring_stop_signals, inner.worker_init_fn)
    return loader


def _json_value(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsWriter(JSONWriter):
    """detectron2's JSONWriter with strict JSON (NaN, e.g. the AP of a class absent from the evaluated images, is
    written as null) and each scalar written once at its own iteration, also when that iteration's line was
    written before (the evaluation after training, logged at the last iteration)."""

    def __init__(self, json_file, window_size=20):
        super().__init__(json_file, window_size)
        self._written = {}  # scalar name -> the last iteration written

    def write(self):
        rows = defaultdict(dict)
        for key, (value, iteration) in get_event_storage().latest_with_smoothing_hint(self._window_size).items():
            if iteration > self._written.get(key, -1):
                rows[iteration][key] = _json_value(value)
                self._written[key] = iteration
        for iteration in sorted(rows):
            self._file_handle.write(
                json.dumps({**rows[iteration], "iteration": iteration}, sort_keys=True, allow_nan=False) + "\n"
            )
        self._file_handle.flush()
        os.fsync(self._file_handle.fileno())


def drop_metrics_from(json_file, iteration):
    """Cut metrics.json before its first line at or past `iteration`, or torn by a kill: what a training resumed
    from a checkpoint before `iteration` will log again. Lines are in iteration order, so only a tail goes."""
    try:
        f = open(json_file, "r+b")
    except FileNotFoundError:
        return
    with f:
        offset = 0
        for line in f:
            try:
                if not line.endswith(b"\n") or json.loads(line)["iteration"] >= iteration:
                    break
            except (ValueError, KeyError, TypeError):
                break
            offset += len(line)
        else:
            return
        logger.info(f"Dropping the lines of {json_file} from iteration {iteration} on (or torn): they are logged again")
        f.truncate(offset)
