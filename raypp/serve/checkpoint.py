"""Where the model lives: relative paths, and the name clients use.

A relative `model.path` in a deployment file is taken relative to the directory
`serve run` was started in (Ray's workers inherit it when `serve run` starts Ray; on a
cluster started with `ray start`, it is that command's directory, so give absolute
paths there).  `build_app` resolves it once, so every replica and worker sees the same
absolute path.

(`make_tiny_if_missing` is honoured by the engine: `raypp.runtime.checkpoint_dir.ensure_checkpoint`.)
"""
from __future__ import annotations

import os
from pathlib import Path

from raypp.config import DeploymentConfig


def resolve_paths(cfg: DeploymentConfig, base: str | os.PathLike | None = None) -> DeploymentConfig:
    path = Path(cfg.model.path).expanduser()
    if not path.is_absolute():
        path = Path(base or os.getcwd()) / path
    cfg = cfg.model_copy(deep=True)
    cfg.model.path = str(path.resolve())
    return cfg


def served_name(cfg: DeploymentConfig) -> str:
    return cfg.model.served_name or Path(cfg.model.path).name
