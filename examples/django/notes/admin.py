from django.contrib import admin

from .models import Heartbeat, Note


@admin.register(Note)
class NoteAdmin(admin.ModelAdmin):
    list_display = ("id", "text", "word_count", "version", "created_at")
    search_fields = ("text",)
    readonly_fields = ("word_count", "created_at")


@admin.register(Heartbeat)
class HeartbeatAdmin(admin.ModelAdmin):
    list_display = ("id", "source", "created_at")
    list_filter = ("source",)
