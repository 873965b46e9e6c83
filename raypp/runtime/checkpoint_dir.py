"""The checkpoint directory a deployment names, written first when it asks for raypp's own."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from raypp.config import DeploymentConfig
from raypp.errors import CheckpointError


def ensure_checkpoint(config: DeploymentConfig) -> Path:
    """The checkpoint directory, written first if absent and `model.make_tiny_if_missing` asks.

    Written into a temporary sibling and renamed into place, so that two replicas
    starting at once, or a reader racing the writer, never see half a checkpoint.
    """
    path = Path(config.model.path).expanduser().resolve()
    preset = config.model.make_tiny_if_missing
    if preset is None or (path / "config.json").is_file():
        return path
    if path.exists() and any(path.iterdir()):
        raise CheckpointError(f"{path} exists but has no config.json; empty it or point model.path elsewhere "
                              f"before asking make_tiny_if_missing to write a {preset!r} checkpoint there")
    from raypp.model.tiny import make_checkpoint
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    make_checkpoint(tmp, preset=preset, progress=True)
    try:
        if path.exists():
            path.rmdir()  # an empty directory left by the user: replace it
        os.rename(tmp, path)
    except OSError:
        if not (path / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another replica finished first
    return path
