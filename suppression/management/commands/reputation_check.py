"""manage.py reputation_check [--report] [--days N]: run the reputation guard now."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from suppression.reputation import reputation_check, reputation_report


class Command(BaseCommand):
    help = "Pause automations and broadcasts over the bounce/complaint limits; --report prints daily figures."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--report", action="store_true", help="Also print per-day figures.")
        parser.add_argument("--days", type=int, default=7, help="Days in the report (default 7).")

    def handle(self, *args: Any, **options: Any) -> None:
        paused = reputation_check()
        for item in paused:
            self.stdout.write(f"paused {item.figures.kind} {item.figures.name!r}: {item.reason}")
        if not paused:
            self.stdout.write("nothing paused")
        if options["report"]:
            self.stdout.write("day         source                          handed  bounce  complaint")
            for f in reputation_report(days=options["days"]):
                self.stdout.write(
                    f"{f.day}  {f.kind[:1]}:{f.name[:30]:<30} {f.handed_over:>7} "
                    f"{f.bounce_rate * 100:>6.2f}% {f.complaint_rate * 100:>8.2f}%"
                )
