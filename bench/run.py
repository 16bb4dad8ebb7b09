#!/usr/bin/env python3
"""cirunner benchmarks: every figure beside a baseline measured in the same run.

    python bench/run.py                   # full run (about a minute)
    python bench/run.py --quick           # a subset in well under a minute
    python bench/run.py --only biglog     # one section (repeatable)

Each measurement builds its own fixtures (git repositories, a 100k-build
store), starts a real `cirunner serve` on 127.0.0.1, warms up, repeats, and
prints: figure, median, min-max, baseline, ratio, target, pass/fail. Results
also go to bench/results.json. Machines here are shared and noisy: compare
ratios, not absolute numbers, across machines.
"""

import argparse
import collections
import contextlib
import glob
import http.client
import json
import os
import pathlib
import py_compile
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import cirunner  # the module under test, from this checkout

GIT_ENV = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.com",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.com")
LINE = "0123456789" * 10  # 100 characters, plus the newline
FIFTY_MB = 50 * 1024 * 1024
# How often a bench waiting for builds asks the server. Every 5 ms kept the
# server's loop thread busy and its workers waiting for the interpreter lock
# (dispatch 170-290 jobs/s against 210-310 at 20 ms, alternating runs); a
# coarser poll can only add to a measured time, never take from it.
POLL = 0.02


# -- fixtures ------------------------------------------------------------------


