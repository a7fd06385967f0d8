"""The README's benchmark section and plots, from bench/results.json.

    python -m bench.report [--results bench/results.json] [--readme README.md]

Replaces the text between <!-- bench:start --> and <!-- bench:end --> in the README; without
those markers the section is printed to stdout and the README is left alone. Writes
bench/throughput.png, bench/latency.png and (with soak results) bench/soak.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/report.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.brokers import REFERENCE  # noqa: E402

HERE = Path(__file__).resolve().parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
THROUGHPUT_PNG, LATENCY_PNG, SOAK_PNG = HERE / "throughput.png", HERE / "latency.png", HERE / "soak.png"


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and abs(value) < 100:
        return f"{value:.3g}"
    return f"{value:,.0f}"


def cell(s: dict, broker: str) -> str:
    text = f"{fmt(s['median'])}"
    if s["n"] > 1:
        text += f" [{fmt(s['min'])}–{fmt(s['max'])}]"
    ratio = s.get("ratio_to_kombu_pg")
    if broker != REFERENCE and ratio is not None:
        text += f" (×{ratio:.2f})"
    return text


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def scenario_table(scenario: dict) -> list[str]:
    summary = scenario["summary"]
    brokers = [b for b in scenario["brokers"] if b in summary]
    metrics = list(dict.fromkeys(m for b in brokers for m in summary[b]))  # the scenario's order
    rows = [[f"`{m}`"] + [cell(summary[b][m], b) if m in summary[b] else "–" for b in brokers]
            for m in metrics]
    lines = table(["metric"] + brokers, rows)
    failed = [r for r in scenario["runs"] if r["error"]]
    for run in failed:
        lines.append(f"\nFailed: {run['broker']} run {run['rep'] + 1}: `{run['error'][:200]}`")
    return lines


def limit_table(results: dict) -> list[str]:
    """kombu-pg's Python path against the same SQL run by pgbench, measured side by side."""
    scenario = results["scenarios"].get("pgbench_limit", {})
    limit = scenario.get("summary", {}).get(REFERENCE)
    if not limit:
        return []

    def median(metric):
        return limit.get(metric, {}).get("median")

    clients = scenario["params"]["clients"]
    # Kombu's consumer claims up to its prefetch (100) per statement and batches acks: the
    # matching SQL is the batched script; claim1_ack is the floor without any batching. One
    # producer or consumer runs its statements one at a time: its match is pgbench's 1 client.
    rows = []
    for what, path, script in (("publish, one producer", "publish", "insert_routed"),
                               ("consume+ack, one consumer", "consume", "claim100_ack")):
        transport, share = median(f"{path}.kombu_msgs_per_s"), median(f"{path}.share")
        wide = median(f"{script}.c{clients}.msgs_per_s")
        rows.append([what, fmt(transport), f"`{script}`: {fmt(median(f'{script}.c1.msgs_per_s'))}",
                     f"{share:.0%}" if share else "–", fmt(wide),
                     f"{transport / wide:.0%}" if transport and wide else "–"])
    return ["kombu-pg through Kombu against its own statements run by pgbench, in the same runs "
            "(messages/s; shares are medians of each run's share):", ""] + \
        table(["path", "kombu-pg", "pgbench, 1 client", "transport / pgbench",
               f"pgbench, {clients} clients", f"transport / {clients} clients"], rows)


