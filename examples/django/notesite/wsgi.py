"""WSGI entry point: `gunicorn notesite.wsgi`."""
import os
import time

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "notesite.settings")

# BOOT_DELAY=seconds simulates a slow-booting release (tests of health_timeout).
_boot_delay = float(os.environ.get("BOOT_DELAY") or 0)
if _boot_delay > 0:
    time.sleep(_boot_delay)

application = get_wsgi_application()
