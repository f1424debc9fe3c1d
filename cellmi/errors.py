"""Errors a user can fix: the CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input, bad settings or a refused operation; the message names what is wrong."""

    exit_code = 2


class IncompleteStoreError(UserError):
    """A store (or run folder) that was never marked complete."""
