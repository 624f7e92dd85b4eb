"""Errors a user can fix: the command-line tools print them as one `error:` line (plus a hint), exit 2.

Raise `UserError` (or a subclass) for every expected mistake: a bad config value, a missing folder,
a corrupt image, a folder that is not a run, an incompatible checkpoint. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input, with an optional hint on how to fix it.

    `str(err)` is the message alone (what and where); `err.hint` is a short suggestion or None.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class DatasetError(UserError, ValueError):
    """Bad dataset input: a missing/empty folder, an unreadable image, an unmatched mask, ..."""


# The training stack by import name: the `train` extra's packages (pyproject.toml). Scoring an export
# folder with ONNX Runtime or OpenVINO needs none of them.
TRAINING_STACK = ("jax", "jaxlib", "flax", "optax", "orbax", "grain", "sklearn", "scipy", "matplotlib")
TRAIN_EXTRA = "pip install 'diff-fastener-jax[train]'"


class TrainingStackMissing(UserError):
    """`what` (a command, or an action) needs the training stack, and its module `module` is not
    installed here (an inspection PC with only the `runtime` extra)."""

    def __init__(self, what: str, module: str, hint: str | None = None):
        super().__init__(
            f"{what} needs the training stack (jax, flax, ...), and {module} is not installed here: {TRAIN_EXTRA}",
            hint,
        )
        self.module = module

    @classmethod
    def from_import_error(cls, what: str, exc: BaseException) -> TrainingStackMissing | None:
        """The error for `exc` when it is the ModuleNotFoundError of a missing training-stack package;
        else None (a missing submodule, `jax.foo`, of an installed package is a bug, not this)."""
        module = getattr(exc, "name", None)
        if isinstance(exc, ModuleNotFoundError) and module in TRAINING_STACK:
            return cls(what, module)
        return None
