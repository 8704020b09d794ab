"""All settings. Values come from the environment (a local ``.env`` file is read for development only).

Production differences come from environment variables, not from a separate settings module.
"""

import os
import warnings
from datetime import timedelta
from pathlib import Path

import environ
from csp.constants import NONE, SELF, UNSAFE_INLINE

from workers.engine.served_teacher import parse_servers

BASE_DIR = Path(__file__).resolve().parent.parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env")  # the OS environment wins over .env

VAR_DIR = Path(env("DISTILLWEB_VAR_DIR", default=str(BASE_DIR / "var")))
# `make demo` writes its generated SECRET_KEY here (mode 0600), so the documented `manage.py` and `celery`
# commands work on the demo's data without DEBUG=true. Read only on the embedded default database (no
# DATABASE_URL), so a deployment never picks up a demo's key; the environment still wins.
DEMO_ENV_FILE = VAR_DIR / "demo.env"
if "DATABASE_URL" not in os.environ and DEMO_ENV_FILE.is_file():
    environ.Env.read_env(DEMO_ENV_FILE)

DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise environ.ImproperlyConfigured("Set SECRET_KEY (or DEBUG=true for local development).")
    SECRET_KEY = "insecure-local-development-key-only-used-with-DEBUG-true-0123456789"
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "experiments",
    "workers",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files, served locally (no CDN)
    "api",
    "csp",
    "axes",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    # Last, as django-axes asks: it turns a lockout into the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "distillweb.urls"
WSGI_APPLICATION = "distillweb.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "experiments.context_processors.team_switcher",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'distillweb.sqlite3'}")}
DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DB_CONN_MAX_AGE", default=60))
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web server and the worker write to the same file: wait for locks instead of failing at once,
    # and take the write lock at BEGIN so two writers never deadlock on an upgrade.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
AUTHENTICATION_BACKENDS = [
    # First: refuses a locked-out login before any password is checked (django-axes).
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "experiments:home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env("STATIC_ROOT", default=str(BASE_DIR / "staticfiles")))
STATICFILES_DIRS = [BASE_DIR / "distillweb" / "static"]
STATICFILES_FINDERS = [
    "django.contrib.staticfiles.finders.FileSystemFinder",
    "django.contrib.staticfiles.finders.AppDirectoriesFinder",
    "distillweb.staticfinders.PlotlyFinder",
]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"
        if not DEBUG
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = DEBUG
if DEBUG:
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # whitenoise serves from finders, but wants the folder

# A shared cache when CACHE_URL names a Redis server (e.g. redis://127.0.0.1:6379/2): sessions are then read
# from it and written through to the database (cached_db), which saves every request its session query.
# Without one, sessions are read from the database only: a per-process cache would keep serving a session
# that another web process has logged out.
if CACHE_URL := env.str("CACHE_URL", default=""):
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": CACHE_URL}}
    SESSION_ENGINE = "django.contrib.sessions.backends.cached_db"

# Uploads: capped so a huge request never reaches the disk.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("DATA_UPLOAD_MAX_MEMORY_SIZE", default=5 * 1024 * 1024)
FILE_UPLOAD_MAX_MEMORY_SIZE = env.int("FILE_UPLOAD_MAX_MEMORY_SIZE", default=5 * 1024 * 1024)

# Security: on by default whenever DEBUG is off. SECURE_SSL_REDIRECT can be turned off behind a proxy that
# terminates TLS and redirects itself.
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=not DEBUG)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=not DEBUG)
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=not DEBUG)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=not DEBUG)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=not DEBUG)
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if env.bool("BEHIND_TLS_PROXY", default=False) else None
)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

# Content-Security-Policy on every response (django-csp 4: https://django-csp.readthedocs.io/en/latest/configuration.html).
# Scripts only from this site (plotly.js is served locally): no inline script or on*= handler, no eval, no
# other origin; Swagger UI (/api/docs/) loads its set-up script from its own view (drf-spectacular's split
# view). Styles also come from this site, plus inline ones: plotly.js injects <style> elements at run time,
# progress bars set their width in a style attribute, and Swagger UI's page has a <style> block; styles cannot
# run code.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF, UNSAFE_INLINE],
        "img-src": [SELF, "data:"],
        "font-src": [SELF],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    },
}

