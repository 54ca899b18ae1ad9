from django.contrib import admin
from django.urls import path

from notes import views

urlpatterns = [
    path("", views.index, name="index"),
    path("health/", views.health, name="health"),
    path("version/", views.version, name="version"),
    path("notes/", views.notes, name="notes"),
    path("notes/count/", views.note_count, name="note-count"),
    path("notes/<int:note_id>/", views.note_detail, name="note-detail"),
    path("heartbeats/", views.heartbeats, name="heartbeats"),
    path("slow/", views.slow, name="slow"),
    path("admin/", admin.site.urls),
]
