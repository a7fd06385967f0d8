"""``kombu-pg metrics``: the broker's Prometheus exporter (needs the ``metrics`` extra)."""
from __future__ import annotations

import click

from .common import target, target_options


@click.command("metrics", help="Serve Prometheus metrics of the broker on /metrics: per queue ready, "
                                "delayed and leased messages, oldest ready age; dead letters by reason.")
@click.option("--port", type=click.IntRange(0, 65535), default=9808, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: all interfaces).")
@target_options
@click.pass_context
def metrics_command(ctx: click.Context, port: int, host: str) -> None:
    where = target(ctx)
    where.admin()  # a broken URL fails here, in one line
    try:
        from .. import metrics as exporter
    except ImportError as exc:
        raise click.ClickException(f"{exc}: install the extra, pip install 'kombu-pg[metrics]'") from None
    try:
        exporter.serve_forever(where.url, where.schema, port=port, host=host, echo=click.echo)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None
