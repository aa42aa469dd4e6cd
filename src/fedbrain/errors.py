"""One error type for bad input: the CLI prints its message as one line and exits 1."""


class InputError(Exception):
    """Bad input a user can fix: the message names the file or key and what to do."""
