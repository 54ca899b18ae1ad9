"""A background worker: does a 'job' every 0.5 s, finishes it on SIGTERM."""
import os
import signal
import sys
import time

INSTANCE = os.environ.get("NONSTOP_INSTANCE", "?")
running = True


def stop(signum, frame):
    global running
    running = False


signal.signal(signal.SIGTERM, stop)
print(f"{INSTANCE}: worker started (pid {os.getpid()})", flush=True)
n = 0
while running:
    n += 1
    time.sleep(0.5)
    if n % 20 == 0:
        print(f"{INSTANCE}: done {n} jobs", flush=True)
print(f"{INSTANCE}: worker stopping after {n} jobs", flush=True)
sys.exit(0)
