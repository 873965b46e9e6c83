"""Where the model lives: relative paths, the name clients use, and the tiny checkpoint on demand.

A relative `model.path` in a deployment file is taken relative to the directory
`serve run` was started in (Ray's workers inherit it when `serve run` starts Ray; on a
cluster started with `ray start`, it is that command's directory, so give absolute
paths there).  `build_app` resolves it once, so every replica and worker sees the same
absolute path.

`make_tiny_if_missing` writes raypp's deterministic checkpoint when `config.json` is
absent: into a temporary sibling directory first and then renamed into place, so that
two replicas starting at once, or a reader racing the writer, never see half a
checkpoint.
"""
from __future__ import annotations

import os
import shutil
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


def ensure_checkpoint(cfg: DeploymentConfig) -> None:
    path = Path(cfg.model.path)
    preset = cfg.model.make_tiny_if_missing
    if preset is None or (path / "config.json").is_file():
        return
    from raypp.model.tiny import make_checkpoint

    if path.exists() and any(path.iterdir()):
        from raypp.errors import CheckpointError
        raise CheckpointError(f"{path} exists but has no config.json; empty it or point model.path elsewhere "
                              f"before asking make_tiny_if_missing to write a {preset!r} checkpoint there")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    make_checkpoint(tmp, preset=preset)
    try:
        if path.exists():
            path.rmdir()           # an empty directory left by the user: replace it
        os.rename(tmp, path)
    except OSError:
        if not (path / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another replica finished first
