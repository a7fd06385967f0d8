"""pgbench_limit: the transport's own statements run by pgbench, with no Python in between.

The scripts are made from kombu_pg/sql/*.sql at run time: every %(name)s placeholder is
replaced by a literal (the values the transport sends for a small message, defaults from
kombu_pg.config.Options) or by a pgbench variable. Each statement runs in its own transaction
(autocommit), as the transport runs them. Scripts:
- insert_direct / insert_routed: publish one message (publish_direct / publish_routed);
- claim1_ack: claim 1 message, then ack it (two commits per message);
- claim100_ack: claim 100, then ack all of them in one statement.
A claim is wrapped in a CTE that aggregates ids and lease tokens into arrays, which pgbench's
\\gset hands to the ack. Claim scripts start from a prefilled, vacuumed queue; messages/s
comes from the row count before and after.

Each script runs with 1 client (what one producer or one consumer process can be compared with:
a Kombu connection runs its statements one after another) and with `clients` (what the server
does with the machine's cores busy).

The transport is measured against that limit in the same place and moment: right between two
1-client pgbench runs of insert_routed, one Kombu producer publishes `publish_n` messages to the
same queue (`publish.*`), and between two of claim100_ack, one Kombu consumer (prefetch 100)
consumes and acks `consume_n` of the same prefilled messages (`consume.*`, timed from its first
delivery, as in deep_queue). `share` is the transport's rate over the mean of the two pgbench
runs around it. The machine's disk-flush speed drifts by tens of percent over minutes, so a
share computed from runs far apart in time would measure the drift. Every timed run, pgbench's
or Kombu's, starts on a freshly vacuumed table: a claim run leaves a hundred thousand dead rows
at the head of the queue, and whichever run came next would pay for skipping them (and for the
autovacuum they set off).
"""
from __future__ import annotations

import base64
import re
import subprocess
import tempfile
from pathlib import Path

from psycopg import sql

from kombu_pg.config import Options
from kombu_pg.store import store_for

from .. import messaging, procs
from .deep_queue import fill_pg

NAME = "pgbench_limit"
KINDS = {"kombu-pg"}
# prefill: enough that the batched claim (tens of thousands of messages/s) never drains it.
PARAMS = {"quick": {"seconds": 2, "clients": 2, "prefill": 300000, "publish_n": 500, "consume_n": 2000},
          "full": {"seconds": 15, "clients": 2, "prefill": 2000000, "publish_n": 20000,
                   "consume_n": 60000}}
