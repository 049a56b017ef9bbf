"""Bounds on what a device (or any client of the broker) can put on the page and into the store.

Payload strings have no size limit in the schema, and every one of them is kept in memory, sent to every browser
with each change and, for alerts, written to disk: a 1 MB `last_error` would be all of that a megabyte at a time.
Free text is clipped, with an ellipsis that shows it was; ids are identities, so one that is too long is refused
rather than clipped (two clipped ids could become one device or one alert)."""

from __future__ import annotations

from drywallqa.edge.payloads import MAX_ID_CHARS  # device ids and alert event ids: one limit, both ends

__all__ = ["MAX_ID_CHARS", "MESSAGE_CHARS", "NAME_CHARS", "MAX_LIST_ITEMS", "clip", "bounded", "id_problem"]

MESSAGE_CHARS = 500  # free text meant for operators: last_error
NAME_CHARS = 200  # names: model, source, prompts, class names, rules
MAX_LIST_ITEMS = 64  # prompts, per-class results, regions (the edge lists 20 regions a class by default)
MESSAGE_FIELDS = frozenset({"last_error"})
ELLIPSIS = "\u2026"


def clip(text: str, limit: int) -> str:
    """`text`, or its first limit-1 characters and an ellipsis when it is longer than `limit`."""
    return text if len(text) <= limit else text[: limit - 1] + ELLIPSIS


def bounded(data: dict) -> dict:
    """A payload's model_dump with every string clipped (MESSAGE_CHARS for the fields in MESSAGE_FIELDS,
    NAME_CHARS for the rest) and every list cut to MAX_LIST_ITEMS."""
    return {k: _bound(v, k) for k, v in data.items()}


def _bound(value: object, key: str) -> object:
    if isinstance(value, str):
        return clip(value, MESSAGE_CHARS if key in MESSAGE_FIELDS else NAME_CHARS)
    if isinstance(value, dict):
        return bounded(value)
    if isinstance(value, (list, tuple)):
        return [_bound(v, key) for v in value[:MAX_LIST_ITEMS]]
    return value


def id_problem(what: str, value: str) -> str | None:
    """Why an id cannot be taken (too long), or None."""
    if len(value) > MAX_ID_CHARS:
        return f"{what} is {len(value)} characters long, over the {MAX_ID_CHARS}-character limit"
    return None