def targets_table(results: dict) -> list[str]:
    """Each performance target, the figure it is judged on, and whether it was met."""
    scenarios = results["scenarios"]

    def median(scenario, metric, broker=REFERENCE):
        s = scenarios.get(scenario, {}).get("summary", {}).get(broker, {}).get(metric)
        return s["median"] if s else None

    def ratio(a, b):
        return a / b if a and b else None

    def row(target, figure, met):
        return [target, figure, "–" if met is None else ("met" if met else "**missed**")]

    rows = []
    e2e = ratio(median("celery_e2e", "prefork.tasks_per_s"), median("celery_e2e", "prefork.tasks_per_s", "redis"))
    stretch = ratio(median("celery_e2e", "prefork.tasks_per_s"),
                    median("celery_e2e", "prefork.tasks_per_s", "rabbitmq"))
    rows.append(row("Celery prefork -c 2 tasks/s ≥ 1.0× Redis",
                    f"{fmt(median('celery_e2e', 'prefork.tasks_per_s'))} tasks/s, "
                    f"{fmt(e2e)}× Redis", None if e2e is None else e2e >= 1.0))
    rows.append(row("(stretch) Celery prefork -c 2 tasks/s ≥ 1.0× RabbitMQ", f"{fmt(stretch)}× RabbitMQ",
                    None if stretch is None else stretch >= 1.0))
    p50, p99 = median("celery_e2e", "prefork.start_p50_ms"), median("celery_e2e", "prefork.start_p99_ms")
    rows.append(row("Idle publish-to-start (prefork) p50 ≤ 3 ms, p99 ≤ 15 ms",
                    f"p50 {fmt(p50)} ms, p99 {fmt(p99)} ms (Redis, same run: p50 "
                    f"{fmt(median('celery_e2e', 'prefork.start_p50_ms', 'redis'))} ms, p99 "
                    f"{fmt(median('celery_e2e', 'prefork.start_p99_ms', 'redis'))} ms)",
                    None if p50 is None or p99 is None else p50 <= 3 and p99 <= 15))
    consume = median("kombu_consume", "msgs_per_s")
    vs_sqla, vs_redis = ratio(consume, median("kombu_consume", "msgs_per_s", "sqla")), \
        ratio(consume, median("kombu_consume", "msgs_per_s", "redis"))
    rows.append(row("Kombu consume+ack ≥ 10× SQLAlchemy transport and ≥ Redis",
                    f"{fmt(consume)} msgs/s: {fmt(vs_sqla)}× SQLAlchemy, {fmt(vs_redis)}× Redis",
                    None if vs_sqla is None or vs_redis is None else vs_sqla >= 10 and vs_redis >= 1))
    deep = next((v["median"] for k, v in scenarios.get("deep_queue", {}).get("summary", {})
                 .get(REFERENCE, {}).items() if k.startswith("ratio_")), None)
    rows.append(row("Deep queue: 1M waiting within 20% of 1k", f"{fmt(deep)}× the 1k rate",
                    None if deep is None else deep >= 0.8))
    growth = median("held_eta", "rss_growth_mb")
    n = scenarios.get("held_eta", {}).get("params", {}).get("n")
    rows.append(row(f"Held ETA tasks ({fmt(n)}): worker memory growth < 20 MB", f"{fmt(growth)} MB",
                    None if growth is None else growth < 20))
    for what, path in (("publish", "publish"), ("consume+ack", "consume")):
        share = median("pgbench_limit", f"{path}.share")
        rows.append(row(f"{what} ≥ 50% of pgbench running the same statements (1 client, same runs)",
                        f"{share:.0%}" if share else "–", None if share is None else share >= 0.5))
    four = ratio(median("producers", "prefork.p4.tasks_per_s"),
                 median("producers", "prefork.p4.tasks_per_s", "rabbitmq"))
    rows.append(row("4 producers, prefork -c 2: Celery tasks/s ≥ 1.0× RabbitMQ",
                    f"{fmt(median('producers', 'prefork.p4.tasks_per_s'))} tasks/s, {fmt(four)}× RabbitMQ",
                    None if four is None else four >= 1.0))
    per, cpu = median("idle", "server_tx_rate_per_consumer"), median("idle", "server_cpu_pct_of_core")
    consumers = scenarios.get("idle", {}).get("params", {}).get("consumers")
    rows.append(row(f"Idle: ≤ 0.2 server transactions/s per idle consumer; {fmt(consumers)} idle "
                    "consumers cost the server < 5% of a core",
                    f"{fmt(per)} transactions/s per consumer, {fmt(cpu)}% of a core",
                    None if per is None or cpu is None else per <= 0.2 and cpu < 5))
    return table(["target", "measured (medians)", ""], rows + soak_targets(scenarios.get("soak", {})))


