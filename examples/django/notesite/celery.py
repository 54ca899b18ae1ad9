"""The Celery app: `celery -A notesite worker` and `celery -A notesite beat`.

Configuration comes from Django settings (names prefixed with CELERY_), which
come from the environment.
"""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "notesite.settings")

app = Celery("notesite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
