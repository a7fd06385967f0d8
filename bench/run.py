"""Run the benchmark scenarios against a set of brokers and write bench/results.json.

    python -m bench.run --quick --repeat 1            # minutes: checks that everything works
    python -m bench.run --repeat 5                    # the real thing
    python -m bench.run --scenario latency --broker postgresql://... --broker redis://...

Brokers alternate run by run (A B C D A B C D ...), so that a slow phase of the machine hits
them all alike rather than one broker's whole series. Each run has its own namespace on its
broker (see bench/brokers.py), removed afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import brokers as brokers_mod  # noqa: E402
from bench import machine, stats  # noqa: E402
from bench.scenarios import SCENARIOS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results.json"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--broker", action="append", metavar="URL",
                    help="broker URL (repeatable); default: " + ", ".join(brokers_mod.DEFAULT_URLS))
    ap.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                    help="scenario to run (repeatable); default: all")
    ap.add_argument("--repeat", type=int, default=3, help="runs per broker and scenario (default 3)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the harness")
    ap.add_argument("--set", action="append", default=[], metavar="SCENARIO.PARAM=VALUE",
                    help="override a scenario parameter, e.g. held_eta.n=20000 (value parsed as JSON)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other scenarios already in the results file (each scenario "
                         "records its own date, commit and repetitions)")
    ap.add_argument("--allow-fsync-off", action="store_true",
                    help="run even if PostgreSQL has fsync off (results are marked invalid)")
    return ap.parse_args(argv)


def overrides(pairs: list[str]) -> dict:
    out: dict[str, dict] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        scenario, _, param = key.partition(".")
        if scenario not in SCENARIOS or not param or not raw:
            raise SystemExit(f"--set {pair!r}: expected SCENARIO.PARAM=VALUE, SCENARIO one of "
                             f"{', '.join(SCENARIOS)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(scenario, {})[param] = value
    return out


def named_brokers(urls: list[str]) -> list[brokers_mod.Broker]:
    result, seen = [], {}
    for url in urls:
        kind = brokers_mod.kind_of(url)
        seen[kind] = seen.get(kind, 0) + 1
        result.append(brokers_mod.Broker(kind if seen[kind] == 1 else f"{kind}-{seen[kind]}", url))
    return result


def check_brokers(candidates, allow_fsync_off: bool):
    """Preflight: keep reachable brokers; refuse PostgreSQL without fsync (numbers would lie)."""
    usable, info, valid = [], {}, True
    for broker in candidates:
        try:
            info[broker.name] = brokers_mod.preflight(broker)
        except Exception as exc:
            print(f"broker {broker.name} unavailable, skipped: {exc}", file=sys.stderr)
            info[broker.name] = {"unavailable": str(exc)}
            continue
        pg = info[broker.name].get("postgresql")
        if pg and pg["fsync"] != "on":
            if not allow_fsync_off:
                raise SystemExit(f"PostgreSQL of {broker.name} runs with fsync={pg['fsync']}: refusing "
                                 "to benchmark (use --allow-fsync-off to run anyway, marked invalid)")
            valid = False
        usable.append(broker)
    return usable, info, valid


def run_scenario(module, params: dict, targets, repeat: int) -> list[dict]:
    runs = []
    for rep in range(repeat):
        for broker in targets:  # alternate brokers run by run
            run = run_once(module, params, broker)
            runs.append(dict(run, broker=broker.name, rep=rep))
            shown = "  ".join(f"{k}={_fmt(v)}" for k, v in run["metrics"].items()) \
                or f"FAILED: {run['error']}"
            print(f"  [{rep + 1}/{repeat}] {broker.name:<10} {run['seconds']:5.1f}s  {shown}", flush=True)
    return runs


def run_once(module, params: dict, broker, attempts: int = 3) -> dict:
    """One run in a fresh environment. A run that failed only because the shared PostgreSQL
    server had no connection slot left (other test suites use it) is tried again."""
    for attempt in range(1, attempts + 1):
        load = os.getloadavg()[0]
        started = time.monotonic()
        metrics, error, trace, details = {}, None, None, None
        try:
            with broker.session() as env:
                metrics = module.run(env, params)
            if isinstance(metrics, tuple):  # (metrics, details): series and records of the run
                metrics, details = metrics
        except Exception as exc:
            trace = traceback.format_exc()
            # A child's error carries its traceback: its last line names the actual exception.
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        run = {"metrics": metrics, "error": error, "traceback": trace, "attempt": attempt,
               "seconds": round(time.monotonic() - started, 1), "loadavg_before": load,
               "loadavg_after": os.getloadavg()[0]}
        if details is not None:
            run["details"] = details
        if error is None or "too many clients" not in trace or attempt == attempts:
            return run
        print(f"  ({broker.name}: PostgreSQL out of connection slots, trying again)", flush=True)
        time.sleep(5)


def summarize(runs: list[dict]) -> dict:
    """Per broker and metric: median, spread, and the ratio of medians to kombu-pg's."""
    values: dict[str, dict[str, list]] = {}
    for run in runs:
        if run["error"] is None:
            for metric, value in run["metrics"].items():
                values.setdefault(run["broker"], {}).setdefault(metric, []).append(value)
    summary = {broker: {metric: stats.summarize(v) for metric, v in metrics.items()}
               for broker, metrics in values.items()}
    reference = summary.get(brokers_mod.REFERENCE, {})
    for metrics in summary.values():
        for metric, s in metrics.items():
            ref = reference.get(metric, {}).get("median")
            s["ratio_to_kombu_pg"] = s["median"] / ref if ref else None
    return summary


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def print_summary(results: dict) -> None:
    for name, scenario in results["scenarios"].items():
        print(f"\n== {name}  (median [min-max], x kombu-pg)")
        summary = scenario["summary"]
        metrics = list(dict.fromkeys(m for per_broker in summary.values() for m in per_broker))
        for metric in metrics:
            cells = []
            for broker, per_broker in summary.items():
                s = per_broker.get(metric)
                if s:
                    ratio = f" x{s['ratio_to_kombu_pg']:.2f}" if s["ratio_to_kombu_pg"] is not None \
                        and broker != brokers_mod.REFERENCE else ""
                    cells.append(f"{broker} {_fmt(s['median'])} [{_fmt(s['min'])}-{_fmt(s['max'])}]{ratio}")
            print(f"  {metric:<28} " + " | ".join(cells))
        for run in scenario["runs"]:
            if run["error"]:
                print(f"  ! {run['broker']} rep {run['rep'] + 1}: {run['error'][:300]}")