def make_repo(path, pipeline, filename=".cirunner.yml"):
    os.makedirs(path, exist_ok=True)
    subprocess.run(["git", "init", "-q", "-b", "main", path], check=True, env=GIT_ENV)
    with open(os.path.join(path, filename), "w") as handle:
        handle.write(pipeline)
    subprocess.run(["git", "-C", path, "add", "-A"], check=True, env=GIT_ENV)
    subprocess.run(["git", "-C", path, "commit", "-qm", "bench"], check=True, env=GIT_ENV)
    return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], check=True, env=GIT_ENV,
                          capture_output=True, text=True).stdout.strip()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid, field="VmRSS"):
    """A process's resident memory now (VmRSS), or at its peak (VmHWM)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss(pid):
    """Start the kernel's peak-RSS record (VmHWM) afresh from the current RSS
    (Linux 4.0+): the peak is then exact, with nothing polling during a run."""
    with open(f"/proc/{pid}/clear_refs", "w") as handle:
        handle.write("5")


def stop_process(process, timeout=20):
    """SIGTERM, and SIGKILL if it has not exited within `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Server:
    """A real `cirunner serve` on 127.0.0.1, talking over one keep-alive connection."""

    def __init__(self, data_dir, workers=2, threads=32, sandbox="none", engine="none",
                 environ=None, extra=()):
        self.data_dir = data_dir
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CIRUNNER_")}
        env["CIRUNNER_LOG_LEVEL"] = "WARNING"
        # As the installed `cirunner` command runs it: the module imported
        # (compiled once, into __pycache__), not compiled as a script each start.
        env["PYTHONPATH"] = ROOT
        env.update(environ or {})
        self.out = open(os.path.join(data_dir, "serve.out"), "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cirunner", "serve", "--data", data_dir,
             "--port", str(self.port), "--workers", str(workers), "--threads", str(threads),
             "--sandbox", sandbox, "--engine", engine, *extra],
            stdout=self.out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("serve did not start") from None
                time.sleep(0.05)
        with open(os.path.join(data_dir, "serve.out")) as handle:
            tokens = re.findall(r"cir_[A-Za-z0-9_-]+", handle.read())
        self.token = tokens[-1] if tokens else None
        self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def request(self, method, path, body=None, raw=False):
        headers = {"Authorization": f"Token {self.token}"} if self.token else {}
        if body is not None:
            body = json.dumps(body)
            headers["Content-Type"] = "application/json"
        try:
            self.connection.request(method, path, body=body, headers=headers)
            response = self.connection.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            # serve closes a keep-alive connection idle for 30 s: open another
            self.connection.close()
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            self.connection.request(method, path, body=body, headers=headers)
            response = self.connection.getresponse()
        data = response.read()
        if response.status >= 400:
            raise RuntimeError(f"{method} {path}: {response.status} {data[:200]!r}")
        return data if raw else json.loads(data)

    def wait_finished(self, owner, name, number, poll=0.001):
        """Wait for a build (polling a cheap call, not the build with all its jobs)."""
        while True:
            for build in self.request("GET", f"/api/repos/{owner}/{name}/builds?per_page=1"):
                if build["number"] >= number and build["status"] in cirunner.DONE_STATUSES:
                    return build
            time.sleep(poll)

    def wait_idle(self, owner, name, poll=0.005):
        """Wait until no build of the repository is pending or running."""
        while any(self.request("GET", f"/api/v1/{owner}/{name}/builds?status={status}&limit=1")
                  ["count"] for status in cirunner.ACTIVE_STATUSES):
            time.sleep(poll)

    def stop(self):
        self.connection.close()
        stop_process(self.process)
        self.out.close()


# -- results -------------------------------------------------------------------

RESULTS = []


class Ratio:
    """A target as a ratio of the median to the baseline measured in the same
    run, so that a verdict means the same on a slow and on a fast machine:
    `at_least` for a throughput, `at_most` for a time. `was` says where the
    bound comes from (an absolute target of a reference run, turned into a
    ratio with that run's baseline)."""

    def __init__(self, at_least=None, at_most=None, was=""):
        self.at_least, self.at_most, self.was = at_least, at_most, was

    def __str__(self):
        return (f">= {self.at_least:g}x" if self.at_least is not None
                else f"<= {self.at_most:g}x")

    def met(self, ratio):
        return (ratio >= self.at_least if self.at_least is not None
                else ratio <= self.at_most)


ABSOLUTE = "absolute: rests on the machine"


def record(figure, samples, unit, baseline, target, passed=None, note=""):
    """One row: samples' median (min-max), the baseline, their ratio, the
    target (text, judged by `passed`; or a Ratio, judged here)."""
    median = statistics.median(samples)
    ratio = median / baseline if baseline else None
    if isinstance(target, Ratio):
        passed = target.met(ratio)
        note = "; ".join(part for part in (note, target.was) if part)
        target = str(target)
    RESULTS.append({"figure": figure, "median": median, "min": min(samples),
                    "max": max(samples), "unit": unit, "baseline": baseline,
                    "ratio": ratio, "target": target,
                    "pass": None if passed is None else bool(passed), "note": note,
                    "samples": list(samples)})
    print_row(RESULTS[-1])


def fmt(value, unit):
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit in ("jobs/s", "req/s", "builds/s"):
        return f"{value:.0f} {unit}"
    if unit == "B":
        return f"{value:.0f} B"
    return f"{value:g} {unit}"


def print_row(row):
    spread = f"{fmt(row['min'], row['unit'])}-{fmt(row['max'], row['unit'])}"
    ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
    print(f"{row['figure']:<46} {fmt(row['median'], row['unit']):>12} {spread:>24} "
          f"{fmt(row['baseline'], row['unit']):>12} {ratio:>7}  {row['target']:<22} "
          f"{'-' if row['pass'] is None else 'PASS' if row['pass'] else 'FAIL'}", flush=True)


# -- measurements --------------------------------------------------------------


def popen_floor(count, threads=2):
    """The raw floor: spawn and wait `true` `count` times from `threads` threads."""
    per_thread = count // threads

    def spawn():
        for _ in range(per_thread):
            subprocess.run(["true"], check=True)

    started = time.perf_counter()
    workers = [threading.Thread(target=spawn) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - started


def bench_dispatch(work, repeats, jobs=200):
    matrix = ", ".join(str(n) for n in range(jobs))
    one_job = "clone: false\npipeline: {t: {commands: [true]}}\n"
    # Targets: ratios to the Popen floor (the one-job ones of issue 31; the
    # matrix ones the 200 and 50 jobs/s of the 11-30 run, whose floor was 3,148).
    variants = {
        "matrix, clone: false": ((f"clone: false\npipeline: {{t: {{commands: [true]}}}}\n"
                                  f"matrix: {{N: [{matrix}]}}\n"), "matrix", 0.064, "none"),
        "one-job builds, clone: false": (one_job, "builds", 0.25, "none"),
        "one-job builds, clone: false, bwrap": (one_job, "builds", 0.10, "bwrap"),
        "matrix, checkout from local repo": ((f"pipeline: {{t: {{commands: [true]}}}}\n"
                                              f"matrix: {{N: [{matrix}]}}\n"), "matrix", 0.016,
                                             "none"),
    }
    floor = [jobs / popen_floor(jobs) for _ in range(repeats)]
    for name, (pipeline, shape, target, sandbox) in variants.items():
        variant_started = time.monotonic()
        data = os.path.join(work, f"dispatch-{shape}-{target}-{sandbox}")
        os.makedirs(data)
        repo_path = os.path.join(work, f"repo-dispatch-{shape}-{target}-{sandbox}")
        sha = make_repo(repo_path, pipeline)
        server = Server(data, sandbox=sandbox)
        try:
            server.request("POST", "/api/repos/bench/r", {"url": repo_path, "private": False})
            rates = []
            for attempt in range(repeats + 1):  # the first is a warm-up
                started = time.perf_counter()
                if shape == "matrix":
                    build = server.request("POST", "/api/repos/bench/r/builds", {"commit": sha})
                    server.wait_finished("bench", "r", build["number"], POLL)
                else:
                    store = cirunner.Store.open(data)
                    repo = store.get_repo("bench", "r")
                    pipeline_id = store.save_pipeline(
                        ".cirunner.yml", pipeline, cirunner.parse_pipeline(pipeline).to_json())
                    fields = {"event": "manual", "branch": "main", "commit_sha": sha,
                              "pipeline_id": pipeline_id, "pipeline_file": ".cirunner.yml"}
                    started = time.perf_counter()
                    last = None
                    for _ in range(jobs):
                        last = store.create_build(repo["id"], fields, [{}])
                    store.close()
                    server.wait_finished("bench", "r", last["number"], POLL)
                    server.wait_idle("bench", "r", POLL)  # every build, not just the last
                elapsed = time.perf_counter() - started
                if attempt:
                    rates.append(jobs / elapsed)
        finally:
            server.stop()
        print(f"  ({name}: {time.monotonic() - variant_started:.1f} s in all)", file=sys.stderr)
        record(f"dispatch: {jobs} jobs, 2 workers, {name}", rates, "jobs/s",
               statistics.median(floor), Ratio(at_least=target),
               note="baseline: Popen loop of `true`, 2 threads")


def bench_latency(work, samples):
    data = os.path.join(work, "latency")
    os.makedirs(data)
    repo_path = os.path.join(work, "repo-latency")
    sha = make_repo(repo_path, "clone: false\npipeline: {t: {commands: [true]}}\n")
    server = Server(data)
    try:
        server.request("POST", "/api/repos/bench/r", {"url": repo_path, "private": False})
        times = trigger_to_success(server, sha, samples)
    finally:
        server.stop()
    floor = spawn_times(samples)
    times.sort()
    p95 = times[int(len(times) * 0.95) - 1]
    record("latency: API trigger -> success, p50", times, "s", statistics.median(floor),
           Ratio(at_most=16, was="10 ms at 11-30's 0.6 ms floor"),
           note="baseline: spawn+wait of `true`")
    record("latency: API trigger -> success, p95", [p95], "s", statistics.median(floor),
           Ratio(at_most=40, was="25 ms at 11-30's floor"))


def trigger_to_success(server, sha, samples, warm_up=5, repo="r"):
    """Seconds from an API trigger of bench/`repo` to its job's success, each."""
    times = []
    for attempt in range(samples + warm_up):
        started = time.perf_counter()
        build = server.request("POST", f"/api/repos/bench/{repo}/builds", {"commit": sha})
        # Follow the job's live log, as a viewer would: the stream ends with
        # the job, committed in the same transaction as the build's status.
        stream = server.request("GET", f"/api/repos/bench/{repo}/logs/{build['number']}/1"
                                "?follow=1", raw=True)
        elapsed = time.perf_counter() - started
        assert b"event: end" in stream and b'"status": "success"' in stream, stream
        if attempt >= warm_up:
            times.append(elapsed)
    return times


BARE_BWRAP = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
              "--unshare-all", "--die-with-parent", "true"]


def spawn_times(samples, command=("true",)):
    """Seconds to spawn and wait for `command`, each."""
    floor = []
    for _ in range(samples):
        started = time.perf_counter()
        subprocess.run(list(command), check=True)
        floor.append(time.perf_counter() - started)
    return floor


def bench_big_log(work, repeats):
    command = f"yes {LINE} | head -c {FIFTY_MB}"
    data = os.path.join(work, "biglog")
    os.makedirs(data)
    repo_path = os.path.join(work, "repo-biglog")
    sha = make_repo(repo_path, f"clone: false\npipeline: {{t: {{commands: ['{command}']}}}}\n")
    server = Server(data)
    try:
        server.request("POST", "/api/repos/bench/r", {"url": repo_path, "private": False})
        # Warm up with one unmeasured run: the first build of a commit reads it
        # from git and loads the YAML parser (60-70 ms that no later build pays).
        build = server.request("POST", "/api/repos/bench/r/builds", {"commit": sha})
        server.wait_finished("bench", "r", build["number"], POLL)
        before = rss_kib(server.process.pid)
        reset_peak_rss(server.process.pid)
        runs, reads, file_runs = [], [], []
        for attempt in range(repeats):
            # Each sample is one job on an idle server, whose store an idle
            # executor checkpoints within 5 s: do that now rather than wait,
            # so no sample pays for the WAL of the ones before it.
            checkpoint = sqlite3.connect(os.path.join(data, "cirunner.db"))
            checkpoint.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            checkpoint.close()
            target = os.path.join(work, "biglog.out")
            started = time.perf_counter()
            subprocess.run(["sh", "-c", f"{command} > {target}"], check=True)
            file_runs.append(time.perf_counter() - started)
            started = time.perf_counter()
            build = server.request("POST", "/api/repos/bench/r/builds", {"commit": sha})
            server.wait_finished("bench", "r", build["number"], POLL)
            runs.append(time.perf_counter() - started)
            read_started = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(
                    f"http://127.0.0.1:{server.port}/api/repos/bench/r/logs/{build['number']}/1",
                    headers={"Accept": "text/plain"})) as response:
                size = 0
                while True:
                    block = response.read(1 << 20)
                    if not block:
                        break
                    size += len(block)
            reads.append(time.perf_counter() - read_started)
            assert size > FIFTY_MB, size
            file_read_started = time.perf_counter()
            with open(target, "rb") as handle:
                while handle.read(1 << 20):
                    pass
            file_read = time.perf_counter() - file_read_started
            os.remove(target)
        growth = (rss_kib(server.process.pid, "VmHWM") - before) / 1024
    finally:
        server.stop()
    base = statistics.median(file_runs)
    record("big log: 50 MB job, trigger -> success", runs, "s", base, "<= 1.5x the file run",
           statistics.median(runs) <= 1.5 * base, "baseline: same command > file")
    record("big log: read 50 MB back over HTTP", reads, "s", file_read,
           Ratio(at_most=30, was="0.2 s at 11-30's 6.5 ms file read"),
           note="baseline: read from a file")
    record("big log: server RSS growth (job + read)", [growth], "MiB", before / 1024,
           "<= 16 MiB", growth <= 16, f"baseline: RSS before; {ABSOLUTE}")


def used_bytes(db):
    """Bytes of the store's pages in use, after a checkpoint (WAL folded in)."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    return (pages - free) * page


def realistic_log(work, size=FIFTY_MB):
    """A build log like real ones, `size` bytes: this project's history with
    its diffs and a run of part of its test suite, repeated (1 MB or more
    before it repeats, so a 512 KiB chunk never holds a repeat)."""
    parts = [subprocess.run(["git", "-C", ROOT, "log", "-p", "--stat", "-n", "80"],
                            capture_output=True, check=False).stdout,
             subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                             "--co", os.path.join(ROOT, "test_cirunner.py")], cwd=ROOT,
                            capture_output=True, check=False).stdout]
    base = b"".join(parts)[:4 * 1024 * 1024]
    path = os.path.join(work, "realistic.log")
    with open(path, "wb") as handle:
        written = 0
        while written < size:
            piece = base[:size - written]
            handle.write(piece)
            written += len(piece)
    return path, len(base)


def bench_log_storage(work, runs=5):
    """Logs in the store: 50 MB of `yes` lines back to back (no checkpoint
    between: the WAL is what it is), what four of them take on disk, and a
    realistic 50 MB log's compression ratio and write time."""
    command = f"yes {LINE} | head -c {FIFTY_MB}"
    data = os.path.join(work, "logstore")
    os.makedirs(data)
    repo_path = os.path.join(work, "repo-logstore")
    sha = make_repo(repo_path, f"clone: false\npipeline: {{t: {{commands: ['{command}']}}}}\n")
    real, period = realistic_log(work)
    real_repo = os.path.join(work, "repo-realistic")
    real_sha = make_repo(real_repo, f"clone: false\npipeline: {{t: {{commands: ['cat {real}']}}}}\n")
    warm_repo = os.path.join(work, "repo-warm")
    warm_sha = make_repo(warm_repo, "clone: false\npipeline: {t: {commands: [true]}}\n")
    server = Server(data)
    db = os.path.join(data, "cirunner.db")
    try:
        for name, path in (("y", repo_path), ("real", real_repo), ("warm", warm_repo)):
            server.request("POST", f"/api/repos/bench/{name}", {"url": path})
        build = server.request("POST", "/api/repos/bench/warm/builds", {"commit": warm_sha})
        server.wait_finished("bench", "warm", build["number"], POLL)
        file_runs, job_runs = [], []
        target = os.path.join(work, "logstore.out")
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run(["sh", "-c", f"{command} > {target}"], check=True)
            file_runs.append(time.perf_counter() - started)
        before = used_bytes(db)
        for _ in range(runs):  # back to back, nothing in between
            started = time.perf_counter()
            build = server.request("POST", "/api/repos/bench/y/builds", {"commit": sha})
            server.wait_finished("bench", "y", build["number"], POLL)
            job_runs.append(time.perf_counter() - started)
        four = (used_bytes(db) - before) * 4 / runs
        before = used_bytes(db)
        started = time.perf_counter()
        subprocess.run(["sh", "-c", f"cat {real} > {target}"], check=True)
        cat_file = time.perf_counter() - started
        started = time.perf_counter()
        build = server.request("POST", "/api/repos/bench/real/builds", {"commit": real_sha})
        server.wait_finished("bench", "real", build["number"], POLL)
        real_run = time.perf_counter() - started
        real_stored = used_bytes(db) - before
        os.remove(target)
    finally:
        server.stop()
    base = statistics.median(file_runs)
    record("logs: 50 MB job back to back (5), worst", [max(job_runs)], "s", base,
           "<= 1.5x the file run", max(job_runs) <= 1.5 * base,
           f"samples {', '.join(f'{run * 1000:.0f} ms' for run in job_runs)}; baseline: > file")
    record("logs: four 50 MB `yes` logs in the store", [four / 1024 / 1024], "MiB", 200,
           "<= 10 MiB", four <= 10 * 1024 * 1024, "baseline: 200 MiB of log")
    record("logs: realistic 50 MB log, stored", [real_stored / 1024 / 1024], "MiB", 50,
           "(reported)", None, f"ratio {FIFTY_MB / max(real_stored, 1):.1f}:1; repeats every "
           f"{period // 1024} KiB")
    record("logs: realistic 50 MB log, trigger -> success", [real_run], "s", cat_file,
           "(reported)", None, "baseline: cat of the file > file")


def bench_wakeups(work, jobs=32):
    """`jobs` jobs of one build start on as many idle workers: when the last
    one starts after the trigger, and the whole build's wall time."""
    data = os.path.join(work, "wakeups")
    os.makedirs(data)
    repo_path = os.path.join(work, "repo-wakeups")
    sha = make_repo(repo_path, ("clone: false\npipeline: {t: {commands: ['date +%s.%N', "
                                "'sleep 1']}}\n" f"matrix: {{N: [{', '.join(map(str, range(jobs)))}]}}\n"))
    server = Server(data, workers=jobs)
    lasts, walls = [], []
    try:
        server.request("POST", "/api/repos/bench/r", {"url": repo_path, "private": False})
        for attempt in range(4):
            time.sleep(0.5)  # every worker idle again
            started = time.time()
            build = server.request("POST", "/api/repos/bench/r/builds", {"commit": sha})
            server.wait_finished("bench", "r", build["number"], POLL)
            wall = time.time() - started
            starts = []
            for job in range(1, jobs + 1):
                # Drone 0.5's answer to a client that sends no Accept: a
                # JSON array of lines, the date the one that is a number.
                lines = server.request("GET", f"/api/repos/bench/r/logs/{build['number']}/{job}")
                starts.append(next(float(line["out"]) for line in lines
                                   if re.fullmatch(r"\d+\.\d+", line["out"])))
            if attempt:  # the first is a warm-up
                lasts.append(max(starts) - started)
                walls.append(wall)
    finally:
        server.stop()
    record(f"wake-ups: {jobs} `sleep 1` jobs, {jobs} workers: last start", lasts, "s",
           popen_floor(jobs), Ratio(at_most=30, was="300 ms at 11-30's 10 ms for 32 spawns"),
           note=f"baseline: spawning {jobs} `true` from 2 threads")
    record(f"wake-ups: {jobs} `sleep 1` jobs, {jobs} workers: wall", walls, "s", 1.0,
           Ratio(at_most=1.25), note="baseline: the jobs' own 1 s")


def fill_store(data, builds):
    """A store with `builds` finished one-job builds of bench/r, written directly."""
    store = cirunner.Store.open(data)
    store.create_user("admin", admin=True)
    token = store.create_token("admin", name="bench")[1]
    # A path that exists (a repository path is checked when it is added);
    # the builds are written directly and never fetch from it.
    repo = store.create_repo("bench", "r", os.path.dirname(os.path.abspath(data)),
                             private=False)
    store.close()
    conn = sqlite3.connect(os.path.join(data, "cirunner.db"))
    now = int(time.time())
    with conn:
        conn.executemany(
            "INSERT INTO builds (repo_id, number, event, status, created_at, enqueued_at, "
            "started_at, finished_at, commit_sha, branch, ref, message, author) "
            "VALUES (?, ?, 'push', 'success', ?, ?, ?, ?, ?, 'main', 'refs/heads/main', ?, ?)",
            ((repo["id"], number, now, now, now, now + 1, f"{number:040x}", f"commit {number}",
              "bench") for number in range(1, builds + 1)))
        conn.execute("INSERT INTO jobs (build_id, number, status, environment, enqueued_at, "
                     "started_at, finished_at) SELECT id, 1, 'success', '{}', created_at, "
                     "started_at, finished_at FROM builds")
        conn.execute("UPDATE repos SET last_number = ?", (builds,))
    # Into the main file, as a server that has been running would have it, so
    # that the server under test does not spend its first seconds on this WAL.
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return token


def timed_pairs(small, small_path, large, large_path, count):
    """Time the same call on two servers, alternating, so that both see the
    same machine (a noisy neighbour hits both, not one). Each call has a query
    of its own, which the routes ignore: a repeated call would be answered
    from the server's read cache, and this measures the store's queries."""
    small_times, large_times = [], []
    for number in range(count):
        for server, path, times in ((small, small_path, small_times),
                                    (large, large_path, large_times)):
            separator = "&" if "?" in path else "?"
            started = time.perf_counter()
            server.request("GET", f"{path}{separator}nocache={number}", raw=True)
            times.append(time.perf_counter() - started)
    return small_times, large_times


def bench_api_scale(work, count, big):
    servers = {}
    try:
        for size in (100, big):
            data = os.path.join(work, f"scale-{size}")
            os.makedirs(data)
            token = fill_store(data, size)
            server = Server(data)
            server.token = token
            servers[size] = server
        for label, path_of in (
                ("builds list, first page", lambda n: "/api/repos/bench/r/builds"),
                ("builds list, middle page",
                 lambda n: f"/api/repos/bench/r/builds?page={n // 50}&per_page=25"),
                ("build detail (Drone)", lambda n: f"/api/repos/bench/r/builds/{n // 2}"),
                ("build detail (v1)", lambda n: f"/api/v1/bench/r/builds/{n // 2}")):
            small, large = timed_pairs(servers[100], path_of(100), servers[big], path_of(big),
                                       count)
            ratio = statistics.median(large) / statistics.median(small)
            record(f"API, {big} builds: {label}", large, "s", statistics.median(small),
                   "<= 1.2x 100 builds", ratio <= 1.2, "baseline: same call, 100 builds")
    finally:
        for server in servers.values():
            server.stop()


def bench_throughput(work, seconds, repeats):
    data = os.path.join(work, "throughput")
    os.makedirs(data)
    repo_path = os.path.join(work, "repo-throughput")
    lines = int((seconds * (repeats + 1) * 2 + 10) * 100)
    sha = make_repo(repo_path, (
        f"clone: false\npipeline: {{t: {{commands: ['for i in $(seq 1 {lines}); do echo line $i; "
        "sleep 0.01; done']}}\nmatrix: {N: ['1', '2']}\n"))
    server = Server(data)
    try:
        server.request("POST", "/api/repos/bench/r", {"url": repo_path, "private": False})
        build = server.request("POST", "/api/repos/bench/r/builds", {"commit": sha})
        time.sleep(0.5)
        path = f"/api/repos/bench/r/builds/{build['number']}"
        load(server, path, 1)  # warm-up
        rates, floors, uncached = [], [], []
        for _ in range(repeats):  # alternate, so that noise hits both alike
            rates.append(load(server, path, seconds))
            floors.append(load(server, "/api/version", seconds))
            uncached.append(load(server, path, seconds, vary=True))
        running = [job["status"] for job in server.request("GET", path)["jobs"]]
    finally:
        server.stop()
    tool = ("wrk, 10 keep-alive connections" if shutil.which("wrk")
            else "10 Python keep-alive clients")
    record("API: small JSON requests/s while 2 jobs log", rates, "req/s",
           statistics.median(floors), Ratio(at_least=0.38, was="2,000 req/s at 11-30's 5,223"),
           note=f"{tool}, GET a 2-job build; baseline: GET /api/version; jobs were {running}")
    # The same build, each request with a query of its own, so that none is
    # answered from the server's read cache: what a request costs when made.
    record("  same, every request a new one (no cache)", uncached, "req/s",
           statistics.median(floors), Ratio(at_least=0.23, was="1,200 req/s at 11-30's 5,223"),
           note="the query string varies (?nocache=N), which the route ignores")


# wrk: each request with a query string of its own (thread number, counter).
VARY_LUA = """
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("prefix", threads)
end
local counter = 0
function request()
  counter = counter + 1
  return wrk.format(nil, wrk.path .. "?nocache=" .. prefix .. "-" .. counter)
end
"""


def load(server, path, seconds, vary=False):
    """Requests/s for `path` from 10 keep-alive connections (wrk, if installed);
    with `vary`, every request has a query string of its own."""
    if not shutil.which("wrk"):
        return python_load(server, path, seconds, vary)
    command = ["wrk", "-t", "2", "-c", "10", "-d", f"{seconds}s", "-H",
               f"Authorization: Token {server.token}", f"http://127.0.0.1:{server.port}{path}"]
    with contextlib.ExitStack() as stack:
        if vary:
            script = stack.enter_context(tempfile.NamedTemporaryFile("w", suffix=".lua"))
            script.write(VARY_LUA)
            script.flush()
            command += ["-s", script.name]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))


def python_load(server, path, seconds, vary=False):
    counts = []
    deadline = time.monotonic() + seconds

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", server.port)
        done = 0
        while time.monotonic() < deadline:
            target = f"{path}?nocache={threading.get_ident()}-{done}" if vary else path
            connection.request("GET", target, headers={"Authorization": f"Token {server.token}"})
            connection.getresponse().read()
            done += 1
        counts.append(done)

    threads = [threading.Thread(target=client) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / seconds


def bench_footprint(work, builds):
    data = os.path.join(work, "footprint")
    os.makedirs(data)
    repo_path = os.path.join(work, "repo-footprint")
    sha = make_repo(repo_path, "clone: false\npipeline: {t: {commands: [true]}}\n")
    server = Server(data, extra=["--keep-builds", "0"])  # every build stays, to be counted
    try:
        time.sleep(1.0)
        idle = rss_kib(server.process.pid) / 1024
        server.request("POST", "/api/repos/bench/r", {"url": repo_path, "private": False})
        db = os.path.join(data, "cirunner.db")

        def size():
            return used_bytes(db), os.path.getsize(db)

        used_before, _ = size()
        numbers = []
        for _ in range(builds):
            build = server.request("POST", "/api/repos/bench/r/builds", {"commit": sha})
            numbers.append(build["id"])
        server.wait_finished("bench", "r", builds, 0.005)
        server.wait_idle("bench", "r")
        used_after, file_full = size()
        per_build = (used_after - used_before) / builds
        left = sum(len(dirs) + len(files) for _, dirs, files in
                   os.walk(os.path.join(data, "workspaces", "bench", "r")))
        for build_id in numbers:
            server.request("DELETE", f"/api/v1/bench/r/builds/{build_id}")
        store = cirunner.Store.open(data)
        store.checkpoint()  # what the server's maintenance thread does every few seconds
        store.close()
        _, file_after_delete = size()
    finally:
        server.stop()
    record("footprint: idle serve RSS", [idle], "MiB", None, "<= 40 MiB", idle <= 40, ABSOLUTE)
    record("footprint: database bytes per trivial build", [per_build], "B", 129,
           "<= 500 B", per_build <= 500, "baseline: Laminar's 129 B (measured separately)")
    record(f"footprint: folders left by {builds} builds", [left], "entries", None, "0",
           left == 0, "under DATA/workspaces/OWNER/NAME")
    record("footprint: file size after deleting them", [file_after_delete], "B", file_full,
           "< size before deleting", file_after_delete < file_full,
           "baseline: file size with the builds")


def timed_one_job_builds(data, repo_path, sha, samples, *, warm, sandbox="none"):
    """Seconds from trigger to the end of the followed log of `samples`
    one-job builds of `sha` on a server of its own (after `warm` more)."""
    server = Server(data, sandbox=sandbox)
    try:
        server.request("POST", "/api/repos/bench/r", {"url": repo_path, "private": False})
        times = []
        for attempt in range(samples + warm):
            started = time.perf_counter()
            build = server.request("POST", "/api/repos/bench/r/builds", {"commit": sha})
            stream = server.request("GET", f"/api/repos/bench/r/logs/{build['number']}/1"
                                    "?follow=1", raw=True)
            assert b'"status": "success"' in stream, stream
            if attempt >= warm:
                times.append(time.perf_counter() - started)
        return times
    finally:
        server.stop()


def timed_variant(work, name, pipeline, samples, *, warm, filename=".cirunner.yml",
                  sandbox="none"):
    """`timed_one_job_builds` of `pipeline` in a repository and a data
    directory of their own, named after `name`."""
    data = os.path.join(work, name)
    os.makedirs(data)
    repo_path = os.path.join(work, f"repo-{name}")
    sha = make_repo(repo_path, pipeline, filename=filename)
    return timed_one_job_builds(data, repo_path, sha, samples, warm=warm, sandbox=sandbox)


def record_per_step(figure, slower, faster, steps, baseline, target, note):
    """What each of `steps` steps costs more in the `slower` runs than in the
    `faster` ones (paired), against `baseline` (seconds; a Ratio target)."""
    per_step = [(slow - fast) / steps for slow, fast in zip(slower, faster)]
    record(figure, per_step, "s", baseline, target, note=note)


def bench_sandbox(work, samples, steps=10):
    """What the bubblewrap sandbox adds to each step, with its own network
    namespace and user-mode network stack: the same job of `steps` trivial
    steps, on a server with and one without the sandbox."""
    pipeline = "clone: false\npipeline:\n" + "".join(
        f"  s{index}: {{commands: [true]}}\n" for index in range(steps))
    durations = {sandbox: timed_variant(work, f"sandbox-{sandbox}", pipeline, samples, warm=3,
                                        sandbox=sandbox) for sandbox in ("none", "bwrap")}
    bare = statistics.median(spawn_times(samples, BARE_BWRAP))
    record_per_step(f"sandbox: overhead per step ({steps}-step job)", durations["bwrap"],
                    durations["none"], steps, bare,
                    Ratio(at_most=2.5, was="25 ms at a 10 ms bare bwrap"),
                    "each step's cost on --sandbox bwrap over --sandbox none; baseline: "
                    "a bare `bwrap --unshare-all ... true`")


def diamond_lattice(rows=10, width=5):
    """A Drone 1.x exec pipeline of rows x width trivial steps, each step
    depending on the one above it and the one above to the right (a lattice
    of diamonds); and the same steps with no depends_on (back to back)."""
    graph, serial = [], []
    for row in range(rows):
        for column in range(width):
            needs = [f"s{row - 1}-{c}" for c in (column, (column + 1) % width)] if row else []
            graph.append(f"- {{name: s{row}-{column}, commands: [true], depends_on: {needs}}}")
            serial.append(f"- {{name: s{row}-{column}, commands: [true]}}")
    head = "kind: pipeline\ntype: exec\nclone: {disable: true}\nsteps:\n"
    return head + "\n".join(graph) + "\n", head + "\n".join(serial) + "\n"


def bench_graph(work, samples, rows=10, width=5):
    """Scheduling a step graph: a 50-step diamond lattice against the same
    steps back to back, per step (the graph's steps may also run side by
    side: what is left over is the scheduler's cost)."""
    durations = {shape: timed_variant(work, f"graph-{shape}", pipeline, samples, warm=2,
                                      filename=".drone.yml")
                 for shape, pipeline in zip(("graph", "serial"), diamond_lattice(rows, width))}
    steps = rows * width
    record_per_step(f"graph: scheduling per step ({steps}-step diamond lattice)",
                    durations["graph"], durations["serial"], steps,
                    statistics.median(durations["serial"]) / steps,
                    Ratio(at_most=3.5, was="5 ms at 11-30's 1.4 ms per serial step"),
                    "baseline: the same steps back to back, per step")


CONTAINERS_CONF = """[engine]
runtime = "runc"

[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
"""


def busybox_image(work, engine_env, tag="localhost/cirunner-bench:1"):
    """A busybox image made here (no registry is reachable): the image of the bench's steps."""
    root = os.path.join(work, "bench-rootfs")
    os.makedirs(os.path.join(root, "bin"))
    shutil.copy(shutil.which("busybox"), os.path.join(root, "bin", "busybox"))
    for applet in ("sh", "true", "echo", "cat"):
        os.symlink("busybox", os.path.join(root, "bin", applet))
    archive = os.path.join(work, "bench-rootfs.tar")
    subprocess.run(["tar", "-C", root, "-cf", archive, "."], check=True)
    subprocess.run(["podman", "import", "--quiet", archive, tag], check=True,
                   capture_output=True, env={**os.environ, **engine_env})
    return tag


def bench_containers(work, samples):
    """A one-step job in a container, trigger to success, beside a bare
    `podman run --rm IMAGE true` on the same machine."""
    if not (shutil.which("podman") and shutil.which("busybox")):
        print("  (containers: skipped, needs podman and busybox-static)", file=sys.stderr)
        return
    conf = os.path.join(work, "containers.conf")
    with open(conf, "w") as handle:
        handle.write(CONTAINERS_CONF)
    engine_env = {"CONTAINERS_CONF": conf}
    image = busybox_image(work, engine_env)
    bare = []
    for attempt in range(samples + 2):
        started = time.perf_counter()
        subprocess.run(["podman", "run", "--rm", image, "true"], check=True,
                       env={**os.environ, **engine_env})
        if attempt >= 2:
            bare.append(time.perf_counter() - started)
    data = os.path.join(work, "containers")
    os.makedirs(data)
    repo_path = os.path.join(work, "repo-containers")
    sha = make_repo(repo_path, f"clone: false\npipeline: {{t: {{image: {image}, "
                               "commands: [true]}}\n")
    server = Server(data, engine="podman", environ=engine_env)
    times = []
    try:
        server.request("POST", "/api/repos/bench/r", {"url": repo_path, "private": False})
        for attempt in range(samples + 2):
            started = time.perf_counter()
            build = server.request("POST", "/api/repos/bench/r/builds", {"commit": sha})
            stream = server.request("GET", f"/api/repos/bench/r/logs/{build['number']}/1"
                                    "?follow=1", raw=True)
            assert b'"status": "success"' in stream, stream
            if attempt >= 2:
                times.append(time.perf_counter() - started)
    finally:
        server.stop()
    base = statistics.median(bare)
    record("containers: one-step job in an image, trigger -> success", times, "s", base,
           "<= 1.15x + 50 ms", statistics.median(times) <= 1.15 * base + 0.05,
           "baseline: podman run --rm IMAGE true")


def bench_triggers(work, repeats, count=500):
    """`count` clients trigger a build of one repository's branch at once: every
    trigger needs the remote's latest commit, and one `git fetch` serves all
    the triggers waiting for it."""
    data = os.path.join(work, "triggers")
    os.makedirs(data)
    repo_path = os.path.join(work, "repo-triggers")
    make_repo(repo_path, "clone: false\npipeline: {t: {commands: [true]}}\n")
    server = Server(data)
    rates, p99s, singles = [], [], []
    try:
        server.request("POST", "/api/repos/bench/r", {"url": repo_path, "private": False})
        for _ in range(3):  # one trigger alone, the baseline (the first also warms up)
            started = time.perf_counter()
            server.request("POST", "/api/repos/bench/r/builds", {"branch": "main"})
            singles.append(time.perf_counter() - started)
        for _ in range(repeats):
            times, statuses = trigger_at_once(server, count)
            wall = max(end for _, end in times) - min(start for start, _ in times)
            latencies = sorted(end - start for start, end in times)
            rates.append(count / wall)
            p99s.append(latencies[int(len(latencies) * 0.99) - 1])
            assert statuses == {201}, statuses
            server.wait_idle("bench", "r", POLL)
    finally:
        server.stop()
    single = statistics.median(singles[1:])
    record(f"triggers: {count} at once, one repo, accepted", rates, "builds/s", 1 / single,
           Ratio(at_least=1.7, was="issue 31's 150 builds/s at 11-30's 11.5 ms alone"),
           note="baseline: one trigger alone, as builds/s")
    record(f"triggers: {count} at once, p99 latency", p99s, "s", single,
           Ratio(at_most=87, was="issue 31's 1 s at 11-30's 11.5 ms alone"),
           note="baseline: one trigger alone")


def trigger_at_once(server, count):
    """POST `count` builds from as many connections, released together."""
    barrier = threading.Barrier(count)
    times, statuses = [], set()
    lock = threading.Lock()

    def trigger():
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        body = json.dumps({"branch": "main"})
        headers = {"Authorization": f"Token {server.token}", "Content-Type": "application/json"}
        connection.connect()
        barrier.wait()
        started = time.perf_counter()
        connection.request("POST", "/api/repos/bench/r/builds", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        ended = time.perf_counter()
        connection.close()
        with lock:
            times.append((started, ended))
            statuses.add(response.status)

    threads = [threading.Thread(target=trigger) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return times, statuses


class SoakClients:
    """The clients of a soak run, each in its own thread: triggers, API
    readers, live-log followers, and a sampler of file size and memory."""

    READS = ("/api/repos/bench/s/builds?per_page=25", "/api/v1/bench/s/builds?limit=20",
             "/api/version", "/api/repos/bench/s/builds/latest?branch=main", "/api/queue",
             "/api/repos/bench/s")

    def __init__(self, server, database):
        self.server, self.database = server, database
        self.errors, self.lock, self.done = collections.Counter(), threading.Lock(), \
            threading.Event()
        self.samples, self.made = [], 0

    def fail(self, kind):
        with self.lock:
            self.errors[kind] += 1

    def connection(self):
        return http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60)

    def call(self, conn, method, path):
        headers = {"Authorization": f"Token {self.server.token}",
                   "Content-Type": "application/json"}
        conn.request(method, path, body=b"{}" if method == "POST" else None, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()

    def trigger(self, count):
        conn = self.connection()
        for _ in range(count):
            try:
                status, _ = self.call(conn, "POST", "/api/repos/bench/s/builds")
            except OSError as exc:
                self.fail(f"trigger: {exc}")
                conn = self.connection()
                continue
            if status != 201:
                self.fail(f"trigger {status}")
            with self.lock:
                self.made += 1

    def read(self, index):
        conn, turn = self.connection(), index
        while not self.done.is_set():
            turn += 1
            try:
                status, _ = self.call(conn, "GET", self.READS[turn % len(self.READS)])
            except OSError as exc:
                self.fail(f"read: {exc}")
                conn = self.connection()
                continue
            if status not in (200, 404):  # latest: none at first
                self.fail(f"read {status}")

    def follow(self):
        conn = self.connection()
        while not self.done.is_set():
            try:
                status, body = self.call(conn, "GET", "/api/repos/bench/s/builds?per_page=1")
                newest = json.loads(body) if status == 200 else []
                if not newest:
                    time.sleep(0.05)
                    continue
                # A follow may wait long for its job (the queue is deep): past
                # serve's 30 s keep-alive, the list's connection is closed on the
                # server's side; the next list call opens a new one.
                conn.close()
                stream = self.connection()
                stream.request("GET", f"/api/repos/bench/s/logs/{newest[0]['number']}/1"
                                      "?follow=1", headers={"Accept": "text/event-stream"})
                response = stream.getresponse()
                if response.status not in (200, 404, 503):  # 404: pruned meanwhile
                    self.fail(f"follow {response.status}")
                response.read()  # to the end event
                stream.close()
            except (OSError, http.client.HTTPException) as exc:  # a stream cut short too
                self.fail(f"follow: {exc!r}"[:120])
                conn = self.connection()

    def sample(self):
        while not self.done.wait(0.5):
            self.samples.append((self.made, os.path.getsize(self.database),
                                 rss_kib(self.server.process.pid) / 1024))

    def run(self, builds):
        """Start everyone, make `builds` builds, wait for the queue to empty."""
        threads = [threading.Thread(target=self.read, args=(index,)) for index in range(20)]
        threads += [threading.Thread(target=self.follow) for _ in range(10)]
        threads.append(threading.Thread(target=self.sample))
        triggers = [threading.Thread(target=self.trigger, args=(builds // 4,)) for _ in range(4)]
        for thread in threads + triggers:
            thread.start()
        for thread in triggers:
            thread.join()
        self.server.wait_idle("bench", "s", poll=0.1)
        self.done.set()
        for thread in threads:
            thread.join(30)


class _NormalSyncStore(cirunner.Store):
    """The store as it was before acknowledged commits were synced: every
    commit with synchronous=NORMAL (the baseline of the durability figure)."""

    @contextlib.contextmanager
    def _durably(self, conn, durable):
        yield


def bench_durability(work, builds=300, rounds=5):
    """What syncing each acknowledged commit (synchronous=FULL for a build's
    creation and each job's end) costs a trivial build, against the same
    store with every commit NORMAL: the store's own calls, no HTTP."""
    samples = {"full": [], "normal": []}
    for round_number in range(rounds):
        for kind, store_class in (("full", cirunner.Store), ("normal", _NormalSyncStore)):
            data = os.path.join(work, f"durability-{kind}-{round_number}")
            os.makedirs(data)
            store = store_class.open(data)
            try:
                repo = store.create_repo("bench", "d", work, private=False)
                store.register_runner("bench:1:a", "bench", os.getpid())
                started = time.perf_counter()
                for _ in range(builds):
                    store.create_build(repo["id"], {"event": "manual"}, [{}])
                    job = store.claim_next_job("bench:1:a")
                    store.finish_job(job["id"], cirunner.SUCCESS)
                samples[kind].append((time.perf_counter() - started) / builds * 1000)
            finally:
                store.close()
    full, normal = statistics.median(samples["full"]), statistics.median(samples["normal"])
    record("durability: ms per trivial build, FULL sync", samples["full"], "ms", normal,
           "<= +2 ms per build", full - normal <= 2.0,
           "baseline: every commit NORMAL; two synced commits per build (made, job end)")


def bench_soak(work, builds=2000, keep=200):
    """A long unattended run, shortened: `builds` builds over 8 workers while
    20 clients read the API and 10 follow live logs, with retention (the
    newest `keep` builds) pruning as it goes, at its default pace."""
    data = os.path.join(work, "soak")
    os.makedirs(data)
    repo_path = os.path.join(work, "repo-soak")
    make_repo(repo_path, "clone: false\npipeline: {t: {commands: ['seq 1 300']}}\n")
    server = Server(data, workers=8, extra=["--keep-builds", str(keep)])
    clients = SoakClients(server, os.path.join(data, "cirunner.db"))
    try:
        server.request("POST", "/api/repos/bench/s", {"url": repo_path, "private": False})
        server.request("POST", "/api/repos/bench/s/builds", {})
        server.wait_idle("bench", "s")
        start_rss = rss_kib(server.process.pid) / 1024
        started = time.monotonic()
        clients.run(builds)
        elapsed = time.monotonic() - started
        time.sleep(2)  # one more pruning round after the last build
        end_rss = rss_kib(server.process.pid) / 1024
        kept = len(server.request("GET", "/api/repos/bench/s/builds?per_page=100&page=3"))
    finally:
        clients.done.set()
        server.stop()
    # The store holding just the kept builds (what retention aims at), against
    # the largest the file was once retention applied (past 2 x keep builds).
    store = cirunner.Store.open(data)
    try:
        cirunner.prune(store, keep_builds=keep, keep_days=0)
        store.checkpoint()
        while store.give_back_space():
            pass
        store.checkpoint()
    finally:
        store.close()
    at_limit = os.path.getsize(os.path.join(data, "cirunner.db"))
    applied = [size for count, size, _ in clients.samples if count >= 2 * keep]
    growth = max(applied) / at_limit if applied else None
    # Memory growth from the moment every thread, connection and cache has been
    # used (a tenth of the builds in) to the end: what would go on growing.
    warm_rss = next((rss for count, _, rss in clients.samples if count >= builds // 10),
                    start_rss)
    errors = sum(clients.errors.values())
    print(f"  soak: {builds} builds in {elapsed:.1f} s ({builds / elapsed:.0f} builds/s); "
          f"{dict(clients.errors) or 'no errors'}; file at most {max(applied, default=0)} "
          f"bytes, {at_limit} holding the kept builds; builds beyond the newest 200: {kept}",
          file=sys.stderr)
    record(f"soak: {builds} builds, 8 workers, 30 clients: errors", [errors], "errors", None,
           "0", errors == 0, "20 API readers, 10 live followers")
    record("soak: db file, largest / at the retention limit", [growth or 0], "x", None,
           "<= 1.25x", growth is not None and growth <= 1.25,
           f"keep-builds {keep}, default pruning pace")
    record("soak: serve RSS growth, warm to end", [end_rss - warm_rss], "MiB", None,
           "<= 20 MiB", end_rss - warm_rss <= 20,
           f"from {warm_rss:.0f} MiB at {builds // 10} builds (idle before: {start_rss:.0f})")


class PostgresCluster:
    """A PostgreSQL server of the bench's own (Debian's binaries), on 127.0.0.1,
    with its default settings (fsync on); as `postgres` when run as root."""

    def __init__(self):
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        initdb = binaries[-1] if binaries else shutil.which("initdb")
        if initdb is None:
            raise FileNotFoundError("initdb (apt-get install postgresql)")
        self.bin = os.path.dirname(initdb)
        self.base = tempfile.mkdtemp(prefix="cirunner-bench-pg-")
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.base, "postgres")
        self.data = os.path.join(self.base, "data")
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8")
        options = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
                   "-c max_connections=300")
        self._run("pg_ctl", "-D", self.data, "-o", options, "-l",
                  os.path.join(self.base, "server.log"), "-w", "start")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}"

    def _run(self, program, *args):
        subprocess.run([*self.as_user, os.path.join(self.bin, program), *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.base)

    def create_database(self):
        import psycopg  # only this section needs it

        name = "bench_" + uuid.uuid4().hex[:12]
        with psycopg.connect(f"{self.url}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"{self.url}/{name}"

    def stop(self):
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)


class Agent:
    """A real `cirunner agent` on a PostgreSQL store."""

    def __init__(self, data_dir, db, key_from, workers=2, labels=""):
        # As an operator copies the first server's key to the agent's machine.
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        shutil.copy(os.path.join(key_from, "secret.key"), os.path.join(data_dir, "secret.key"))
        os.chmod(os.path.join(data_dir, "secret.key"), 0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CIRUNNER_")}
        env.update(CIRUNNER_LOG_LEVEL="WARNING", PYTHONPATH=ROOT)
        self.out = open(os.path.join(data_dir, "agent.out"), "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cirunner", "agent", "--data", data_dir, "--db", db,
             "--workers", str(workers), "--sandbox", "none", "--engine", "none",
             *(("--labels", labels) if labels else ())],
            stdout=self.out, stderr=subprocess.STDOUT, env=env)

    def stop(self):
        stop_process(self.process)
        self.out.close()


def bench_postgres(work, repeats, jobs=200, claims=10_000):
    """The store on PostgreSQL (a cluster of its own, default settings: fsync
    on): dispatch over three agents, trigger-to-success through a server with
    the job on an agent, and claim contention."""
    try:
        cluster = PostgresCluster()
    except FileNotFoundError as exc:
        print(f"  (postgres: skipped, {exc})", file=sys.stderr)
        return
    try:
        _bench_pg_dispatch(work, cluster, repeats, jobs)
        _bench_pg_latency(work, cluster, 20 if repeats == 1 else 50)
        _bench_pg_claims(work, cluster, claims)
    finally:
        cluster.stop()


def _wait_jobs_done(store, poll=POLL):
    """Wait until no job of the store is pending or running."""
    while any(store.count_by_status("jobs").get(status) for status in cirunner.ACTIVE_STATUSES):
        time.sleep(poll)


def _bench_pg_dispatch(work, cluster, repeats, jobs):
    db = cluster.create_database()
    data = os.path.join(work, "pg-dispatch")
    store = cirunner.open_store(data, db)
    repo_path = os.path.join(work, "repo-pg-dispatch")
    pipeline = "clone: false\npipeline: {t: {commands: [true]}}\n"
    sha = make_repo(repo_path, pipeline)
    repo = store.create_repo("bench", "r", repo_path)
    pipeline_id = store.save_pipeline(".cirunner.yml", pipeline,
                                      cirunner.parse_pipeline(pipeline).to_json())
    fields = {"event": "manual", "branch": "main", "commit_sha": sha,
              "pipeline_id": pipeline_id, "pipeline_file": ".cirunner.yml"}
    agents = [Agent(os.path.join(work, f"pg-agent-{n}"), db, data) for n in range(3)]
    try:
        while len(store.active_runners()) < 3:
            if any(agent.process.poll() is not None for agent in agents):
                raise RuntimeError("an agent exited: see its agent.out")
            time.sleep(0.05)
        rates = []
        for attempt in range(repeats + 1):  # the first is a warm-up
            started = time.perf_counter()
            for _ in range(jobs):
                store.create_build(repo["id"], fields, [{}])
            _wait_jobs_done(store)
            if attempt:
                rates.append(jobs / (time.perf_counter() - started))
        import psycopg  # as an operator reads the shared database
        with psycopg.connect(db) as conn:
            counts = dict(conn.execute("SELECT claimed_by, count(*) FROM jobs "
                                       "GROUP BY claimed_by").fetchall())
    finally:
        for agent in agents:
            agent.stop()
        store.close()
    floor = [jobs / popen_floor(jobs) for _ in range(repeats)]
    record(f"postgres: {jobs} jobs over 3 agents x 2 workers", rates, "jobs/s",
           statistics.median(floor), Ratio(at_least=0.064, was="200 jobs/s at a 3,148 floor"),
           note=f"baseline: Popen loop of `true`, 2 threads; jobs per agent "
                f"{sorted(counts.values())}")


def _bench_pg_latency(work, cluster, samples):
    db = cluster.create_database()
    data = os.path.join(work, "pg-latency")
    os.makedirs(data)
    repo_path = os.path.join(work, "repo-pg-latency")
    # Only the agents have the label: the job always crosses processes.
    sha = make_repo(repo_path, "labels: {pool: agents}\nclone: false\n"
                               "pipeline: {t: {commands: [true]}}\n")
    server = Server(data, extra=("--db", db))
    agents = [Agent(os.path.join(work, f"pg-lat-agent-{n}"), db, data, labels="pool=agents")
              for n in range(3)]
    try:
        server.request("POST", "/api/repos/bench/r", {"url": repo_path, "private": False})
        time.sleep(1.0)  # the agents are up
        times = trigger_to_success(server, sha, samples)
    finally:
        for agent in agents:
            agent.stop()
        server.stop()
    floor = spawn_times(samples)
    record("postgres: API trigger -> success on an agent, p50", times, "s",
           statistics.median(floor), Ratio(at_most=32, was="20 ms at a 0.6 ms floor"),
           note="baseline: spawn+wait of `true`; the job requires an agent's label")


def _bench_pg_claims(work, cluster, claims, workers=12):
    db = cluster.create_database()
    store = cirunner.open_store(os.path.join(work, "pg-claims"), db)
    repo_path = os.path.join(work, "repo-pg-claims")
    make_repo(repo_path, "pipeline: {t: {commands: [true]}}\n")
    repo = store.create_repo("bench", "r", repo_path)
    per_build = 1000
    for _ in range(claims // per_build):
        store.create_build(repo["id"], {"event": "manual"}, [{"N": str(n)}
                                                              for n in range(per_build)])
    claimed, errors = [], []
    lock = threading.Lock()

    def worker(index):
        runner = f"bench-{index}"
        while True:
            try:
                job = store.claim_next_job(runner)
            except Exception as exc:  # noqa: BLE001 - counted: a deadlock would show here
                with lock:
                    errors.append(repr(exc))
                continue
            if job is None:
                return
            store.finish_job(job["id"], cirunner.SUCCESS)
            with lock:
                claimed.append(job["id"])

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    twice = len(claimed) - len(set(claimed))
    store.close()
    ok = twice == 0 and not errors and len(claimed) == claims
    record(f"postgres: {claims} claims by {workers} workers", [len(claimed) / elapsed],
           "jobs/s", None, "none twice, no deadlock", ok,
           f"claimed {len(claimed)}, twice {twice}, errors {len(errors)} "
           f"{errors[:1] if errors else ''}")


class HttpAgent:
    """A real `cirunner agent --server URL --token TOKEN` (no database, no key)."""

    def __init__(self, data_dir, server, name, workers=2, sandbox="none"):
        os.makedirs(data_dir, exist_ok=True)
        token = server.request("POST", "/api/agents", {"name": name})["token"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CIRUNNER_")}
        env.update(CIRUNNER_LOG_LEVEL="WARNING", PYTHONPATH=ROOT)
        self.log_path = os.path.join(data_dir, "agent.out")
        self.out = open(self.log_path, "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cirunner", "agent", "--server",
             f"http://127.0.0.1:{server.port}", "--token", token, "--data", data_dir,
             "--workers", str(workers), "--sandbox", sandbox, "--engine", "none"],
            stdout=self.out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 20
        while "runs jobs from" not in pathlib.Path(self.log_path).read_text():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the agent did not start: see {self.log_path}")
            time.sleep(0.05)

    def stop(self):
        stop_process(self.process)
        self.out.close()


def bench_agents(work, repeats, jobs=200):
    """Agents over HTTP against a SQLite `serve --workers 0`: dispatch over two
    agents, trigger-to-success of a job on an agent, a 50 MB log produced on
    an agent (against the same job run by serve itself), an idle agent's RSS."""
    data = os.path.join(work, "agents")
    os.makedirs(data)
    server = Server(data, workers=0)
    agents = []
    try:
        agents = [HttpAgent(os.path.join(work, f"http-agent-{n}"), server, f"bench-{n}")
                  for n in range(2)]
        time.sleep(1.0)
        idle = [rss_kib(agent.process.pid) / 1024 for agent in agents]
        _bench_agent_dispatch(work, server, repeats, jobs, data)
        repo_path = os.path.join(work, "repo-agents-latency")
        sha = make_repo(repo_path, "clone: false\npipeline: {t: {commands: [true]}}\n")
        server.request("POST", "/api/repos/bench/lat", {"url": repo_path, "private": False})
        times = trigger_to_success(server, sha, 20 if repeats == 1 else 50, repo="lat")
        on_agents = _big_log_runs(work, server, "agent", repeats)
    finally:
        for agent in agents:
            agent.stop()
        server.stop()
    floor = spawn_times(50)
    record("agents: API trigger -> success on an agent, p50", times, "s",
           statistics.median(floor), Ratio(at_most=32, was="20 ms at a 0.6 ms floor"),
           note="baseline: spawn+wait of `true`; serve --workers 0, 2 HTTP agents")
    local_data = os.path.join(work, "agents-local")
    os.makedirs(local_data)
    local = Server(local_data, workers=2)
    try:
        by_serve = _big_log_runs(work, local, "serve", repeats)
    finally:
        local.stop()
    base = statistics.median(by_serve)
    record("agents: 50 MB log produced on an agent", on_agents, "s", base,
           "<= 2x serve itself", statistics.median(on_agents) <= 2 * base,
           "baseline: the same job run by serve itself")
    record("agents: idle agent RSS", idle, "MiB", None, "<= 30 MiB", max(idle) <= 30,
           f"{ABSOLUTE}'s Python")


def _bench_agent_dispatch(work, server, repeats, jobs, data):
    repo_path = os.path.join(work, "repo-agents-dispatch")
    pipeline = "clone: false\npipeline: {t: {commands: [true]}}\n"
    sha = make_repo(repo_path, pipeline)
    server.request("POST", "/api/repos/bench/r", {"url": repo_path, "private": False})
    store = cirunner.Store.open(data)
    repo = store.get_repo("bench", "r")
    pipeline_id = store.save_pipeline(".cirunner.yml", pipeline,
                                      cirunner.parse_pipeline(pipeline).to_json())
    fields = {"event": "manual", "branch": "main", "commit_sha": sha,
              "pipeline_id": pipeline_id, "pipeline_file": ".cirunner.yml"}
    rates = []
    try:
        for attempt in range(repeats + 1):  # the first is a warm-up
            started = time.perf_counter()
            last = None
            for _ in range(jobs):
                last = store.create_build(repo["id"], fields, [{}])
            server.wait_finished("bench", "r", last["number"], POLL)
            server.wait_idle("bench", "r", POLL)
            if attempt:
                rates.append(jobs / (time.perf_counter() - started))
    finally:
        store.close()
    floor = [jobs / popen_floor(jobs) for _ in range(repeats)]
    record(f"agents: {jobs} jobs over 2 HTTP agents x 2 workers", rates, "jobs/s",
           statistics.median(floor), Ratio(at_least=0.064, was="200 jobs/s at a 3,148 floor"),
           note="baseline: Popen loop of `true`, 2 threads; SQLite serve --workers 0")


def _big_log_runs(work, server, where, repeats):
    """Seconds from trigger to success of a job printing 50 MB, each run."""
    command = f"yes {LINE} | head -c {FIFTY_MB}"
    repo_path = os.path.join(work, f"repo-agents-biglog-{where}")
    sha = make_repo(repo_path, f"clone: false\npipeline: {{t: {{commands: ['{command}']}}}}\n")
    server.request("POST", "/api/repos/bench/big", {"url": repo_path, "private": False})
    runs = []
    for attempt in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        build = server.request("POST", "/api/repos/bench/big/builds", {"commit": sha})
        finished = server.wait_finished("bench", "big", build["number"], POLL)
        assert finished["status"] == "success", finished
        if attempt:
            runs.append(time.perf_counter() - started)
    return runs


# Each section, in the order they run: (name, run(work, repeats, quick)).
SECTION_RUNS = (
    ("dispatch", lambda work, repeats, quick: bench_dispatch(work, repeats)),
    ("latency", lambda work, repeats, quick: bench_latency(work, 20 if quick else 50)),
    ("biglog", lambda work, repeats, quick: bench_big_log(work, repeats)),
    ("api", lambda work, repeats, quick: bench_api_scale(work, 50 if quick else 300,
                                                         10_000 if quick else 100_000)),
    ("throughput", lambda work, repeats, quick: bench_throughput(work, 3 if quick else 4,
                                                                 repeats)),
    ("sandbox", lambda work, repeats, quick: bench_sandbox(work, 10 if quick else 30)),
    ("graph", lambda work, repeats, quick: bench_graph(work, 5 if quick else 15)),
    ("containers", lambda work, repeats, quick: bench_containers(work, 5 if quick else 15)),
    ("triggers", lambda work, repeats, quick: bench_triggers(work, 1 if quick else 3)),
    ("footprint", lambda work, repeats, quick: bench_footprint(work, 50 if quick else 600)),
    ("logs", lambda work, repeats, quick: bench_log_storage(work)),
    ("wakeups", lambda work, repeats, quick: bench_wakeups(work)),
    ("durability", lambda work, repeats, quick: bench_durability(work, 100 if quick else 300)),
    ("soak", lambda work, repeats, quick: bench_soak(work)),
    ("postgres", lambda work, repeats, quick: bench_postgres(work, repeats)),
    ("agents", lambda work, repeats, quick: bench_agents(work, repeats)),
)
SECTIONS = tuple(name for name, _ in SECTION_RUNS)
SLOW_SECTIONS = ("biglog", "logs", "soak")  # not with --quick


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a subset in under a minute")
    parser.add_argument("--json", default=os.path.join(HERE, "results.json"))
    parser.add_argument("--only", action="append", choices=sorted(SECTIONS), metavar="SECTION",
                        help=f"run only this section (repeatable): {', '.join(sorted(SECTIONS))}")
    args = parser.parse_args()
    # As `pip install` leaves it: compiled once into __pycache__ (Python reads
    # that even with PYTHONDONTWRITEBYTECODE set, which only stops writing it).
    # Compiling at each start costs the server 20-25 MiB of memory it keeps.
    py_compile.compile(os.path.join(ROOT, "cirunner.py"), doraise=True)
    wanted = set(args.only or SECTIONS)
    repeats = 1 if args.quick else 3
    work = tempfile.mkdtemp(prefix="cirunner-bench-")
    if os.geteuid() == 0:  # a server run as root runs steps as nobody, who must pass through
        os.chmod(work, 0o711)
    print(f"cirunner {cirunner.__version__} benchmarks, {os.cpu_count()} CPUs, "
          f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}"
          f"{' (quick)' if args.quick else ''}")
    print(f"{'figure':<46} {'median':>12} {'min-max':>24} {'baseline':>12} {'ratio':>7}  "
          f"{'target':<22} result")
    started = time.monotonic()
    try:
        for name, run in SECTION_RUNS:
            if name in wanted and (name not in SLOW_SECTIONS or not args.quick):
                run(work, repeats, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    targets = [row for row in RESULTS if row["pass"] is not None]
    passed = sum(row["pass"] for row in targets)
    print(f"{passed} of {len(targets)} targets met in {time.monotonic() - started:.0f} s")
    with open(args.json, "w") as handle:
        json.dump({"quick": args.quick, "results": RESULTS}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
