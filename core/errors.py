"""The one exception type for bad user input.

Anything a user can fix (a missing file, a malformed annotation, a checkpoint of another
architecture, a cache of another teacher) raises UserError with a one-line message that names the
problem and the fix. The CLI prints it without a traceback and exits non-zero; everything else is
a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input a user can fix; the message is one line naming the problem and the fix."""


def one_line(err: UserError) -> str:
    """The message to print. A UserError raised in a DataLoader worker comes back with the worker's
    traceback folded into its message; the user needs only the original message, its last line."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(f"{UserError.__name__}: ", 1)[-1]
    return text.splitlines()[0] if text else type(err).__name__


def first_line(error: BaseException) -> str:
    """The first line of an exception message, for one-line errors: at most 200 characters; a longer
    one is cut to its first sentence (torch's zip errors run on with advice)."""
    text = str(error).strip().splitlines()
    if not text:
        return type(error).__name__
    line = text[0]
    if len(line) <= 200:
        return line
    end = line.find(". ", 0, 200)
    return line[:end] if end > 0 else line[:200]
