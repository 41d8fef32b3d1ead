"""Integrations with outside services; each module imports its service only when imported itself.

- `cityseg_d2.integrations.wandb`: Weights & Biases run, EventWriter and hooks for training runs and Ray Tune trials.
"""
