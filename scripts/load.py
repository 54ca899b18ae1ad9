#!/usr/bin/env python3
"""A small closed-loop HTTP load generator for the demo (stdlib only).

Usage: load.py URL --until-file PATH [--workers N]
Runs GETs until PATH exists, then prints one JSON line:
{"requests": N, "ok": N, "failed": N, "non_2xx": N, "p50_ms": x, "p99_ms": x, "versions": {...}}
A "failed" request is one that got no HTTP response at all.
"""
import argparse
import http.client
import json
import os
import threading
import time
from urllib.parse import urlparse


def worker(url, until, results, lock):
    u = urlparse(url)
    conn = None
    lat, ok, failed, non2xx, versions, errors = [], 0, 0, 0, {}, []
    while not os.path.exists(until):
        t0 = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
            conn.request("GET", u.path or "/")
            r = conn.getresponse()
            body = r.read().decode(errors="replace")
            if r.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
            if 200 <= r.status < 300:
                ok += 1
                v = body.split("version ")[-1].rstrip(")\n") if "version " in body else "?"
                versions[v] = versions.get(v, 0) + 1
            else:
                non2xx += 1
                errors.append(f"HTTP {r.status}")
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
            # A keep-alive connection closed between requests: any client
            # retries that on a new connection; count it only if the retry fails.
            if conn is not None:
                conn.close()
                conn = None
                continue
            failed += 1
            errors.append(repr(e))
        except Exception as e:  # noqa: BLE001
            failed += 1
            errors.append(repr(e))
            if conn is not None:
                conn.close()
            conn = None
        lat.append((time.perf_counter() - t0) * 1000)
    with lock:
        results.append((lat, ok, failed, non2xx, versions, errors))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--until-file", required=True)
    ap.add_argument("--workers", type=int, default=4)
    a = ap.parse_args()
    results, lock = [], threading.Lock()
    threads = [threading.Thread(target=worker, args=(a.url, a.until_file, results, lock)) for _ in range(a.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = sorted(x for r in results for x in r[0])
    versions = {}
    for r in results:
        for k, v in r[4].items():
            versions[k] = versions.get(k, 0) + v
    pct = lambda p: round(lat[min(len(lat) - 1, int(len(lat) * p))], 2) if lat else 0
    print(json.dumps({
        "requests": len(lat),
        "ok": sum(r[1] for r in results),
        "failed": sum(r[2] for r in results),
        "non_2xx": sum(r[3] for r in results),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "versions": versions,
        "errors": [e for r in results for e in r[5]][:10],
    }))


if __name__ == "__main__":
    main()
