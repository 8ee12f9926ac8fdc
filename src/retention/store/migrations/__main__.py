"""``python -m retention.store.migrations <alembic command>``: Alembic's command line on the
ledger's migrations without an alembic.ini. ``revision`` numbers the new revision itself
(0004, 0005, ...) unless ``--rev-id`` is given; commands that reach a database use
``-x url=<SQLAlchemy URL>``, else the configured ledger (``retention.config.ledger_url``)."""

from __future__ import annotations

import sys

from alembic.config import CommandLine

from retention.store import migrations


def main(argv: list[str] | None = None) -> int:
    cli = CommandLine(prog="python -m retention.store.migrations")
    options = cli.parser.parse_args(argv)
    if not hasattr(options, "cmd"):
        cli.parser.error("too few arguments")
    fn = options.cmd[0]
    if fn.__name__ == "revision" and not options.rev_id:
        numbers = [int(r) for r in migrations.known_revisions() if r.isdigit()]
        options.rev_id = f"{max(numbers, default=0) + 1:04d}"
    cfg = migrations.alembic_config()
    cfg.cmd_opts = options
    cli.run_cmd(cfg, options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
