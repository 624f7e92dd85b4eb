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