#: The pgbench script each Kombu path is measured against (see the module docstring).
PAIRED = {"insert_routed": "publish", "claim100_ack": "consume"}
PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def run(env, p) -> dict:
    queue = env.queue("pgb")
    procs.call(messaging.publish, env.endpoint, queue, 1, timeout=60)  # declares, and a real payload
    with env.sql() as conn:
        payload = conn.execute(sql.SQL("SELECT payload FROM {} WHERE queue = %s").format(env.table()),
                               (queue,)).fetchone()[0]
        literals = values(conn, env, queue, payload)
    statements = store_for(env.schema).sql
    publish = dict(literals, max_attempts="NULL")  # a plain message carries no cap of its own
    scripts = {
        "insert_direct": (render(statements["publish_direct"], publish) + ";", 0),
        "insert_routed": (render(statements["publish_routed"], publish) + ";", 0),
        "claim1_ack": (claim_and_ack(statements, literals, 1), p["prefill"] // 10),  # ~10x slower per message
        "claim100_ack": (claim_and_ack(statements, literals, 100), p["prefill"]),
    }
    metrics = {}
    with tempfile.TemporaryDirectory(prefix="bench-pgbench-") as tmp:
        for name, (script, prefill) in scripts.items():
            path = Path(tmp) / f"{name}.sql"
            path.write_text(script + "\n")
            for clients in sorted({1, p["clients"]}):
                if prefill:
                    fill_pg(env, queue, prefill, 0)
                paired = PAIRED.get(name) if clients == 1 else None
                runs = [limit_run(env, queue, path, clients, p["seconds"])]
                if paired:
                    rate = kombu_rate(env, queue, paired, p[f"{paired}_n"])
                    runs.append(limit_run(env, queue, path, clients, p["seconds"]))
                key = f"{name}.c{clients}"
                for metric in ("tx_per_s", "msgs_per_s", "latency_avg_ms"):
                    metrics[f"{key}.{metric}"] = sum(run[metric] for run in runs) / len(runs)
                if paired:
                    metrics[f"{paired}.kombu_msgs_per_s"] = rate
                    metrics[f"{paired}.share"] = rate / metrics[f"{key}.msgs_per_s"]
                if prefill and not count(env, queue):
                    raise RuntimeError(f"{name} drained the {prefill} prefilled messages: raise prefill")
    return metrics


def limit_run(env, queue: str, script: Path, clients: int, seconds: int) -> dict:
    vacuum(env)
    before = count(env, queue)
    out = pgbench(env.broker.url, script, clients, seconds)
    return {"tx_per_s": out["tps"], "latency_avg_ms": out["latency_ms"],
            "msgs_per_s": abs(count(env, queue) - before) / seconds}


def kombu_rate(env, queue: str, path: str, n: int) -> float:
    """messages/s of one Kombu producer or consumer on the queue pgbench just worked on."""
    vacuum(env)
    if path == "publish":
        result = procs.call(messaging.publish, env.endpoint, queue, n, timeout=60 + n / 20)
        return n / (result["end"] - result["start"])
    before = count(env, queue)
    result = procs.call(messaging.consume, env.endpoint, queue, n, prefetch=100, within=120, timeout=150)
    if before - count(env, queue) != n:
        raise RuntimeError(f"the consumer took {before - count(env, queue)} messages, not {n}")
    # From the first delivery: the declare at consumer start counts the (deep) queue, once.
    return (n - 1) / (result["end"] - result["first"])


def values(conn, env, queue: str, payload: str) -> dict:
    options = Options(schema=env.schema)
    # base64 keeps ':' out of the script, which pgbench would take for variables.
    encoded = base64.b64encode(payload.encode()).decode()
    lit = lambda value: sql.Literal(value).as_string(conn)  # noqa: E731
    return {
        "queue": lit(queue), "exchange": lit(queue), "routing_key": lit(queue),
        "priority": "0", "eta": "NULL", "ttl_ms": "NULL", "task_id": "NULL", "task_name": "NULL",
        "max_attempts": str(options.max_attempts), "default_max_attempts": str(options.max_attempts),
        "unique_key": "NULL", "unique_replace": "false",
        "payload": f"convert_from(decode('{encoded}', 'base64'), 'UTF8')",
        "channel": lit(options.notify_channel), "lease_seconds": str(options.visibility_timeout),
        "ids": ":ids", "tokens": ":tokens",
        # As the transport sends them: no lease held yet, leases committed durably (the default).
        "held": "'{}'", "holder": lit("bench[1]"), "synchronous_commit": lit("on" if options.durable_leases else "off"),
        # The transport NOTIFYs only on a publish more than 5 ms after the previous one to the same
        # destination: in a burst, hardly ever. The limit is the statement without it.
        "notify": "false",
    }


def render(statement: str, literals: dict) -> str:
    def substitute(match):
        if match.group(1) not in literals:
            raise KeyError(f"no value for placeholder %({match.group(1)})s: "
                           "add one to values() in bench/scenarios/pgbench_limit.py")
        return literals[match.group(1)]
    # Comments go: pgbench would take a ':word' in one for a variable.
    code = "\n".join(line for line in statement.splitlines() if not line.lstrip().startswith("--"))
    return PLACEHOLDER.sub(substitute, code).strip()


def claim_and_ack(statements, literals: dict, limit: int) -> str:
    claim = render(statements["claim"], dict(literals, limit=str(limit)))
    return (f"WITH claimed AS (\n{claim}\n)\n"
            "SELECT coalesce(array_agg(id), '{}') AS ids, coalesce(array_agg(lease_token), '{}') AS tokens\n"
            "FROM claimed\n\\gset\n"
            f"{render(statements['ack'], literals)};")


def vacuum(env) -> None:
    with env.sql() as conn:
        conn.execute(sql.SQL("VACUUM {}").format(env.table()))


def count(env, queue: str) -> int:
    with env.sql() as conn:
        return conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE queue = %s").format(env.table()),
                            (queue,)).fetchone()[0]


def pgbench(url: str, script: Path, clients: int, seconds: int) -> dict:
    cmd = ["pgbench", "-n", "-M", "prepared", "-f", str(script), "-c", str(clients),
           "-j", str(clients), "-T", str(seconds), url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    if done.returncode != 0 or (failed and int(failed.group(1))):
        raise RuntimeError(f"pgbench failed ({done.returncode}):\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return {"tps": float(re.search(r"tps = ([\d.]+)", done.stdout).group(1)),
            "latency_ms": float(re.search(r"latency average = ([\d.]+) ms", done.stdout).group(1))}
