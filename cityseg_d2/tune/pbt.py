"""Population-based training: Ray's PopulationBasedTraining over the optimizer, the LR schedule and the loss weights.

At each perturbation point (a report, so a multiple of TEST.EVAL_PERIOD) the trials in the bottom quantile restart
from the checkpoint of a trial in the top quantile with that trial's values perturbed. A trial builds its Trainer from
its current config, so the new loss weights (in the model), gradient clipping (in the optimizer's class) and LR
schedule shape (warm-up, steps, gamma) are there already; what the detectron2 checkpoint brings back over them is the
optimizer's param groups (lr, momentum, weight decay, nesterov) and the LR scheduler's base LRs.
`config_hyperparameters` puts the config's values back after the restore, so they apply from the next iteration on,
in log.txt, metrics.json and W&B alike.
"""

import contextlib
import functools
import logging
import math

from ray.train._internal.session import _FutureTrainingResult
from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining

logger = logging.getLogger(__name__)

# What PBT may perturb: keys that a trial's Trainer takes from its config without changing the model's weights or
# the optimizer's param groups (detectron2's build_optimizer groups parameters by which of these overrides they get,
# so BIAS_LR_FACTOR and WEIGHT_DECAY_BIAS, whose values decide the grouping, are left out). Anything else (anchor
# sizes, head sizes, batch size, input sizes) needs a new model or data pipeline: search it with ASHA or FIFO.
PBT_KEYS = (
    "SOLVER.BASE_LR",
    "SOLVER.MOMENTUM",
    "SOLVER.NESTEROV",
    "SOLVER.WEIGHT_DECAY",
    "SOLVER.WEIGHT_DECAY_NORM",
    "SOLVER.GAMMA",
    "SOLVER.WARMUP_FACTOR",
    "SOLVER.WARMUP_ITERS",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
    "MODEL.RPN.LOSS_WEIGHT",
    "MODEL.RPN.BBOX_REG_LOSS_WEIGHT",
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT",
)
# The sweep file's scheduler entries for PBT, with Ray's defaults.
PBT_DEFAULTS = {
    "perturbation_interval": 0,  # 0 = TEST.EVAL_PERIOD
    "burn_in_period": 0,
    "quantile_fraction": 0.25,
    "resample_probability": 0.25,
    "perturbation_factors": [1.2, 0.8],
    "synch": False,
}


def pbt_option(sweep, name):
    return sweep.scheduler.get(name, PBT_DEFAULTS[name])


def perturbation_interval(sweep, cfg):
    """PBT's perturbation interval in detectron2 iterations: the sweep's, else TEST.EVAL_PERIOD (every report)."""
    return int(pbt_option(sweep, "perturbation_interval") or cfg.TEST.EVAL_PERIOD)


def checkpoints_to_keep(sweep, cfg):
    """Per trial: those of one perturbation interval, plus one, so that the checkpoint a weaker trial is told to
    exploit is still there when it restarts (Ray warns below 3)."""
    return max(3, perturbation_interval(sweep, cfg) // cfg.TEST.EVAL_PERIOD + 1)


def _mutation(spec):
    """How PBT perturbs a key: values in bounds are multiplied by a perturbation factor (or resampled), candidates
    shift to a neighbour."""
    if spec.kind in ("loguniform", "uniform"):
        return spec.domain()
    return list(spec.domain().categories if spec.kind == "choice" else spec.domain()["grid_search"])


def _clip_to_bounds(bounds, config):
    """PBT multiplies values by its perturbation factors without limit: keep them inside the sweep's bounds."""
    for key, (lower, upper) in bounds.items():
        config[key] = min(max(config[key], lower), upper)
    return config


class _SingleSavePopulationBasedTraining(PopulationBasedTraining):
    """Ray's PBT, except that a top trial whose report is still being saved (it reported a moment ago and is being
    paused) hands that save to the trials that exploit it, as Ray does for a paused one, instead of being saved a
    second time. That second save at the same iteration left Ray 2.60 with a stale checkpoint index when the trial
    resumed, so its next save overwrote the checkpoint its exploiter was about to restore (seen in CI with synch
    PBT, two trials reporting together: the exploiter restored the donor's final iteration, or a half-written file)."""

    def _checkpoint_or_exploit(self, trial, tune_controller, upper_quantile, lower_quantile):
        saving = trial.temporary_state.saving_to
        if trial in upper_quantile and trial.status == Trial.RUNNING and isinstance(saving, _FutureTrainingResult):
            self._trial_state[trial].last_checkpoint = saving
            self._num_checkpoints += 1
            return
        super()._checkpoint_or_exploit(trial, tune_controller, upper_quantile, lower_quantile)


def build_pbt(sweep, cfg):
    """Ray's PopulationBasedTraining for a validated PBT sweep, its time the detectron2 iteration of each report."""
    bounds = {key: spec.values for key, spec in sweep.space.items() if spec.kind in ("loguniform", "uniform")}
    return _SingleSavePopulationBasedTraining(
        time_attr="iteration",
        perturbation_interval=perturbation_interval(sweep, cfg),
        burn_in_period=pbt_option(sweep, "burn_in_period"),
        hyperparam_mutations={key: _mutation(spec) for key, spec in sweep.space.items()},
        quantile_fraction=pbt_option(sweep, "quantile_fraction"),
        resample_probability=pbt_option(sweep, "resample_probability"),
        perturbation_factors=tuple(pbt_option(sweep, "perturbation_factors")),
        custom_explore_fn=functools.partial(_clip_to_bounds, bounds) if bounds else None,
        synch=pbt_option(sweep, "synch"),
    )


def _group_values(group):
    return {key: value for key, value in group.items() if key not in ("params", "param_names")}


@contextlib.contextmanager
def config_hyperparameters(trainer):
    """Around trainer.resume_or_load: the optimizer's param groups and the LR scheduler keep the values of the
    trainer's config, not those of the checkpoint (another trial's, after a PBT exploit). The restored iteration,
    momentum buffers and model weights are the checkpoint's; the LR of the next iteration is the config's base LR
    at the restored point of the config's schedule (warm-up included)."""
    optimizer, scheduler = trainer.optimizer, trainer.scheduler
    configured = [_group_values(group) for group in optimizer.param_groups]
    yield
    restored = [_group_values(group) for group in optimizer.param_groups]
    for group, values in zip(optimizer.param_groups, configured):
        group.update(values)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    lrs = scheduler.get_lr()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() returns, as after a scheduler step
    changes = _changes(restored, [_group_values(group) for group in optimizer.param_groups])
    if changes:
        start = trainer.start_iter
        logger.info(f"Hyperparameters of the trial's config replace the checkpoint's from iteration {start}: {changes}")


def _changes(before, after):
    """'lr 0.02 -> 0.024, momentum 0.9 -> 0.92' over every param group, each change once (initial_lr is lr's base)."""
    changes = {}
    for old_group, new_group in zip(before, after):
        for key, new in new_group.items():
            old = old_group.get(key)
            numbers = isinstance(old, float) and isinstance(new, float)
            if key == "initial_lr" or old == new or (numbers and math.isclose(old, new)):
                continue
            changes[key, old, new] = f"{key} {old:.6g} -> {new:.6g}" if numbers else f"{key} {old} -> {new}"
    return ", ".join(changes.values())
