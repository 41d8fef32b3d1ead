"""Training and inference on top of detectron2's DefaultTrainer."""
from .setup import ConfigError, setup
from .trainer import Trainer, TrainingDivergedError

__all__ = ["ConfigError", "setup", "Trainer", "TrainingDivergedError"]
