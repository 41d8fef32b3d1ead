#!/usr/bin/env python
"""Does early stopping pay? One learning-rate grid swept twice, every trial to the end (FIFO) and with a scheduler:
Ray's ASHA (--scheduler asha, the default) or synchronous successive halving (--scheduler sha).

The study is one where ranking is possible: 12 learning rates by default, an evaluation (a Tune report) every
--eval-period iterations, the first rung (--grace) after the warm-up (SOLVER.WARMUP_ITERS) and the later rungs at
grace x reduction_factor^k below --max-iter. SEED is fixed, so a learning rate is the same trial in both arms: a
trial the scheduler runs to the end reproduces the grid's (the tool prints how closely). Both arms take the learning
rates in one seeded random order (--order-seed), as a random search would: Ray's ASHA lets the first trial at each
rung go on unranked, and in ascending order those would be the smallest learning rates; sha pauses every trial at a
rung until all have reached it and ranks them all. Trials reuse Ray actors in both arms (reuse_actors), so a trial
starts without a new process.

Prints per arm the trials stopped early, the iterations trained, the CPU-seconds used (every process of the Ray
session, read from /proc: Linux only), the wall clock and the best trial (each arm's figures also go to
benchmark.json in its experiment folder); then the scheduler's share of the grid's CPU-seconds and iterations and the
gap between the two arms' best, with the load average. Not a test: the figures depend on the machine and its load.
Then it replays the scheduler (Ray's own class, as the sweep builds it) on the grid arm's reports in 1000 random
orders: one measured arm is one order, and how much ASHA saves depends on which trials come first.
`--replay GRID_EXPERIMENT` does only that, for other --scheduler / --grace / --reduction-factor values, in seconds and
without training; `--grid-from GRID_EXPERIMENT` trains only the scheduler's arm and compares it with a grid arm
trained before. The study of README (synthetic data set at 128 px; warm-up 20, so the first rung is 40 iterations
past it):

  python tools/benchmark_tune.py --cpus-per-trial 1 INPUT.MIN_SIZE_TRAIN "(128,)" INPUT.MAX_SIZE_TRAIN 256 \\
      INPUT.MIN_SIZE_TEST 128 INPUT.MAX_SIZE_TEST 256 SOLVER.WARMUP_ITERS 20 SOLVER.STEPS "(800,)" \\
      DATASETS.CITYSCAPES.TEST_MAX_IMAGES 20 DATALOADER.NUM_WORKERS 0
"""

import argparse
import glob
import heapq
import json
import os
import random
import statistics
import threading
import time
from types import SimpleNamespace

import cityseg_d2  # noqa: F401  (before detectron2: silences the warnings its import prints)
import ray

from cityseg_d2.engine import prepare_config
from cityseg_d2.errors import ConfigError, run_cli
from cityseg_d2.tune import (
    build_scheduler,
    connect_ray,
    experiment_path,
    format_table,
    new_experiment,
    parse_sweep,
    resolve_resources,
    start_sweep,
    trial_rows,
    validate_sweep,
    write_summary,
)

FIGURES_FILE = "benchmark.json"
QUICKSTART = "configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml"
SCHEDULER_NAMES = {"asha": "Ray's ASHA", "sha": "Synchronous successive halving (sha)"}
LRS = [0.0025, 0.0032, 0.0041, 0.0053, 0.0069, 0.0088, 0.0113, 0.0146, 0.0188, 0.0242, 0.0311, 0.04]  # x1.29


