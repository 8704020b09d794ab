import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distillweb.settings.base")
application = get_asgi_application()

# A request never waits on a broker that is down or hung: sends give up quickly and the lifecycle sweep sends
# the queued runs later (experiments/broker.py). Workers do not load this module and keep Celery's retries.
from experiments.broker import configure_web_process  # noqa: E402

configure_web_process()

# What start-up loaded (Django, the apps, URL patterns, models) lives as long as the process: take it out of
# the cyclic garbage collector's view, so that a full collection walks only what requests made (~100k start-up
# objects otherwise cost ~50 ms per full collection, paid by whichever request triggers it).
gc.freeze()
