"""The HTML pages: usable without JavaScript (links, GET filters, POST forms answered by a
redirect), bulk actions behind a confirmation page."""
from __future__ import annotations

import dataclasses

from flask import (Blueprint, current_app, flash, g, redirect, render_template, request,
                   url_for)

from ..admin import Filter
from ..reasons import REASONS
from . import params, security
from .data import RATE_EVENTS, Console, NotFound

blueprint = Blueprint("pages", __name__)


def console() -> Console:
    return current_app.extensions["kombu_pg"]


def access() -> security.Access:
    return current_app.extensions["kombu_pg.access"]


@blueprint.get("/")
def index():
    return redirect(url_for("pages.queues"))


@blueprint.route("/login", methods=["GET", "POST"])
def login():
    if not access().token:
        return redirect(url_for("pages.queues"))
    error = None
    if request.method == "POST":
        if access().check_token(request.form.get("token", "")):
            access().log_in()
            security.log_action("session", request, "logged in")
            target = request.args.get("next") or ""
            # Only a path of this site: never an absolute URL taken from the request.
            return redirect(target if target.startswith("/") and not target.startswith("//")
                            else url_for("pages.queues"))
        error = "wrong token"
        security.log_action("anonymous", request, "failed login (wrong token)")
    return render_template("login.html", error=error), 401 if error else 200


@blueprint.post("/logout")
def logout():
    from flask import session
    session.clear()
    return redirect(url_for("pages.login"))


@blueprint.get("/queues")
def queues():
    show_all = request.args.get("all") == "1"
    data = console().queues()
    shown = [q for q in data["queues"] if show_all or not q["celery_internal"]]
    return render_template("queues.html", data=data, shown=shown, hidden=len(data["queues"]) - len(shown),
                           show_all=show_all, events=RATE_EVENTS)


@blueprint.get("/dead-letters")
def dead_letters():
    filter = params.dead_letter_filter(request.args)
    after, limit = params.page(request.args)
    page = console().dead_letters(filter, after=after, limit=limit)
    return render_template("dead_letters.html", page=page, filter=filter, reasons=REASONS,
                           tasks=console().dead_letter_tasks(), args=params.filter_args(filter),
                           after=after, limit=limit)


@blueprint.get("/dead-letters/<int:dead_letter_id>")
def dead_letter(dead_letter_id: int):
    return render_template("dead_letter.html", letter=console().dead_letter(dead_letter_id))


def _action_target(source) -> tuple[str, Filter, str]:
    """(action, filter, description) of a replay/purge request: one id, or a filter."""
    action = source.get("action")
    if action not in ("replay", "purge"):
        raise params.BadInput(f"unknown action {action!r}: replay or purge")
    if source.get("id"):
        dead_letter_id = params.integer(source, "id", 0, minimum=1)
        console().dead_letter(dead_letter_id)  # NotFound if there is none
        return action, Filter(ids=[dead_letter_id], replayed=False if action == "replay" else None), \
            f"dead letter {dead_letter_id}"
    filter = params.dead_letter_filter(source)
    described = ", ".join(f"{k} = {v}" for k, v in params.filter_args(filter).items())
    return action, filter, f"dead letters matching {described}"


@blueprint.get("/dead-letters/confirm")
def confirm():
    if not access().writable:
        return redirect(url_for("pages.dead_letters"))
    action, filter, described = _action_target(request.args)
    if action == "replay" and filter.replayed is not False:
        filter = dataclasses.replace(filter, replayed=False)  # only those not replayed yet
    hidden = {k: v for k, v in request.args.items() if k in params.DEAD_LETTER_PARAMS + ("id",)}
    return render_template("confirm.html", action=action, described=described, hidden=hidden,
                           count=console().count(filter))


@blueprint.post("/dead-letters/action")
def dead_letters_action():
    action, filter, described = _action_target(request.form)
    if action == "replay":
        done = console().replay(filter)
    else:
        done = console().purge(filter)
    security.log_action(g.who, request, f"{action} of {described}", done)
    flash(f"{'replayed' if action == 'replay' else 'purged'} {done} dead letter(s) ({described})")
    return redirect(url_for("pages.dead_letters", **({} if filter.ids else params.filter_args(filter))))


@blueprint.get("/beat")
def beat():
    return render_template("beat.html", data=console().beat())


@blueprint.post("/beat/<name>/<action>")
def beat_action(name: str, action: str):
    if action not in ("pause", "resume", "run"):
        raise params.BadInput(f"unknown action {action!r}: pause, resume or run")
    if action == "run":
        try:
            task_id = console().run_now(name)
        except ValueError as exc:
            raise params.BadInput(str(exc)) from None
        flash(f"sent {name} now (task {task_id})")
    else:
        console().set_paused(name, action == "pause")
        flash(f"{'paused' if action == 'pause' else 'resumed'} {name}")
    security.log_action(g.who, request, f"beat {action} {name!r}")
    return redirect(url_for("pages.beat"))


@blueprint.get("/workers")
def workers():
    return render_template("workers.html", data=console().workers())


@blueprint.get("/tasks")
def tasks():
    task_id = (request.args.get("id") or "").strip()
    if not task_id:
        return render_template("task.html", task_id="", task=None, missing=None)
    try:
        task = console().task(task_id)
        missing = None
    except NotFound as exc:
        task, missing = None, str(exc.args[0])
    return render_template("task.html", task_id=task_id, task=task, missing=missing), 404 if missing else 200
