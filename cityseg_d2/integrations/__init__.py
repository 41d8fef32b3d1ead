"""Integrations with outside services. This module says whether one is on without importing it, so that a run
without W&B never pays for `import wandb`.

- `cityseg_d2.integrations.wandb`: Weights & Biases runs for trainings and Ray Tune trials.
"""
import os

WANDB_MODES = ("online", "offline", "disabled")


def wandb_enabled(cfg):
    """W&B is on when WANDB.ENABLED is true or $WANDB_PROJECT is set, unless WANDB.MODE (else $WANDB_MODE) is
    "disabled"."""
    mode = cfg.WANDB.MODE or os.environ.get("WANDB_MODE", "")
    return mode != "disabled" and bool(cfg.WANDB.ENABLED or os.environ.get("WANDB_PROJECT"))
