"""One error type for everything a user can cause, and one way to report it.

Stages and the CLI wrap their entry point in `exit_on_user_error`, so bad input ends in a single
line on stderr and exit code 2 instead of a traceback.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

USER_ERROR_EXIT = 2
REDACTED = "***"
# `scheme://user:password@` and secret-looking query values (`?token=...`, `&api_key=...`).
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#@\s]+@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;][^=&;#\s]*(?:token|secret|passw|pwd|key|auth|sig|credential)[^=&;#\s]*=)"
    r"[^&;#\s]+",
    re.IGNORECASE,
)


class DlpipeError(Exception):
    """A problem the user can fix: bad params, bad data, unreachable service, bad input."""


def redact(text: str) -> str:
    """`text` with the credentials of any URI in it (tracking URIs may carry `user:token@` or
    `?token=`) replaced by ***: what dlpipe writes or prints never holds a secret."""
    text = _USERINFO.sub(rf"\g<scheme>{REDACTED}@", text)
    return _SECRET_QUERY.sub(rf"\g<key>{REDACTED}", text)


def first_line(err: BaseException) -> str:
    """The gist of an exception in one line (MLflow puts its reason after "Error: "; a tracking
    server's refusal says who was refused)."""
    status = refused_status(err)
    if status is not None:
        return refusal(status)
    text = str(err).strip()
    if "Error: " in text:
        text = text.rsplit("Error: ", 1)[1]
    return redact((text.splitlines() or [type(err).__name__])[0][:300])


def refused_status(err: BaseException) -> int | None:
    """401 or 403 when `err` is a tracking server's refusal (MLflow's exceptions carry the HTTP
    status), else None."""
    status = getattr(err, "get_http_status_code", lambda: None)()
    return status if status in (401, 403) else None


def refusal(status: int) -> str:
    """A tracking server's 401 or 403, in words, naming the user (never the password)."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401:
        given = f"the password of user {user} is wrong" if user else "no user was given"
        return (
            f"401 Unauthorized: {given} (set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD, or ~/.mlflow/credentials)"
        )
    return (
        f"403 Permission denied for user {user or '(from ~/.mlflow/credentials)'}: an admin "
        "grants it with `python -m dlpipe.team_users NAME --role trainer`"
    )


def exit_on_user_error(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn `DlpipeError` (and Ctrl-C) raised by `fn` into one stderr line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> T:
        try:
            return fn(*args, **kwargs)
        except DlpipeError as err:
            print(f"error: {' '.join(redact(str(err)).splitlines())}", file=sys.stderr)
            raise SystemExit(USER_ERROR_EXIT) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
