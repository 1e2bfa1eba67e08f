"""The one exception type for mistakes a user can make and fix, and the warning category (with `warn`).

The CLI prints its message (no traceback) and exits with code 2. Library code
raises it for bad input: a missing file, a corrupt image, a wrong config value,
an incompatible checkpoint. Bugs stay ordinary exceptions with tracebacks.
"""


import warnings


class UserError(Exception):
    """A problem with the user's input; the message names it and the fix."""


class ConfigError(UserError):
    """A config key or value that is unknown, wrongly typed or out of range."""


class DiffusekitWarning(UserWarning):
    """Something worth knowing that does not stop the work (a skipped image, a truncated prompt, a failed
    periodic save). Library code warns through `warnings`, so that a program can silence or capture it:

        warnings.filterwarnings("ignore", category=DiffusekitWarning)

    The CLI prints each one as a line "warning: ..." on stderr."""


def warn(message: str) -> None:
    """A DiffusekitWarning: the CLI prints it as one 'warning: ...' line, a program may filter it."""
    warnings.warn(message, DiffusekitWarning, stacklevel=2)
