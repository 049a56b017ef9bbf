"""The one error type for data problems: raised by the data code, printed by the CLI as one line, exit 2."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset, data config, split file or cache that cannot be used; the message says what and what to do."""


class DataConfigError(DataError):
    """The data config (configs/data.yaml) holds a value that cannot work; the message names the field."""
