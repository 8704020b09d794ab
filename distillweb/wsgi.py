import gc
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distillweb.settings.base")
application = get_wsgi_application()

# What start-up loaded (Django, the apps, URL patterns, models) lives as long as the process: take it out of the
# cyclic garbage collector's view, so that a full collection walks only what requests made (~100k start-up
# objects otherwise cost ~50 ms per full collection, paid by whichever request triggers it).
gc.freeze()
