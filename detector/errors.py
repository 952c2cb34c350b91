"""The one exception type for bad user input.

Anything a user can fix (a missing file, a malformed annotation, a checkpoint of another
architecture, a cache of another teacher) raises UserError with a one-line message that names the
problem and the fix. The CLI prints it without a traceback and exits non-zero; everything else is
a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input a user can fix; the message is one line naming the problem and the fix."""
