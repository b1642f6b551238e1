"""What a training run reports per --log-interval: Megatron-LM's log line, --metrics-file JSON lines and
TensorBoard scalars. Written by the last rank (last pipeline stage), as Megatron-LM does."""

from __future__ import annotations

import json
import os
import resource
from typing import Optional

import torch

from aquila_npu.errors import MissingDependency


def device_memory() -> dict:
    """Peak memory of this process: the accelerator's allocator where there is one, else the host RSS."""
    if torch.cuda.is_available() and torch.cuda.device_count():
        return {"max_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
                "max_reserved_gb": torch.cuda.max_memory_reserved() / 1e9}
    return {"max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}


class Reporter:
    def __init__(self, *, is_writer: bool, train_iters: int, metrics_file: Optional[str] = None,
                 tensorboard_dir: Optional[str] = None):
        self.is_writer, self.train_iters = is_writer, train_iters
        self.metrics, self.features = None, None
        if metrics_file and is_writer:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            self.metrics = open(metrics_file, "a")
        self.tb = None
        if tensorboard_dir and is_writer:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MissingDependency("--tensorboard-dir needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(log_dir=tensorboard_dir)

    def log(self, iteration: int, rec: dict) -> None:
        if not self.is_writer:
            return
        line = (f" iteration {iteration:8d}/{self.train_iters:8d} | consumed samples: {rec['consumed_samples']:12d} "
                f"| elapsed time per iteration (ms): {rec['step_time_s'] * 1000:.1f} "
                f"| learning rate: {rec['learning_rate']:.6E} | global batch size: {rec['global_batch_size']:5d} "
                f"| lm loss: {rec['lm_loss']:.6E} ")
        if rec.get("loss_scale") is not None:
            line += f"| loss scale: {rec['loss_scale']:.1f} "
        if rec.get("grad_norm") is not None:
            line += f"| grad norm: {rec['grad_norm']:.3f} "
        line += (f"| number of skipped iterations: {rec['skipped_iterations']:3d} "
                 f"| tokens/p/s: {rec['tokens_per_sec_per_device']:.1f} "
                 f"| TFLOP/s/device: {rec['tflops_per_device']:.2f} |")
        if rec.get("mfu") is not None:
            line = line[:-1] + f"| MFU: {100 * rec['mfu']:.1f}% |"
        print(line, flush=True)
        if self.metrics:
            first = {"run_features": self.features} if self.features is not None else {}
            self.metrics.write(json.dumps({"iteration": iteration, **rec, **first}) + "\n")
            self.metrics.flush()
            self.features = None
        if self.tb:
            for key in ("lm_loss", "learning_rate", "grad_norm", "tokens_per_sec_per_device", "step_time_s",
                        "loss_scale", "mfu"):
                if rec.get(key) is not None:
                    self.tb.add_scalar(key.replace("lm_loss", "lm loss"), rec[key], iteration)
            self.tb.flush()

    def log_features(self, features: dict) -> None:
        """Which speed features the run has on (``training.features``): recorded in the first logged iteration's
        --metrics-file line (``run_features``)."""
        self.features = features

    def log_eval(self, iteration: int, loss: float) -> None:
        if not self.is_writer:
            return
        print(f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} |", flush=True)
        if self.metrics:
            self.metrics.write(json.dumps({"iteration": iteration, "validation_lm_loss": loss}) + "\n")
            self.metrics.flush()
        if self.tb:
            self.tb.add_scalar("lm loss validation", loss, iteration)
            self.tb.flush()

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
        if self.tb:
            self.tb.close()