def soak_targets(scenario: dict) -> list[list[str]]:
    """The soak's targets hold for every window: judged on kombu-pg's worst run."""
    summary = scenario.get("summary", {})

    def worst(metric, broker=REFERENCE, low=True):
        s = summary.get(broker, {}).get(metric)
        return None if s is None else s["min"] if low else s["max"]

    def verdict(ok):
        return "–" if ok is None else ("met" if ok else "**missed**")

    rate = summary.get(REFERENCE, {}).get("offered_per_s", {}).get("median")
    fraction = scenario.get("params", {}).get("fraction", 0.6)
    others = [b for b in scenario.get("brokers", []) if b != REFERENCE and b in summary]

    def beside(metric, unit="", low=True):  # the other brokers' worst runs, for comparison
        cells = [f"{b} {fmt(worst(metric, b, low))}{unit}" for b in others]
        return f" ({', '.join(cells)})" if cells else ""

    ratio = worst("min_consumed_ratio")
    p99 = worst("max_p99_ms", low=False)
    size, backlog = worst("final_table_mb", low=False), worst("final_backlog", low=False)
    updates, hot = worst("table_updates", low=False), worst("hot_ratio")
    hot_ok = None if updates is None else updates == 0 or (hot is not None and hot >= 0.95)
    return [
        [f"Soak at {fraction:.0%} of kombu-pg's burst capacity: every window consumes ≥ 98% of what was offered",
         f"{fmt(rate)} tasks/s offered, lowest window {fmt(ratio)}" + beside("min_consumed_ratio"),
         verdict(None if ratio is None else ratio >= 0.98)],
        ["Soak: publish-to-start p99 ≤ 50 ms in every window",
         f"highest window p99 {fmt(p99)} ms" + beside("max_p99_ms", " ms", low=False),
         verdict(None if p99 is None else p99 <= 50)],
        ["Soak: `messages` table + indexes ≤ 30 MB at the end (backlog drained to < 100 tasks)",
         f"{fmt(size)} MB, backlog {fmt(backlog)}",
         verdict(None if size is None else size <= 30 and backlog is not None and backlog < 100)],
        ["Soak: the claim path makes HOT updates (≥ 95% HOT) or none",
         f"{fmt(updates)} updates, {'–' if hot is None else f'{hot:.0%}'} HOT", verdict(hot_ok)],
    ]


def machine_lines(meta: dict, scenarios: dict) -> list[str]:
    m = meta["machine"]
    rows = [["date (UTC)", m["date"]], ["CPU", f"{m['cpu']}, {m['cores']} cores"],
            ["memory", f"{m['memory_gb']} GB"], ["OS", m["os"]], ["Python", m["python"]],
            ["packages", ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v)],
            ["kombu-pg commit", f"{m['git']['commit']}" + (" + uncommitted transport changes"
                                                         if m["git"]["transport_modified"] else "")],
            ["load average (1/5/15 min) at start / end",
             f"{' '.join(f'{x:.2f}' for x in m['loadavg_at_start'])} / "
             f"{' '.join(f'{x:.2f}' for x in m.get('loadavg_at_end', []))}"]]
    for name, info in meta["brokers"].items():
        if "postgresql" in info:
            pg = info["postgresql"]
            text = (f"PostgreSQL {pg['server_version']}: fsync={pg['fsync']}, synchronous_commit="
                    f"{pg['synchronous_commit']}, wal_sync_method={pg['wal_sync_method']}, "
                    f"shared_buffers={pg['shared_buffers']}")
        elif "redis_version" in info:
            text = (f"Redis {info['redis_version']}: appendonly={info.get('appendonly')}, "
                    f"appendfsync={info.get('appendfsync')}, save='{info.get('save')}'")
        elif "rabbitmq_version" in info:
            text = f"RabbitMQ {info['rabbitmq_version']}"
        else:
            text = f"unavailable: {info.get('unavailable')}"
        rows.append([f"broker `{name}`", text])
    return table(["", ""], rows + server_rows(scenarios))


def server_rows(scenarios: dict) -> list[list[str]]:
    """Servers a scenario started for itself, with their version and settings."""
    rows = []
    for scenario_name, scenario in scenarios.items():
        for broker, info in scenario.get("servers", {}).items():
            settings = ", ".join(f"{k}={v}" for k, v in info.items()
                                 if k not in ("server_version", "started_by", "messages_reloptions"))
            table_options = ", ".join(info.get("messages_reloptions") or []) or "none"
            rows.append([f"`{broker}` in {scenario_name}",
                         f"PostgreSQL {info['server_version']}, started by {info['started_by']}: "
                         f"{settings}; `messages` table options: {table_options}"])
    return rows


