"""End the sessions of processes that are gone (``server_crash``), keeping their usage."""

from django.core.management.base import BaseCommand

from quotas.sweep import sweep


class Command(BaseCommand):
    help = (
        "Close open sessions whose process stopped sending heartbeats (end reason "
        "server_crash): totals from their records, provisional estimates kept, slots freed."
    )

    def handle(self, *args, **options):
        result = sweep()
        for session_id, client, _slot in result.closed:
            self.stdout.write(f"closed {session_id} ({client}) as server_crash")
        self.stdout.write(self.style.SUCCESS(f"{len(result)} stale sessions closed."))
