"""Isolation of builds: steps in a bubblewrap sandbox, against a real `cirunner
serve`. Its own file: it needs bubblewrap (Debian's `bubblewrap`), which
.ci/run installs.

Each test plays a user with a write token on a repository of their own, who
tries to reach what the server keeps from them.
"""

import contextlib
import json
import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import cirunner
import test_cirunner
from test_cirunner import (  # noqa: F401 - steps_reach_tmp_path is autouse
    GitDaemon,
    Server,
    commit_files,
    http_json,
    http_text,
    steps_reach_tmp_path,
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

    def start(data_dir, *extra, env_path=None):
        # The server's own HOME holds a file a step must not read.
        home = pathlib.Path(data_dir).parent / "server-home"
        home.mkdir(exist_ok=True)
        (home / ".netrc").write_text("machine forge login bob password hunter3\n")
        env = {"HOME": str(home)}
        if env_path:
            env["PATH"] = f"{env_path}:{os.environ['PATH']}"
        server = Server(data_dir, "--sandbox", "bwrap", *extra, env=env)
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
    assert api(server, alice, "POST", "/api/repos/alice/attack",
               {"url": alice_repo, "private": False})[0] == 201
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
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
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


def grows(path, timeout=30):
    """Wait until a file grows (a condition, not a nap): True once it has."""
    before = path.stat().st_size if path.exists() else 0
    wait_for(lambda: (path.stat().st_size if path.exists() else 0) > before, timeout=timeout,
             interval=0.05)
    return True


def writers(path):
    """Pids of the processes that hold `path` open (from /proc): none left
    means nothing can make it grow any more."""
    found = []
    target = os.path.realpath(path)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") == target:
                        found.append(int(entry))
                        break
    return found


@pytest.mark.parametrize("ending", ["job end", "cancel", "serve SIGTERM"])
def test_every_detached_process_of_a_sandboxed_job_dies_with_it(tmp_path, servers, ending):
    n = {"job end": 71, "cancel": 72, "serve SIGTERM": 73}[ending]
    server = servers(tmp_path / "data", "--keep-workspaces")
    repo = str(tmp_path / "repo")
    then = "sleep 0.5" if ending == "job end" else "sleep 600"
    commit_files(repo, {".cirunner.yml": detach_pipeline(n, then)})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    assert server.api("POST", "/api/repos/alice/hello/builds", {})[0] == 201
    daemon_log = workspace_of(server.data_dir, "alice/hello", 1, 1) / "daemon.log"
    wait_for(lambda: "\ndetached\n" in http_text(server.url + "/api/repos/alice/hello/logs/1/1"))
    pids = host_pids(n)
    assert len(pids) >= 7
    assert grows(daemon_log)
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
    assert writers(daemon_log) == []  # nothing left that could write it


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
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
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


# -- the boundary: nothing a pipeline writes reaches a host process ------------------

EVIL_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
/* Runs in every process that loads it: leaves a marker in a folder of the
   host (where a sandboxed process cannot write) and prints the server's key
   if it can read it. */
__attribute__((constructor)) static void evil(void) {
    char path[4096];
    unsigned char key[64];
    snprintf(path, sizeof path, "%s/ran-uid%d-pid%d", MARKERS, (int)getuid(), (int)getpid());
    int fd = open(path, O_WRONLY | O_CREAT, 0666);
    if (fd >= 0) close(fd);
    fd = open(KEY, O_RDONLY);
    if (fd >= 0) {
        ssize_t n = read(fd, key, sizeof key);
        close(fd);
        fprintf(stderr, "STOLEN-KEY ");
        for (ssize_t i = 0; i < n; i++) fprintf(stderr, "%02x", key[i]);
        fprintf(stderr, "\n");
    }
    fprintf(stderr, "EVIL-RAN uid=%d\n", (int)getuid());
}
"""


def build_evil_library(tmp_path, key_path):
    """evil.so, made with the C compiler, and the host folder it marks."""
    markers = tmp_path / "markers"
    markers.mkdir()
    markers.chmod(0o777)
    source = tmp_path / "evil.c"
    source.write_text(EVIL_C)
    library = tmp_path / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source),
                    f'-DMARKERS="{markers}"', f'-DKEY="{key_path}"'], check=True)
    # It works: loaded into a host process, it leaves its marker.
    subprocess.run(["/bin/true"], env={"LD_PRELOAD": str(library)}, check=True,
                   stderr=subprocess.DEVNULL)
    assert list(markers.iterdir())
    for marker in markers.iterdir():
        marker.unlink()
    return library, markers


def commit_binary(repo, name, data):
    path = pathlib.Path(repo) / name
    path.write_bytes(data)
    test_cirunner.git(repo, "add", "-A")
    test_cirunner.git(repo, "commit", "-q", "-m", f"add {name}")


@pytest.mark.parametrize("route", ["step environment", "build variable", "secret"])
def test_ld_preload_from_a_pipeline_never_loads_into_a_host_process(tmp_path, servers, route):
    data = tmp_path / "data"
    server = servers(data)
    library, markers = build_evil_library(tmp_path, data / "secret.key")
    repo = str(tmp_path / "repo")
    in_workspace = str(workspace_of(data, "alice/hello", 1, 1) / "evil.so")
    environment = ("    environment:\n      LD_PRELOAD: ${CI_WORKSPACE}/evil.so\n"
                   if route == "step environment" else "")
    commit_files(repo, {".cirunner.yml": f"pipeline:\n  t:\n{environment}"
                                         "    commands: [echo step-ran]\n"})
    commit_binary(repo, "evil.so", library.read_bytes())
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    body = {}
    if route == "build variable":
        body = {"variables": {"LD_PRELOAD": in_workspace}}
    elif route == "secret":
        assert server.api("POST", "/api/repos/alice/hello/secrets",
                          {"name": "LD_PRELOAD", "value": in_workspace})[0] == 201
    build = run_build(server, server.auth, "alice/hello", body)
    log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
    assert build["status"] == "success", log
    assert "step-ran" in log
    assert "EVIL-RAN" in log  # it reached the step, inside the sandbox...
    assert "STOLEN-KEY" not in log  # ...where the key is out of reach
    assert (data / "secret.key").read_bytes().hex() not in log
    assert list(markers.iterdir()) == []  # and no host process loaded it


def test_a_secret_is_on_no_command_line_nor_in_a_host_process_environment(tmp_path, servers):
    server = servers(tmp_path / "data")
    repo = str(tmp_path / "repo")
    commit_files(repo, {".cirunner.yml": "pipeline: {t: {commands: ['echo started', "
                                         "'sleep 600']}}\n"})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    server.api("POST", "/api/repos/alice/hello/secrets", {"name": "TOKEN", "value": SECRET})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    wait_for(lambda: "started" in http_text(server.url + "/api/repos/alice/hello/logs/1/1"))
    hosts = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = pathlib.Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = pathlib.Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        assert SECRET.encode() not in command
        if command.split(b"\0")[0].endswith((b"bwrap", b"slirp4netns")):
            hosts += 1
            assert SECRET.encode() not in environ  # the step's own processes hold it
    assert hosts >= 2
    server.api("DELETE", "/api/repos/alice/hello/builds/1")


# -- the sandbox hides the host's doors ---------------------------------------------

DOORS = """\
import socket, sys
def attempt(name, family, address):
    try:
        sock = socket.socket(family)
        sock.settimeout(3)
        sock.connect(address)
        print("DOOR", name, "open")
    except OSError:
        print("DOOR", name, "closed")
attempt("api-loopback", socket.AF_INET, ("127.0.0.1", int(sys.argv[1])))
attempt("unix-socket", socket.AF_UNIX, sys.argv[2])
attempt("outbound", socket.AF_INET, (sys.argv[3], int(sys.argv[4])))
"""


def host_address():
    """An address of this machine that is not loopback (as the network sees it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent
            return probe.getsockname()[0]
        except OSError:
            return None


def test_a_sandboxed_step_reaches_neither_the_hosts_loopback_nor_its_unix_sockets(
        tmp_path, servers):
    server = servers(tmp_path / "data")
    # A unix socket where services keep theirs (/run), and a service that
    # listens on every address, which outbound connections may reach.
    run = pathlib.Path(os.environ.get("XDG_RUNTIME_DIR") or "/run")
    folder = pathlib.Path(tempfile.mkdtemp(dir=run, prefix="cirunner-test-"))
    listeners = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_INET)]
    try:
        listeners[0].bind(str(folder / "db.sock"))
        folder.chmod(0o755)
        (folder / "db.sock").chmod(0o777)
        listeners[1].bind(("0.0.0.0", 0))
        for listener in listeners:
            listener.listen(8)
        address = host_address()
        repo = str(tmp_path / "repo")
        commit_files(repo, {"doors.py": DOORS, ".cirunner.yml": (
            "pipeline: {t: {commands: ['id -u', 'python3 doors.py $API_PORT $SOCKET $HOST_IP "
            "$OUT_PORT', 'cat /etc/shadow || echo shadow-closed']}}\n")})
        server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
        build = run_build(server, server.auth, "alice/hello", {"variables": {
            "API_PORT": str(server.port), "SOCKET": str(folder / "db.sock"),
            "HOST_IP": address or "127.0.0.1",
            "OUT_PORT": str(listeners[1].getsockname()[1])}})
    finally:
        for listener in listeners:
            listener.close()
        shutil.rmtree(folder, ignore_errors=True)
    log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
    doors = dict(re.findall(r"^DOOR (\S+) (open|closed)$", log, re.MULTILINE))
    assert doors["api-loopback"] == "closed", log
    assert doors["unix-socket"] == "closed", log
    if address:  # a machine with a network: the way out works
        assert doors["outbound"] == "open", log
    uid = int(re.search(r"^\+ id -u\n(\d+)$", log, re.MULTILINE).group(1))
    assert uid != 0  # never root, even when serve is
    assert "shadow-closed" in log and "root:" not in log
    assert build["status"] == "success"