class ProcessTreeCPU:
    """CPU-seconds (user + system) used by this process and its descendants (Ray's raylet and workers) while it runs.

    A process's own times are read from /proc/<pid>/stat every `interval` seconds and the last reading of each process
    counts, also of those that have exited since (a Ray worker's times reach no parent that waits for it): at most
    `interval` of a short-lived process is missed.
    """

    def __init__(self, interval=0.5):
        self._interval = interval
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._last = {}  # (pid, start time) -> CPU-seconds at the last reading
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._baseline = self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._last.update(self._read())

    @property
    def seconds(self):
        return sum(seconds - self._baseline.get(key, 0.0) for key, seconds in self._last.items())

    def _poll(self):
        while not self._stop.wait(self._interval):
            self._last.update(self._read())

    def _read(self):
        """{(pid, start time): CPU-seconds} of this process and its descendants now."""
        stats = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:  # exited meanwhile
                    continue
                # After the command: state, ppid, ... utime (12th), stime (13th), ... starttime (20th).
                stats[int(name)] = (int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / self._ticks)
        children = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        seconds, todo = {}, [os.getpid()]
        while todo:
            pid = todo.pop()
            if pid in stats:
                _, start, used = stats[pid]
                seconds[pid, start] = used
                todo += children.get(pid, [])
        return seconds


def grid_curves(experiment_dir, metric):
    """{learning rate: [(iteration, metric), ...]} of every trial of a finished grid experiment, from Tune's files."""
    from ray.tune import ExperimentAnalysis

    if not glob.glob(os.path.join(experiment_dir, "experiment_state-*.json")):
        raise ConfigError(f"{experiment_dir} is no Tune experiment folder (it has no experiment_state-*.json)")
    analysis = ExperimentAnalysis(os.path.abspath(experiment_dir))
    configs = analysis.get_all_configs()
    curves = {}
    for trial, frame in analysis.trial_dataframes.items():
        reports = frame.dropna(subset=[metric])
        curves[configs[trial]["SOLVER.BASE_LR"]] = list(zip(reports["iteration"], reports[metric]))
    if not curves:
        raise ConfigError(f"{experiment_dir}: no trial reported {metric}")
    return curves


class _ReplayTrial:
    """What a scheduler reads of a Tune trial: its id, status and last result (hashable, as Ray's Trial is)."""

    def __init__(self, lr):
        self.trial_id, self.lr, self.status, self.is_saving, self.last_result = str(lr), lr, "PENDING", False, {}
        self.next_report = 0


class _ReplayController:
    """The part of Tune's controller a scheduler calls: the trials in the order they were added, and stop_trial
    (which tells the scheduler as Tune's does: on_trial_remove for a waiting trial, on_trial_complete for a running
    one)."""

    def __init__(self, scheduler, trials):
        self.scheduler, self.trials = scheduler, trials

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        if trial.status in ("PENDING", "PAUSED"):
            self.scheduler.on_trial_remove(self, trial)
        elif trial.status == "RUNNING":
            self.scheduler.on_trial_complete(self, trial, trial.last_result)
        trial.status = "TERMINATED"


def replay(curves, new_scheduler, metric, mode, slots, order, rng):
    """Feeds the grid's recorded reports to a fresh scheduler (Ray's own, as the sweep builds it) the way Tune would,
    trials added in `order`, `slots` running at a time at equal speed, a paused trial going on from its last report
    when the scheduler picks it; returns (iterations trained, best value seen). With SEED fixed a trial reports the
    same values under a scheduler as in the grid, so this is what the scheduler would train in that order. Which of
    two trials that report at the same iteration comes first (and so may pass an ASHA rung unranked) is decided by a
    draw per trial: in a real sweep it is whichever trial runs a little faster."""
    from ray.tune.schedulers import TrialScheduler

    scheduler = new_scheduler()
    scheduler.set_search_properties(metric, mode)
    trials = [_ReplayTrial(lr) for lr in order]
    controller = _ReplayController(scheduler, trials)
    for trial in trials:
        scheduler.on_trial_add(controller, trial)
    arrival = {trial: rng.random() for trial in trials}
    events, trained, seen = [], 0, []

    def report_after(now, trial, iterations):
        heapq.heappush(events, (now + iterations, arrival[trial], order.index(trial.lr), trial))

    def start_trials(now):
        while sum(trial.status == "RUNNING" for trial in trials) < slots:
            trial = scheduler.choose_trial_to_run(controller)
            if trial is None:
                return
            trial.status = "RUNNING"
            reports, k = curves[trial.lr], trial.next_report
            report_after(now, trial, reports[k][0] - (reports[k - 1][0] if k else 0))

    start_trials(0)
    while events:
        now, _, _, trial = heapq.heappop(events)
        reports, k = curves[trial.lr], trial.next_report
        iteration, value = reports[k]
        trained += iteration - (reports[k - 1][0] if k else 0)
        seen.append(value)
        trial.last_result, trial.next_report = {"iteration": iteration, metric: value}, k + 1
        if k + 1 == len(reports):  # done: Tune stops the trial without asking the scheduler
            decision = TrialScheduler.STOP
        else:
            decision = scheduler.on_trial_result(controller, trial, trial.last_result)
        if decision == TrialScheduler.STOP:
            controller.stop_trial(trial)
        elif decision == TrialScheduler.PAUSE:
            trial.status = "PAUSED"
        else:
            report_after(now, trial, reports[k + 1][0] - iteration)
        start_trials(now)
    return trained, (max if mode == "max" else min)(seen)