# Login throttling (django-axes: https://django-axes.readthedocs.io/en/latest/4_configuration.html). After
# LOGIN_FAILURE_LIMIT failed logins for the same username from the same address, that pair is locked out for
# LOGIN_COOLOFF_S seconds (the login page answers 429 and says so); a successful login before the limit resets
# the count. Covers the login page and the admin's login (the API takes tokens, not passwords).
AXES_ENABLED = env.bool("LOGIN_THROTTLING", default=True)
AXES_FAILURE_LIMIT = env.int("LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(seconds=env.int("LOGIN_COOLOFF_S", default=900))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_VERBOSE = False

# --- distillweb -----------------------------------------------------------------------------------
ARTIFACT_ROOT = Path(env("ARTIFACT_ROOT", default=str(VAR_DIR / "artifacts")))
# Local model folders and data files may only be registered from under these roots (checked after
# resolving symlinks). Empty: local paths are refused.
# Folders `prepare_models` writes the packaged real models into (and the default model root).
MODELS_DIR = Path(env("DISTILLWEB_MODELS_DIR", default=str(VAR_DIR / "models")))
MODEL_ROOTS = [Path(p) for p in env.list("MODEL_ROOTS", default=[str(MODELS_DIR)])]
DATASET_ROOTS = [Path(p) for p in env.list("DATASET_ROOTS", default=[])]
# Largest dataset file the "Upload a file" source accepts; bigger uploads are refused before anything is
# stored.
DATASET_UPLOAD_MAX_BYTES = env.int("DATASET_UPLOAD_MAX_BYTES", default=50 * 1024 * 1024)
ALLOW_TRUST_REMOTE_CODE = env.bool("ALLOW_TRUST_REMOTE_CODE", default=False)
# Inference servers (vLLM, sglang: OpenAI-compatible) a teacher of source "server" may name:
# DISTILLWEB_TEACHER_SERVERS="name=base_url[,name2=base_url2]"; users pick a name, never a URL. A server's
# bearer token, if any, stays in the workers' environment (DISTILLWEB_TEACHER_SERVER_TOKEN_<NAME>).
try:
    TEACHER_SERVERS = parse_servers(env("DISTILLWEB_TEACHER_SERVERS", default=""))
except ValueError as exc:
    raise environ.ImproperlyConfigured(str(exc)) from None
# The run lifecycle (experiments.services): a run's heartbeat is its lease, renewed by every metric, progress
# and checkpoint write. A running run silent for RUN_HEARTBEAT_TIMEOUT_S lost its worker: the
# `workers.requeue_stale_runs` beat task (every RUN_SWEEP_INTERVAL_S) requeues it, and another worker resumes
# it from its last checkpoint, up to RUN_MAX_ATTEMPTS attempts; then it fails. A worker rides out a database
# outage of up to RUN_DB_RETRY_S (metric points stay buffered). A queued run whose broker message was lost is
# sent again after RUN_REDISPATCH_AFTER_S.
RUN_HEARTBEAT_TIMEOUT_S = env.int("RUN_HEARTBEAT_TIMEOUT_S", default=120)
RUN_MAX_ATTEMPTS = env.int("RUN_MAX_ATTEMPTS", default=3)
RUN_SWEEP_INTERVAL_S = env.float("RUN_SWEEP_INTERVAL_S", default=30.0)
RUN_DB_RETRY_S = env.float("RUN_DB_RETRY_S", default=300.0)
RUN_REDISPATCH_AFTER_S = env.int("RUN_REDISPATCH_AFTER_S", default=300)
# The stall watchdog (workers/watchdog.py): a run whose step or phase progress has not advanced for this long
# is stopped (its pool process killed) and requeued once, then failed on the next stall. 0 turns it off.
RUN_STALL_TIMEOUT_S = env.float("RUN_STALL_TIMEOUT_S", default=1800.0)
# How many of its newest registered checkpoints a run keeps on disk (a resume uses the newest).
RUN_KEEP_CHECKPOINTS = env.int("RUN_KEEP_CHECKPOINTS", default=2)
WORKER_HEARTBEAT_INTERVAL_S = env.int("WORKER_HEARTBEAT_INTERVAL_S", default=10)
WORKER_OFFLINE_AFTER_S = env.int("WORKER_OFFLINE_AFTER_S", default=60)
MAX_RUNS_PER_EXPERIMENT = env.int("MAX_RUNS_PER_EXPERIMENT", default=200)
# The Celery queue new runs are sent to (workers consume it with `-Q`).
RUN_QUEUE = env("RUN_QUEUE", default="training")
# How a new run picks its queue (experiments.domain.routing): "auto" sends it to the smallest queue named
# gpu-<N>g (N GiB per GPU) or cpu that an online worker consumes and that fits its estimated GPU memory
# (RUN_QUEUE while no worker declares such a queue); "off" sends every run to RUN_QUEUE.
RUN_ROUTING = env("RUN_ROUTING", default="auto")
if RUN_ROUTING not in ("auto", "off"):
    raise environ.ImproperlyConfigured(f"RUN_ROUTING must be 'auto' or 'off', not {RUN_ROUTING!r}.")

# --- Celery ---------------------------------------------------------------------------------------
# Default: kombu's filesystem transport under var/, so the embedded shape needs no broker server.
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="filesystem://")
_broker_dir = VAR_DIR / "broker"
if CELERY_BROKER_URL.startswith("filesystem://"):
    for _sub in ("queue", "processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "store_processed": False,
        "control_folder": str(_broker_dir / "control"),
    }
    # The embedded shape runs on one machine, often as root in a container; with JSON as the only accepted
    # content Celery refuses nothing and only warns, which is noise for the demo. Servers and a real broker
    # keep the warning.
    warnings.filterwarnings("ignore", message="You're running the worker with superuser privileges")
