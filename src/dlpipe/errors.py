"""One error type for everything a user can cause, and one way to report it.

Stages and the CLI wrap their entry point in `exit_on_user_error`, so bad input ends in a single
line on stderr and exit code 2 instead of a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

USER_ERROR_EXIT = 2


class DlpipeError(Exception):
    """A problem the user can fix: bad params, bad data, unreachable service, bad input."""


def first_line(err: BaseException) -> str:
    """The gist of an exception in one line (MLflow puts its reason after "Error: ")."""
    text = str(err).strip()
    if "Error: " in text:
        text = text.rsplit("Error: ", 1)[1]
    return (text.splitlines() or [type(err).__name__])[0][:300]


def exit_on_user_error(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn `DlpipeError` (and Ctrl-C) raised by `fn` into one stderr line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> T:
        try:
            return fn(*args, **kwargs)
        except DlpipeError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(USER_ERROR_EXIT) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
