"""detectron2's DefaultTrainer with Cityscapes evaluators, best-checkpoint keeping, crash-safe checkpoints and
outputs (see engine/checkpoint.py and engine/hooks.py) and one-line messages for what a user can fix."""
import contextlib
import functools
import logging
import os
import weakref

from detectron2.data import build_detection_test_loader
from detectron2.engine import DefaultTrainer, defaults, hooks
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, TensorboardXWriter

from ..data.fast_loader import build_fast_train_loader
from ..errors import ConfigError, TrainingDivergedError, UserError, first_line
from ..evaluation import build_evaluator
from ..integrations import wandb_enabled
from ..modeling import build_fast_model, inference_autocast
from .checkpoint import (
    FINAL_CHECKPOINT,
    UNREADABLE,
    SafeCheckpointer,
    eval_only_fit_error,
    verify_checkpoint,
    weights_error,
)
from .hooks import EvalHook, MetricsWriter, StopOnSignal, drop_metrics_from, keep_workers_through_stop_signals
from .train_loop import build_train_loop

logger = logging.getLogger(__name__)


class _OneLineUserErrors(logging.Filter):
    """detectron2's train loop logs the exception that ends training with its traceback. A user's error (run_cli
    prints it as one `error:` line) and a diverging loss are logged in one line instead."""

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (UserError, FloatingPointError)):
            record.msg, record.args = f"Training stopped: {first_line(error)}", ()
            record.exc_info = record.exc_text = None
        return True


_ONE_LINE_USER_ERRORS = _OneLineUserErrors()


@contextlib.contextmanager
def _data_parallel_on_cpu(cfg):
    """detectron2's create_ddp_model hands DDP the local rank as a CUDA device id, which DDP refuses for a model on
    the CPU: with several processes on CPUs (gloo; a Ray Train worker, launch without GPUs), the Trainer's model is
    wrapped without one."""
    if cfg.MODEL.DEVICE != "cpu" or comm.get_world_size() == 1:
        yield
        return
    create_ddp_model = defaults.create_ddp_model
    defaults.create_ddp_model = functools.partial(create_ddp_model, device_ids=None)
    try:
        yield
    finally:
        defaults.create_ddp_model = create_ddp_model