def replay_orders(args, curves, scheduler_sweep, cfg, slots, orders=1000):
    """What share of the grid's iterations the scheduler trains and whether it sees the grid's best (within
    --tolerance), over `orders` random orders of the trials: how typical one measured arm is."""
    grid_iterations = sum(reports[-1][0] for reports in curves.values())
    sign = 1 if args.mode == "max" else -1
    grid_best = sign * max(sign * value for reports in curves.values() for _, value in reports)
    rng = random.Random(args.order_seed)
    outcomes = []
    for _ in range(orders):
        order = rng.sample(sorted(curves), len(curves))
        trained, best = replay(
            curves, lambda: build_scheduler(scheduler_sweep, cfg), args.metric, args.mode, slots, order, rng
        )
        outcomes.append((trained / grid_iterations, sign * (grid_best - best) <= args.tolerance))
    shares = sorted(share for share, _ in outcomes)
    found = sum(ok for _, ok in outcomes) / orders
    both = sum(ok and share <= 0.4 for share, ok in outcomes) / orders
    print(
        f"{SCHEDULER_NAMES[args.scheduler]} replayed on the grid's reports in {orders} random orders ({slots} trials "
        f"at a time): it trains "
        f"a median {statistics.median(shares):.0%} of the grid's iterations (10%-90%: {shares[orders // 10]:.0%}-"
        f"{shares[orders * 9 // 10]:.0%}), sees the grid's best within {args.tolerance:g} in {found:.0%} of the "
        "orders, "
        f"and both that and <= 40% of the iterations in {both:.0%}"
    )


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=QUICKSTART)
    parser.add_argument("--lrs", type=float, nargs="+", default=LRS, help="the SOLVER.BASE_LR grid")
    parser.add_argument(
        "--scheduler", choices=sorted(SCHEDULER_NAMES), default="asha", help="the scheduler of the arm against the grid"
    )
    parser.add_argument("--max-iter", type=int, default=960, help="SOLVER.MAX_ITER, the scheduler's max_t")
    parser.add_argument("--eval-period", type=int, default=60, help="TEST.EVAL_PERIOD: a report each")
    parser.add_argument("--grace", type=int, default=60, help="the first rung (iterations), after the warm-up")
    parser.add_argument("--reduction-factor", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="SEED of every trial, so both arms train the same trials")
    parser.add_argument("--order-seed", type=int, default=0, help="the seed of the learning rates' order (both arms)")
    parser.add_argument("--metric", default="segm/AP")
    parser.add_argument("--mode", default="max")
    parser.add_argument("--cpus-per-trial", type=float, default=None)
    parser.add_argument("--gpus-per-trial", type=float, default=None)
    parser.add_argument("--address", default=None)
    parser.add_argument("--storage", default="output/benchmark_tune")
    parser.add_argument("--tolerance", type=float, default=0.5, help="how far below the grid's best counts as found")
    parser.add_argument(
        "--replay",
        metavar="GRID_EXPERIMENT",
        help="train nothing: replay --scheduler (--grace, --reduction-factor, --max-iter) on a finished grid arm's "
        "reports",
    )
    parser.add_argument(
        "--grid-from",
        metavar="GRID_EXPERIMENT",
        help="do not train the grid again: compare with this finished grid arm of the same study (its CPU-seconds and "
        "wall clock from the benchmark.json this tool writes; iterations and best from Tune's files)",
    )
    parser.add_argument(
        "--replay-slots",
        type=int,
        help="trials at a time in the replay (default: this machine's cores / --cpus-per-trial)",
    )
    parser.add_argument("opts", nargs="*", default=[], metavar="KEY VALUE", help="overrides of the base config")
    return parser


