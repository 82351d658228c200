"""The error every command reports as one ``error:`` line and exit status 2."""


class ScoringError(RuntimeError):
    """Scoring cannot start or go on; the message names the input and the fix."""
