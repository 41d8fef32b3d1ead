#!/usr/bin/env python
"""Does ASHA pay? One learning-rate grid swept twice, every trial to the end (FIFO) and with ASHA.

The study is one where ranking is possible: 12 learning rates by default, an evaluation (a Tune report) every
--eval-period iterations, ASHA's first rung (--grace) after the warm-up (SOLVER.WARMUP_ITERS) and its later rungs at
grace x reduction_factor^k below --max-iter. SEED is fixed, so a learning rate is the same trial in both arms: a
trial ASHA runs to the end reproduces the grid's (the tool prints how closely). Both arms take the learning rates in
one seeded random order (--order-seed), as a random search would: Ray's ASHA lets the first trial at each rung go on
unranked, and in ascending order those would be the smallest learning rates. Trials reuse Ray actors in both arms
(reuse_actors), so a trial starts without a new process.

Prints per arm the trials stopped early, the iterations trained, the CPU-seconds used (every process of the Ray
session, read from /proc: Linux only), the wall clock and the best trial; then ASHA's share of the grid's
CPU-seconds and the gap between the two arms' best, with the load average. Not a test: the figures depend on the
machine and its load. Then it replays Ray's ASHA on the grid arm's reports in 1000 random orders: one ASHA arm is one
order, and how much ASHA saves depends on which trials come first. `--replay GRID_EXPERIMENT` does only that, for
other --grace / --reduction-factor values, in seconds and without training. The study of README (synthetic data set
at 128 px; warm-up 20, so the first rung is 40 iterations past it):

  python tools/benchmark_tune.py --cpus-per-trial 1 INPUT.MIN_SIZE_TRAIN "(128,)" INPUT.MAX_SIZE_TRAIN 256 \\
      INPUT.MIN_SIZE_TEST 128 INPUT.MAX_SIZE_TEST 256 SOLVER.WARMUP_ITERS 20 SOLVER.STEPS "(800,)" \\
      DATASETS.CITYSCAPES.TEST_MAX_IMAGES 20 DATALOADER.NUM_WORKERS 0
"""

import argparse
import glob
import heapq
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

QUICKSTART = "configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic.yaml"
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


def replay_asha(curves, new_scheduler, metric, mode, slots, order, rng):
    """Feeds the grid's recorded reports to a fresh ASHA scheduler (Ray's own, as the sweep builds it) the way Tune
    would, trials taken in `order` and `slots` at a time at equal speed; returns (iterations trained, best value seen).
    With SEED fixed a trial reports the same values under ASHA as in the grid, so this is what ASHA would train in
    that order. Which of two trials that report at the same iteration comes first (and so may pass a rung unranked)
    is decided by a draw per trial: in a real sweep it is whichever trial runs a little faster."""
    from ray.tune.schedulers import TrialScheduler

    scheduler = new_scheduler()
    scheduler.set_search_properties(metric, mode)
    pending, events, trained, seen = list(order), [], 0, []
    arrival = {lr: rng.random() for lr in order}

    def start(now):
        if pending:
            lr = pending.pop(0)
            scheduler.on_trial_add(None, SimpleNamespace(trial_id=str(lr)))
            heapq.heappush(events, (now + curves[lr][0][0], arrival[lr], lr, 0))

    for _ in range(slots):
        start(0)
    while events:
        now, _, lr, k = heapq.heappop(events)
        iteration, value = curves[lr][k]
        trained += iteration - (curves[lr][k - 1][0] if k else 0)
        seen.append(value)
        action = scheduler.on_trial_result(
            None, SimpleNamespace(trial_id=str(lr)), {"iteration": iteration, metric: value}
        )
        if action == TrialScheduler.STOP or k + 1 == len(curves[lr]):
            start(now)
        else:
            heapq.heappush(events, (now + curves[lr][k + 1][0] - iteration, arrival[lr], lr, k + 1))
    return trained, (max if mode == "max" else min)(seen)


def replay_orders(args, curves, asha_sweep, cfg, slots, orders=1000):
    """What share of the grid's iterations ASHA trains and whether it sees the grid's best (within --tolerance), over
    `orders` random orders of the trials: how typical one measured ASHA arm is."""
    grid_iterations = sum(reports[-1][0] for reports in curves.values())
    sign = 1 if args.mode == "max" else -1
    grid_best = sign * max(sign * value for reports in curves.values() for _, value in reports)
    rng = random.Random(args.order_seed)
    outcomes = []
    for _ in range(orders):
        order = rng.sample(sorted(curves), len(curves))
        trained, best = replay_asha(
            curves, lambda: build_scheduler(asha_sweep, cfg), args.metric, args.mode, slots, order, rng
        )
        outcomes.append((trained / grid_iterations, sign * (grid_best - best) <= args.tolerance))
    shares = sorted(share for share, _ in outcomes)
    found = sum(ok for _, ok in outcomes) / orders
    both = sum(ok and share <= 0.4 for share, ok in outcomes) / orders
    print(
        f"Ray's ASHA replayed on the grid's reports in {orders} random orders ({slots} trials at a time): it trains "
        f"a median {statistics.median(shares):.0%} of the grid's iterations (10%-90%: {shares[orders // 10]:.0%}-"
        f"{shares[orders * 9 // 10]:.0%}), sees the grid's best within {args.tolerance:g} in {found:.0%} of the orders, "
        f"and both that and <= 40% of the iterations in {both:.0%}"
    )


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=QUICKSTART)
    parser.add_argument("--lrs", type=float, nargs="+", default=LRS, help="the SOLVER.BASE_LR grid")
    parser.add_argument("--max-iter", type=int, default=960, help="SOLVER.MAX_ITER, ASHA's max_t")
    parser.add_argument("--eval-period", type=int, default=60, help="TEST.EVAL_PERIOD: a report each")
    parser.add_argument("--grace", type=int, default=60, help="ASHA's first rung (iterations), after the warm-up")
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
        help="train nothing: replay ASHA (--grace, --reduction-factor, --max-iter) on a finished grid arm's reports",
    )
    parser.add_argument(
        "--replay-slots",
        type=int,
        help="trials at a time in the replay (default: this machine's cores / --cpus-per-trial)",
    )
    parser.add_argument("opts", nargs="*", default=[], metavar="KEY VALUE", help="overrides of the base config")
    return parser


