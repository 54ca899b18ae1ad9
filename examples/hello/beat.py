"""A scheduler that must never run twice at once (like celery beat).

It takes an exclusive lock on $BEAT_LOCK (default ./beat.lock) without
waiting; if another beat holds it, it records the violation in
$BEAT_LOCK.doubled and exits 1. It appends "start"/"stop" lines to
$BEAT_LOCK.log so tests can check that runs never overlap.
"""
import fcntl
import os
import signal
import sys
import time

LOCK = os.environ.get("BEAT_LOCK", "beat.lock")
INSTANCE = os.environ.get("NONSTOP_INSTANCE", "?")


def log(event):
    with open(LOCK + ".log", "a") as f:
        f.write(f"{time.time():.6f} {os.getpid()} {event}\n")


fd = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o644)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    with open(LOCK + ".doubled", "a") as f:
        f.write(f"{time.time():.6f} {os.getpid()} found another beat running\n")
    print(f"{INSTANCE}: another beat is running!", flush=True)
    sys.exit(1)

log("start")
running = True


def stop(signum, frame):
    global running
    running = False


signal.signal(signal.SIGTERM, stop)
print(f"{INSTANCE}: beat started (pid {os.getpid()})", flush=True)
while running:
    time.sleep(0.1)
log("stop")
print(f"{INSTANCE}: beat stopped", flush=True)
