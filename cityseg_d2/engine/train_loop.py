"""The training step of the fast path (CITYSEG.FAST.TRAIN_LOOP), and the choice between it and detectron2's.

detectron2's SimpleTrainer/AMPTrainer read every loss with its own `.item()` after the backward pass, and its
heads read their statistics the same way during the forward pass: a host sync each, after which the GPU idles
until Python queues the next kernels. FastTrainLoop reads the losses and the statistics our heads log with
`put_scalars` in one device-to-host copy per step, and runs autocast from SOLVER.AMP on any device (bfloat16
on the CPU too, where detectron2's AMPTrainer refuses to run). Gradient scaling is used for float16 on CUDA only.
"""

import time

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer

from ..errors import ConfigError
from ..modeling import deferred_scalars
from ..modeling.model import PRECISIONS
from ..modeling.metrics import to_host, write_scalars


class FastTrainLoop(SimpleTrainer):
    """SimpleTrainer with autocast in `precision` (None: float32) and one host sync per step for metrics."""

    def __init__(self, model, data_loader, optimizer, precision=None, device="cuda"):
        super().__init__(model, data_loader, optimizer)
        self.precision = precision
        self.device_type = torch.device(device).type
        scaled = precision == torch.float16 and self.device_type == "cuda"
        self.grad_scaler = torch.amp.GradScaler("cuda") if scaled else None

    def run_step(self):
        assert self.model.training, "[FastTrainLoop] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with deferred_scalars() as statistics, torch.autocast(
            self.device_type, dtype=self.precision, enabled=self.precision is not None
        ):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        self.after_backward()
        values = to_host({**loss_dict, **statistics})  # the step's one host sync
        self._write_metrics({name: torch.tensor(values.pop(name)) for name in loss_dict}, data_time)
        write_scalars(values)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


def build_train_loop(cfg, model, data_loader, optimizer):
    """The training step for cfg: FastTrainLoop with CITYSEG.FAST.TRAIN_LOOP, or when SOLVER.AMP asks for
    autocast on the CPU; else detectron2's AMPTrainer (with SOLVER.AMP.PRECISION) or SimpleTrainer, as
    DefaultTrainer builds them."""
    amp = cfg.SOLVER.AMP.ENABLED
    precision = None
    if amp:
        precision = PRECISIONS.get(cfg.SOLVER.AMP.PRECISION)
        if precision is None:
            raise ConfigError(f"SOLVER.AMP.PRECISION is {cfg.SOLVER.AMP.PRECISION!r}: use float16 or bfloat16")
    device = cfg.MODEL.DEVICE
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu and precision == torch.float16:
        raise ConfigError(
            "SOLVER.AMP.PRECISION float16 needs a GPU: use bfloat16 on the CPU (or SOLVER.AMP.ENABLED False)"
        )
    if cfg.CITYSEG.FAST.TRAIN_LOOP or (on_cpu and precision is not None):
        return FastTrainLoop(model, data_loader, optimizer, precision=precision, device=device)
    if amp:
        return AMPTrainer(model, data_loader, optimizer, precision=precision or torch.float16)
    return SimpleTrainer(model, data_loader, optimizer)
