#!/usr/bin/env python3
"""End-to-end smoke test of the Django notes example, without nonstop.

Runs the Procfile's own commands against the local PostgreSQL and Redis:
release (ensure_database + migrate), collectstatic, then web (gunicorn), worker
and beat, and checks every endpoint, the hashed static files, the celery task,
the beat heartbeat, gunicorn's graceful SIGTERM, FAIL_HEALTH=1, BROKEN_PAGES=1 and a database
that is down. Everything it starts it stops (by pid/process group), and it
drops the throwaway database it created. Exit status 0 on success, 1 on failure.

Usage: python3 examples/django/tests/smoke.py [--keep]
Environment: SMOKE_PG_URL (default postgres://postgres@127.0.0.1:5432; a
throwaway database nonstop_django_smoke_<pid> is created there), REDIS_URL
(default redis://127.0.0.1:6379/0).
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
APP_DIR = os.path.dirname(HERE)
KEEP = "--keep" in sys.argv


class Failure(Exception):
    pass


def log(msg):
    print(f"smoke: {msg}", flush=True)


def check(cond, msg):
    if not cond:
        raise Failure(msg)
    log(f"ok   {msg}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def procfile():
    entries = {}
    with open(os.path.join(APP_DIR, "Procfile")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, command = line.partition(":")
                entries[name.strip()] = command.strip()
    return entries


def http(method, url, data=None, headers=None, timeout=10):
    """(status, headers, body bytes); never raises for HTTP error statuses."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def get_json(url):
    status, _, body = http("GET", url)
    return status, (json.loads(body) if body.strip().startswith(b"{") else None)