def check_study(args, cfg):
    """One line for a study where ASHA cannot rank trials: a rung inside the warm-up, or rungs between reports."""
    if args.grace <= cfg.SOLVER.WARMUP_ITERS:
        raise ConfigError(
            f"--grace {args.grace} is within the warm-up (SOLVER.WARMUP_ITERS {cfg.SOLVER.WARMUP_ITERS}): ASHA would "
            "rank trials before they train at their learning rate; raise --grace or lower the warm-up"
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
    return figures, rows


def main(args):
    args.lrs = random.Random(args.order_seed).sample(args.lrs, len(args.lrs))
    opts = ["SOLVER.MAX_ITER", str(args.max_iter), "TEST.EVAL_PERIOD", str(args.eval_period), "SEED", str(args.seed)]
    cfg = prepare_config(args.config_file, [*opts, *args.opts])
    check_study(args, cfg)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    grid = sweep_of(args, f"grid_{stamp}", {"type": "fifo"})
    asha = sweep_of(
        args, f"asha_{stamp}", {"type": "asha", "grace_period": args.grace, "reduction_factor": args.reduction_factor}
    )
    for sweep in (grid, asha):
        validate_sweep(sweep, cfg)
    slots = args.replay_slots or max(1, int(os.cpu_count() // (args.cpus_per_trial or 1)))
    if args.replay:
        curves = grid_curves(args.replay, args.metric)
        trained = {reports[-1][0] for reports in curves.values()}
        if trained != {args.max_iter}:
            raise ConfigError(
                f"--replay {args.replay}: its trials trained {'/'.join(map(str, sorted(trained)))} iterations, not "
                f"--max-iter {args.max_iter}: pass the grid's --max-iter"
            )
        replay_orders(args, curves, asha, cfg, slots)
        return
    connect_ray(args.address)
    load = os.getloadavg()
    (grid_figures, grid_rows), (asha_figures, asha_rows) = run(args, grid, cfg), run(args, asha, cfg)

    print(f"\nLearning rates in the order tried: {' '.join(f'{lr:g}' for lr in args.lrs)}")
    print(f"{len(args.lrs)} learning rates, {args.max_iter} iterations, evaluation every {args.eval_period}, "
          f"ASHA grace {args.grace}, reduction factor {args.reduction_factor}, SEED {args.seed}; {args.config_file} "
          f"{' '.join(args.opts)}")  # fmt: skip
    figures = {"full grid": grid_figures, "ASHA": asha_figures}
    print(format_table([{"": key, **{arm: figures[arm][key] for arm in figures}} for key in grid_figures]))
    metric = f"best {args.metric}"
    share = asha_figures["CPU-seconds"] / grid_figures["CPU-seconds"]
    gap = (grid_figures[metric] - asha_figures[metric]) * (1 if args.mode == "max" else -1)
    print(f"ASHA used {share:.0%} of the grid's CPU-seconds; its best is {gap:.2f} {args.metric} below the grid's best")
    # The same SEED and values: where ASHA ran a trial to the end, it should have reached the grid's value.
    grid_by_lr = {row["SOLVER.BASE_LR"]: row[args.metric] for row in grid_rows}
    finished = [r for r in asha_rows if r["status"] == "finished" and r[args.metric] is not None]
    differences = [abs(r[args.metric] - grid_by_lr[r["SOLVER.BASE_LR"]]) for r in finished]
    if differences:
        agreement = f"{max(differences):.3g} {args.metric}"
        print(f"The {len(finished)} trials ASHA ran to the end match the grid's same trials within {agreement}")
    replay_orders(args, grid_curves(experiment_path(args.storage, grid.name), args.metric), asha, cfg, slots)
    print(f"Experiments: {os.path.abspath(args.storage)}/{{{grid.name},{asha.name}}}")
    print(f"Load average (1, 5, 15 min) at the start: {', '.join(f'{x:.2f}' for x in load)}; at the end: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip


if __name__ == "__main__":
    run_cli(main, build_parser().parse_intermixed_args())
