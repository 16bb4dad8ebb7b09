"""Steps in container images, on a real podman, against a real `cirunner serve`.
Its own file: it needs a container engine (Debian's `podman`, `runc` and
`busybox-static`, which .ci/run installs) and images it builds itself, since no
image registry is reachable here.

On this kind of machine podman needs two settings that are the engine's
business, not cirunner's: the runc runtime and lower default limits. They go in
a containers.conf that the tests point podman at with CONTAINERS_CONF; serve
passes its environment to the engine and needs no special case.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

import cirunner
from test_cirunner import Server, commit_files, http_json, http_text, wait_for, workspace_of
from test_isolation import DETACHED, growing, host_pids

pytestmark = pytest.mark.skipif(shutil.which("podman") is None or shutil.which("busybox") is None,
                                reason="needs podman and busybox-static: apt-get install "
                                       "podman runc busybox-static")

IMAGE = "localhost/cirunner-test"
PLUGIN = "localhost/cirunner-plugin:1"
GRACE = 2
CONTAINERS_CONF = """\
[engine]
runtime = "runc"

[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
"""


@pytest.fixture(scope="session")
def engine_env(tmp_path_factory):
    """The environment serve and the tests give podman."""
    folder = tmp_path_factory.mktemp("podman")
    conf = folder / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return {"CONTAINERS_CONF": str(conf)}


def podman(engine_env, *args, check=True):
    return subprocess.run(["podman", *args], env={**os.environ, **engine_env}, text=True,
                          capture_output=True, check=check)


@pytest.fixture(scope="session")
def images(engine_env, tmp_path_factory):
    """localhost/cirunner-test:1 and :2 (busybox, /VERSION 1 or 2, a web page to
    serve), and a plugin image whose entrypoint prints its PLUGIN_* settings."""
    for tag in ("1", "2"):
        root = tmp_path_factory.mktemp(f"rootfs{tag}")
        for folder in ("bin", "etc", "tmp", "www", "root"):
            (root / folder).mkdir()
        shutil.copy(shutil.which("busybox"), root / "bin" / "busybox")
        applets = subprocess.run([str(root / "bin" / "busybox"), "--list"], text=True,
                                 capture_output=True, check=True).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        (root / "VERSION").write_text(f"{tag}\n")
        (root / "www" / "index.html").write_text(f"served-by-httpd-{tag}\n")
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        archive = tmp_path_factory.mktemp(f"image{tag}") / "rootfs.tar"
        subprocess.run(["tar", "-C", str(root), "-cf", str(archive), "."], check=True)
        podman(engine_env, "import", "--quiet", str(archive), f"{IMAGE}:{tag}")
        if tag == "1":
            podman(engine_env, "import", "--quiet", "--change",
                   'ENTRYPOINT ["/bin/sh", "-c", "env | grep ^PLUGIN_ | sort"]',
                   str(archive), PLUGIN)
    return {"1": f"{IMAGE}:1", "2": f"{IMAGE}:2"}


@pytest.fixture
def servers(engine_env, images):
    started = []

    def start(data_dir, *extra):
        server = Server(data_dir, "--engine", "podman", *extra, env=engine_env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def leftovers(engine_env, data_dir):
    """Containers, networks and volumes podman still has of this store."""
    store_key = hashlib.sha1(
        os.path.abspath(os.path.join(data_dir, "cirunner.db")).encode()).hexdigest()[:10]
    found = []
    for listing in (["ps", "--all"], ["network", "ls"], ["volume", "ls"]):
        found += podman(engine_env, *listing, "--quiet", "--filter",
                        f"label=cirunner.store={store_key}").stdout.split()
    return found


def build_of(server, full_name, number):
    return server.api("GET", f"/api/repos/{full_name}/builds/{number}")[1]


def finished(server, full_name, number, timeout=60):
    def done():
        build = build_of(server, full_name, number)
        return build if build["status"] in cirunner.DONE_STATUSES else None

    return wait_for(done, timeout=timeout)


DRONE_05 = """\
workspace:
  base: /drone
pipeline:
  test:
    image: localhost/cirunner-test:${TAG}
    commands:
      - echo "image VERSION $(cat /VERSION)"
      - echo "workspace $(pwd)"
      - test -f README
      - for i in $(seq 100); do wget -q -O - http://web/index.html && break; sleep 0.1; done
      - test ! -e "$DATA_DIR/cirunner.db" && test ! -e "$DATA_DIR/secret.key"
      - test ! -e "$DATA_DIR/workspaces" && echo "data dir not mounted"
  announce:
    image: localhost/cirunner-plugin:1
    channel: dev
    recipients: [alice, bob]
    options: {level: 2}
    when:
      event: [push, manual]
services:
  web:
    image: localhost/cirunner-test:1
    command: [httpd, -f, -p, "80", -h, /www]
matrix:
  TAG: ["1", "2"]
"""


def test_a_drone_pipeline_runs_in_its_images_with_a_service_and_a_plugin(tmp_path, servers):
    data = tmp_path / "data"
    server = servers(data)
    repo = str(tmp_path / "repo")
    commit_files(repo, {".drone.yml": DRONE_05, "README": "hello\n"})
    server.api("POST", "/api/repos/alice/hello", {"url": repo})
    status, _ = server.api("POST", "/api/repos/alice/hello/builds",
                           {"variables": {"DATA_DIR": str(data)}})
    assert status == 201
    build = finished(server, "alice/hello", 1)
    assert build["status"] == "success", build
    for number, tag in ((1, "1"), (2, "2")):
        log = http_text(server.url + f"/api/repos/alice/hello/logs/1/{number}")
        assert f"image VERSION {tag}" in log
        assert "workspace /drone/src/alice/hello" in log  # a local repository: no host part
        assert "served-by-httpd-1" in log  # the service, by its name
        assert "data dir not mounted" in log
        settings = sorted(re.findall(r"^PLUGIN_\w+=.*$", log, re.MULTILINE))
        assert settings == ["PLUGIN_CHANNEL=dev", 'PLUGIN_OPTIONS={"level": 2}',
                            "PLUGIN_RECIPIENTS=alice,bob"]
        steps = build["jobs"][number - 1]["steps"]
        assert [(step["name"], step["kind"], step["status"]) for step in steps] == [
            ("web", "service", "success"), ("test", "step", "success"),
            ("announce", "plugin", "success")]


def test_nothing_of_a_container_job_is_left_behind(tmp_path, servers, engine_env):
    data = tmp_path / "data"
    server = servers(data)
    repo = str(tmp_path / "repo")
    commit_files(repo, {".drone.yml": DRONE_05, "README": "hello\n"})
    server.api("POST", "/api/repos/alice/hello", {"url": repo})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    assert finished(server, "alice/hello", 1)["status"] == "success"
    assert leftovers(engine_env, data) == []


def container_detach_pipeline(n, then):
    commands = [pattern.format(n=n) for pattern in DETACHED] + ["echo detached", then]
    return ("pipeline:\n  t:\n    image: localhost/cirunner-test:1\n    commands:\n" + "".join(
        f"      - {json.dumps(command)}\n" for command in commands))


@pytest.mark.parametrize("ending", ["job end", "cancel", "serve SIGTERM"])
def test_every_process_of_a_container_step_ends_with_the_job(tmp_path, servers, engine_env,
                                                             ending):
    n = {"job end": 81, "cancel": 82, "serve SIGTERM": 83}[ending]
    data = tmp_path / "data"
    server = servers(data, "--keep-workspaces")
    daemon_log = workspace_of(data, "alice/hello", 1, 1) / "daemon.log"
    repo = str(tmp_path / "repo")
    then = "sleep 0.5" if ending == "job end" else "sleep 600"
    commit_files(repo, {".drone.yml": container_detach_pipeline(n, then)})
    server.api("POST", "/api/repos/alice/hello", {"url": repo})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    wait_for(lambda: "\ndetached\n" in http_text(server.url + "/api/repos/alice/hello/logs/1/1"),
             timeout=30)
    assert len(host_pids(n)) >= 7
    assert growing(daemon_log)
    ended = time.monotonic()
    if ending == "cancel":
        assert server.api("DELETE", "/api/repos/alice/hello/builds/1")[0] == 200
        assert finished(server, "alice/hello", 1)["status"] == "killed"
    elif ending == "serve SIGTERM":
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=GRACE + 20) == 0
    else:
        assert finished(server, "alice/hello", 1)["status"] == "success"
    wait_for(lambda: not host_pids(n), timeout=GRACE + 5)
    assert time.monotonic() - ended < GRACE + 8
    assert not growing(daemon_log)
    wait_for(lambda: leftovers(engine_env, data) == [], timeout=10)


def test_cancel_of_a_container_step_kills_it_within_the_grace_period(tmp_path, servers,
                                                                     engine_env):
    data = tmp_path / "data"
    server = servers(data)
    repo = str(tmp_path / "repo")
    commit_files(repo, {".drone.yml": (
        "pipeline:\n  t:\n    image: localhost/cirunner-test:1\n    commands:\n"
        "      - echo started\n      - trap '' TERM; sleep 600\n")})
    server.api("POST", "/api/repos/alice/hello", {"url": repo})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    wait_for(lambda: "started\n" in http_text(server.url + "/api/repos/alice/hello/logs/1/1")
             .replace("echo started", ""), timeout=30)
    cancelled = time.monotonic()
    assert server.api("DELETE", "/api/repos/alice/hello/builds/1")[0] == 200
    build = finished(server, "alice/hello", 1, timeout=GRACE + 10)
    assert time.monotonic() - cancelled < GRACE + 2 + 1  # + the engine's own start-up
    assert build["jobs"][0]["status"] == "killed" and build["jobs"][0]["exit_code"] == 137
    assert leftovers(engine_env, data) == []


def test_kill_9_of_serve_during_a_container_step_then_restart_cleans_up(tmp_path, servers,
                                                                        engine_env):
    data = tmp_path / "data"
    server = servers(data)
    repo = str(tmp_path / "repo")
    commit_files(repo, {".drone.yml": (
        "pipeline:\n  t:\n    image: localhost/cirunner-test:1\n    commands:\n"
        "      - echo started\n      - sleep 600\n")})
    server.api("POST", "/api/repos/alice/hello", {"url": repo})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    wait_for(lambda: "started\n" in http_text(server.url + "/api/repos/alice/hello/logs/1/1")
             .replace("echo started", ""), timeout=30)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    assert leftovers(engine_env, data) != []  # the container outlives a killed server...
    server = servers(data)
    wait_for(lambda: leftovers(engine_env, data) == [], timeout=20)  # ...until the next start
    build = build_of(server, "alice/hello", 1)
    assert build["status"] == "error" and "runner stopped" in build["jobs"][0]["error"]


def test_privileged_needs_a_trusted_repository(tmp_path, servers):
    server = servers(tmp_path / "data")
    repo = str(tmp_path / "repo")
    commit_files(repo, {".drone.yml": (
        "pipeline:\n  t:\n    image: localhost/cirunner-test:1\n    privileged: true\n"
        "    commands: [echo privileged-ran]\n")})
    server.api("POST", "/api/repos/alice/hello", {"url": repo})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    build = finished(server, "alice/hello", 1)
    assert build["status"] == "error"
    assert "'privileged'" in build["jobs"][0]["error"]
    assert "--trusted true" in build["jobs"][0]["error"]
    store = cirunner.Store.open(server.data_dir)  # alice may not trust her own repository
    try:
        store.create_user("alice")
        alice = {"Authorization": f"Token {store.create_token('alice')[1]}"}
    finally:
        store.close()
    status, body = http_json("PATCH", server.url + "/api/repos/alice/hello", {"trusted": True},
                             alice)
    assert status == 403 and "admin" in body["message"]
    assert server.api("PATCH", "/api/repos/alice/hello", {"trusted": True})[0] == 200
    server.api("POST", "/api/repos/alice/hello/builds", {})
    build = finished(server, "alice/hello", 2)
    assert build["status"] == "success", build
    assert "privileged-ran" in http_text(server.url + "/api/repos/alice/hello/logs/2/1")


def test_without_an_engine_images_run_on_the_host_and_services_fail_clearly(tmp_path):
    server = Server(tmp_path / "data", "--engine", "none")
    try:
        repo = str(tmp_path / "repo")
        commit_files(repo, {".drone.yml": (
            "pipeline:\n  t:\n    image: golang:1.8\n    commands: [echo on-the-host]\n")})
        server.api("POST", "/api/repos/alice/hello", {"url": repo})
        server.api("POST", "/api/repos/alice/hello/builds", {})
        build = finished(server, "alice/hello", 1)
        log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
        assert build["status"] == "success"
        assert log.startswith("cirunner: image golang:1.8 not used for step 't'")
        other = str(tmp_path / "other")
        commit_files(other, {".drone.yml": DRONE_05, "README": "x\n"})
        server.api("POST", "/api/repos/alice/other", {"url": other})
        server.api("POST", "/api/repos/alice/other/builds", {})
        build = finished(server, "alice/other", 1)
        assert build["status"] == "error"
        assert "apt-get install podman" in build["jobs"][0]["error"]
    finally:
        server.stop()