def check_study(args, cfg):
    """One line for a study where the scheduler cannot rank trials: a rung inside the warm-up, or between reports."""
    if args.grace <= cfg.SOLVER.WARMUP_ITERS:
        raise ConfigError(
            f"--grace {args.grace} is within the warm-up (SOLVER.WARMUP_ITERS {cfg.SOLVER.WARMUP_ITERS}): the "
            "scheduler would rank trials before they train at their learning rate; raise --grace or lower the warm-up"
        )
    if args.grace % args.eval_period:
        raise ConfigError(f"--grace {args.grace} must be a multiple of --eval-period {args.eval_period} (the reports)")


def sweep_of(args, name, scheduler):
    return parse_sweep(
        {
            "name": name,
            "metric": args.metric,
            "mode": args.mode,
            "scheduler": scheduler,
            "space": {"SOLVER.BASE_LR": {"grid": args.lrs}},
        },
        source=f"<{name}>",
    )


def run(args, sweep, cfg):
    sweep = resolve_resources(sweep, cfg, ray.cluster_resources(), args.cpus_per_trial, args.gpus_per_trial)
    experiment_dir = new_experiment(args.storage, sweep.name)
    start = time.perf_counter()
    with ProcessTreeCPU() as cpu:
        results = start_sweep(sweep, cfg, experiment_dir)
    wall = time.perf_counter() - start
    rows = trial_rows(results, sweep, cfg)
    write_summary(rows, experiment_dir)
    best = rows[0]
    trial_seconds = sum(result.metrics.get("time_total_s", 0) for result in results if result.metrics)
    figures = {
        "trials": len(rows),
        "stopped early": sum(r["status"] == "stopped early" for r in rows),
        "iterations trained": sum(r["iterations"] for r in rows),
        "CPU-seconds": cpu.seconds,
        "trial-seconds (Tune's time_total_s)": trial_seconds,
        "GPU-seconds (allocated to trials)": trial_seconds * sweep.gpus_per_trial,
        "wall clock (s)": wall,
        f"best {sweep.metric}": best[sweep.metric],
        "best SOLVER.BASE_LR": best["SOLVER.BASE_LR"],
    }
    with open(os.path.join(experiment_dir, FIGURES_FILE), "w") as f:
        json.dump(figures, f, indent=1)
    return figures, {row["SOLVER.BASE_LR"]: row for row in rows}


def finished_grid(experiment_dir, metric, mode, max_iter):
    """The figures and {learning rate: row} of a grid arm a run of this tool trained before (--grid-from)."""
    curves = check_grid(experiment_dir, metric, max_iter)
    pick = max if mode == "max" else min
    best_of = {lr: pick(value for _, value in reports) for lr, reports in curves.items()}
    figures_file = os.path.join(experiment_dir, FIGURES_FILE)
    if os.path.isfile(figures_file):
        with open(figures_file) as f:
            figures = json.load(f)
    else:
        best = pick(best_of, key=best_of.get)
        figures = {
            "trials": len(curves),
            "stopped early": 0,
            "iterations trained": sum(reports[-1][0] for reports in curves.values()),
            f"best {metric}": best_of[best],
            "best SOLVER.BASE_LR": best,
        }
    return figures, {lr: {metric: value} for lr, value in best_of.items()}


def check_grid(experiment_dir, metric, max_iter):
    """A finished grid arm's curves, refused in one line if its trials did not train --max-iter iterations."""
    curves = grid_curves(experiment_dir, metric)
    trained = {reports[-1][0] for reports in curves.values()}
    if trained != {max_iter}:
        raise ConfigError(
            f"{experiment_dir}: its trials trained {'/'.join(map(str, sorted(trained)))} iterations, not --max-iter "
            f"{max_iter}: pass the grid's --max-iter"
        )
    return curves


