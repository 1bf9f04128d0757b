"""User-facing errors: the CLI prints the message (what, where, how to fix) and exits 1.

Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class EmbedforgeError(Exception):
    """A problem the user can fix: bad input, missing files, an unreachable endpoint."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = [self.what.rstrip(".") + "."]
        if self.where:
            parts.append(f"Where: {self.where}.")
        if self.fix:
            parts.append(f"Fix: {self.fix.rstrip('.')}.")
        return " ".join(parts)
