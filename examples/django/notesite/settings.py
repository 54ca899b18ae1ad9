"""Settings for the notes example, read entirely from the environment (12-factor).

Variables (all optional; defaults are for a local machine):

  DATABASE_URL        postgres://USER[:PASSWORD]@HOST[:PORT]/NAME[?sslmode=...]
                      (default postgres://postgres@127.0.0.1:5432/nonstop_django)
  DB_CONN_MAX_AGE     seconds a database connection is reused (default 60)
  DB_CONNECT_TIMEOUT  seconds to wait for PostgreSQL to answer a connect (default 2)
  REDIS_URL           Celery broker (default redis://127.0.0.1:6379/0)
  CELERY_QUEUE        queue name (default "notes", or "notes-$NONSTOP_ENVIRONMENT"
                      so that environments sharing one Redis do not steal tasks)
  HEARTBEAT_SECONDS   period of the beat `heartbeat` task (default 10)
  SECRET_KEY          (a development default; set it in production)
  DEBUG               1/true/yes/on to enable (default off)
  ALLOWED_HOSTS       comma-separated (default 127.0.0.1,localhost,*)
  CSRF_TRUSTED_ORIGINS comma-separated origins, for the admin behind a proxy
  STATIC_ROOT         where collectstatic writes (default <BASE_DIR>/staticfiles)
  STATIC_URL          (default /static/)
  SERVE_STATIC        1 (default): serve STATIC_ROOT from the app with WhiteNoise;
                      0: leave static files to the proxy in front
  LOG_LEVEL           (default INFO); logs go to stdout
  APP_VERSION         shown on the home page and in /version/ (default "1")
  FAIL_HEALTH         1: /health/ answers 500 (simulates a bad release)
  BROKEN_PAGES        1: every request but /health/ answers 500 (a bad release
                      whose health check passes)
  BOOT_DELAY          seconds to sleep before the WSGI app loads (default 0)
"""
import os
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env(name, default=""):
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def env_bool(name, default=False):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def env_list(name, default):
    return [item.strip() for item in env(name, default).split(",") if item.strip()]


def database_from_url(url):
    """A DATABASES entry from a URL (postgres://, postgresql://, sqlite:///path)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("postgres", "postgresql", "pgsql"):
        name = unquote(parts.path.lstrip("/"))
        if not name:
            raise ImproperlyConfigured(f"DATABASE_URL has no database name: {parts.scheme}://...{parts.path!r}")
        options = dict(parse_qsl(parts.query))
        options.setdefault("connect_timeout", env("DB_CONNECT_TIMEOUT", "2"))
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            "OPTIONS": options,
        }
    if scheme == "sqlite":
        # sqlite:///relative.db or sqlite:////absolute/path.db
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": path or ":memory:"}
    raise ImproperlyConfigured(f"DATABASE_URL scheme {parts.scheme!r} is not supported (use postgres:// or sqlite://)")


SECRET_KEY = env("SECRET_KEY", "django-insecure-notes-example-do-not-use-in-production")
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,*")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

APP_VERSION = env("APP_VERSION", "1")
SERVE_STATIC = env_bool("SERVE_STATIC", True)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "notes",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    *(["whitenoise.middleware.WhiteNoiseMiddleware"] if SERVE_STATIC else []),
    *(["notes.middleware.broken_pages"] if env_bool("BROKEN_PAGES") else []),
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "notesite.urls"
WSGI_APPLICATION = "notesite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/nonstop_django")
DATABASES = {"default": database_from_url(DATABASE_URL)}
DATABASES["default"]["CONN_MAX_AGE"] = int(env("DB_CONN_MAX_AGE", "60"))
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# Static files: collectstatic copies them to STATIC_ROOT with a content hash in
# each name (app.3f2a9c1b7d4e.css) and writes staticfiles.json, the manifest
# that `{% static %}` reads. Old and new releases therefore reference different
# file names, and both sets can live side by side in one STATIC_ROOT.
STATIC_URL = env("STATIC_URL", "/static/")
STATIC_ROOT = env("STATIC_ROOT", str(BASE_DIR / "staticfiles"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.ManifestStaticFilesStorage"},
}
# Hashed names never change, so they may be cached for a year.
WHITENOISE_MAX_AGE = 365 * 24 * 3600

# Celery: Redis as the broker, no result backend (tasks store their results).
REDIS_URL = env("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = REDIS_URL
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_DEFAULT_QUEUE = env(
    "CELERY_QUEUE",
    f"notes-{os.environ['NONSTOP_ENVIRONMENT']}" if os.environ.get("NONSTOP_ENVIRONMENT") else "notes",
)
# A worker killed mid-task (SIGKILL, crash) does not lose it: the message is
# acknowledged only after the task ran, and is delivered again otherwise.
# Both tasks are idempotent.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Do not let a web request hang on a broker that is down.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}
CELERY_BROKER_TRANSPORT_OPTIONS = {"socket_connect_timeout": 2, "socket_timeout": 5}
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TIMEZONE = TIME_ZONE

HEARTBEAT_SECONDS = float(env("HEARTBEAT_SECONDS", "10"))
CELERY_BEAT_SCHEDULE = {
    "heartbeat": {
        "task": "notes.tasks.heartbeat",
        "schedule": HEARTBEAT_SECONDS,
        # Evaluated in the beat process: names the scheduler that sent it, so
        # that two schedulers running at once show up as two sources.
        "args": (f"{os.environ.get('NONSTOP_INSTANCE', 'beat')}/pid{os.getpid()}",),
        # A heartbeat that waited longer than its period is stale: drop it.
        "options": {"expires": HEARTBEAT_SECONDS},
    },
}

# Logs are an event stream: everything to stdout, one line per event.
LOG_LEVEL = env("LOG_LEVEL", "INFO").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"},
    },
    "handlers": {
        "stdout": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout", "formatter": "plain"},
    },
    "root": {"handlers": ["stdout"], "level": LOG_LEVEL},
    "loggers": {
        "django": {"handlers": ["stdout"], "level": LOG_LEVEL, "propagate": False},
        # Django logs every 4xx/5xx here; 404s of /notes/<id>/ are expected.
        "django.request": {"handlers": ["stdout"], "level": "ERROR", "propagate": False},
    },
}
