"""`make demo`: migrate, seed, then run the web server and two workers together until Ctrl-C.

One worker trains (the run queue, one run at a time); a second, small one consumes FLEET_QUEUE and runs celery
beat, so the periodic sweeps (silent workers offline, lost runs requeued) run while a run trains instead of
queueing behind it.
"""

import os
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.utils.crypto import get_random_string


def write_demo_env(path: Path) -> str:
    """The demo's SECRET_KEY, generated into ``path`` (mode 0600) on first use and kept afterwards.

    Settings read the file on the embedded default database, so the README's `manage.py` and `celery`
    commands work on the demo's data without DEBUG=true.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        path.chmod(0o600)
    else:
        with os.fdopen(fd, "w") as f:
            f.write("# Written by `make demo` for the demo's embedded setup; `make clean-demo` removes it.\n"
                    # Letters and digits only: nothing the env-file parser quotes, strips or interpolates ($).
                    f"SECRET_KEY={get_random_string(64, string.ascii_letters + string.digits)}\n")
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == "SECRET_KEY":
            return value.strip()
    raise SystemExit(f"{path} has no SECRET_KEY line; delete the file and start the demo again.")


def process_plan(*, host: str, port: str) -> list[tuple[list[str], dict[str, str]]]:
    """The demo's processes, each with the environment it adds: the web server, the training worker, and the
    fleet worker with celery beat."""
    celery = [sys.executable, "-m", "celery", "-A", "distillweb", "worker", "--concurrency", "1",
              "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    return [
        # Django's "This is a development server" banner: known, and the demo is one.
        ([sys.executable, "manage.py", "runserver", "--noreload", f"{host}:{port}"],
         {"DJANGO_RUNSERVER_HIDE_WARNING": "true"}),
        # Trains one run at a time and takes one message at a time, so queued runs stay in the queue.
        ([*celery, "-Q", settings.RUN_QUEUE, "-n", "demo@%h", "--prefetch-multiplier", "1"], {}),
        # -B: celery beat sends the periodic sweeps to FLEET_QUEUE, which only this worker consumes, so a
        # sweep runs within seconds even while the training worker is busy for minutes. It trains nothing:
        # no warm-up of the training imports.
        ([*celery, "-Q", settings.FLEET_QUEUE, "-n", "demo-fleet@%h",
          "-B", "--schedule", str(settings.VAR_DIR / "celerybeat-schedule")],
         {"WORKER_WARMUP": "0"}),
    ]


class Command(BaseCommand):
    help = "Run distillweb on the embedded default: SQLite, the filesystem broker and local workers."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", default="8000")
        parser.add_argument("--no-seed", action="store_true")

    def handle(self, *args, host="127.0.0.1", port="8000", no_seed=False, **options):
        settings.ARTIFACT_ROOT.mkdir(parents=True, exist_ok=True)
        secret_key = write_demo_env(settings.DEMO_ENV_FILE)
        self.stdout.write(f"Settings for manage.py and celery commands: {settings.DEMO_ENV_FILE}")
        call_command("migrate", interactive=False, verbosity=0)
        self.stdout.write("Database ready.")
        if not no_seed:
            call_command("demo_seed")
        env = {"SECRET_KEY": secret_key, **os.environ, "PYTHONUNBUFFERED": "1"}
        processes = [subprocess.Popen(argv, env={**env, **extra}, cwd=settings.BASE_DIR)
                     for argv, extra in process_plan(host=host, port=port)]
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
            raise SystemExit("The web server or a worker stopped unexpectedly; see the log above.")
        self.stdout.write("Stopped.")
