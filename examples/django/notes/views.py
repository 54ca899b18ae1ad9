import json
import logging
import os
import time

from django.conf import settings
from django.db import connection, transaction
from django.http import HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods

from .models import Heartbeat, Note
from .tasks import count_words

log = logging.getLogger(__name__)

MAX_TEXT = 10_000


def _instance():
    return {
        "version": settings.APP_VERSION,
        "instance": os.environ.get("NONSTOP_INSTANCE", ""),
        "release": os.environ.get("NONSTOP_RELEASE", ""),
        "pid": os.getpid(),
    }


@require_GET
def index(request):
    notes = Note.objects.all()[:20]
    return render(request, "notes/index.html", {"notes": notes, "count": Note.objects.count(), **_instance()})


@never_cache
@require_GET
def health(request):
    """200 "ok" when this instance can query the database."""
    if os.environ.get("FAIL_HEALTH") == "1":
        return HttpResponse("failing on purpose (FAIL_HEALTH=1)\n", status=500, content_type="text/plain")
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # any database error makes the instance unhealthy
        log.error("health: database check failed: %s", exc)
        return HttpResponse(f"database unavailable: {type(exc).__name__}\n", status=500, content_type="text/plain")
    return HttpResponse("ok\n", content_type="text/plain")


@never_cache
@require_GET
def version(request):
    return JsonResponse(_instance())


def _read_text(request):
    if request.content_type == "application/json":
        try:
            body = json.loads(request.body or b"null")
        except ValueError:
            return None, "body is not valid JSON"
        if not isinstance(body, dict):
            return None, 'expected a JSON object {"text": ...}'
        text = body.get("text")
    else:
        text = request.POST.get("text")
    if not isinstance(text, str) or not text.strip():
        return None, "`text` is required"
    if len(text) > MAX_TEXT:
        return None, f"`text` is longer than {MAX_TEXT} characters"
    return text, None


def _enqueue_count_words(note_id):
    try:
        count_words.delay(note_id)
    except Exception as exc:
        # The note is stored; only its word count is late. Do not fail the request.
        log.error("could not enqueue count_words(%s): %s", note_id, exc)


@csrf_exempt  # an API endpoint for scripts and load tests, not a browser form
@never_cache
@require_http_methods(["GET", "POST"])
def notes(request):
    if request.method == "GET":
        return JsonResponse({"notes": [n.as_dict() for n in Note.objects.all()[:20]]})
    text, error = _read_text(request)
    if error:
        return JsonResponse({"error": error}, status=400)
    note = Note.objects.create(text=text, version=settings.APP_VERSION)
    transaction.on_commit(lambda: _enqueue_count_words(note.id))
    return JsonResponse({"id": note.id}, status=201)


@never_cache
@require_GET
def note_detail(request, note_id):
    note = Note.objects.filter(pk=note_id).first()
    if note is None:
        return JsonResponse({"error": "not found", "id": note_id}, status=404)
    return JsonResponse(note.as_dict())


@never_cache
@require_GET
def note_count(request):
    return JsonResponse({"count": Note.objects.count()})


@never_cache
@require_GET
def heartbeats(request):
    """The latest heartbeats written by the beat-scheduled task."""
    latest = list(Heartbeat.objects.all()[:20])
    return JsonResponse(
        {
            "count": Heartbeat.objects.count(),
            "latest": [{"id": h.id, "source": h.source, "created_at": h.created_at.isoformat()} for h in latest],
        }
    )


@never_cache
@require_GET
def slow(request):
    """Answers after ?ms=N milliseconds, at most 25 s (gunicorn kills a worker at 30 s): for drain tests."""
    try:
        ms = max(0, min(int(request.GET.get("ms", "1000")), 25_000))
    except ValueError:
        return JsonResponse({"error": "ms must be an integer"}, status=400)
    time.sleep(ms / 1000)
    return JsonResponse({"slept_ms": ms, **_instance()})
