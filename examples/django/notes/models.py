from django.db import models


class Note(models.Model):
    text = models.TextField()
    # Set by the `count_words` Celery task after the note is created.
    word_count = models.PositiveIntegerField(null=True, blank=True)
    # APP_VERSION of the release that wrote the note (useful during rollouts).
    version = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self):
        return self.text[:60]

    def as_dict(self):
        return {
            "id": self.id,
            "text": self.text,
            "word_count": self.word_count,
            "version": self.version,
            "created_at": self.created_at.isoformat(),
        }


class Heartbeat(models.Model):
    """One row per run of the `heartbeat` task that celery beat schedules."""

    # Which beat process sent it ("beat.1/pid1234"): two at once is a bug.
    source = models.CharField(max_length=128)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self):
        return f"{self.source} at {self.created_at:%Y-%m-%d %H:%M:%S}"