else:
    # https://docs.celeryq.dev/en/stable/getting-started/backends-and-brokers/redis.html#visibility-timeout
    # Redis re-delivers a message nobody acknowledged after this long. Runs are acknowledged when they end
    # (acks_late), so it must exceed the longest run, or Redis starts a second copy of every long one. Worker
    # loss is handled by the database lease instead (RUN_HEARTBEAT_TIMEOUT_S, the requeue sweep), which needs
    # no redelivery at all; a late one is harmless (run_claim refuses a live or finished run).
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": env.int("BROKER_VISIBILITY_TIMEOUT_S", default=48 * 3600)
    }
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "training"
CELERY_TASK_ROUTES = {"workers.run_distillation": {"queue": "training"}}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A task message sent by the web process (a launch, a requeue) waits at most this long per socket operation,
# and is retried once, when the broker is down or hung; the run stays queued and the lifecycle sweep sends it
# once the broker is back (experiments/broker.py). Worker processes keep Celery's connection and retry
# settings.
BROKER_PUBLISH_TIMEOUT_S = env.float("BROKER_PUBLISH_TIMEOUT_S", default=1.0)
# A broker outage must not stop a run that is training: it needs only the database (its lease), and its
# message is acknowledged when it ends. https://docs.celeryq.dev/en/stable/userguide/configuration.html
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TIMEZONE = TIME_ZONE
# Worker fleet: the offline sweep runs under celery beat on FLEET_QUEUE (a worker consuming it runs it, e.g.
# `celery -A distillweb worker -Q fleet -B`); the console waits this long for a worker's remote-control reply.
FLEET_QUEUE = env("FLEET_QUEUE", default="fleet")
WORKER_CONTROL_TIMEOUT_S = env.float("WORKER_CONTROL_TIMEOUT_S", default=3.0)
# workers/fleet_tasks.py is not a `tasks` module, so autodiscovery would miss it.
CELERY_IMPORTS = ["workers.fleet_tasks", "workers.lifecycle_tasks"]
# https://docs.celeryq.dev/en/stable/userguide/periodic-tasks.html
CELERY_BEAT_SCHEDULE = {
    "fleet-sweep": {
        "task": "workers.fleet_sweep",
        "schedule": WORKER_OFFLINE_AFTER_S / 2,
        # A sweep nobody ran in time is dropped: the next one does the same work.
        "options": {"queue": FLEET_QUEUE, "expires": WORKER_OFFLINE_AFTER_S / 2},
    },
    # Runs whose lease expired are requeued (or failed past RUN_MAX_ATTEMPTS); lost queued messages are
    # re-sent.
    "requeue-stale-runs": {
        "task": "workers.requeue_stale_runs",
        "schedule": RUN_SWEEP_INTERVAL_S,
        "options": {"queue": FLEET_QUEUE, "expires": RUN_SWEEP_INTERVAL_S},
    },
}

# --- REST API (api/) ---------------------------------------------------------------------------------
# https://www.django-rest-framework.org/api-guide/settings/ — token first, so a request without credentials
# gets 401 with `WWW-Authenticate: Bearer`; the session serves the browser (and enforces CSRF on writes).
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "api.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # Authenticated, and a read-only token may only read.
    "DEFAULT_PERMISSION_CLASSES": ["api.permissions.TokenScopePermission"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["api.parsers.CappedJSONParser"],
    "DEFAULT_PAGINATION_CLASS": "api.pagination.CappedLimitOffsetPagination",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "api.exceptions.exception_handler",
}
# https://drf-spectacular.readthedocs.io/en/latest/settings.html
SPECTACULAR_SETTINGS = {
    "TITLE": "distillweb API",
    "DESCRIPTION": "Records, experiments, runs, metrics and leaderboards of distillweb, scoped to your "
                   "teams.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # Every operation also documents the error answers it shares with the others (401, 403, 400, 404, 413,
    # 415).
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "api.schema.document_error_responses",
    ],
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "filters": {"filesystem_broker_host": {"()": "distillweb.logfilters.FilesystemBrokerHost"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
if CELERY_BROKER_URL.startswith("filesystem://"):
    # kombu warns "No hostname was supplied" on every connection to the filesystem transport, which has no
    # host.
    LOGGING["loggers"]["kombu.connection"] = {"filters": ["filesystem_broker_host"]}