def _stop_on_sigterm(signum, frame):
    # As Ctrl-C: unwind, so that every worker, producer and server started so far is stopped
    # by the block that started it, instead of being left running.
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    mode = "quick" if args.quick else "full"
    sets = overrides(args.set)
    candidates = named_brokers(args.broker or brokers_mod.DEFAULT_URLS)
    usable, broker_info, valid = check_brokers(candidates, args.allow_fsync_off)
    results = {
        "meta": {"mode": mode, "repeat": args.repeat, "valid": valid, "argv": sys.argv[1:],
                 "machine": machine.describe(), "brokers": broker_info,
                 "broker_urls": {b.name: b.url for b in candidates}},
        "scenarios": {},
    }
    if args.merge and args.out.exists():
        earlier = json.loads(args.out.read_text())
        for scenario in earlier["scenarios"].values():  # written before scenarios recorded these
            scenario.setdefault("repeat", earlier["meta"]["repeat"])
            scenario.setdefault("date", earlier["meta"]["machine"]["date"])
            scenario.setdefault("commit", earlier["meta"]["machine"]["git"])
        results["scenarios"] = earlier["scenarios"]
        results["meta"]["valid"] = valid and earlier["meta"].get("valid", True)
    for name in args.scenario or list(SCENARIOS):
        module = SCENARIOS[name]
        params = {**module.PARAMS[mode], **sets.get(name, {})}
        targets = [b for b in usable if module.KINDS is None or b.kind in module.KINDS]
        print(f"\n# {name} {json.dumps(params)}", flush=True)
        if not targets:
            print("  no broker of the kinds it needs: skipped")
            continue
        started = time.time()
        runs = run_scenario(module, params, targets, args.repeat)
        results["scenarios"][name] = {
            "doc": (module.__doc__ or "").strip(), "params": params, "repeat": args.repeat,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(started)),
            "commit": results["meta"]["machine"]["git"],
            "brokers": [b.name for b in targets], "seconds": round(time.time() - started, 1),
            "runs": runs, "summary": summarize(runs)}
        # Servers a scenario started for itself (the soak's PostgreSQL): kept with the scenario,
        # so that merging other scenarios later does not lose them.
        servers = {r["broker"]: r["details"]["server"] for r in runs if "server" in r.get("details", {})}
        if servers:
            results["scenarios"][name]["servers"] = servers
        results["meta"]["machine"]["loadavg_at_end"] = os.getloadavg()
        args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")  # after each scenario
    print_summary(results)
    print(f"\nresults: {args.out}" + ("" if valid else "  (INVALID: fsync off)"))
    failed = any(r["error"] for s in results["scenarios"].values() for r in s["runs"])
    return 1 if failed or len(usable) < len(candidates) else 0


if __name__ == "__main__":
    sys.exit(main())
