"""Training and inference on top of detectron2's DefaultTrainer, and the one way to make their config."""
from .setup import prepare_config, setup
from .trainer import Trainer

__all__ = ["Trainer", "prepare_config", "setup"]
