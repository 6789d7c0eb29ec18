"""Errors a user can cause (bad paths, broken checkpoints); the CLI prints them as one line."""


class MarlinError(Exception):
    """A problem with the user's input, with a one-line message that names the file involved."""
