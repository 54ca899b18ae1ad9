import logging

from celery import shared_task

from .models import Heartbeat, Note

log = logging.getLogger(__name__)


@shared_task
def count_words(note_id):
    """Store the number of words of a note. Idempotent."""
    note = Note.objects.filter(pk=note_id).first()
    if note is None:
        log.warning("count_words: note %s does not exist", note_id)
        return None
    count = len(note.text.split())
    Note.objects.filter(pk=note_id).update(word_count=count)
    log.info("count_words: note %s has %s words", note_id, count)
    return count


@shared_task
def heartbeat(source="beat"):
    """Scheduled by celery beat every HEARTBEAT_SECONDS; records one row."""
    Heartbeat.objects.create(source=source)
    log.info("heartbeat from %s", source)