def main(args):
    finished = args.replay or args.grid_from
    if finished:  # the grid's study: its learning rates
        args.lrs = sorted(check_grid(finished, args.metric, args.max_iter))
    args.lrs = random.Random(args.order_seed).sample(args.lrs, len(args.lrs))
    opts = ["SOLVER.MAX_ITER", str(args.max_iter), "TEST.EVAL_PERIOD", str(args.eval_period), "SEED", str(args.seed)]
    cfg = prepare_config(args.config_file, [*opts, *args.opts])
    check_study(args, cfg)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    grid = sweep_of(args, f"grid_{stamp}", {"type": "fifo"})
    arm = args.scheduler.upper()
    scheduled = sweep_of(
        args,
        f"{args.scheduler}_{stamp}",
        {"type": args.scheduler, "grace_period": args.grace, "reduction_factor": args.reduction_factor},
    )
    for sweep in (grid, scheduled):
        validate_sweep(sweep, cfg)
    slots = args.replay_slots or max(1, int(os.cpu_count() // (args.cpus_per_trial or 1)))
    if args.replay:
        replay_orders(args, grid_curves(args.replay, args.metric), scheduled, cfg, slots)
        return
    if args.grid_from:
        grid_dir = args.grid_from
        grid_figures, grid_rows = finished_grid(grid_dir, args.metric, args.mode, args.max_iter)
    connect_ray(args.address)
    load = os.getloadavg()
    if not args.grid_from:
        grid_dir = experiment_path(args.storage, grid.name)
        grid_figures, grid_rows = run(args, grid, cfg)
    figures, rows = run(args, scheduled, cfg)

    print(f"\nLearning rates in the order tried: {' '.join(f'{lr:g}' for lr in args.lrs)}")
    print(f"{len(args.lrs)} learning rates, {args.max_iter} iterations, evaluation every {args.eval_period}, "
          f"{arm} grace {args.grace}, reduction factor {args.reduction_factor}, SEED {args.seed}; {args.config_file} "
          f"{' '.join(args.opts)}")  # fmt: skip
    arms = {"full grid": grid_figures, arm: figures}
    print(format_table([{"": key, **{name: arms[name].get(key) for name in arms}} for key in figures]))
    metric = f"best {args.metric}"
    gap = (grid_figures[metric] - figures[metric]) * (1 if args.mode == "max" else -1)
    iterations = figures["iterations trained"] / grid_figures["iterations trained"]
    if "CPU-seconds" in grid_figures:
        cpu = f"{figures['CPU-seconds'] / grid_figures['CPU-seconds']:.0%} of the grid's CPU-seconds and "
    else:
        cpu = f"(the CPU-seconds of the grid in {grid_dir} were not recorded) "
    side = "below" if gap >= 0 else "above"
    print(f"{arm} used {cpu}{iterations:.0%} of its iterations; its best is {abs(gap):.2f} {args.metric} {side} "
          "the grid's")  # fmt: skip
    # The same SEED and values: where the scheduler ran a trial to the end, it should have reached the grid's value.
    finished = [(lr, row) for lr, row in rows.items() if row["status"] == "finished" and row[args.metric] is not None]
    differences = [abs(row[args.metric] - grid_rows[lr][args.metric]) for lr, row in finished]
    if differences:
        agreement = f"{max(differences):.3g} {args.metric}"
        print(f"The {len(finished)} trials {arm} ran to the end match the grid's same trials within {agreement}")
    replay_orders(args, check_grid(grid_dir, args.metric, args.max_iter), scheduled, cfg, slots)
    print(f"Experiments: {os.path.abspath(grid_dir)}, {os.path.abspath(experiment_path(args.storage, scheduled.name))}")
    print(f"Load average (1, 5, 15 min) at the start: {', '.join(f'{x:.2f}' for x in load)}; at the end: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip


if __name__ == "__main__":
    run_cli(main, build_parser().parse_intermixed_args())
