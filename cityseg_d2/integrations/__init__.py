"""Integrations with outside services. This module says whether one is on without importing it, so that a run
without W&B never pays for `import wandb`.

- `cityseg_d2.integrations.wandb`: Weights & Biases runs for trainings and Ray Tune trials.
"""
import os

from ..errors import ConfigError

WANDB_MODES = ("online", "offline", "disabled")
# Beside the checkpoints in OUTPUT_DIR: the id of the training's W&B run, which a resumed training continues.
WANDB_RUN_ID_FILE = "wandb_run_id"


def wandb_mode(cfg):
    """WANDB.MODE, else $WANDB_MODE, else "" (W&B chooses online or offline); a ConfigError for an unknown mode."""
    if cfg.WANDB.MODE:
        source, mode = "WANDB.MODE", cfg.WANDB.MODE
    else:
        source, mode = "$WANDB_MODE", os.environ.get("WANDB_MODE", "")
    if mode and mode not in WANDB_MODES:
        raise ConfigError(f"{source} is {mode!r}: use one of {', '.join(WANDB_MODES)} or leave it empty")
    return mode


def wandb_enabled(cfg):
    """W&B is on when WANDB.ENABLED is true or $WANDB_PROJECT is set, unless the mode is "disabled"."""
    return wandb_mode(cfg) != "disabled" and bool(cfg.WANDB.ENABLED or os.environ.get("WANDB_PROJECT"))
