"""Bearer tokens kept in files: `ds serve --token-file` checks them, `ds-monitor --token-file` sends them.

A token lives in a file (a mounted Kubernetes Secret, a file only its owner reads) rather than on the command
line, where `ps` and shell history would show it to everyone on the machine.
"""

from __future__ import annotations

from pathlib import Path

from fullchain.errors import UserError

MIN_TOKEN_CHARS = 16


def read_token(token_file: Path | None) -> str | None:
    """The token in `token_file` (surrounding whitespace removed), or None without a file."""
    if token_file is None:
        return None
    try:
        token = token_file.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--token-file {token_file}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    if len(token) < MIN_TOKEN_CHARS:
        raise UserError(f"--token-file {token_file}: the token must be at least {MIN_TOKEN_CHARS} characters")
    return token