METHOD = """\
Every scenario runs against each broker in turn, alternating broker by broker (A B C D A B C D
...) for the repetitions given with each scenario, so that slow phases of the machine hit all
brokers alike.
Each run gets a namespace of its own that is removed afterwards (a PostgreSQL schema for
kombu-pg, a database for the SQLAlchemy transport, a dedicated Redis database, tagged queue and
exchange names on RabbitMQ). Producers and consumers are separate, freshly spawned Python
processes; connecting is not timed. Messages are small (~100-byte JSON bodies), persistent, sent
through a durable direct exchange as Celery sends them. Tables show the median over the
repetitions, [min–max] when there were several, and (×r) the ratio of the broker's median to
kombu-pg's (for throughputs, above 1 is faster than kombu-pg; for latencies and memory, above 1
is more). Durability differs by design: kombu-pg and the SQLAlchemy transport commit every
publish and ack durably to PostgreSQL (settings below; fsync must be on or the harness refuses
to run; kombu-pg's lease claims and renewals alone skip the flush wait, since losing them only
redelivers);
RabbitMQ stores persistent messages without publisher confirms; Redis persists per its own
settings below.
Two scenarios load a real `celery worker` for longer or from many sides: `producers` (4 and 16
publisher processes at once into one prefork -c 2 or threads -c 8 worker) and `soak` (a fixed
rate, 60% of kombu-pg's burst capacity, offered to every broker alike for minutes, measured
window by window). The soak's kombu-pg runs on a PostgreSQL server the bench starts itself with
stock settings (autovacuum on, fsync on), not on the server named above, since what a long run
leaves in the table depends on autovacuum; that server's version and settings are in the
machine table."""


def section(results: dict) -> str:
    meta = results["meta"]
    out = [f"Generated by `python -m bench.report` from `bench/results.json` "
           f"({meta['mode']} sizes; repetitions, date and commit per scenario below); "
           f"rerun with `python -m bench.run --repeat 5 && python -m bench.report`."]
    if not meta.get("valid", True):
        out += ["", "**These results are invalid: PostgreSQL ran with fsync off.**"]
    out += ["", "### Method", "", METHOD, ""]
    # Anything done to the results file by hand (a scenario re-run and merged) is said here.
    out += [f"Note: {note}." for note in meta.get("notes", [])]
    out += ["", "### Targets", ""] + targets_table(results)
    out += ["", "### Machine", ""]
    out += machine_lines(meta, results["scenarios"])
    out += ["", "### Results", "", "![throughput](bench/throughput.png)", "",
            "![latency](bench/latency.png)"]
    for name, scenario in results["scenarios"].items():
        # The scenario's docstring says what it measures; its first line starts with its name.
        first, *rest = scenario["doc"].split("\n\n")
        summary = first.split(":", 1)[-1].strip()
        out += ["", f"#### {name}", "", summary[:1].upper() + summary[1:]]
        for paragraph in rest:
            out += ["", paragraph]
        out += ["", "Parameters: " + ", ".join(f"`{k}={v}`" for k, v in scenario["params"].items())
                + provenance(scenario, meta), ""]
        out += scenario_table(scenario)
        if name == "pgbench_limit":
            out += [""] + limit_table(results)
        if name == "soak":
            out += ["", "![soak](bench/soak.png)", ""] + soak_windows_table(scenario)
    return "\n".join(out) + "\n"


def last_runs(scenario: dict) -> dict[str, dict]:
    """Each broker's last successful run that has per-window series."""
    runs = {}
    for run in scenario["runs"]:
        if run["error"] is None and run.get("details", {}).get("windows"):
            runs[run["broker"]] = run
    return runs


def soak_windows_table(scenario: dict) -> list[str]:
    runs = last_runs(scenario)
    if not runs:
        return []
    header = ["window end (min)"]
    for broker, run in runs.items():
        header += [f"{broker}: started/s (offered)", "p99 ms"]
        if "table_mb" in run["details"]["windows"][0]:
            header += ["`messages` MB", "dead tuples", "HOT", "autovacuums"]
    rows = []
    for k, first in enumerate(next(iter(runs.values()))["details"]["windows"]):
        row = [fmt(first["end_s"] / 60)]
        for run in runs.values():
            w = run["details"]["windows"][k]
            row += [f"{fmt(w['consumed_per_s'])} ({fmt(w['offered_per_s'])})", fmt(w["p99_ms"])]
            if "table_mb" in w:
                row += [fmt(w["table_mb"]), fmt(w["dead_tuples"]),
                        "–" if w["hot_ratio"] is None else f"{w['hot_ratio']:.0%}", fmt(w["autovacuum_runs"])]
        rows.append(row)
    return ["Per window, each broker's last run:", ""] + table(header, rows)


# -- plots ------------------------------------------------------------------------------------

