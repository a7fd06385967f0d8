"""The JSON API under /api/: what the pages show, and the same actions (POST with a JSON body and
the Authorization header). Errors are ``{"error": "...", "status": n}`` with a 4xx status."""
from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify, request

from ..admin import Filter
from . import params, security
from .data import Console, NotFound, to_json

blueprint = Blueprint("api", __name__)


def console() -> Console:
    return current_app.extensions["kombu_pg"]


def _no_params(*allowed: str) -> None:
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        raise params.BadInput(f"unknown parameter {unknown[0]!r}"
                              + (f": this endpoint takes {', '.join(allowed)}" if allowed else
                                 ": this endpoint takes none"))


@blueprint.get("/queues")
def queues():
    _no_params("minutes")
    minutes = params.integer(request.args, "minutes", 60, minimum=1, maximum=24 * 60)
    return jsonify(to_json(console().queues(minutes)))


@blueprint.get("/dead-letters")
def dead_letters():
    filter = params.dead_letter_filter(request.args)
    after, limit = params.page(request.args)
    return jsonify(to_json(console().dead_letters(filter, after=after, limit=limit)))


@blueprint.get("/dead-letters/<dead_letter_id>")
def dead_letter(dead_letter_id: str):
    _no_params()
    if not dead_letter_id.isdigit():
        raise NotFound(f"no dead letter with id {dead_letter_id!r}: ids are whole numbers")
    return jsonify(to_json(console().dead_letter(int(dead_letter_id))))


@blueprint.post("/dead-letters/<action>")
def dead_letters_action(action: str):
    """Body: ``{"ids": [1, 2]}``, or ``{"filter": {"queue": ..., "task": ..., "reason": ...,
    "replayed": "no|yes|all"}}`` (``{"filter": {}}``: all); ``"dry_run": true`` only counts."""
    if action not in ("replay", "purge"):
        raise params.BadInput(f"unknown action {action!r}: replay or purge")
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or set(body) - {"ids", "filter", "dry_run"} or \
            ("ids" in body) == ("filter" in body):
        raise params.BadInput('send {"ids": [...]} or {"filter": {...}} (and optionally "dry_run": true)')
    if "ids" in body:
        ids = body["ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool)
                                                            and i > 0 for i in ids):
            raise params.BadInput("ids must be a non-empty list of dead letter ids (positive integers)")
        filter = Filter(ids=ids, replayed=False if action == "replay" else None)
    else:
        if not isinstance(body["filter"], dict) or not all(isinstance(v, str) for v in body["filter"].values()):
            raise params.BadInput("filter must be an object of strings: queue, task, reason, replayed")
        if set(body["filter"]) - {"queue", "task", "reason", "replayed"}:
            raise params.BadInput("the filter takes queue, task, reason and replayed only")
        filter = params.dead_letter_filter(body["filter"])
    matching = console().count(filter)
    if body.get("dry_run"):
        return jsonify({"action": action, "matching": matching, "done": 0, "dry_run": True})
    done = console().replay(filter) if action == "replay" else console().purge(filter)
    security.log_action(g.who, request, f"API {action} of dead letters ({_describe(filter)})", done)
    return jsonify({"action": action, "matching": matching, "done": done})


@blueprint.get("/beat")
def beat():
    _no_params()
    return jsonify(to_json(console().beat()))


@blueprint.post("/beat/<name>/<action>")
def beat_action(name: str, action: str):
    if action not in ("pause", "resume", "run"):
        raise params.BadInput(f"unknown action {action!r}: pause, resume or run")
    result: dict[str, object]
    if action == "run":
        try:
            result = {"task_id": console().run_now(name)}
        except ValueError as exc:
            raise params.BadInput(str(exc)) from None
    else:
        console().set_paused(name, action == "pause")
        result = {"paused": action == "pause"}
    security.log_action(g.who, request, f"API beat {action} {name!r}")
    return jsonify({"entry": name, "action": action, **result})


@blueprint.get("/workers")
def workers():
    _no_params()
    return jsonify(to_json(console().workers()))


@blueprint.get("/tasks/<task_id>")
def task(task_id: str):
    _no_params()
    return jsonify(to_json(console().task(task_id)))


def _describe(filter: Filter) -> str:
    if filter.ids:
        return "ids " + ", ".join(map(str, filter.ids))
    return ", ".join(f"{k}={v}" for k, v in params.filter_args(filter).items()) or "all"
