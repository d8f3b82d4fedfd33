"""Optional metric sinks beside the CSVs: TensorBoard and Weights & Biases, used only when installed and asked for.
Each logger takes the same flat, namespaced metrics row the trainer writes to metrics.csv."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any


class TensorBoardLogger:
    """Scalars to `<run>/tensorboard/` (needs the `tensorboard` package: pip install craft-bench[tensorboard])."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise SystemExit("error: --log tensorboard needs the tensorboard package: pip install 'craft-bench[tensorboard]'") from error
        self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, row: dict[str, float], step: int) -> None:
        for key, value in row.items():
            if key not in ("step", "seed") and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    """A W&B run named after the run directory (needs `wandb` and a login: pip install craft-bench[wandb])."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        try:
            import wandb
        except ImportError as error:
            raise SystemExit("error: --log wandb needs the wandb package: pip install 'craft-bench[wandb]'") from error
        self._run = wandb.init(project="craft-bench", name=run_dir.name, config=config, dir=str(run_dir), resume="allow", id=run_dir.name)

    def log(self, row: dict[str, float], step: int) -> None:
        self._run.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        self._run.finish()


#: Logger name -> the package it needs.
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_loggers(names: list[str]) -> None:
    """Refuse an unknown logger name, or one whose package is missing, before a run creates anything."""
    for name in names:
        if name not in LOGGER_PACKAGES:
            raise SystemExit(f"error: unknown logger {name!r}; valid: csv (always on), {', '.join(LOGGER_PACKAGES)}")
        if importlib.util.find_spec(LOGGER_PACKAGES[name]) is None:
            raise SystemExit(f"error: --log {name} needs the {name} package: pip install 'craft-bench[{name}]'")


def make_loggers(names: list[str], run_dir: Path, config: dict[str, Any]) -> list:
    """Loggers by name; an unknown name is an error listing the valid ones. If one fails to start, the ones already
    started are closed (no half-open W&B run)."""
    check_loggers(names)
    loggers: list = []
    try:
        for name in names:
            loggers.append(TensorBoardLogger(run_dir) if name == "tensorboard" else WandbLogger(run_dir, config))
    except BaseException:
        for logger in loggers:
            logger.close()
        raise
    return loggers
