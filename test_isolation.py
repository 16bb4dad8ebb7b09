"""Isolation of builds: steps in a bubblewrap sandbox, against a real `cirunner
serve`. Its own file: it needs bubblewrap (Debian's `bubblewrap`), which
.ci/run installs.

Each test plays a user with a write token on a repository of their own, who
tries to reach what the server keeps from them.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import sys
import time

import pytest

import cirunner
from test_cirunner import (
    GitDaemon,
    Server,
    commit_files,
    http_json,
    http_text,
    wait_for,
    workspace_of,
)

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None,
                                reason="needs bubblewrap: apt-get install bubblewrap")

SECRET = "hunter2-of-bob-0123456789"
GRACE = 2  # the Server fixture's --grace


@pytest.fixture
def servers():
    started = []

    def start(data_dir, *extra):
        # The server's own HOME holds a file a step must not read.
        home = pathlib.Path(data_dir).parent / "server-home"
        home.mkdir(exist_ok=True)
        (home / ".netrc").write_text("machine forge login bob password hunter3\n")
        server = Server(data_dir, "--sandbox", "bwrap", *extra, env={"HOME": str(home)})
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def git_daemon(tmp_path):
    daemon = GitDaemon(tmp_path / "served")
    yield daemon
    daemon.stop()


def add_user(server, login):
    """A user with a write token (made with the CLI on the server's store)."""
    store = cirunner.Store.open(server.data_dir)
    try:
        store.create_user(login)
        return {"Authorization": f"Token {store.create_token(login)[1]}"}
    finally:
        store.close()


def api(server, auth, method, path, body=None):
    return http_json(method, server.url + path, body, auth)


def run_build(server, auth, full_name, body=None, timeout=30):
    status, build = api(server, auth, "POST", f"/api/repos/{full_name}/builds", body or {})
    assert status == 201, build

    def finished():
        now = api(server, auth, "GET", f"/api/repos/{full_name}/builds/{build['number']}")[1]
        return now if now["status"] in cirunner.DONE_STATUSES else None

    return wait_for(finished, timeout=timeout)


# -- what a step can see and change --------------------------------------------------

PROBE = r"""#!/bin/sh
# Each line: PROBE <name> ok|blocked
try() { name=$1; shift; if "$@" >/dev/null 2>&1; then echo "PROBE $name ok"; else echo "PROBE $name blocked"; fi; }
try read-key cat "$DATA/secret.key"
try read-db head -c 16 "$DATA/cirunner.db"
try read-wal ls "$DATA/cirunner.db-wal"
try other-mirror ls "$DATA/mirrors/bob/priv.git"
try other-workspace ls "$DATA/workspaces/bob"
try own-mirror-config cat "$DATA/mirrors/alice/attack.git/config"
try other-environ sh -c 'cat /proc/[0-9]*/environ 2>/dev/null | tr "\0" "\n" | grep -q "^BOB_TOKEN="'
try server-home cat "$SERVER_HOME/.netrc"
try other-process sh -c 'ps -eo args | grep -v grep | grep -q "sleep 4242"'
try write-etc touch /etc/cirunner-was-here
try write-data touch "$DATA/planted"
try write-venv touch "$VENV/planted"
try write-usr touch /usr/local/bin/planted
try write-workspace touch planted-in-workspace
try write-tmp touch /tmp/planted
try write-home touch "$HOME/planted"
try git-log git log -1 --format=%s
try git-status git status --short
env | grep -q "^BOB_TOKEN=" && echo "PROBE secret-in-env ok" || echo "PROBE secret-in-env blocked"
"""

ALLOWED = {"write-workspace", "write-tmp", "write-home", "git-log", "git-status"}


def probes(log):
    return dict(re.findall(r"^PROBE (\S+) (ok|blocked)$", log, re.MULTILINE))


@pytest.mark.parametrize("event", ["push", "pull_request"])
def test_a_sandboxed_step_cannot_read_or_change_the_server(tmp_path, servers, git_daemon,
                                                           event):
    data = tmp_path / "data"
    server = servers(data)
    bob, alice = add_user(server, "bob"), add_user(server, "alice")
    # bob: a private repository with a secret, and a job of his running now
    bob_repo = git_daemon.repo("bob", {".cirunner.yml": "pipeline: {t: {commands: ['sleep 4242']}}\n"})
    assert api(server, bob, "POST", "/api/repos/bob/priv", {"url": bob_repo, "private": True})[0] == 201
    status, _ = api(server, bob, "POST", "/api/repos/bob/priv/secrets",
                    {"name": "BOB_TOKEN", "value": SECRET, "events": ["manual", "pull_request"]})
    assert status == 201
    assert api(server, bob, "POST", "/api/repos/bob/priv/builds", {})[0] == 201
    wait_for(lambda: api(server, bob, "GET", "/api/repos/bob/priv/builds/1")[1]["status"]
             == "running")
    # alice: her own repository, whose step tries everything
    alice_repo = git_daemon.repo("alice", {
        "probe.sh": PROBE, ".cirunner.yml": "pipeline: {t: {commands: ['sh probe.sh']}}\n"})
    assert api(server, alice, "POST", "/api/repos/alice/attack", {"url": alice_repo})[0] == 201
    variables = {"DATA": str(data), "VENV": sys.prefix,
                 "SERVER_HOME": str(tmp_path / "server-home")}
    build = run_build(server, alice, "alice/attack", {"variables": variables, "event": event})
    log = http_text(server.url + f"/api/repos/alice/attack/logs/{build['number']}/1")
    found = probes(log)
    assert len(found) == 19, log
    assert {name for name, result in found.items() if result == "ok"} == ALLOWED, log
    for path in (data / "planted", pathlib.Path(sys.prefix) / "planted", "/etc/cirunner-was-here",
                 "/usr/local/bin/planted", tmp_path / "server-home" / "planted",
                 pathlib.Path("/tmp/planted")):
        assert not os.path.exists(path), path  # nothing reached the host
    assert build["status"] == "success"
    assert api(server, bob, "DELETE", "/api/repos/bob/priv/builds/1")[0] == 200


def test_a_job_path_leaves_out_the_servers_virtual_environment(tmp_path, servers):
    server = servers(tmp_path / "data")
    repo = str(tmp_path / "repo")
    commit_files(repo, {".cirunner.yml": "pipeline: {t: {commands: ['echo \"PATH=$PATH\"', "
                                         "'echo \"VENV=${VIRTUAL_ENV:-none}\"']}}\n"})
    server.api("POST", "/api/repos/alice/hello", {"url": repo})
    build = run_build(server, server.auth, "alice/hello")
    log = http_text(server.url + f"/api/repos/alice/hello/logs/{build['number']}/1")
    path = re.search(r"^PATH=(.*)$", log, re.MULTILINE).group(1).split(os.pathsep)
    assert os.path.join(sys.prefix, "bin") not in path  # the tests run serve from a venv
    assert sys.prefix != sys.base_prefix and "VENV=none" in log


# -- every process of a job ends with it ---------------------------------------------

# The seven ways to outlive a job; each pattern sleeps a number of its own, so
# that the test finds its processes on the host by their command line.
DETACHED = [
    "nohup sleep {n}1 >/dev/null 2>&1 &",
    "setsid sleep {n}2 &",
    "(sleep {n}3 &) &",
    "setsid env -i sleep {n}4 &",
    "(unset CIRUNNER_JOB_TOKEN; setsid sleep {n}5 &)",
    "sh -c 'trap \"\" TERM; exec sleep {n}6' &",
    "setsid sh -c 'while :; do echo x >> daemon.log; sleep 0.1; done # {n}7' >/dev/null 2>&1 &",
]


def detach_pipeline(n, then):
    commands = [pattern.format(n=n) for pattern in DETACHED] + ["echo detached", then]
    return "pipeline:\n  t:\n    commands:\n" + "".join(
        f"      - {json.dumps(command)}\n" for command in commands)


def host_pids(n):
    """Host pids of the processes the patterns above started (by command line)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    command = handle.read().replace(b"\x00", b" ").decode(errors="replace")
            except OSError:
                continue
            if re.search(rf"\b{n}[1-7]\b", command) and "pytest" not in command:
                pids.append(int(entry))
    return pids


def growing(path):
    """Whether a file grows over half a second."""
    before = path.stat().st_size if path.exists() else 0
    time.sleep(0.5)
    return (path.stat().st_size if path.exists() else 0) > before


@pytest.mark.parametrize("ending", ["job end", "cancel", "serve SIGTERM"])
def test_every_detached_process_of_a_sandboxed_job_dies_with_it(tmp_path, servers, ending):
    n = {"job end": 71, "cancel": 72, "serve SIGTERM": 73}[ending]
    server = servers(tmp_path / "data", "--keep-workspaces")
    repo = str(tmp_path / "repo")
    then = "sleep 0.5" if ending == "job end" else "sleep 600"
    commit_files(repo, {".cirunner.yml": detach_pipeline(n, then)})
    server.api("POST", "/api/repos/alice/hello", {"url": repo})
    assert server.api("POST", "/api/repos/alice/hello/builds", {})[0] == 201
    daemon_log = workspace_of(server.data_dir, "alice/hello", 1, 1) / "daemon.log"
    wait_for(lambda: "\ndetached\n" in http_text(server.url + "/api/repos/alice/hello/logs/1/1"))
    pids = host_pids(n)
    assert len(pids) >= 7
    assert growing(daemon_log)
    ended = time.monotonic()
    if ending == "cancel":
        assert server.api("DELETE", "/api/repos/alice/hello/builds/1")[0] == 200
    elif ending == "serve SIGTERM":
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=GRACE + 10) == 0
    if ending != "serve SIGTERM":
        wait_for(lambda: server.api("GET", "/api/repos/alice/hello/builds/1")[1]["status"]
                 in cirunner.DONE_STATUSES, timeout=GRACE + 5)
    wait_for(lambda: not host_pids(n), timeout=GRACE + 2)
    assert time.monotonic() - ended < GRACE + 3
    assert all(not os.path.exists(f"/proc/{pid}") or _zombie(pid) for pid in pids)
    assert not growing(daemon_log)


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_kill_9_of_serve_ends_a_sandboxed_job_and_restart_records_it(tmp_path, servers):
    data = tmp_path / "data"
    server = servers(data)
    repo = str(tmp_path / "repo")
    commit_files(repo, {".cirunner.yml": detach_pipeline(74, "sleep 600")})
    server.api("POST", "/api/repos/alice/hello", {"url": repo})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    wait_for(lambda: len(host_pids(74)) >= 7)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    wait_for(lambda: not host_pids(74), timeout=5)  # the sandboxes die with their parent
    server = servers(data)
    status, build = http_json("GET", server.url + "/api/repos/alice/hello/builds/1")
    assert status == 200 and build["status"] == "error"
    assert "runner stopped" in build["jobs"][0]["error"]


def test_serve_names_its_isolation_and_warns_without_a_sandbox(tmp_path):
    server = Server(tmp_path / "sandboxed", "--sandbox", "auto")
    unsandboxed = Server(tmp_path / "plain", "--sandbox", "none")
    try:
        assert "steps in bwrap" in server.output() and "WARNING" not in server.output()
        warning = [line for line in unsandboxed.output().splitlines() if "WARNING" in line]
        assert len(warning) == 1
        assert "can read and change this server's data" in warning[0]
        assert "apt-get install bubblewrap" in warning[0]
    finally:
        server.stop()
        unsandboxed.stop()