class Proc:
    """A process started in its own session (so its children share its group)."""

    def __init__(self, name, command, env, logdir):
        self.name = name
        self.logpath = os.path.join(logdir, f"{name}.log")
        self.logfile = open(self.logpath, "wb")
        self.started = time.monotonic()
        self.p = subprocess.Popen(
            ["sh", "-c", command], cwd=APP_DIR, env=env, stdout=self.logfile, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log(f"started {name} (pid {self.p.pid}): {command}")

    def signal(self, sig):
        if self.p.poll() is None:
            os.kill(self.p.pid, sig)

    def stop(self, timeout=30):
        """SIGTERM the process, wait, then SIGKILL its whole group. Returns (exit code, seconds)."""
        t0 = time.monotonic()
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {timeout}s; SIGKILL")
        # Leftover children (gunicorn/celery workers) of a group we created.
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        code = self.p.wait()
        self.logfile.close()
        return code, time.monotonic() - t0

    def tail(self, n=40):
        try:
            with open(self.logpath, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


def wait_for(what, fn, timeout, interval=0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise Failure(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def wait_status(base, path, want, proc, timeout=30):
    def probe():
        if proc.p.poll() is not None:
            raise Failure(f"{proc.name} exited with {proc.p.returncode} before {path} answered")
        try:
            status, _, _ = http("GET", base + path, timeout=2)
            return status == want
        except OSError:
            return False

    wait_for(f"GET {path} -> {want}", probe, timeout)
    return time.monotonic() - proc.started


def main():
    pid = os.getpid()
    pg_url = os.environ.get("SMOKE_PG_URL", "postgres://postgres@127.0.0.1:5432").rstrip("/")
    db_name = f"nonstop_django_smoke_{pid}"
    tmp = tempfile.mkdtemp(prefix="notes-smoke-")
    static_root = os.path.join(tmp, "static")
    env = dict(os.environ)
    for k in ("PORT", "FAIL_HEALTH", "BROKEN_PAGES", "BOOT_DELAY", "NONSTOP_ENVIRONMENT", "DEBUG", "SERVE_STATIC"):
        env.pop(k, None)
    env.update(
        DJANGO_SETTINGS_MODULE="notesite.settings",
        DATABASE_URL=f"{pg_url}/{db_name}",
        REDIS_URL=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        STATIC_ROOT=static_root,
        CELERY_QUEUE=f"notes-smoke-{pid}",  # never steal tasks from a running deployment
        CELERY_BEAT_SCHEDULE=os.path.join(tmp, "celerybeat-schedule"),
        HEARTBEAT_SECONDS="1",
        APP_VERSION=f"smoke-{pid}",
        NONSTOP_INSTANCE="web.1",
        PYTHONUNBUFFERED="1",
    )
    procs = []
    cmds = procfile()
    for name in ("release", "web", "worker", "beat"):
        check(name in cmds, f"Procfile has a `{name}` entry")

    def start(name, command, **extra):
        p = Proc(name, command, {**env, **extra}, tmp)
        procs.append(p)
        return p

    def run(what, command, **extra):
        t0 = time.monotonic()
        r = subprocess.run(["sh", "-c", command], cwd=APP_DIR, env={**env, **extra}, capture_output=True, text=True)
        if r.returncode != 0:
            raise Failure(f"{what} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        log(f"ok   {what} ({time.monotonic() - t0:.1f}s)")
        return r.stdout

    try:
        # Release phase, twice: it must be idempotent.
        out = run("release (ensure_database + migrate)", cmds["release"])
        check(f"created database '{db_name}'" in out, "ensure_database created the database")
        out = run("release again", cmds["release"])
        check("exists" in out and "No migrations to apply" in out, "release is idempotent")
        run("collectstatic", "python3 manage.py collectstatic --noinput")
        manifest = json.load(open(os.path.join(static_root, "staticfiles.json")))
        check("notes/app.css" in manifest["paths"], "staticfiles.json maps notes/app.css")

        # The three processes.
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        web = start("web", cmds["web"], PORT=str(port))
        worker = start("worker", cmds["worker"], NONSTOP_INSTANCE="worker.1")
        beat = start("beat", cmds["beat"], NONSTOP_INSTANCE="beat.1")
        boot = wait_status(base, "/health/", 200, web)
        log(f"ok   gunicorn healthy {boot:.2f}s after start")

        status, headers, body = http("GET", base + "/health/")
        check(status == 200 and body == b"ok\n", "GET /health/ -> 200 ok")

        status, headers, body = http("GET", base + "/")
        html = body.decode()
        check(status == 200, "GET / -> 200")
        check(env["APP_VERSION"] in html and "web.1" in html, "home page shows APP_VERSION and NONSTOP_INSTANCE")
        css = re.search(r'href="(/static/notes/app\.([0-9a-f]{12})\.css)"', html)
        js = re.search(r'src="(/static/notes/app\.([0-9a-f]{12})\.js)"', html)
        check(css is not None and js is not None, "home page links hashed app.<hash>.css and app.<hash>.js")
        css_file = os.path.join(static_root, css.group(1)[len("/static/"):])
        check(os.path.isfile(css_file), f"{css.group(1)} exists in STATIC_ROOT")
        check(manifest["paths"]["notes/app.css"] == css.group(1)[len("/static/"):], "the CSS URL is the manifest's")
        status, headers, body = http("GET", base + css.group(1))
        check(status == 200 and body == open(css_file, "rb").read(), "the hashed CSS is served (WhiteNoise)")
        check("max-age=31536000" in headers.get("Cache-Control", ""), "hashed static files are cacheable for a year")
        status, _, _ = http("GET", base + js.group(1))
        check(status == 200, "the hashed JS is served")

        status, _, body = http("GET", base + "/admin/login/")
        check(status == 200 and b"/static/admin/css/base." in body, "admin login page uses hashed admin static")

        status, data = get_json(base + "/version/")
        check(status == 200 and data["version"] == env["APP_VERSION"], "GET /version/ -> version")

        # Notes API (CSRF-exempt).
        status, data = get_json(base + "/notes/count/")
        check(status == 200 and data == {"count": 0}, "GET /notes/count/ -> 0 on a new database")
        status, _, body = http("POST", base + "/notes/", data=b"text=hello+from+a+form+post",
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
        check(status == 201, f"POST /notes/ (form) -> 201 ({status} {body[:200]!r})")
        id1 = json.loads(body)["id"]
        text2 = "one two three four five"
        status, _, body = http("POST", base + "/notes/", data=json.dumps({"text": text2}).encode(),
                               headers={"Content-Type": "application/json"})
        check(status == 201, f"POST /notes/ (JSON) -> 201 ({status} {body[:200]!r})")
        id2 = json.loads(body)["id"]
        status, _, _ = http("POST", base + "/notes/", data=b"{}", headers={"Content-Type": "application/json"})
        check(status == 400, "POST /notes/ without text -> 400")
        status, data = get_json(f"{base}/notes/{id2}/")
        check(status == 200 and data["text"] == text2 and data["version"] == env["APP_VERSION"], "GET /notes/<id>/ -> the note")
        status, _ = get_json(f"{base}/notes/{id2 + 1000}/")
        check(status == 404, "GET /notes/<missing>/ -> 404")
        status, data = get_json(base + "/notes/count/")
        check(data == {"count": 2}, "GET /notes/count/ -> 2")
        status, _, body = http("GET", base + "/")
        check(b"one two three four five" in body, "home page lists the new note")

        # Celery worker: count_words ran for both notes.
        t0 = time.monotonic()
        wait_for("word counts", lambda: get_json(f"{base}/notes/{id1}/")[1]["word_count"] == 5
                 and get_json(f"{base}/notes/{id2}/")[1]["word_count"] == 5, 20, 0.2)
        log(f"ok   celery worker stored word counts ({time.monotonic() - t0:.1f}s after the POST)")

        # Celery beat: heartbeats every second, from a single scheduler.
        hb = wait_for("2 heartbeats", lambda: (lambda d: d if d["count"] >= 2 else None)(get_json(base + "/heartbeats/")[1]), 30, 0.5)
        sources = {h["source"] for h in hb["latest"]}
        check(len(sources) == 1 and next(iter(sources)).startswith("beat.1/pid"), f"beat heartbeats from one scheduler {sources}")

        # Graceful stop: an in-flight request finishes after SIGTERM.
        result = {}

        def slow_request():
            try:
                result["status"] = http("GET", base + "/slow/?ms=2000", timeout=15)[0]
            except Exception as e:  # noqa: BLE001
                result["error"] = repr(e)

        t = threading.Thread(target=slow_request)
        t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        web.signal(signal.SIGTERM)
        t.join(15)
        check(result.get("status") == 200, f"a request in flight at SIGTERM completes ({result})")
        code = web.p.wait(25)
        check(code == 0, f"gunicorn exits 0 after SIGTERM ({time.monotonic() - t0:.1f}s)")
        for p in (worker, beat):
            code, took = p.stop(30)
            check(code in (0, -signal.SIGTERM), f"{p.name} stops on SIGTERM (exit {code}, {took:.1f}s)")

        # A bad release: FAIL_HEALTH=1.
        port2 = free_port()
        bad = start("web-fail-health", cmds["web"], PORT=str(port2), FAIL_HEALTH="1")
        wait_status(f"http://127.0.0.1:{port2}", "/version/", 200, bad)
        status, _, body = http("GET", f"http://127.0.0.1:{port2}/health/")
        check(status == 500, f"FAIL_HEALTH=1 -> /health/ 500 ({body.strip()!r})")
        bad.stop()

        # A bad release whose health check passes: BROKEN_PAGES=1.
        port4 = free_port()
        broken = start("web-broken-pages", cmds["web"], PORT=str(port4), BROKEN_PAGES="1")
        wait_status(f"http://127.0.0.1:{port4}", "/health/", 200, broken)
        for method, path in (("GET", "/"), ("GET", "/version/"), ("POST", "/notes/")):
            status, _, body = http(method, f"http://127.0.0.1:{port4}{path}")
            check(status == 500, f"BROKEN_PAGES=1 -> {method} {path} 500 ({body.strip()[:60]!r})")
        broken.stop()

        # The database is down (nothing listens on the port).
        port3, dead_pg = free_port(), free_port()
        nodb = start("web-no-db", cmds["web"], PORT=str(port3),
                     DATABASE_URL=f"postgres://postgres@127.0.0.1:{dead_pg}/{db_name}")
        wait_status(f"http://127.0.0.1:{port3}", "/version/", 200, nodb)
        status, _, body = http("GET", f"http://127.0.0.1:{port3}/health/")
        check(status == 500, f"database down -> /health/ 500 ({body.strip()!r})")
        nodb.stop()

        log(f"PASS (gunicorn boot to healthy: {boot:.2f}s)")
        return 0
    except (Failure, Exception) as e:  # noqa: BLE001
        log(f"FAIL: {e}")
        for p in procs:
            log(f"--- last lines of {p.name} ({p.logpath}):\n{p.tail()}")
        return 1
    finally:
        for p in procs:
            if not p.logfile.closed:
                p.stop(10)
        try:
            import psycopg

            with psycopg.connect(f"{pg_url}/postgres", autocommit=True) as pg:
                pg.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            log(f"dropped database {db_name}")
        except Exception as e:  # noqa: BLE001
            log(f"could not drop database {db_name}: {e}")
        try:
            import redis

            r = redis.Redis.from_url(env["REDIS_URL"])
            q = env["CELERY_QUEUE"]
            r.delete(q, f"_kombu.binding.{q}", f"_kombu.binding_permanent.{q}")
        except Exception as e:  # noqa: BLE001
            log(f"could not clean up Redis keys of queue {env['CELERY_QUEUE']}: {e}")
        if KEEP:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
