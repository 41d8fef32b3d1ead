"""detectron2's DefaultTrainer with Cityscapes evaluators, best-checkpoint keeping and a divergence message."""
import logging
import os
import pickle

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer, hooks
from detectron2.utils import comm

from ..errors import ConfigError, TrainingDivergedError, first_line
from ..evaluation import build_evaluator
from ..integrations import wandb_enabled

logger = logging.getLogger(__name__)


# What torch.load / pickle raise on a file that is not a checkpoint, or one of another model.
_LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError)


def _weights_error(weights, error):
    return ConfigError(f"MODEL.WEIGHTS {weights!r} could not be loaded: {first_line(error)}")


class Trainer(DefaultTrainer):
    """DefaultTrainer whose evaluators come from TEST.EVALUATORS, which keeps the best checkpoint
    (CITYSEG.BEST_CHECKPOINT_METRIC) and logs to Weights & Biases when the config turns it on.

    Data loading is detectron2's DatasetMapper: the Cityscapes recipe's multi-scale resize and flips come from
    INPUT.MIN_SIZE_TRAIN / MAX_SIZE_TRAIN / RANDOM_FLIP (and INPUT.CROP), as in every detectron2 config.
    `wandb` is the W&B session (cityseg_d2.integrations.wandb.WandbSession) on the main process when W&B is on,
    else None; its run starts when training starts.
    """

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        try:
            return super().build_train_loader(cfg)
        except AssertionError as e:  # detectron2 asserts on empty data sets ("Dataset '...' is empty!")
            raise ConfigError(f"DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)}: {e}") from e

    def build_hooks(self):
        self.wandb = None
        if wandb_enabled(self.cfg) and comm.is_main_process():
            from ..integrations.wandb import WandbSession

            self.wandb = WandbSession(self.cfg)
        ret = super().build_hooks()  # calls build_writers
        metric = self.cfg.CITYSEG.BEST_CHECKPOINT_METRIC
        best = None
        if metric and self.cfg.TEST.EVAL_PERIOD > 0 and comm.is_main_process():
            best = hooks.BestCheckpointer(
                self.cfg.TEST.EVAL_PERIOD, self.checkpointer, metric, mode=self.cfg.CITYSEG.BEST_CHECKPOINT_MODE
            )
        # After the EvalHook whose results they read, before the PeriodicWriter that is always last (its
        # after_train closes the writers, which finishes the W&B run).
        ret[-1:-1] = ([best] if best else []) + (self.wandb.evaluation_hooks(best) if self.wandb else [])
        if self.wandb:
            ret.insert(0, self.wandb)  # first: the run exists before any other hook's before_train
        return ret

    def build_writers(self):
        return super().build_writers() + ([self.wandb.writer()] if self.wandb else [])

    def resume_or_load(self, resume=True):
        try:
            super().resume_or_load(resume=resume)
        except _LOAD_ERRORS as e:
            raise _weights_error(self.cfg.MODEL.WEIGHTS, e) from e

    def train(self):
        try:
            return super().train()
        except FloatingPointError as e:
            if isinstance(e, TrainingDivergedError):
                raise
            raise TrainingDivergedError(
                f"training diverged at iteration {self.iter}: {first_line(e)} Lower SOLVER.BASE_LR, raise "
                "SOLVER.WARMUP_ITERS or turn on SOLVER.CLIP_GRADIENTS.ENABLED; with random init use GN or BN, not FrozenBN."
            ) from e
        except BaseException as e:
            if self.wandb:  # when an after_train hook raised, PeriodicWriter never closed the W&B writer
                self.wandb.finish(error=e)
            raise

    @classmethod
    def evaluate_weights(cls, cfg, resume=False):
        """--eval-only: load MODEL.WEIGHTS (or the last checkpoint with resume) and evaluate DATASETS.TEST."""
        model = cls.build_model(cfg)
        checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        try:
            checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
        except _LOAD_ERRORS as e:
            raise _weights_error(cfg.MODEL.WEIGHTS, e) from e
        return cls.test(cfg, model)