class Trainer(DefaultTrainer):
    """DefaultTrainer whose evaluators come from TEST.EVALUATORS, which keeps the best checkpoint
    (CITYSEG.BEST_CHECKPOINT_METRIC) and logs to Weights & Biases when the config turns it on.

    Data loading is detectron2's DatasetMapper: the Cityscapes recipe's multi-scale resize and flips come from
    INPUT.MIN_SIZE_TRAIN / MAX_SIZE_TRAIN / RANDOM_FLIP (and INPUT.CROP), as in every detectron2 config.
    `wandb` is the W&B session (cityseg_d2.integrations.wandb.WandbSession) on the main process when W&B is on,
    else None; its run starts when training starts.

    Checkpoints are written atomically and read weights-only (SafeCheckpointer); SIGTERM or SIGINT saves one and
    stops (StopOnSignal, in a single-process training), with `resume_hint` in its message; a finished training's
    model_final.pth is read back before train() returns.
    """

    resume_hint = "continue from it with --resume"

    def __init__(self, cfg):
        with _data_parallel_on_cpu(cfg):
            super().__init__(cfg)
        # The fast path's training step (engine/train_loop.py) where the config asks for it.
        loop = self._trainer
        self._trainer = build_train_loop(cfg, loop.model, loop.data_loader, loop.optimizer)

    @classmethod
    def build_model(cls, cfg):
        model = build_fast_model(cfg)  # detectron2's build_model plus CITYSEG.FAST.CHANNELS_LAST / COMPILE
        logger.info(f"Model:\n{model}")
        return model

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, batch_size=cfg.CITYSEG.FAST.TEST_BATCH_SIZE)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        with inference_autocast(cfg):  # CITYSEG.FAST.TEST_PRECISION
            return super().test(cfg, model, evaluators)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        try:
            loader = build_fast_train_loader(cfg) if cfg.CITYSEG.FAST.DATA else super().build_train_loader(cfg)
            return keep_workers_through_stop_signals(loader)
        except AssertionError as e:  # detectron2 asserts on empty data sets ("Dataset '...' is empty!")
            raise ConfigError(f"DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)}: {e}") from e

    def build_hooks(self):
        # DefaultTrainer made a DetectionCheckpointer just before calling build_hooks: the hooks save through ours.
        self.checkpointer = SafeCheckpointer(
            self.checkpointer.model,
            self.cfg.OUTPUT_DIR,
            trust_pickle=self.cfg.CITYSEG.TRUST_PICKLE_WEIGHTS,
            trainer=weakref.proxy(self),
        )
        self.wandb = None
        if wandb_enabled(self.cfg) and comm.is_main_process():
            from ..integrations.wandb import WandbSession

            self.wandb = WandbSession(self.cfg)
        ret = super().build_hooks()  # calls build_writers
        ret = [self._eval_hook() if isinstance(h, hooks.EvalHook) else h for h in ret]
        metric = self.cfg.CITYSEG.BEST_CHECKPOINT_METRIC
        best = None
        if metric and self.cfg.TEST.EVAL_PERIOD > 0 and comm.is_main_process():
            best = hooks.BestCheckpointer(
                self.cfg.TEST.EVAL_PERIOD, self.checkpointer, metric, mode=self.cfg.CITYSEG.BEST_CHECKPOINT_MODE
            )
        # After the EvalHook whose results they read, before the PeriodicWriter that is always last (its
        # after_train closes the writers, which finishes the W&B run).
        ret[-1:-1] = ([best] if best else []) + (self.wandb.evaluation_hooks(best) if self.wandb else [])
        if comm.get_world_size() == 1:  # several processes would have to agree on the iteration to stop at
            ret.insert(len(ret) - 1, StopOnSignal(self.checkpointer))  # after every hook that saves or evaluates
        if self.wandb:
            ret.insert(0, self.wandb)  # first: the run exists before any other hook's before_train
        return ret

    def _eval_hook(self):
        """Ours in place of DefaultTrainer's EvalHook, with the same evaluation function."""

        def test_and_save_results():
            self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        return EvalHook(self.cfg.TEST.EVAL_PERIOD, test_and_save_results)

    def build_writers(self):
        """detectron2's default writers, with metrics.json written by MetricsWriter (strict JSON)."""
        output_dir = self.cfg.OUTPUT_DIR
        os.makedirs(output_dir, exist_ok=True)
        writers = [
            CommonMetricPrinter(self.max_iter),
            MetricsWriter(os.path.join(output_dir, "metrics.json")),
            TensorboardXWriter(output_dir),
        ]
        return writers + ([self.wandb.writer()] if self.wandb else [])

    def resume_or_load(self, resume=True):
        try:
            super().resume_or_load(resume=resume)
        except UserError:
            raise
        except UNREADABLE as e:
            raise weights_error(self.cfg.MODEL.WEIGHTS, e) from e
        if resume and comm.is_main_process():
            drop_metrics_from(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), self.start_iter)

    def train(self):
        train_loop_logger = logging.getLogger("detectron2.engine.train_loop")
        if _ONE_LINE_USER_ERRORS not in train_loop_logger.filters:
            train_loop_logger.addFilter(_ONE_LINE_USER_ERRORS)
        try:
            results = super().train()
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
        if comm.is_main_process():
            final = os.path.join(self.cfg.OUTPUT_DIR, FINAL_CHECKPOINT)
            verify_checkpoint(final, self.max_iter - 1)
            logger.info(f"Training finished: {final} (iteration {self.max_iter - 1}) read back whole")
        return results

    @classmethod
    def evaluate_weights(cls, cfg, resume=False):
        """--eval-only: load MODEL.WEIGHTS (or the last checkpoint with resume) and evaluate DATASETS.TEST; weights
        that leave part of the model at random init are refused (they would evaluate to an AP near 0)."""
        model = cls.build_model(cfg)
        checkpointer = SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR, trust_pickle=cfg.CITYSEG.TRUST_PICKLE_WEIGHTS)
        try:
            checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
        except UserError:
            raise
        except UNREADABLE as e:
            raise weights_error(cfg.MODEL.WEIGHTS, e) from e
        refusal = eval_only_fit_error(cfg.MODEL.WEIGHTS, checkpointer.fit)
        if refusal:
            raise refusal
        return cls.test(cfg, model)
