"""`make demo`: migrate, seed, then run the web server and one worker together until Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Run distillweb on the embedded default: SQLite, the filesystem broker and one local worker."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", default="8000")
        parser.add_argument("--no-seed", action="store_true")

    def handle(self, *args, host="127.0.0.1", port="8000", no_seed=False, **options):
        settings.ARTIFACT_ROOT.mkdir(parents=True, exist_ok=True)
        call_command("migrate", interactive=False, verbosity=0)
        self.stdout.write("Database ready.")
        if not no_seed:
            call_command("demo_seed")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        processes = [
            subprocess.Popen(
                [sys.executable, "manage.py", "runserver", "--noreload", f"{host}:{port}"], env=env,
                cwd=settings.BASE_DIR,
            ),
            # -B: celery beat in the worker sends the periodic sweeps (silent workers offline, runs whose
            # worker died requeued); the worker consumes the sweeps' queue beside the training queue.
            subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "distillweb", "worker", "-Q",
                 f"{settings.RUN_QUEUE},{settings.FLEET_QUEUE}", "-n", "demo@%h", "--concurrency", "1",
                 "--loglevel", "INFO", "--without-gossip", "--without-mingle",
                 "-B", "--schedule", str(settings.VAR_DIR / "celerybeat-schedule")],
                env=env, cwd=settings.BASE_DIR,
            ),
        ]
        self.stdout.write(self.style.SUCCESS(f"distillweb is up at http://{host}:{port}/ — Ctrl-C stops it."))
        stopping = False

        def stop(*_):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            while not stopping and all(p.poll() is None for p in processes):
                time.sleep(0.5)
        finally:
            for p in processes:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            for p in processes:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
        failed = [p for p in processes if p.returncode not in (0, -signal.SIGTERM, -signal.SIGINT)]
        if failed and not stopping:
            raise SystemExit("The web server or the worker stopped unexpectedly; see the log above.")
        self.stdout.write("Stopped.")
