"""The bearer token: one reader for robots, clients and the server's ``--auth-token-file``.

Tokens are read from a file (kept off the command line, where ``ps`` shows it) or from the
``CARVE_TOKEN`` environment variable.
"""

from __future__ import annotations

import os
from pathlib import Path

TOKEN_ENV = "CARVE_TOKEN"


class TokenError(ValueError):
    """A token file that cannot be read or is empty; the message names the file."""


def read_token_file(path: str | Path) -> str:
    """The token is the file's content without surrounding whitespace; an empty or unreadable file
    raises TokenError."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise TokenError(f"cannot read auth token file {path}: {e.strerror}") from None
    if not token:
        raise TokenError(f"auth token file {path} is empty")
    return token


def read_token(path: str | Path | None = None, env: str = TOKEN_ENV) -> str | None:
    """The token from ``path`` when given (see :func:`read_token_file`), else from the environment
    variable ``env``; None when neither is set (an unauthenticated server)."""
    if path:
        return read_token_file(path)
    return (os.environ.get(env) or "").strip() or None
