"""Checkpoints that survive crashes and files that cannot run code: detectron2's DetectionCheckpointer, made safe.

- Writes are atomic (cityseg_d2.file_io.atomic_write, through the checkpointer's PathManager, so fvcore's own save
  and tag_last_checkpoint are used unchanged): a checkpoint and `last_checkpoint` are replaced whole or not at all,
  whenever the process is killed; a full disk is one error line, and the previous checkpoint stays intact.
- `.pth` files are read with torch.load(weights_only=True): tensors and plain containers only, never code.
- `.pkl` files (pickles, which can run code) are read only from detectron2's model zoo, or when the config says the
  user trusts them (CITYSEG.TRUST_PICKLE_WEIGHTS, train_net's --trust-pickle).
- --resume takes the checkpoint `last_checkpoint` names, else, with a warning naming the unreadable file, the newest
  checkpoint that can be read.
- What did not fit the model is logged in one line, and can be checked before training (weights_fit).
"""

import contextlib
import glob
import logging
import os
import pickle
import warnings
import zipfile
from typing import NamedTuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from ..errors import CheckpointError, ConfigError, OutputDirError, first_line
from ..file_io import atomic_write

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"
FINAL_CHECKPOINT = "model_final.pth"
MODEL_ZOO_PREFIXES = ("detectron2://", "https://dl.fbaipublicfiles.com/detectron2/")
# What torch.load, pickle and the state-dict loading raise on a file that is not a checkpoint of this model.
UNREADABLE = (RuntimeError, OSError, EOFError, ValueError, KeyError, AssertionError, pickle.UnpicklingError)


def untrusted_pickle_error(path, trust_pickle):
    """The ConfigError to raise for weights `path`, a pickle from outside detectron2's model zoo, when pickles are
    not trusted; None when it may be read."""
    if trust_pickle or not path.split("?")[0].endswith(".pkl") or path.startswith(MODEL_ZOO_PREFIXES):
        return None
    return ConfigError(
        f"MODEL.WEIGHTS {path} is a pickle, which can run code when loaded: refused. Convert it to a .pth state dict, "
        "or, if you trust its source, set CITYSEG.TRUST_PICKLE_WEIGHTS True (train_net.py: --trust-pickle)"
    )


def weights_error(weights, error):
    """The ConfigError for MODEL.WEIGHTS that could not be read or loaded."""
    return ConfigError(
        f"MODEL.WEIGHTS '{weights}' could not be loaded ({unreadable_reason(weights, error)}): give a .pth written by "
        "detectron2 (or torch.save of a state dict), or MODEL.WEIGHTS '' for random init"
    )


def eval_only_fit_error(weights, fit):
    """The ConfigError for weights that leave part of the model at random init, which --eval-only would evaluate
    to an AP near 0; None when they fit it whole."""
    if fit is None or fit.complete:
        return None
    return ConfigError(
        f"--eval-only: {weights} does not fit this model ({fit.describe()}): evaluate it with the config it was "
        "trained with"
    )


def unreadable_reason(path, error):
    """Why a checkpoint could not be read, in words (torch's weights-only refusals are long and generic)."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return "the file is empty"
    if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error):
        if "GLOBAL" in str(error):  # a class or function to import and call: what makes a pickle run code
            return "it holds Python objects besides tensors, which could run code when loaded: refused"
        return "not a PyTorch checkpoint"
    return first_line(error).split(". ")[0]  # torch's reader adds sentences of advice


class _FirstWriteError:
    """A file whose first failing write() is kept: torch.save turns it into an opaque RuntimeError ("unexpected
    pos ..."), while the OSError says what happened (no space left on device)."""

    def __init__(self, file):
        self._file = file
        self.error = None

    def write(self, data):
        try:
            return self._file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._file, name)


class _AtomicWrites:
    """The checkpointer's PathManager, except that opening a local file for writing writes it atomically."""

    def __init__(self, path_manager):
        self._path_manager = path_manager

    def __getattr__(self, name):
        return getattr(self._path_manager, name)

    @contextlib.contextmanager
    def open(self, path, mode="r", **kwargs):
        if "w" not in mode or "://" in path:
            with self._path_manager.open(path, mode, **kwargs) as f:
                yield f
            return
        with atomic_write(path, mode) as f:
            recorder = _FirstWriteError(f)
            try:
                yield recorder
            except RuntimeError as e:
                if recorder.error is not None:
                    raise recorder.error from e
                raise


