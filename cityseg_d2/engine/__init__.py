"""Training and inference on top of detectron2's DefaultTrainer, and the one way to make their config."""
from .launch import launch
from .setup import prepare_config, setup
from .trainer import Trainer

__all__ = ["Trainer", "launch", "prepare_config", "setup"]
