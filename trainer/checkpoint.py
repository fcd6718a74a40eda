"""Moving weights between sharded (DCP) checkpoints and plain, unsharded modules in one process.

A funnel checkpoint directory stores the LightningModule's state under ``state_dict.<fqn>``; the
sharded model lives at ``model.`` inside it. DCP reads any saved sharding into any requested
layout, so a plain module on one process can load a checkpoint written by N ranks (export,
evaluation, tests) and a plain module's weights can seed a sharded run (``--init-from``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

MODEL_PREFIX = "model."


def _keyed(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in module.state_dict().items()}


def load_unsharded(module: nn.Module, path: str | os.PathLike[str], prefix: str = MODEL_PREFIX) -> nn.Module:
    """Fill a plain ``module`` (same architecture as the sharded one) from a sharded checkpoint."""
    state = {"state_dict": _keyed(module, prefix)}
    dcp.load(state, checkpoint_id=Path(path), no_dist=True)
    module.load_state_dict({k[len(prefix) :]: v for k, v in state["state_dict"].items()})
    return module


def save_unsharded(module: nn.Module, path: str | os.PathLike[str], prefix: str = MODEL_PREFIX) -> Path:
    """Write a plain module's weights as a checkpoint that ``--init-from`` and DCP can reshard."""
    path = Path(path)
    dcp.save({"state_dict": _keyed(module, prefix)}, checkpoint_id=path, no_dist=True)
    return path