def test_sandbox_network_host_is_an_opt_out_with_a_warning(tmp_path, servers):
    server = servers(tmp_path / "data", "--sandbox-network", "host")
    assert "WARNING: --sandbox-network host" in server.output()
    repo = str(tmp_path / "repo")
    commit_files(repo, {"doors.py": DOORS, ".cirunner.yml": (
        "pipeline: {t: {commands: ['python3 doors.py $API_PORT /nowhere 127.0.0.1 1']}}\n")})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    run_build(server, server.auth, "alice/hello",
              {"variables": {"API_PORT": str(server.port)}})
    log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
    assert "DOOR api-loopback open" in log


# -- isolation fails closed, and says how it is ---------------------------------------


def fake_tool(folder, name, script):
    folder.mkdir(exist_ok=True)
    tool = folder / name
    tool.write_text("#!/bin/sh\n" + script)
    tool.chmod(0o755)
    return folder


def _zombie_children(names):
    """Our own children that have exited and wait to be reaped, by pid."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    stat = handle.read()
            except OSError:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            state, parent = stat[stat.rindex(")") + 2:].split()[:2]
            if state == "Z" and int(parent) == os.getpid() and name in names:
                found.add(int(entry))
    return found


def test_checking_the_sandbox_leaves_no_zombie_behind(tmp_path):
    store = cirunner.Store.open(str(tmp_path / "data"))
    try:
        before = _zombie_children({"bwrap", "slirp4netns"})
        for _ in range(3):  # as an embedder (or a test suite) making executors
            executor = cirunner.Executor(store, workers=1, engine="none")
            executor.runner.check()
            assert executor.runner.problem == "", executor.runner.problem
        assert _zombie_children({"bwrap", "slirp4netns"}) - before == set()
    finally:
        store.close()


def test_bwrap_failing_while_it_makes_the_sandbox_is_named_not_a_broken_pipe(tmp_path):
    # A bind whose source is gone (a mount gone while bwrap built its view)
    # ends bwrap after it has said who its child is: the error used to be
    # "Broken pipe" or "the sandbox's network namespace is gone".
    store = cirunner.Store.open(str(tmp_path / "data"))
    try:
        runner = cirunner.Executor(store, workers=1, engine="none", sandbox="bwrap").runner
        for _ in range(3):
            process = runner._launch(["/bin/true"], env={},
                                     binds=[(str(tmp_path / "gone"), False)])
            said = process.popen.stdout.read()
            process.popen.stdout.close()
            runner._finish(process)
            assert not process.started
            assert process.start_error == ("bwrap ended while it made the sandbox: what it "
                                           "said is in the step's log")
            assert b"Can't find source path" in said
        runner.reap_networks()
        runner.reap()
    finally:
        store.close()


def test_auto_without_a_working_sandbox_refuses_host_steps_naming_the_fix(tmp_path):
    broken = fake_tool(tmp_path / "bin", "bwrap",
                       'echo "bwrap: No permissions to create a new namespace" >&2; exit 1\n')
    server = Server(tmp_path / "data", "--sandbox", "auto",
                    env={"PATH": f"{broken}:{os.environ['PATH']}"})
    try:
        assert "WARNING: no sandbox can be made here" in server.output()
        repo = str(tmp_path / "repo")
        commit_files(repo, {".cirunner.yml": "pipeline: {t: {commands: [echo never]}}\n"})
        server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
        build = run_build(server, server.auth, "alice/hello")
        log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
        assert build["status"] == "error"
        error = build["jobs"][0]["error"]
        assert "No permissions to create a new namespace" in error
        assert "--sandbox none" in error
        assert "never" not in log.replace("echo never", "")
        health = http_json("GET", server.url + "/healthz")[1]
        assert health["isolation"]["steps"] == "unavailable"
    finally:
        server.stop()


def test_a_sandbox_that_fails_to_start_a_step_is_tried_once_more_then_an_error(tmp_path,
                                                                                servers):
    flags = tmp_path / "flags"  # the wrapper runs as the step user (nobody, for root)
    flags.mkdir(mode=0o777)
    flags.chmod(0o777)
    flag = flags / "fail"
    real = shutil.which("bwrap")
    wrapper = fake_tool(tmp_path / "bin", "bwrap", (
        f'if [ -e {flag} ]; then n=$(cat {flag}); echo $((n - 1)) > {flag}; '
        f'[ "$n" -gt 1 ] || rm -f {flag}; '
        'echo "bwrap: Can\'t mount tmpfs on /newroot/x: No such file or directory" >&2; '
        f'exit 1; fi\nexec {real} "$@"\n'))
    server = servers(tmp_path / "data", env_path=str(wrapper))
    repo = str(tmp_path / "repo")
    commit_files(repo, {".cirunner.yml": "pipeline: {t: {commands: [echo ran]}}\n"})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    flag.write_text("1")  # the next start fails once
    flag.chmod(0o666)
    build = run_build(server, server.auth, "alice/hello")
    log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
    assert build["status"] == "success", log
    assert ("bwrap ended while it made the sandbox: what it said is in the step's log; "
            "trying once more") in log
    assert "bwrap: Can't mount tmpfs on /newroot/x" in log  # what it said
    flag.write_text("2")  # both tries fail: the runner's fault, never the step's
    flag.chmod(0o666)
    build = run_build(server, server.auth, "alice/hello")
    assert build["status"] == "error"
    assert build["jobs"][0]["error"] == ("step 't': bwrap ended while it made the sandbox: "
                                           "what it said is in the step's log")


def test_healthz_and_each_log_say_how_steps_are_isolated(tmp_path, servers):
    server = servers(tmp_path / "data")
    health = http_json("GET", server.url + "/healthz")[1]
    assert health["isolation"]["steps"] == "bwrap"
    assert health["isolation"]["network"] == "private"
    repo = str(tmp_path / "repo")
    commit_files(repo, {".cirunner.yml": "pipeline: {t: {commands: [echo hi]}}\n"})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    run_build(server, server.auth, "alice/hello")
    log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
    assert log.startswith("cirunner: steps on the host run in bwrap (own network")


# -- workspaces --------------------------------------------------------------------


def test_a_workspace_a_step_locked_up_is_removed_and_the_build_restarts(tmp_path, servers):
    data = tmp_path / "data"
    server = servers(data)
    repo = str(tmp_path / "repo")
    commit_files(repo, {".cirunner.yml": (
        "pipeline: {t: {commands: ['mkdir -p locked/inner/deeper', 'touch locked/inner/f', "
        "'chmod 000 locked/inner/deeper', 'chmod 500 locked/inner', 'chmod 000 locked']}}\n")})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    assert run_build(server, server.auth, "alice/hello")["status"] == "success"
    wait_for(lambda: not workspace_of(data, "alice/hello", 1, 1).exists())
    assert server.api("POST", "/api/repos/alice/hello/builds/1")[0] == 202
    wait_for(lambda: server.api("GET", "/api/repos/alice/hello/builds/1")[1]["status"]
             == "success")
    wait_for(lambda: not workspace_of(data, "alice/hello", 1, 1).exists())


def test_a_root_server_runs_host_steps_as_nobody_through_setpriv(tmp_path, servers):
    """As root, even unsandboxed steps run as the step user, with none of the
    server's groups; the switch is setpriv's (Python's own user switch needs a
    full fork of the server, milliseconds a step: dispatch fell 4x with it)."""
    nobody = pwd.getpwnam("nobody")
    user = cirunner._StepUser(nobody.pw_uid, nobody.pw_gid, "nobody")
    argv, options = user.switched(["/bin/true"])
    assert argv[0] == shutil.which("setpriv") and argv[-2:] == ["--", "/bin/true"]
    assert options == {}
    server = servers(tmp_path / "data", "--sandbox", "none")
    repo = str(tmp_path / "repo")
    commit_files(repo, {".cirunner.yml": "pipeline: {t: {commands: ['id -u', 'id -G']}}\n"})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    assert run_build(server, server.auth, "alice/hello")["status"] == "success"
    log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
    assert f"+ id -u\n{nobody.pw_uid}\n+ id -G\n{nobody.pw_gid}\n" in log, log
