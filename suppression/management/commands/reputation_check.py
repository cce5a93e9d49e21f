"""manage.py reputation_check [--report] [--days N]: run the reputation guard now."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from suppression.reputation import reputation_check, reputation_report


def _rate(count: int, handed_over: int) -> str:
    # A day with complaints on earlier days' mail and nothing sent has no rate.
    return f"{count / handed_over * 100:>6.2f}%" if handed_over else f"{'-':>7}"


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
            # Per UTC day: messages handed to the ESP that day, and messages whose bounce
            # or complaint the ESP reported that day (whenever they were sent).
            self.stdout.write(
                "day         source                            handed  bounced   rate  complaints   rate"
            )
            for f in reputation_report(days=options["days"]):
                self.stdout.write(
                    f"{f.day}  {f.kind[:1]}:{f.name[:30]:<30} {f.handed_over:>7} "
                    f"{f.bounced:>7} {_rate(f.bounced, f.handed_over)} "
                    f"{f.complained:>8} {_rate(f.complained, f.handed_over)}"
                )
