"""Read a systemd EnvironmentFile (`/etc/drywallqa/edge.env`) as the service would see it.

`edge check-config --env-file` uses it so that the check sees the overrides and secrets the service gets, rather
than the shell's environment. The parser follows systemd's own (`parse_env_file` in src/basic/env-file.c), character
by character:
- blank lines and lines starting with `#` or `;` are ignored; whitespace around the name and `=` is dropped;
- an unquoted value drops its trailing whitespace, and a backslash takes the next character literally
  (`site\\ walk.mp4` is `site walk.mp4`); a backslash before the line's end joins the next line;
- `'...'` is taken literally, newlines included; in `"..."` a backslash escapes `"`, `\\`, `` ` `` and `$`, joins
  lines before a newline, and stays in place before anything else;
- text right after a closing quote goes on the same value (`"a"b` is `ab`).

Where systemd would quietly skip a line (its warning is easy to miss in the journal) or where its versions disagree,
this is an error naming the line instead: a line without `=`, a name that is not a variable name (`export X=1`), a
quote left open at the end of the file, and a comment ending in a backslash (before systemd 254, which Ubuntu 22.04
and JetPack 6 predate, that comment also swallows the next line). With `strict` (what `edge check-config` reads), a
`#` after a value's blank or closing quote is one too: systemd has no comment after a value and hands the service
`broker.site# main broker` as the host.
"""

from __future__ import annotations

import re
from pathlib import Path

from drywallqa.edge.settings import ConfigError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WHITESPACE = " \t\n\r"
_NEWLINE = "\n\r"
_DOUBLE_QUOTE_ESCAPES = '"\\`$'


class _Parser:
    """systemd's states: pre_key, key, pre_value, value, value_escape, single, double, double_escape, comment."""

    def __init__(self, path: Path, strict: bool = False) -> None:
        self.path = path
        self.strict = strict
        self.hash_after_blank = False  # the value being read has a '#' after a blank or a closing quote
        self.values: dict[str, str] = {}
        self.line = 1  # the line being read
        self.start = 1  # the line the current assignment started on
        self.key: list[str] = []
        self.value: list[str] = []
        self.trailing_ws: int | None = None  # where the unquoted value's trailing whitespace starts

    def error(self, line: int, what: str) -> ConfigError:
        return ConfigError(f"{self.path}, line {line}: {what}")

    def no_value(self) -> ConfigError:
        """A line with no `=`."""
        return self.error(self.start, f"expected NAME=VALUE, got {''.join(self.key).strip()[:80]!r} (systemd "
                                      f"would skip this line)")

    def push(self) -> None:
        name = "".join(self.key).strip(_WHITESPACE)
        if name.startswith("\ufeff") and _NAME.fullmatch(name[1:]):
            raise self.error(self.start, f"the file starts with a byte order mark (U+FEFF, written by some Windows "
                                         f"editors): systemd reads it as part of the name {name[1:]!r} and skips "
                                         f"this line. Save the file as UTF-8 without BOM (e.g. sed -i '1s/^\\xEF"
                                         f"\\xBB\\xBF//' {self.path})")
        if not _NAME.fullmatch(name):
            raise self.error(self.start, f"expected NAME=VALUE, got a name {name[:60]!r} (systemd would skip this "
                                         f"line)")
        if self.trailing_ws is not None:
            del self.value[self.trailing_ws:]
        value = "".join(self.value)
        if self.strict and self.hash_after_blank:
            raise self.error(self.start, f"'#' after a value does not start a comment in an environment file: "
                                         f"systemd gives {name} the value {value[:80]!r}. Put the comment on a line "
                                         f"of its own (or quote the value if the '#' belongs to it)")
        self.values[name] = value
        self.key, self.value, self.trailing_ws, self.hash_after_blank = [], [], None, False

    def parse(self, text: str) -> dict[str, str]:
        state = "pre_key"
        prev, quote_closed = "", False
        for c in text:
            if c == "#" and state in ("pre_value", "value") and (prev in (" ", "\t") or quote_closed):
                self.hash_after_blank = True  # `A=x # note`, `A="x" # note`, `A="x"#note`: meant as a comment
            was = state
            if state == "pre_key":
                if c in "#;":
                    state = "comment"
                elif c not in _WHITESPACE:
                    state, self.start, self.key = "key", self.line, [c]
            elif state == "key":
                if c in _NEWLINE:
                    raise self.no_value()
                if c == "=":
                    state = "pre_value"
                else:
                    self.key.append(c)
            elif state == "pre_value":
                if c in _NEWLINE:
                    self.push()
                    state = "pre_key"
                elif c == "'":
                    state = "single"
                elif c == '"':
                    state = "double"
                elif c == "\\":
                    state = "value_escape"
                elif c not in _WHITESPACE:
                    state = "value"
                    self.value.append(c)
            elif state == "value":
                if c in _NEWLINE:
                    self.push()
                    state = "pre_key"
                elif c == "\\":
                    state, self.trailing_ws = "value_escape", None
                else:
                    if c not in _WHITESPACE:
                        self.trailing_ws = None
                    elif self.trailing_ws is None:
                        self.trailing_ws = len(self.value)
                    self.value.append(c)
            elif state == "value_escape":
                state = "value"
                if c not in _NEWLINE:  # an escaped newline joins the lines
                    self.value.append(c)
            elif state == "single":
                if c == "'":
                    state = "pre_value"
                else:
                    self.value.append(c)
            elif state == "double":
                if c == '"':
                    state = "pre_value"
                elif c == "\\":
                    state = "double_escape"
                else:
                    self.value.append(c)
            elif state == "double_escape":
                state = "double"
                if c in _DOUBLE_QUOTE_ESCAPES:
                    self.value.append(c)
                elif c not in _NEWLINE:  # as a shell does: the backslash stays before other characters
                    self.value += ["\\", c]
            elif state == "comment":
                if c in _NEWLINE:
                    state = "pre_key"
                elif c == "\\":
                    state = "comment_escape"
            elif state == "comment_escape":
                if c in _NEWLINE:
                    raise self.error(self.line, "a comment ends in a backslash: systemd before version 254 also "
                                                "ignores the next line, later versions do not; remove the backslash")
                state = "comment"
            prev = "\\" if was == "value_escape" else c  # an escaped blank (`a\ #b`) belongs to the value
            quote_closed = was in ("single", "double") and state == "pre_value"
            if c == "\n":
                self.line += 1
        if state in ("single", "double", "double_escape"):
            raise self.error(self.start, "the quote that opens the value is never closed (systemd would take the "
                                         "rest of the file as its value)")
        if state == "key":
            raise self.no_value()
        if state in ("pre_value", "value", "value_escape"):
            self.push()
        return self.values


def read_env_file(path: str | Path, strict: bool = False) -> dict[str, str]:
    """The variables the file sets, in order (a later assignment of a name wins, as in systemd). `strict`: also
    refuse a `#` that reads as a comment after a value but is part of it."""
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
    if text.startswith("\ufeff") and text[1:2] in ("#", ";"):
        text = text[1:]  # systemd skips this first line (a name that is not one): a comment, so nothing is lost
    return _Parser(path, strict).parse(text)
