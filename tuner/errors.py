"""User-facing errors: one line naming the problem and the fix."""


class TunerError(Exception):
    """A user-facing error: one line naming the problem and the fix."""
