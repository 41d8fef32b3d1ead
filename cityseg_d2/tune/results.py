"""A finished sweep's summary from Ray's result API: one row per trial, best first, printed and written to the
experiment dir as trials.csv / trials.json, and best_config.yaml, the base config with the best trial's values."""
import csv
import json
import math
import os

from tabulate import tabulate

from ..errors import ConfigError
from .trial import TRIAL_OUTPUT, trial_dirname

CONFIG_PREFIX = "config/"  # ResultGrid.get_dataframe's columns of a trial's sampled values


def trial_rows(results, sweep, cfg):
    """One row per trial of a ResultGrid, best first: rank, trial, sampled values, the best value of the sweep's
    metric the trial reported, iterations trained, status and output_dir."""
    return rank_trials(
        best=results.get_dataframe(filter_metric=sweep.metric, filter_mode=sweep.mode),
        last=results.get_dataframe(),
        trials={os.path.basename(result.path): result for result in results},
        sweep=sweep,
        cfg=cfg,
    )


def rank_trials(best, last, trials, sweep, cfg):
    """trial_rows from ResultGrid.get_dataframe filtered for the sweep's metric and mode (`best`) and unfiltered
    (`last`, the last reports), and the trials' Results by trial folder name (also those that never reported)."""
    best_rows = _by_trial(best)
    last_rows = _by_trial(last)
    rows = []
    for name, result in trials.items():
        reported = best_rows.get(name) or last_rows.get(name)
        if reported:
            params = {k[len(CONFIG_PREFIX) :]: v for k, v in reported.items() if k.startswith(CONFIG_PREFIX)}
        else:  # failed before its first report: Ray's params.json has its config
            with open(os.path.join(result.path, "params.json")) as f:
                params = json.load(f)
        sampled = sweep.sampled_values(params)
        iterations = int(_number(last_rows.get(name, {}).get("iteration")) or 0)
        max_iter = sampled.get("SOLVER.MAX_ITER", cfg.SOLVER.MAX_ITER)
        status = "error" if result.error else ("finished" if iterations >= max_iter else "stopped early")
        rows.append(
            {
                "trial": name,
                **sampled,
                sweep.metric: _number(best_rows.get(name, {}).get(sweep.metric)),
                "iterations": iterations,
                "status": status,
                "output_dir": os.path.join(result.path, TRIAL_OUTPUT),
            }
        )
    sign = -1 if sweep.mode == "max" else 1
    rows.sort(key=lambda r: (r[sweep.metric] is None, sign * (r[sweep.metric] or 0), r["trial"]))
    return [{"rank": i + 1, **row} for i, row in enumerate(rows)]


def _by_trial(dataframe):
    if dataframe.empty:
        return {}
    return {trial_dirname(row["trial_id"]): row for row in dataframe.to_dict("records")}


def _number(value):
    """A reported number, or None where a trial reported none (pandas fills missing cells with NaN)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def cell_text(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def format_table(rows, columns=None):
    """Rows (dicts) as a plain-text table of their cell_text; `columns` defaults to the first row's keys."""
    columns = columns or (list(rows[0]) if rows else [])
    return tabulate([[cell_text(row[c]) for c in columns] for row in rows], headers=columns, disable_numparse=True)


def print_summary(rows, sweep):
    print(f"\nSweep {sweep.name}: {len(rows)} trials, best first ({sweep.metric}, {sweep.mode}):")
    print(format_table(rows, [c for c in (rows[0] if rows else []) if c != "output_dir"]))


def write_summary(rows, experiment_dir):
    """trials.csv (table cells) and trials.json (raw values) in the experiment dir."""
    with open(os.path.join(experiment_dir, "trials.json"), "w") as f:
        json.dump(rows, f, indent=2)
    if rows:
        with open(os.path.join(experiment_dir, "trials.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: cell_text(v) for k, v in row.items()} for row in rows)


def write_best_config(rows, sweep, cfg, experiment_dir):
    """best_config.yaml: the base config with the best trial's values, training into experiment_dir/best."""
    if not rows or rows[0][sweep.metric] is None:
        reported = sorted({k for row in rows for k in row if k not in ("rank", "trial")})
        raise ConfigError(
            f"no trial reported the metric {sweep.metric!r} (check metric: in {sweep.source} and the trials' "
            f"output/log.txt; table columns: {reported})"
        )
    best = rows[0]
    best_cfg = cfg.clone()
    best_cfg.defrost()
    best_cfg.merge_from_list([x for key in sweep.space for x in (key, best[key])])
    best_cfg.OUTPUT_DIR = os.path.join(experiment_dir, "best")
    path = os.path.join(experiment_dir, "best_config.yaml")
    with open(path, "w") as f:
        f.write(f"# Sweep {sweep.name}, best trial {best['trial']}: {sweep.metric} = {best[sweep.metric]:.4g}\n")
        f.write(best_cfg.dump())
    return path
