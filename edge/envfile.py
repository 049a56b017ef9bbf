"""Read a systemd EnvironmentFile (`/etc/drywallqa/edge.env`) as the service would see it.

`edge check-config --env-file` uses it so that the check sees the overrides and secrets the service gets, rather
than the shell's environment. The syntax is the part of systemd's that such files use: `KEY=VALUE` lines,
whitespace around `=` and around an unquoted value ignored, a value in single or double quotes taken as written
(in double quotes `\\"`, `\\\\`, `\\$` and `` \\` `` stand for the character), a trailing backslash joining the next
line, and blank lines or lines starting with `#` or `;` ignored. systemd skips a line it cannot read and logs a
warning that is easy to miss in the journal; here such a line is an error that names it.
"""

from __future__ import annotations

import re
from pathlib import Path

from drywallqa.edge.settings import ConfigError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOUBLE_QUOTED_ESCAPES = {'"': '"', "\\": "\\", "$": "$", "`": "`"}


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, line) with backslash-newline continuations joined and comments dropped."""
    out: list[tuple[int, str]] = []
    pending: str | None = None
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if pending is None:
            stripped = raw.strip()
            if not stripped or stripped[0] in "#;":
                continue
            start, pending = number, raw
        else:
            pending += raw
        if pending.endswith("\\") and not pending.endswith("\\\\"):
            pending = pending[:-1]
            continue
        out.append((start, pending))
        pending = None
    if pending is not None:
        out.append((start, pending))
    return out


def _unquote(value: str, where: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1]
    if len(value) >= 2 and value[0] == value[-1] == '"':
        body, chars, i = value[1:-1], [], 0
        while i < len(body):
            if body[i] == "\\" and i + 1 < len(body) and body[i + 1] in _DOUBLE_QUOTED_ESCAPES:
                chars.append(_DOUBLE_QUOTED_ESCAPES[body[i + 1]])
                i += 2
            else:
                chars.append(body[i])
                i += 1
        return "".join(chars)
    if value[:1] in "'\"":
        raise ConfigError(f"{where}: the quote that opens the value is not closed at its end")
    return value


def read_env_file(path: str | Path) -> dict[str, str]:
    """The variables the file sets, in order (a later assignment of a name wins, as in systemd)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"environment file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"environment file {path} is a folder, not a file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"environment file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the environment file {path}: {exc.strerror or exc} (the service's file "
                          f"is readable by root only: run the check with sudo)") from None
    values: dict[str, str] = {}
    for number, line in _logical_lines(text):
        where = f"{path}, line {number}"
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not _NAME.fullmatch(name):
            raise ConfigError(f"{where}: expected NAME=VALUE, got {line.strip()[:80]!r} (systemd would skip "
                              f"this line)")
        values[name] = _unquote(value.strip(), where)
    return values
