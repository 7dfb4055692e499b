"""Errors caused by input (bad files, bad params): the CLI prints them as one line and exits 2."""


class PickstyleError(Exception):
    """Base of every error the user can fix; the message says what was wrong and where."""
