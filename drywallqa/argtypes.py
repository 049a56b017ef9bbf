"""argparse value types shared by every `drywallqa` subcommand (the edge runtime's included: no torch here)."""

from __future__ import annotations

import argparse


def _int_at_least(minimum: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (thread counts, batch sizes, limits, frame counts)."""
    return _int_at_least(1, text)


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (how many entries to list)."""
    return _int_at_least(0, text)


def positive_float(text: str) -> float:
    """A number > 0 (durations in seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value
