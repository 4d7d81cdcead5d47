"""Errors the questioner reports to the user instead of a traceback.

The CLI maps them to exit codes: a ``UsageError`` (bad argument, unreadable file, missing model
directory, unknown backend) exits 2 like argparse's own errors; any other ``QuestionerError``
(an endpoint that refuses, a backend that fails mid-run) exits 1.
"""


class QuestionerError(Exception):
    """A failure the user can act on; the message says what and where."""

    exit_code = 1


class UsageError(QuestionerError):
    """The command line or an input file is wrong."""

    exit_code = 2


class BackendError(QuestionerError):
    """A generation backend cannot go on (endpoint refused, every request of a batch failed)."""
