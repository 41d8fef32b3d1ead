"""Synchronous successive halving (`scheduler: type: sha`): every trial trains to a rung, then the best
1/reduction_factor of them go on to the next.

Ray's ASHA decides at a rung with the trials that have reached it so far, so the first ones to get there go on
unranked; with few trials, a few at a time, those unranked trials are most of what ASHA trains (README, "Does ASHA
pay?"). Here a trial that reaches a rung is paused (checkpointed, its resources freed for the next trial) until
every trial of the sweep has reached it or ended; then the best go on from their checkpoints and the rest stop.

It is Ray's HyperBandScheduler with a single bracket: the whole sweep, from grace_period to max_t (Ray's own
HyperBand spreads a sweep over brackets whose first one runs its trials to max_t without halving). Added to Ray's
bracket: no rung is decided before every trial of the sweep has been created (the search algorithm may create them
as slots free up), and a trial that ends for good lets the rung go on without it at any rung, not only the first.
max_concurrent_trials is refused with sha (sweep.py): Ray keeps it in the search algorithm, which counts paused
trials as running, so the sweep would wait for ever once every slot holds a paused trial; the trials' resources bound
how many run at once. Ray saves no scheduler state: after --resume the halving starts afresh among the trials that
had not ended (on_trial_add skips those that had).
"""

from ray.tune.experiment import Trial
from ray.tune.schedulers import HyperBandScheduler, TrialScheduler
from ray.tune.schedulers.hyperband import _Bracket

from ..errors import ConfigError


def halving_rungs(grace_period, reduction_factor, max_t):
    """The iterations at which the trials are ranked: grace_period x reduction_factor^k below max_t."""
    rungs, rung = [], grace_period
    while rung < max_t:
        rungs.append(rung)
        rung *= reduction_factor
    return rungs


class SynchronousHalvingScheduler(HyperBandScheduler):
    """Successive halving over the sweep's `num_trials` trials (all in one bracket) at halving_rungs, time in
    `time_attr` units (detectron2 iterations, as the trials report them)."""

    def __init__(self, num_trials, grace_period, reduction_factor, max_t, time_attr="iteration", **kwargs):
        super().__init__(time_attr=time_attr, max_t=max_t, reduction_factor=reduction_factor, **kwargs)
        self._num_trials, self._added, self._deciding = num_trials, 0, False
        self._bracket = _Bracket(
            time_attr=time_attr,
            max_trials=num_trials,
            init_t_attr=grace_period,
            max_t_attr=max_t,
            eta=reduction_factor,
            s=len(halving_rungs(grace_period, reduction_factor, max_t)),
        )
        self._hyperbands = [[self._bracket]]

    def on_trial_add(self, tune_controller, trial):
        if self._added == self._num_trials:
            raise ConfigError(
                f"scheduler sha: more than the sweep's {self._num_trials} trials were started; it ranks them all at "
                "each rung and must know how many there are"
            )
        self._added += 1
        if trial.status != Trial.TERMINATED:  # a resumed sweep's finished or stopped trial is no longer ranked
            self._bracket.add_trial(trial)
            self._trial_info[trial] = self._bracket, 0

    def _all_trials_created(self):
        return self._added == self._num_trials

    def on_trial_result(self, tune_controller, trial, result):
        if self._all_trials_created():
            return super().on_trial_result(tune_controller, trial, result)
        self._bracket.update_trial_stats(trial, result)  # trials still to come: wait for them at the rung
        return TrialScheduler.CONTINUE if self._bracket.continue_trial(trial) else TrialScheduler.PAUSE

    def on_trial_remove(self, tune_controller, trial):
        """A trial that ended (an error for good, say) may be the last one the rung waits for: decide the rung then.
        Ray's bracket only does so before its first halving (is_being_processed is never reset), so a trial failing
        after it would leave the others paused for ever."""
        self._bracket.cleanup_trial(trial)
        if self._all_trials_created() and not self._bracket.finished() and not self._deciding:
            self._process_bracket(tune_controller, self._bracket)

    def _process_bracket(self, tune_controller, bracket):
        self._deciding = True  # stopping the trials a rung drops calls on_trial_remove
        try:
            return super()._process_bracket(tune_controller, bracket)
        finally:
            self._deciding = False
