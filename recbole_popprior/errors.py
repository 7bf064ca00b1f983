"""The one exception type the plugin raises for bad input.

Command-line entry points catch :class:`PopPriorError`, print ``error: <message>``
on one line and exit with status 2; everything else is a bug and keeps its traceback.
"""


class PopPriorError(Exception):
    """Bad input, bad configuration or a missing dataset: a one-line, user-facing message."""