class WeightsFit(NamedTuple):
    """How the tensors of a checkpoint fit a model: element counts, and a few mismatches by name for messages."""

    model_elements: int  # of the model's parameters and buffers
    loaded_elements: int  # of those, loaded from the checkpoint
    checkpoint_tensors: int
    skipped_tensors: int  # checkpoint tensors the model has no place for, or of another shape
    examples: list

    @classmethod
    def of(cls, model, incompatible):
        """From what fvcore's Checkpointer._load_model reports (missing, unexpected and reshaped keys)."""
        state = model.state_dict()
        reshaped = {key: (tuple(theirs), tuple(ours)) for key, theirs, ours in incompatible.incorrect_shapes}
        not_loaded = set(incompatible.missing_keys) | set(reshaped)
        loaded = [key for key in state if key not in not_loaded]
        skipped = len(incompatible.unexpected_keys) + len(reshaped)
        return cls(
            model_elements=sum(value.numel() for value in state.values()),
            loaded_elements=sum(state[key].numel() for key in loaded),
            checkpoint_tensors=len(loaded) + skipped,
            skipped_tensors=skipped,
            examples=[
                f"{key}: {theirs} in the checkpoint, {ours} in the model" for key, (theirs, ours) in reshaped.items()
            ]
            + [f"{key}: not in the model" for key in incompatible.unexpected_keys],
        )

    @property
    def complete(self):
        return self.loaded_elements == self.model_elements

    @property
    def mostly_skipped(self):
        """Most of the checkpoint's tensors have no place in the model: a checkpoint of another architecture."""
        return self.checkpoint_tensors > 0 and (
            self.skipped_tensors > self.checkpoint_tensors / 2 or not self.loaded_elements
        )

    def describe(self):
        loaded = 100.0 * self.loaded_elements / max(self.model_elements, 1)
        text = (
            f"{loaded:.0f}% of the model's weights loaded, {self.skipped_tensors} of the checkpoint's "
            f"{self.checkpoint_tensors} tensors skipped"
        )
        return text + (f" (e.g. {'; '.join(self.examples[:2])})" if self.examples else "")


class SafeCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves, weights-only loading, a pickle policy, a fallback to the newest
    readable checkpoint on resume, and a one-line account of what did not fit (also kept in `self.fit`)."""

    def __init__(self, model, save_dir="", *, trust_pickle=False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.path_manager = _AtomicWrites(self.path_manager)
        self.trust_pickle = trust_pickle
        self.fit = None

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        try:
            super().save(name, **kwargs)
        except OSError as e:
            last = os.path.join(self.save_dir, LAST_CHECKPOINT)
            kept = (
                f"the last complete checkpoint, named in {last}, is intact"
                if os.path.isfile(last)
                else "nothing was saved"
            )
            raise OutputDirError(
                f"cannot write checkpoint {os.path.join(self.save_dir, name)}.pth ({e.strerror or first_line(e)}); "
                f"{kept}: free space in {self.save_dir}, then continue with --resume"
            ) from e

    def load(self, path, *args, **kwargs):
        refusal = untrusted_pickle_error(path, self.trust_pickle) if path else None
        if refusal:
            raise refusal
        try:
            return super().load(path, *args, **kwargs)
        except BaseException:
            # DetectionCheckpointer.load resets this only when it returns; left set, the next load() asserts.
            self._parsed_url_during_load = None
            raise

    def _torch_load(self, f):
        return torch.load(f, map_location=torch.device("cpu"), weights_only=True)

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        self.fit = WeightsFit.of(self.model, incompatible)
        return incompatible

    def _log_incompatible_keys(self, incompatible):
        """One line instead of fvcore's list of every skipped key."""
        if self.fit.skipped_tensors or not self.fit.complete:
            self.logger.warning(f"Loaded weights: {self.fit.describe()}")

    def has_checkpoint(self):
        return bool(resume_candidates(self.save_dir))

    def resume_or_load(self, path, *, resume=True):
        """With resume, the checkpoint last_checkpoint names, else the newest readable one (a warning names each
        unreadable file); without resume or without checkpoints, the weights at `path`."""
        candidates = resume_candidates(self.save_dir) if resume else []
        problems = []
        for candidate in candidates:
            try:
                return self.load(candidate)
            except UNREADABLE as e:
                problems.append(f"{os.path.basename(candidate)}: {unreadable_reason(candidate, e)}")
                logger.warning(f"Cannot resume from {candidate} ({problems[-1]}); trying the next newest checkpoint")
        if candidates:
            raise _no_readable_checkpoint(self.save_dir, problems)
        return self.load(path, checkpointables=[])


