"""``manage.py pgpool_stats``: the stats of each alias's pool in this process."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import connections

from pgpool.django.pools import pool_stats


class Command(BaseCommand):
    help = "Print the stats of each database alias's pgpool pool (opening them first with --connect)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--connect",
            action="store_true",
            help="borrow and give back one connection per alias first, so that every pooled alias has its pool",
        )
        parser.add_argument("--json", action="store_true", help="one JSON object, alias -> stats")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["connect"]:
            for connection in connections.all():
                if getattr(connection, "pool", None) is not None:
                    connection.ensure_connection()
                    connection.close()
        stats = pool_stats()
        if options["json"]:
            self.stdout.write(json.dumps(stats, indent=2, sort_keys=True))
            return
        if not stats:
            self.stdout.write(
                "no pool in this process (an alias makes its pool at its first connection; try --connect)"
            )
            return
        for alias, numbers in stats.items():
            self.stdout.write(
                f"{alias}: pool {numbers['name']!r} idle={numbers['idle']} in_use={numbers['in_use']}"
                f" waiting={numbers['waiting']} maxconn={numbers['maxconn']}"
            )
            for key, value in numbers.items():
                if key not in {"name", "idle", "in_use", "waiting", "maxconn"}:
                    self.stdout.write(f"    {key}: {value}")