def bars(results: dict, picks: list[tuple[str, str]], path: Path, ylabel: str, title: str) -> bool:
    """Grouped bars, one group per (scenario, metric), one bar per broker, min-max as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = [(s, m) for s, m in picks if any(m in b for b in results["scenarios"][s]["summary"].values())]
    if not picks:
        return False
    brokers = list(dict.fromkeys(b for s, _ in picks for b in results["scenarios"][s]["summary"]))
    width = 0.8 / len(brokers)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(picks) + 2), 4.5))
    for i, broker in enumerate(brokers):
        xs, ys, lo, hi = [], [], [], []
        for x, (scenario, metric) in enumerate(picks):
            s = results["scenarios"][scenario]["summary"].get(broker, {}).get(metric)
            if s and s["median"] > 0:
                xs.append(x + (i - (len(brokers) - 1) / 2) * width)
                ys.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=broker)
    ax.set_xticks(range(len(picks)))
    ax.set_xticklabels([f"{s}\n{m}" for s, m in picks], rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def soak_plot(scenario: dict, path: Path) -> bool:
    """The soak's per-window series: consumed rate, p99 latency, kombu-pg's table and dead tuples."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in scenario.get("runs", []) if r["error"] is None and r.get("details", {}).get("windows")]
    if not runs:
        return False
    panels = [("consumed_per_s", "tasks started per second (dashed: offered)"),
              ("p99_ms", "publish-to-start p99 (ms)"),
              ("table_mb", "kombu-pg: `messages` table + indexes (MB)"), ("dead_tuples", "kombu-pg: dead tuples")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    colours = {}
    for run in runs:
        first = run["broker"] not in colours  # one legend entry per broker
        colour = colours.setdefault(run["broker"], f"C{len(colours)}")
        windows = run["details"]["windows"]
        minutes = [w["end_s"] / 60 for w in windows]
        for ax, (key, _) in zip(axes.flat, panels):
            points = [(m, w[key]) for m, w in zip(minutes, windows) if w.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, color=colour,
                        label=run["broker"] if first else None)
        axes.flat[0].plot(minutes, [w["offered_per_s"] for w in windows], linestyle="--", color=colour, alpha=0.5)
    for ax, (_, title) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    for ax in axes[1]:
        ax.set_xlabel("minutes (window ends)")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Soak at a fixed rate, per {scenario['params']['window']} s window "
                 "(kombu-pg on a bench-started PostgreSQL, stock settings)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def provenance(scenario: dict, meta: dict) -> str:
    """Repetitions, date and commit of the run a scenario's numbers come from."""
    repeat = scenario.get("repeat", meta["repeat"])
    git = scenario.get("commit") or meta["machine"]["git"]
    date = scenario.get("date") or meta["machine"]["date"]
    modified = " + uncommitted transport changes" if git["transport_modified"] else ""
    return f"; {repeat} repetition(s), run {date} at commit {git['commit']}{modified}."


def plot(results: dict) -> list[Path]:
    scenarios = results["scenarios"]
    metrics = {name: list(dict.fromkeys(m for b in s["summary"].values() for m in b))
               for name, s in scenarios.items()}
    throughput = [(name, m) for name, ms in metrics.items() if name not in ("pgbench_limit", "soak")
                  for m in ms if m.endswith(("msgs_per_s", "tasks_per_s"))]
    latency = [(name, m) for name, ms in metrics.items() if name in ("latency", "celery_e2e")
               for m in ms if m.endswith(("_p50_ms", "_p99_ms"))]
    written = []
    if bars(results, throughput, THROUGHPUT_PNG, "messages or tasks per second (log)",
            "Throughput (median, min–max)"):
        written.append(THROUGHPUT_PNG)
    if bars(results, latency, LATENCY_PNG, "milliseconds (log)", "Latency (median over runs, min–max)"):
        written.append(LATENCY_PNG)
    if "soak" in scenarios and soak_plot(scenarios["soak"], SOAK_PNG):
        written.append(SOAK_PNG)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=HERE / "results.json")
    ap.add_argument("--readme", type=Path, default=HERE.parent / "README.md")
    args = ap.parse_args(argv)
    results = json.loads(args.results.read_text())
    for path in plot(results):
        print(f"wrote {path}", file=sys.stderr)
    text = section(results)
    readme = args.readme.read_text() if args.readme.exists() else ""
    if START in readme and END in readme and readme.index(START) < readme.index(END):
        before, rest = readme.split(START, 1)
        after = rest.split(END, 1)[1]
        args.readme.write_text(f"{before}{START}\n{text}{END}{after}")
        print(f"updated the benchmark section of {args.readme}", file=sys.stderr)
    else:
        print(text)
        print(f"{args.readme} has no {START} ... {END} markers: section printed above, README "
              "left unchanged", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
