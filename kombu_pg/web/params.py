"""Request parameters, checked: every filter becomes a bound parameter of a fixed statement, and
bad input is refused with one line naming the problem and the fix (400)."""
from __future__ import annotations

from typing import Mapping

from ..admin import Filter
from ..reasons import REASONS

DEAD_LETTER_PARAMS = ("queue", "task", "reason", "replayed", "after", "limit")
REPLAYED = {"no": False, "yes": True, "all": None}
MAX_LIMIT = 500
DEFAULT_LIMIT = 50


class BadInput(ValueError):
    """The request's parameters are wrong: answered with 400 and this message."""


def dead_letter_filter(args: Mapping[str, str], *, strict: bool = True) -> Filter:
    """The filter of a dead letters list or bulk action (queue, task, reason, replayed)."""
    if strict:
        unknown = sorted(set(args) - set(DEAD_LETTER_PARAMS) - {"csrf_token", "action", "id", "confirm"})
        if unknown:
            raise BadInput(f"unknown parameter {unknown[0]!r}: the filters are "
                           f"{', '.join(DEAD_LETTER_PARAMS)}")
    reason = args.get("reason") or None
    if reason is not None and reason not in REASONS:
        raise BadInput(f"unknown reason {reason!r}: one of {', '.join(REASONS)}")
    replayed = args.get("replayed") or "no"
    if replayed not in REPLAYED:
        raise BadInput(f"replayed must be one of {', '.join(REPLAYED)}, not {replayed!r}")
    return Filter(queue=args.get("queue") or None, task=args.get("task") or None, reason=reason,
                  replayed=REPLAYED[replayed])


def page(args: Mapping[str, str]) -> tuple[int, int]:
    """(after, limit): keyset pagination, dead letters with id > after."""
    return (integer(args, "after", 0, minimum=0),
            integer(args, "limit", DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT))


def integer(args: Mapping[str, str], name: str, default: int, *, minimum: int,
            maximum: int | None = None) -> int:
    text = args.get(name)
    if text in (None, ""):
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadInput(f"{name} must be a whole number, not {text!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise BadInput(f"{name} must be {bounds}, not {value}")
    return value


def filter_args(filter: Filter) -> dict[str, str]:
    """The filter as query parameters (for links and hidden form fields)."""
    replayed = {False: "no", True: "yes", None: "all"}[filter.replayed]
    args = {"queue": filter.queue, "task": filter.task, "reason": filter.reason, "replayed": replayed}
    return {k: v for k, v in args.items() if v}