def resume_candidates(output_dir):
    """The checkpoints --resume tries, in order: the one `last_checkpoint` names, then every model_*.pth from the
    newest (by modification time) to the oldest."""
    named = []
    try:
        with open(os.path.join(output_dir, LAST_CHECKPOINT)) as f:
            name = f.read().strip()
        if name and os.path.isfile(os.path.join(output_dir, name)):
            named = [os.path.join(output_dir, name)]
    except OSError:
        pass
    others = sorted(glob.glob(os.path.join(glob.escape(output_dir), "model_*.pth")), key=os.path.getmtime, reverse=True)
    return named + [path for path in others if path not in named]


def _read_checkpoint(path):
    """torch.load of a checkpoint, weights only; a zip-format file is mapped, not read (only its metadata is)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def checkpoint_iteration(path):
    """The last training iteration a checkpoint holds (0-based), or None for weights without a training state."""
    checkpoint = _read_checkpoint(path)
    trainer = checkpoint.get("trainer")
    if isinstance(trainer, dict) and "iteration" in trainer:
        return trainer["iteration"]
    return checkpoint.get("iteration")


def _no_readable_checkpoint(output_dir, problems):
    return CheckpointError(
        f"--resume: no checkpoint in {output_dir} can be read ({'; '.join(problems)}): start afresh in another "
        "OUTPUT_DIR, or with --overwrite"
    )


def resume_point(output_dir):
    """(path, iteration) of the checkpoint --resume would start from (unreadable ones skipped, as the checkpointer
    does), None when there is none; a CheckpointError when none of them can be read. Reads metadata only."""
    candidates, problems = resume_candidates(output_dir), []
    for candidate in candidates:
        try:
            return candidate, checkpoint_iteration(candidate)
        except UNREADABLE as e:
            problems.append(f"{os.path.basename(candidate)}: {unreadable_reason(candidate, e)}")
    if candidates:
        raise _no_readable_checkpoint(output_dir, problems)
    return None


def verify_checkpoint(path, iteration):
    """Read a checkpoint back (its zip directory and every record's metadata): it was written whole, and at
    `iteration`. A CheckpointError says what is wrong."""
    try:
        found = checkpoint_iteration(path)
    except UNREADABLE as e:
        raise CheckpointError(f"{path} cannot be read back after training ({unreadable_reason(path, e)})") from e
    if found != iteration:
        raise CheckpointError(f"{path} holds iteration {found}, not the last one, {iteration}")


class _WeightsProbe(SafeCheckpointer):
    """Loads weights into a model on the meta device (no memory, no copies), to see how they fit, in silence."""

    def _torch_load(self, f):
        return _read_checkpoint(f)

    def _log_incompatible_keys(self, incompatible):
        pass


def weights_fit(cfg, weights=None):
    """How MODEL.WEIGHTS (or `weights`) fits the model of `cfg`, found without building the model for real: a
    ConfigError when the file cannot be read or is a refused pickle."""
    weights = weights or cfg.MODEL.WEIGHTS
    refusal = untrusted_pickle_error(weights, cfg.CITYSEG.TRUST_PICKLE_WEIGHTS)
    if refusal:
        raise refusal
    meta_cfg = cfg.clone()
    meta_cfg.defrost()
    meta_cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(meta_cfg)
    probe = _WeightsProbe(model, trust_pickle=cfg.CITYSEG.TRUST_PICKLE_WEIGHTS)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
            probe.load(weights, checkpointables=[])
    except UNREADABLE as e:
        raise weights_error(weights, e) from e
    return probe.fit
