"""What the page shows when a question fails: the command line's one line, and the server keeps serving.

    try: ...
    except Exception as e:
        text = error_message(e)   # "error: /tmp/x.jpg: not an image file PIL can read (...)"

The same rule as ``llava-next``'s entry point (cli/main.py ``_main``): the exceptions that describe the user's
input (``ValueError`` and its subclasses, ``OSError`` for files, the hub's ``HubError``) are shown as their
message (an ``OSError`` with a file name as ``FILE: reason``), so the page and the command line say the same
words for the same input; anything else is a bug in llava-next, shown as its class and message with a request
to report it (the traceback goes to the server's stderr).
"""

from __future__ import annotations

import sys
import traceback

from llava_next_weights.hub import HubError


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, (ValueError, OSError, HubError))


def user_message(e: BaseException) -> str:
    """The message the command line prints after ``error:`` for a user error."""
    return str(e) if not isinstance(e, OSError) or e.filename is None else f"{e.filename}: {e.strerror or e}"


def error_message(e: BaseException) -> str:
    """The one line the page shows for ``e`` (internal errors also print their traceback on stderr)."""
    if is_user_error(e):
        return f"error: {user_message(e)}"
    traceback.print_exception(e, file=sys.stderr)
    return f"internal error ({type(e).__name__}: {e}); this is a bug, please report it with the server's traceback"
