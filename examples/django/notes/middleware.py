"""BROKEN_PAGES=1: a bad release whose health check passes.

Every request but GET /health/ answers 500, as a release with a broken page
(a template error, a missing setting) would, while /health/ still answers 200:
health checks alone let it through; smoke checks of its pages, or watching
the 5xx rate of live traffic, do not.
"""
import logging

from django.http import HttpResponseServerError

log = logging.getLogger(__name__)

HEALTH_PATH = "/health/"


def broken_pages(get_response):
    log.warning("BROKEN_PAGES=1: every request but %s answers 500", HEALTH_PATH)

    def middleware(request):
        if request.path == HEALTH_PATH:
            return get_response(request)
        return HttpResponseServerError("broken on purpose (BROKEN_PAGES=1)\n", content_type="text/plain")

    return middleware
