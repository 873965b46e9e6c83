"""Errors a user can fix: each message names the field or file and what would work."""


class UserError(ValueError):
    """Bad input (a config field, a layout, a checkpoint): reported in one line, never a traceback."""


class LayoutError(UserError):
    """A TP x PP layout that cannot run this model."""


class CheckpointError(UserError):
    """A checkpoint directory raypp cannot load as asked."""


class PlacementError(RuntimeError):
    """The cluster cannot host the placement groups a layout needs."""


class WorkerSetupError(RuntimeError):
    """A pipeline worker could not start (process groups, weight loading): names the worker and the cause."""
