"""tools/benchmark_tune.py's parts that decide what it reports: a study where ASHA cannot rank trials is refused, the
CPU-seconds count every process of the session, also those that exited before the count ends, and the replay feeds
recorded reports to Ray's ASHA and to sha as Tune would. A run of the benchmark itself takes minutes even at toy size
(two arms of at least 8 trials), so none runs here."""
import random
import runpy
import subprocess
import sys
import time

import pytest

benchmark_tune = runpy.run_path("tools/benchmark_tune.py")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--grace", "40", "--eval-period", "40"], "error: --grace 40 is within the warm-up (SOLVER.WARMUP_ITERS 50)"),
        (["--grace", "100", "--eval-period", "30"], "error: --grace 100 must be a multiple of --eval-period 30"),
        (["--replay", "no/such/grid"], "error: no/such/grid is no Tune experiment folder"),
    ],
)
def test_a_study_asha_cannot_rank_is_refused_before_ray_starts(run_tool, args, message):
    run = run_tool("benchmark_tune.py", *args)
    assert run.code == 2 and len(run.error_lines()) == 1 and run.error_lines()[0].startswith(message), run.err


def test_cpu_seconds_count_children_that_exited_before_the_end():
    burn = "import time\nend = time.process_time() + 1.0\nwhile time.process_time() < end: pass"
    with benchmark_tune["ProcessTreeCPU"](interval=0.1) as cpu:
        subprocess.run([sys.executable, "-c", burn], check=True)
        time.sleep(0.3)  # exited: only the readings taken while it ran remain
    assert 0.8 <= cpu.seconds


def test_replay_feeds_the_grid_reports_to_rays_asha_as_tune_would():
    """Three trials one at a time, ASHA (Ray's, grace 2, reduction factor 2, max_t 4): the first passes the rung at 2
    unranked and trains to 4; the second is below the median of what the rung has seen (1.0) and stops at 2, although
    it would have been the grid's best; the third passes (3.0 >= 0.75) and trains to 4."""
    from ray.tune.schedulers import ASHAScheduler

    curves = {0.1: [(2, 1.0), (4, 2.0)], 0.2: [(2, 0.5), (4, 5.0)], 0.3: [(2, 3.0), (4, 3.5)]}
    scheduler = lambda: ASHAScheduler(time_attr="iteration", max_t=4, grace_period=2, reduction_factor=2)  # noqa: E731
    replay = benchmark_tune["replay"]
    assert replay(curves, scheduler, "AP", "max", 1, [0.1, 0.2, 0.3], random.Random(0)) == (4 + 2 + 4, 3.5)
    # Two at once: the first two report at 2 together, and the one drawn to arrive first passes unranked. If that is
    # the second (0.5), the first (1.0) passes too, and the third (3.0 >= 0.75): every trial trains to 4.
    outcomes = {replay(curves, scheduler, "AP", "max", 2, [0.1, 0.2, 0.3], random.Random(seed)) for seed in range(20)}
    assert outcomes == {(4 + 2 + 4, 3.5), (4 + 4 + 4, 5.0)}


def test_replay_pauses_and_resumes_trials_for_synchronous_halving_in_any_order():
    """The same trials under sha (grace 2, reduction factor 2, max_t 4): all three train to 2 and are ranked there
    together, whatever the order; the best two (1.0, 3.0) go on to 4, 0.5 stops. ASHA above trained all three to 4 in
    some orders."""
    from cityseg_d2.tune.halving import SynchronousHalvingScheduler

    curves = {0.1: [(2, 1.0), (4, 2.0)], 0.2: [(2, 0.5), (4, 5.0)], 0.3: [(2, 3.0), (4, 3.5)]}
    scheduler = lambda: SynchronousHalvingScheduler(3, grace_period=2, reduction_factor=2, max_t=4)  # noqa: E731
    replay = benchmark_tune["replay"]
    orders = [random.Random(seed).sample(sorted(curves), 3) for seed in range(10)]
    outcomes = {
        replay(curves, scheduler, "AP", "max", slots, order, random.Random(seed))
        for slots in (1, 2, 3)
        for seed, order in enumerate(orders)
    }
    assert outcomes == {(2 + 2 + 2 + 2 + 2, 3.5)}


def test_sha_decides_a_rung_when_the_trial_it_waits_for_fails_after_the_first_halving():
    """Three trials, rungs at 2 and 4: at 2, 0.5 is dropped; 1.0 reaches 4 and waits there for 3.0, which then fails
    for good. The rung is decided without it and 1.0 goes on (Ray's bracket alone would leave it paused)."""
    from cityseg_d2.tune.halving import SynchronousHalvingScheduler

    scheduler = SynchronousHalvingScheduler(3, grace_period=2, reduction_factor=2, max_t=8)
    scheduler.set_search_properties("AP", "max")
    trials = [benchmark_tune["_ReplayTrial"](value) for value in (1.0, 0.5, 3.0)]
    controller = benchmark_tune["_ReplayController"](scheduler, trials)
    for trial in trials:
        scheduler.on_trial_add(controller, trial)
        trial.status = "RUNNING"

    def report(trial, iteration, value):
        decision = scheduler.on_trial_result(controller, trial, {"iteration": iteration, "AP": value})
        trial.status = {"PAUSE": "PAUSED", "STOP": "TERMINATED"}.get(decision, trial.status)
        return decision

    assert [report(t, 2, t.lr) for t in trials] == ["PAUSE", "PAUSE", "CONTINUE"]
    assert trials[1].status == "TERMINATED" and scheduler.choose_trial_to_run(controller) is trials[0]
    trials[0].status = "RUNNING"
    assert report(trials[0], 4, 2.0) == "PAUSE"
    trials[2].status = "ERROR"
    scheduler.on_trial_error(controller, trials[2])
    assert scheduler.choose_trial_to_run(controller) is trials[0]
