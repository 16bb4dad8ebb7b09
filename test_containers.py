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
import pathlib
import re
import shutil
import signal
import subprocess
import time

import pytest

import cirunner
from test_cirunner import (
    Server,
    commit_files,
    http_json,
    http_text,
    steps_reach_tmp_path,  # noqa: F401 - autouse
    wait_for,
    workspace_of,
)
from test_isolation import DETACHED, build_evil_library, grows, host_pids, writers

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
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
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
        assert settings == ["PLUGIN_CHANNEL=dev", 'PLUGIN_OPTIONS={"level":2}',
                            "PLUGIN_RECIPIENTS=alice,bob"]
        steps = build["jobs"][number - 1]["steps"]
        assert [(step["name"], step["kind"], step["status"]) for step in steps] == [
            ("web", "service", "success"), ("test", "step", "success"),
            ("announce", "plugin", "success")]


DRONE_1 = """\
kind: pipeline
type: docker
name: default

steps:
- name: test
  image: localhost/cirunner-test:1
  commands:
  - echo "workspace $(pwd)"
  - test -f README
  - for i in $(seq 100); do wget -q -O - http://web/index.html && break; sleep 0.1; done
- name: lint
  image: localhost/cirunner-test:2
  commands: [echo "lint VERSION $(cat /VERSION)"]
  depends_on: [test]
- name: announce
  image: localhost/cirunner-plugin:1
  settings:
    channel: dev
    password:
      from_secret: slack_password
  depends_on: [lint]

services:
- name: web
  image: localhost/cirunner-test:1
  command: [httpd, -f, -p, "80", -h, /www]
---
kind: signature
hmac: 0123
"""


def test_a_drone_1x_pipeline_runs_in_its_images_with_a_service_and_a_plugin(tmp_path, servers):
    server = servers(tmp_path / "data")
    repo = str(tmp_path / "repo")
    commit_files(repo, {".drone.yml": DRONE_1, "README": "hello\n"})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    server.api("POST", "/api/repos/alice/hello/secrets", {"name": "slack_password",
                                                          "value": "s3cr3t-pw"})
    assert server.api("POST", "/api/repos/alice/hello/builds", {})[0] == 201
    try:
        build = finished(server, "alice/hello", 1)
    except AssertionError:  # where it stands: the steps, the log, the server's log
        raise AssertionError((build_of(server, "alice/hello", 1)["jobs"],
                              http_text(server.url + "/api/repos/alice/hello/logs/1/1")[-2000:],
                              server.output()[-2000:])) from None
    log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
    assert build["status"] == "success", (build, log[-2000:])
    assert "workspace /drone/src" in log and "served-by-httpd-1" in log
    assert "lint VERSION 2" in log
    settings = sorted(re.findall(r"^PLUGIN_\w+=.*$", log, re.MULTILINE))
    assert settings == ["PLUGIN_CHANNEL=dev", "PLUGIN_PASSWORD=********"]
    assert "s3cr3t-pw" not in log
    assert [(step["name"], step["status"]) for step in build["jobs"][0]["steps"]] == [
        ("web", "success"), ("test", "success"), ("lint", "success"), ("announce", "success")]


DRONE_1_VOLUMES = """\
kind: pipeline
type: docker
name: default
steps:
- name: write
  image: localhost/cirunner-test:1
  volumes: [{name: cache, path: /cache}]
  commands: [echo kept-between-steps > /cache/file]
- name: read
  image: localhost/cirunner-test:1
  volumes: [{name: cache, path: /var/cache}]
  commands: [cat /var/cache/file]
volumes:
- name: cache
  temp: {}
"""


def test_a_drone_1x_temp_volume_is_shared_by_the_steps_and_a_host_one_needs_trust(
        tmp_path, servers, engine_env):
    data = tmp_path / "data"
    server = servers(data)
    repo = str(tmp_path / "repo")
    host = tmp_path / "host-folder"
    host.mkdir()
    (host / "from-host").write_text("host-file-read\n")
    with_host = DRONE_1_VOLUMES.replace(
        "  temp: {}\n", f"  temp: {{}}\n- name: outside\n  host: {{path: {host}}}\n").replace(
        "  commands: [cat /var/cache/file]\n",
        "  commands: [cat /var/cache/file]\n- name: host\n  image: localhost/cirunner-test:1\n"
        "  volumes: [{name: outside, path: /outside}]\n  commands: [cat /outside/from-host]\n")
    commit_files(repo, {".drone.yml": DRONE_1_VOLUMES})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    build = finished(server, "alice/hello", 1)
    log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
    assert build["status"] == "success", (build, log[-2000:])
    assert "kept-between-steps" in log
    commit_files(repo, {".drone.yml": with_host})  # a host path: a trusted repository's only
    server.api("POST", "/api/repos/alice/hello/builds", {})
    build = finished(server, "alice/hello", 2)
    assert build["status"] == "error" and "trusted repository" in build["jobs"][0]["error"] \
        and "outside" in build["jobs"][0]["error"], build
    assert server.api("PATCH", "/api/repos/alice/hello", {"trusted": True})[0] == 200
    server.api("POST", "/api/repos/alice/hello/builds", {})
    build = finished(server, "alice/hello", 3)
    log = http_text(server.url + "/api/repos/alice/hello/logs/3/1")
    assert build["status"] == "success", (build, log[-2000:])
    assert "host-file-read" in log and "kept-between-steps" in log
    assert leftovers(engine_env, data) == []  # the temp volumes too


def test_a_woodpecker_step_runs_in_its_directory_in_the_container(tmp_path, servers):
    """Woodpecker's `directory`: relative, in the workspace; absolute, the
    container's own path (as Woodpecker's compiler makes the working dir)."""
    server = servers(tmp_path / "data")
    repo = str(tmp_path / "repo")
    commit_files(repo, {"web/index.txt": "hello\n", ".woodpecker.yml": (
        "steps:\n"
        "  - name: in-web\n    image: localhost/cirunner-test:1\n    directory: web\n"
        "    commands: [echo \"in $(pwd)\", cat index.txt]\n"
        "  - name: absolute\n    image: localhost/cirunner-test:1\n    directory: /tmp\n"
        "    commands: [echo \"in $(pwd)\"]\n")})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    assert server.api("POST", "/api/repos/alice/hello/builds", {})[0] == 201
    build = finished(server, "alice/hello", 1)
    log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
    assert build["status"] == "success", (build, log[-2000:])
    assert re.search(r"^in /woodpecker/src/\S+/web$", log, re.MULTILINE), log
    assert "\nhello\n" in log and "\nin /tmp\n" in log, log


def test_a_woodpecker_plugin_gets_the_secrets_its_settings_name_inside_maps_and_lists(
        tmp_path, servers):
    """A registry login in a plugin's settings (Woodpecker's buildx plugin's
    `logins`): the plugin sees the secret's value in its place, and the log
    shows it masked."""
    server = servers(tmp_path / "data")
    repo = str(tmp_path / "repo")
    commit_files(repo, {".woodpecker.yml": (
        f"steps:\n  - name: publish\n    image: {PLUGIN}\n    settings:\n"
        "      logins:\n        - registry: r.example\n"
        "          password: {from_secret: registry_pw}\n"
        "      config: {auth: {token: {from_secret: api_token}}, retries: 2}\n")})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    for name, value in (("registry_pw", "pw-of-the-registry"), ("api_token", "t0k3n-of-api")):
        server.api("POST", "/api/repos/alice/hello/secrets", {"name": name, "value": value})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    build = finished(server, "alice/hello", 1)
    log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
    assert build["status"] == "success", (build, log[-2000:])
    assert sorted(re.findall(r"^PLUGIN_\w+=.*$", log, re.MULTILINE)) == [
        'PLUGIN_CONFIG={"auth":{"token":"********"},"retries":2}',
        'PLUGIN_LOGINS=[{"password":"********","registry":"r.example"}]']
    assert "pw-of-the-registry" not in log and "t0k3n-of-api" not in log


SERVICE_WITH_COMMANDS = """\
steps:
  - name: fetch
    image: localhost/cirunner-test:2
    commands:
      - for i in $(seq 100); do wget -q -O - http://web:8080/index.html && break; sleep 0.1; done
services:
  - name: web
    image: localhost/cirunner-test:1
    commands: [echo serving, httpd -f -p 8080 -h /www]
"""


@pytest.mark.parametrize("filename, text", [
    (".woodpecker.yml", SERVICE_WITH_COMMANDS),
    (".drone.yml", "kind: pipeline\ntype: docker\n" + SERVICE_WITH_COMMANDS),
])
def test_a_service_runs_its_commands_as_its_script(tmp_path, servers, filename, text):
    """Drone and Woodpecker run a service's `commands` as a step's (a
    database or a server started by a shell line): not its image's command."""
    server = servers(tmp_path / "data")
    repo = str(tmp_path / "repo")
    commit_files(repo, {filename: text})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    build = finished(server, "alice/hello", 1)
    log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
    assert build["status"] == "success", (build, log[-2000:])
    assert "served-by-httpd-1" in log and "+ echo serving\nserving\n" in log, log


def test_a_container_step_sees_its_own_workspace_never_the_hosts(tmp_path, servers):
    """Every variable that names the workspace names the container's path:
    the server's data folder is not the step's to know (or to use, which it
    cannot: it is not mounted there)."""
    server = servers(tmp_path / "data")
    repo = str(tmp_path / "repo")
    names = ["DRONE_WORKSPACE", "CI_WORKSPACE", "DRONE_DIR", "CI_BUILD_DIR"]
    commit_files(repo, {".drone.yml": (
        "pipeline:\n  t:\n    image: localhost/cirunner-test:1\n    commands:\n"
        + "".join(f"      - echo \"{name}=${name} ${{{name}}}\"\n" for name in names))})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    build = finished(server, "alice/hello", 1)
    log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
    assert build["status"] == "success", (build, log[-2000:])
    seen = dict(re.findall(r"^(\w+)=(.*)$", log, re.MULTILINE))
    assert seen == {name: "/drone/src/alice/hello /drone/src/alice/hello" for name in names}, log
    assert str(tmp_path) not in log


def test_an_agent_runs_steps_and_services_in_their_images(tmp_path, servers, engine_env,
                                                           monkeypatch):
    """`cirunner agent --engine podman`: a build machine runs image steps as
    serve does (each container is named by its step's number in the job)."""
    from test_agents import Agent
    server = servers(tmp_path / "serve", "--workers", "0")
    repo = str(tmp_path / "repo")
    commit_files(repo, {".woodpecker.yml": SERVICE_WITH_COMMANDS})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    status, body = server.api("POST", "/api/agents", {"name": "box", "labels": {}})
    assert status == 201, body
    for key, value in engine_env.items():
        monkeypatch.setenv(key, value)
    agent = Agent(tmp_path / "agent", server, body["token"], "--engine", "podman")
    try:
        server.api("POST", "/api/repos/alice/hello/builds", {})
        build = finished(server, "alice/hello", 1)
        log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
        assert build["status"] == "success", (build, log[-2000:], agent.output()[-2000:])
        assert "served-by-httpd-1" in log
    finally:
        agent.stop()
    identity = f"{server.url.rstrip('/')} {os.path.abspath(agent.data_dir)}"  # the agent's store
    store_key = hashlib.sha1(identity.encode()).hexdigest()[:10]
    assert podman(engine_env, "ps", "--all", "--quiet", "--filter",
                  f"label=cirunner.store={store_key}").stdout.split() == []


def test_a_service_that_ignores_sigterm_is_done_with_at_the_jobs_end_not_after_the_grace(
        tmp_path, servers):
    server = servers(tmp_path / "data", "--grace", "60")  # a step's grace: not a service's
    repo = str(tmp_path / "repo")
    commit_files(repo, {".drone.yml": (  # busybox httpd ignores SIGTERM
        "pipeline:\n  test:\n    image: localhost/cirunner-test:1\n    commands: [true]\n"
        "services:\n  web:\n    image: localhost/cirunner-test:1\n"
        "    command: [httpd, -f, -p, \"80\", -h, /www]\n")})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    build = finished(server, "alice/hello", 1)
    job = build["jobs"][0]
    assert build["status"] == "success", build
    assert job["finished_at"] - job["started_at"] < 30, job  # not the 60 s grace
    service = next(step for step in job["steps"] if step["name"] == "web")
    assert (service["status"], service["exit_code"]) == ("success", 0), service
    assert "cirunner: service web stopped: the job ended" in http_text(
        server.url + "/api/repos/alice/hello/logs/1/1")


def test_an_image_that_cannot_be_pulled_is_named_not_an_exit_code(tmp_path, servers):
    server = servers(tmp_path / "data")
    repo = str(tmp_path / "repo")
    commit_files(repo, {".drone.yml": "pipeline:\n  test:\n    image: "
                                      "localhost:1/nowhere/none:1\n    commands: [true]\n"})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    job = finished(server, "alice/hello", 1)["jobs"][0]
    assert job["status"] == "error", job
    assert "could not pull localhost:1/nowhere/none:1" in job["error"], job


def test_a_detached_step_is_reached_by_its_name_in_a_job_without_services(tmp_path, servers):
    server = servers(tmp_path / "data")
    repo = str(tmp_path / "repo")
    commit_files(repo, {".drone.yml": (
        "pipeline:\n  web:\n    image: localhost/cirunner-test:1\n    detach: true\n"
        "    commands: [httpd -f -p 80 -h /www]\n"
        "  fetch:\n    image: localhost/cirunner-test:1\n    commands:\n"
        "      - for i in $(seq 100); do wget -q -O - http://web/index.html && exit 0; "
        "sleep 0.1; done; exit 1\n")})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    build = finished(server, "alice/hello", 1)
    assert build["status"] == "success", build
    assert "served-by-httpd-1" in http_text(server.url + "/api/repos/alice/hello/logs/1/1")


def test_nothing_of_a_container_job_is_left_behind(tmp_path, servers, engine_env):
    data = tmp_path / "data"
    server = servers(data)
    repo = str(tmp_path / "repo")
    commit_files(repo, {".drone.yml": DRONE_05, "README": "hello\n"})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
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
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    wait_for(lambda: "\ndetached\n" in http_text(server.url + "/api/repos/alice/hello/logs/1/1"),
             timeout=30)
    assert len(host_pids(n)) >= 7
    assert grows(daemon_log)
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
    assert writers(daemon_log) == []  # nothing left that could write it
    wait_for(lambda: leftovers(engine_env, data) == [], timeout=10)


def test_cancel_of_a_container_step_kills_it_within_the_grace_period(tmp_path, servers,
                                                                     engine_env):
    data = tmp_path / "data"
    server = servers(data)
    repo = str(tmp_path / "repo")
    commit_files(repo, {".drone.yml": (
        "pipeline:\n  t:\n    image: localhost/cirunner-test:1\n    commands:\n"
        "      - echo started\n      - trap '' TERM; sleep 600\n")})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
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
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
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
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
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


# -- the boundary: no value a pipeline controls reaches podman on the host -----------


@pytest.mark.parametrize("where", ["step", "service"])
def test_ld_preload_of_a_container_step_never_loads_into_podman(tmp_path, servers, where):
    data = tmp_path / "data"
    server = servers(data)
    library, markers = build_evil_library(tmp_path, data / "secret.key")
    repo = str(tmp_path / "repo")
    # The library's host path: podman would load it, the busybox image cannot.
    preload = f"    environment:\n      LD_PRELOAD: {library}\n"
    if where == "step":
        pipeline = (f"pipeline:\n  t:\n    image: localhost/cirunner-test:1\n{preload}"
                    "    commands: [echo step-ran]\n")
    else:
        pipeline = ("pipeline:\n  t:\n    image: localhost/cirunner-test:1\n"
                    "    commands: [echo step-ran]\nservices:\n  db:\n"
                    f"    image: localhost/cirunner-test:1\n{preload}"
                    "    command: [sleep, '600']\n")
    commit_files(repo, {".drone.yml": pipeline})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    server.api("POST", "/api/repos/alice/hello/secrets", {"name": "LD_PRELOAD",
                                                          "value": str(library)})
    server.api("POST", "/api/repos/alice/hello/builds", {"variables": {
        "GCONV_PATH": str(tmp_path), "CONTAINERS_CONF": str(tmp_path / "evil.conf")}})
    build = finished(server, "alice/hello", 1)
    log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
    assert build["status"] == "success", log
    assert "step-ran" in log
    assert list(markers.iterdir()) == []  # podman did not load it
    assert "STOLEN-KEY" not in log


def test_a_multi_line_secret_reaches_the_container_whole(tmp_path, servers, engine_env):
    data = tmp_path / "data"
    server = servers(data)
    repo = str(tmp_path / "repo")
    commit_files(repo, {".drone.yml": (
        "pipeline:\n  t:\n    image: localhost/cirunner-test:1\n"
        "    commands: ['printf \"%s\" \"$KEY\" | wc -l', 'printf \"[%s]\" \"$SPACED\"']\n")})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    server.api("POST", "/api/repos/alice/hello/secrets",
               {"name": "KEY", "value": "-----BEGIN KEY-----\nline two\nline three\n"})
    server.api("POST", "/api/repos/alice/hello/builds",
               {"variables": {"SPACED": "  two  spaces = and # hash "}})
    build = finished(server, "alice/hello", 1)
    log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
    assert build["status"] == "success", log
    assert re.search(r"^\s*3$", log, re.MULTILINE), log
    assert "[  two  spaces = and # hash ]" in log
    # The secret held the value only for the job's life.
    assert [name for name in podman(engine_env, "secret", "ls", "--format",
                                    "{{.Name}}").stdout.split()
            if name.startswith("cirunner-")] == []


@pytest.mark.parametrize("image", ["--volume=/:/host", "--privileged", "-v/:/host",
                                   "localhost/cirunner-test:1 --privileged", "UPPER/case"])
def test_an_image_name_is_never_read_as_an_engine_option(tmp_path, servers, image):
    data = tmp_path / "data"
    server = servers(data)
    repo = str(tmp_path / "repo")
    commit_files(repo, {".cirunner.yml": (  # Drone files may not set a step's entrypoint
        f"pipeline:\n  t:\n    image: {json.dumps(image)}\n"
        "    entrypoint: [/bin/sh, localhost/cirunner-test:1, -c]\n"
        f"    command: ['cat /host{data}/secret.key; echo escaped']\n")})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    build = finished(server, "alice/hello", 1)
    log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
    assert build["status"] == "error"
    assert f"image {image!r} is not valid" in build["jobs"][0]["error"]
    assert "escaped" not in log.replace("echo escaped", "")


def test_engine_arguments_that_are_not_what_they_say_are_refused(tmp_path, servers):
    server = servers(tmp_path / "data")
    repo = str(tmp_path / "repo")
    commit_files(repo, {".drone.yml": (
        "pipeline:\n  t:\n    image: localhost/cirunner-test:1\n"
        "    volumes: ['--privileged']\n    dns: ['--net=host']\n"
        "    shm_size: '--device=/dev/sda'\n    commands: [echo ran]\n"
        "    devices: ['--privileged']\n    network_mode: '--pid=host'\n"
        "    extra_hosts: ['--net=host:1.2.3.4']\n"
        "    labels: {cirunner.store: elsewhere, cirunner.job: '1'}\n")})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    server.api("PATCH", "/api/repos/alice/hello", {"trusted": True})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    build = finished(server, "alice/hello", 1)
    error = build["jobs"][0]["error"]
    assert build["status"] == "error"
    for problem in ("volume '--privileged' is not valid", "dns '--net=host' is not valid",
                    "shm_size '--device=/dev/sda' is not valid",
                    "device '--privileged' is not valid",
                    "network_mode '--pid=host' is not valid",
                    "extra_hosts '--net=host:1.2.3.4' is not valid",
                    "label 'cirunner.store' is not valid", "label 'cirunner.job' is not valid"):
        assert problem in error


def test_an_image_step_without_a_working_engine_is_an_error_not_exit_125(tmp_path):
    broken = tmp_path / "bin"
    broken.mkdir()
    (broken / "podman").write_text("#!/bin/sh\necho 'Error: cannot set up the runtime' >&2\n"
                                   "exit 125\n")
    (broken / "podman").chmod(0o755)
    server = Server(tmp_path / "data", "--engine", "auto",
                    env={"PATH": f"{broken}:{os.environ['PATH']}"})
    try:
        repo = str(tmp_path / "repo")
        commit_files(repo, {".drone.yml": (
            "pipeline:\n  t:\n    image: localhost/cirunner-test:1\n    commands: [echo x]\n")})
        server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
        server.api("POST", "/api/repos/alice/hello/builds", {})
        build = finished(server, "alice/hello", 1)
        assert build["status"] == "error"
        error = build["jobs"][0]["error"]
        assert "needs a container engine" in error and "cannot set up the runtime" in error
        health = http_json("GET", server.url + "/healthz")[1]
        assert health["isolation"]["images"] == "unavailable"
        # why: on serve's first line, and to an admin
        assert re.search(r"images in unavailable \(podman does not work here: .*cannot set up "
                         r"the runtime\)", server.output()), server.output()
        problem = server.api("GET", "/healthz")[1]["problems"]["images"]
        assert "cannot set up the runtime" in problem
    finally:
        server.stop()


def test_without_an_engine_images_run_on_the_host_and_services_fail_clearly(tmp_path):
    server = Server(tmp_path / "data", "--engine", "none")
    try:
        repo = str(tmp_path / "repo")
        commit_files(repo, {".drone.yml": (
            "pipeline:\n  t:\n    image: golang:1.8\n    commands: [echo on-the-host]\n")})
        server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
        server.api("POST", "/api/repos/alice/hello/builds", {})
        build = finished(server, "alice/hello", 1)
        log = http_text(server.url + "/api/repos/alice/hello/logs/1/1")
        assert build["status"] == "success"
        assert log.startswith("cirunner: image golang:1.8 not used for step 't'")
        other = str(tmp_path / "other")
        commit_files(other, {".drone.yml": DRONE_05, "README": "x\n"})
        server.api("POST", "/api/repos/alice/other", {"url": other, "private": False})
        server.api("POST", "/api/repos/alice/other/builds", {})
        build = finished(server, "alice/other", 1)
        assert build["status"] == "error"
        assert "apt-get install podman" in build["jobs"][0]["error"]
    finally:
        server.stop()


# -- real Drone files ----------------------------------------------------------------
# Five .drone.yml files of public repositories, as they were at the commit named
# (Drone 0.4, 0.5 and 0.8 forms). Each is parsed and expanded as it is; to run,
# its images are replaced by the local test images (no registry is reachable)
# and each command by an echo of it (their tools are not in a busybox image).

REAL_DRONE_FILES = {
    # drone/drone at commit 390c920e7886a92fe73982e4c782d34d50ec0364, .drone.yml
    'drone/drone@390c920e7886': (
        'clone:\n'
        '  path: github.com/drone/drone\n'
        '\n'
        'build:\n'
        '  image: drone/golang:1.5\n'
        '  environment:\n'
        '    - GO15VENDOREXPERIMENT=1\n'
        '  commands:\n'
        '    - make deps gen\n'
        '    - make test test_postgres test_mysql\n'
        '    - make build build_static deb docs\n'
        '\n'
        'compose:\n'
        '  postgres:\n'
        '    image: postgres:9.4.5\n'
        '    environment:\n'
        '      - POSTGRES_USER=postgres\n'
        '  mysql:\n'
        '    image: mysql:5.6.27\n'
        '    environment:\n'
        '      - MYSQL_DATABASE=test\n'
        '      - MYSQL_ALLOW_EMPTY_PASSWORD=yes\n'
        '\n'
        'publish:\n'
        '  docker:\n'
        '    username: drone\n'
        '    password: $$DOCKER_PASS\n'
        '    email: $$DOCKER_EMAIL\n'
        '    repo: drone/drone\n'
        '    tag:\n'
        '      - "latest" \n'
        '      - "0.4.1"\n'
        '      - "0.4"\n'
        '    when:\n'
        '      repo: drone/drone\n'
        '      branch: master\n'
        '\n'
        'notify:\n'
        '  gitter:\n'
        '    webhook: https://webhooks.gitter.im/e/$$GITTER_KEY\n'),
    # drone/drone at commit d78a768e5b935c1d96f6b4df1e5a9726d6fe949a, .drone.yml
    'drone/drone@d78a768e5b93': (
        'workspace:\n'
        '  base: /go\n'
        '  path: src/github.com/drone/drone\n'
        '\n'
        'pipeline:\n'
        '  test:\n'
        '    image: golang:1.6\n'
        '    environment:\n'
        '      - GO15VENDOREXPERIMENT=1\n'
        '    commands:\n'
        '      - make deps gen\n'
        '      - make test test_postgres test_mysql\n'
        '\n'
        '  compile:\n'
        '    image: golang:1.6\n'
        '    environment:\n'
        '      - GO15VENDOREXPERIMENT=1\n'
        '      - GOPATH=/go\n'
        '    commands:\n'
        '      - export PATH=$PATH:$GOPATH/bin\n'
        '      - make build\n'
        '    when:\n'
        '      event: push\n'
        '\n'
        '  archive:\n'
        '    image: plugins/s3\n'
        '    acl: public-read\n'
        '    bucket: downloads.drone.io\n'
        '    source: release/**/*.*\n'
        '    access_key: ${AWS_ACCESS_KEY_ID}\n'
        '    secret_key: ${AWS_SECRET_ACCESS_KEY}\n'
        '    when:\n'
        '      event: push\n'
        '      branch: master\n'
        '\n'
        '  publish:\n'
        '    image: plugins/docker\n'
        '    repo: drone/drone\n'
        '    username: ${DOCKER_USERNAME}\n'
        '    password: ${DOCKER_PASSWORD}\n'
        '    tag: [ "0.5", "0.5.0", "0.5.0-rc", "latest" ]\n'
        '    when:\n'
        '      branch: master\n'
        '      event: push\n'
        '\n'
        '  notify:\n'
        '    image: plugins/gitter\n'
        '    webhook: ${GITTER_WEBHOOK}\n'
        '    when:\n'
        '      status: [ success, failure ]\n'
        '      event: [ push, pull_request ]\n'
        '\n'
        'services:\n'
        '  postgres:\n'
        '    image: postgres:9.4.5\n'
        '    environment:\n'
        '      - POSTGRES_USER=postgres\n'
        '  mysql:\n'
        '    image: mysql:5.6.27\n'
        '    environment:\n'
        '      - MYSQL_DATABASE=test\n'
        '      - MYSQL_ALLOW_EMPTY_PASSWORD=yes\n'),
    # appleboy/gorush at commit a6546b568cd767627a5ddfdc74d28a1aeaa80a0d, .drone.yml
    'appleboy/gorush@a6546b568cd7': (
        'pipeline:\n'
        '  # restore the cache from an sftp server\n'
        '  restore_cache:\n'
        '    image: appleboy/drone-sftp-cache\n'
        '    restore: true\n'
        '    mount: [ .glide, vendor ]\n'
        '    ignore_branch: true\n'
        '\n'
        '  build:\n'
        '    image: appleboy/golang-testing:${GO_VERSION}\n'
        '    environment:\n'
        '      - GOPATH=/go\n'
        '    commands:\n'
        '      - make install\n'
        '      - coverage all\n'
        '\n'
        '  line:\n'
        '    image: appleboy/drone-line\n'
        '    pull: true\n'
        '    to: u359650f919427b5229330c7205c47ee4\n'
        '    when:\n'
        '      status: [ success, failure ]\n'
        '      matrix:\n'
        '        GO_VERSION: 1.7.1\n'
        '\n'
        '  gtalk:\n'
        '    image: appleboy/drone-gtalk\n'
        '    pull: true\n'
        '    to: appleboy.tw@gmail.com\n'
        '    when:\n'
        '      status: [ success, failure ]\n'
        '      matrix:\n'
        '        GO_VERSION: 1.7.1\n'
        '\n'
        '  facebook:\n'
        '    image: appleboy/drone-facebook\n'
        '    pull: true\n'
        '    to: 1234973386524610\n'
        '    when:\n'
        '      status: [ success, failure ]\n'
        '      matrix:\n'
        '        GO_VERSION: 1.7.1\n'
        '\n'
        '  telegram:\n'
        '    image: appleboy/drone-telegram\n'
        '    pull: true\n'
        '    to: 65382999\n'
        '    when:\n'
        '      status: [ success, failure ]\n'
        '      matrix:\n'
        '        GO_VERSION: 1.7.1\n'
        '\n'
        '  # rebuild the cache on the sftp server\n'
        '  rebuild_cache:\n'
        '    image: appleboy/drone-sftp-cache\n'
        '    rebuild: true\n'
        '    mount: [ .glide, vendor ]\n'
        '    ignore_branch: true\n'
        '    when:\n'
        '      branch: master\n'
        '      matrix:\n'
        '        GO_VERSION: 1.7.1\n'
        '\n'
        'services:\n'
        '  redis:\n'
        '    image: redis:alpine\n'
        '\n'
        'workspace:\n'
        '  path: /go/src/github.com/appleboy/gorush\n'
        '\n'
        'matrix:\n'
        '  GO_VERSION:\n'
        '    - 1.7.1\n'
        '    - 1.6.3\n'),
    # go-gitea/git at commit 0a4f451834ba4159e5c09be0a4202aa9f5e00237, .drone.yml
    'go-gitea/git@0a4f451834ba': (
        'workspace:\n'
        '  base: /srv/app\n'
        '  path: src/code.gitea.io/git\n'
        '\n'
        'clone:\n'
        '  git:\n'
        '    image: plugins/git:1\n'
        '    # Tests require the entire history (for some reason)\n'
        '    #depth: 50\n'
        '    tags: true\n'
        '\n'
        'pipeline:\n'
        '  testing:\n'
        '    image: webhippie/golang:edge\n'
        '    pull: true\n'
        '    commands:\n'
        '      - git update-ref refs/heads/test HEAD\n'
        '      - make clean\n'
        '      - make vet\n'
        '      - make lint\n'
        '      # Test with latest git version\n'
        '      - git --version && make test\n'
        '      # Test with git version 1.7.2\n'
        '      - apk add --update autoconf zlib-dev > /dev/null &&\n'
        '        mkdir build &&\n'
        '        curl -sL "https://github.com/git/git/archive/v1.7.2.tar.gz" -o git.tar.gz &&\n'
        '        tar -C build -xzf git.tar.gz &&\n'
        '        cd build/git-1.7.2 &&\n'
        '        { autoconf 2> err || { cat err && false; } } &&\n'
        '        ./configure --without-tcltk --prefix=/usr/local > /dev/null &&\n'
        '        { make install NO_PERL=please > /dev/null 2> err || { cat err && false; } } &&\n'
        '        cd ../.. &&\n'
        '        rm -rf build git.tar.gz &&\n'
        '        hash -r &&\n'
        '        git --version &&\n'
        '        make test\n'
        '      # Test a build (is this really needed?)\n'
        '      - make build\n'
        '\n'
        '  # coverage:\n'
        '  #   image: plugins/coverage:1\n'
        '  #   pull: true\n'
        '  #   secrets: [ github_token ]\n'
        '  #   server: https://coverage.gitea.io\n'
        '\n'
        '  discord:\n'
        '    image: appleboy/drone-discord:1.0.0\n'
        '    pull: true\n'
        '    secrets: [ discord_webhook_id, discord_webhook_token ]\n'
        '    when:\n'
        '      event: [ push, tag, pull_request ]\n'
        '      status: [ changed, failure ]\n'),
    # appleboy/drone-ssh at commit 84cb1840391d0080db9c3d4730d63924f1009fc6, .drone.yml
    'appleboy/drone-ssh@84cb1840391d': (
        'workspace:\n'
        '  base: /go/src\n'
        '  path: github.com/appleboy/drone-ssh\n'
        '\n'
        'clone:\n'
        '  git:\n'
        '    image: plugins/git\n'
        '    depth: 50\n'
        '    tags: true\n'
        '\n'
        'pipeline:\n'
        '  lint:\n'
        '    image: appleboy/golang-testing\n'
        '    pull: true\n'
        '    group: golang\n'
        '    commands:\n'
        '      - make vet\n'
        '      - make lint\n'
        '      - make test-vendor\n'
        '\n'
        '  linux_amd64:\n'
        '    image: appleboy/golang-testing\n'
        '    pull: true\n'
        '    group: golang\n'
        '    commands:\n'
        '      - make linux_amd64\n'
        '\n'
        '  linux_arm64:\n'
        '    image: appleboy/golang-testing\n'
        '    pull: true\n'
        '    group: golang\n'
        '    commands:\n'
        '      - make linux_arm64\n'
        '\n'
        '  linux_arm:\n'
        '    image: appleboy/golang-testing\n'
        '    pull: true\n'
        '    group: golang\n'
        '    commands:\n'
        '      - make linux_arm\n'
        '\n'
        '  test:\n'
        '    image: appleboy/golang-testing\n'
        '    pull: true\n'
        '    group: golang\n'
        '    commands:\n'
        '      - make ssh-server\n'
        '      - make test\n'
        '      - make coverage\n'
        '\n'
        '  release:\n'
        '    image: appleboy/golang-testing\n'
        '    pull: true\n'
        '    commands:\n'
        '      - make release\n'
        '    when:\n'
        '      event: [ tag ]\n'
        '      local: false\n'
        '\n'
        '  codecov:\n'
        '    image: robertstettner/drone-codecov\n'
        '    secrets: [ codecov_token ]\n'
        '    files:\n'
        '      - .cover/coverage.txt\n'
        '    when:\n'
        '      event: [ push, pull_request ]\n'
        '      status: [ success ]\n'
        '\n'
        '  publish:\n'
        '    image: plugins/docker\n'
        '    pull: true\n'
        '    repo: ${DRONE_REPO}\n'
        '    default_tags: true\n'
        '    secrets: [ docker_username, docker_password ]\n'
        '    group: release\n'
        '    when:\n'
        '      event: [ push, tag ]\n'
        '      local: false\n'
        '\n'
        '  release_tag:\n'
        '    image: plugins/github-release\n'
        '    pull: true\n'
        '    secrets: [ github_release_api_key ]\n'
        '    group: release\n'
        '    files:\n'
        '      - dist/release/*\n'
        '    when:\n'
        '      event: [ tag ]\n'
        '      local: false\n'
        '\n'
        '  discord:\n'
        '    image: appleboy/drone-discord\n'
        '    pull: true\n'
        '    secrets: [ discord_webhook_id, discord_webhook_token ]\n'
        '    when:\n'
        '      status: [ changed, failure ]\n'),
}
REAL_DRONE_SHAPES = {  # (form, steps, services, jobs)
    "drone/drone@390c920e7886": ("0.4", 3, 2, 1),
    "drone/drone@d78a768e5b93": ("0.5", 5, 2, 1),
    "appleboy/gorush@a6546b568cd7": ("0.5", 7, 1, 2),
    "go-gitea/git@0a4f451834ba": ("0.8", 2, 0, 1),
    "appleboy/drone-ssh@84cb1840391d": ("0.8", 10, 0, 1),
}


@pytest.mark.parametrize("source", sorted(REAL_DRONE_FILES))
def test_real_drone_files_parse_and_expand(source):
    pipeline = cirunner.parse_pipeline(REAL_DRONE_FILES[source], ".drone.yml")
    form, steps, services, jobs = REAL_DRONE_SHAPES[source]
    assert ("0.4" if pipeline.drone04 else "0.5+", len(pipeline.steps), len(pipeline.services),
            len(pipeline.matrix)) == ("0.4" if form == "0.4" else "0.5+", steps, services, jobs)


def localize(text):
    """A Drone file made to run here: local images, and each command an echo of it."""
    import yaml

    document = yaml.safe_load(text)

    def step(body, service=False):
        for key in ("pull", "privileged", "volumes", "image"):
            body.pop(key, None)
        if service:
            body.pop("commands", None)
            body.update(image=f"{IMAGE}:1", command=["httpd", "-f", "-p", "80", "-h", "/www"])
        elif "commands" in body:
            body.update(image=f"{IMAGE}:1",
                        commands=["echo " + cirunner.shlex.quote(str(command))
                                  for command in body["commands"]])
        else:
            body["image"] = PLUGIN
        return body

    for section in ("pipeline", "build", "publish", "deploy", "notify"):
        steps = document.get(section)
        if section == "build" and isinstance(steps, dict) and "commands" in steps:
            document["build"] = step(steps)
        elif isinstance(steps, dict):
            document[section] = {name: step(body or {}) for name, body in steps.items()}
    for section in ("services", "compose"):
        if isinstance(document.get(section), dict):
            document[section] = {name: step(body, service=True)
                                 for name, body in document[section].items()}
    if isinstance(document.get("clone"), dict):
        for body in document["clone"].values():
            if isinstance(body, dict):
                body.pop("image", None)
    return yaml.safe_dump(document, sort_keys=False)


def test_real_drone_files_run_green_in_local_images(tmp_path, servers):
    server = servers(tmp_path / "data")
    for index, source in enumerate(sorted(REAL_DRONE_FILES), start=1):
        repo = str(tmp_path / f"repo{index}")
        commit_files(repo, {".drone.yml": localize(REAL_DRONE_FILES[source])})
        name = f"alice/real{index}"
        assert server.api("POST", f"/api/repos/{name}", {"url": repo, "private": False})[0] == 201
        assert server.api("POST", f"/api/repos/{name}/builds", {"event": "push"})[0] == 201
    for index, source in enumerate(sorted(REAL_DRONE_FILES), start=1):
        build = finished(server, f"alice/real{index}", 1, timeout=120)
        logs = "".join(http_text(server.url + f"/api/repos/alice/real{index}/logs/1/"
                                              f"{job['number']}") for job in build["jobs"])
        assert build["status"] == "success", (source, build["error"], logs[-2000:])
        ran = [step["name"] for job in build["jobs"] for step in job["steps"]
               if step["status"] == "success"]
        assert ran, source


REAL_PIPELINES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata",
                              "real-pipelines")
# Five of each kind (testdata/real-pipelines), run whole: graphs of pipelines
# and of steps, services, matrices, plugins.
REAL_RUNS = {"drone": ["09-drone-plugins__drone-hugo.yml", "10-keel-hq__keel.yml",
                       "13-grafana__synthetic-monitoring-agent.yml", "14-grafana__tanka.yml",
                       "18-go-vikunja__website.yml"],
             "woodpecker": ["04-woodpecker-ci__plugin-docker-buildx/",
                            "05-thegeeklab__wp-matrix/", "09-CatalaLang__catala.yml",
                            "11-6543__nudge.yml", "20-woodpecker-ci__plugin-ready-release-go/"]}
_OUT_OF_REACH = ("platform", "node", "labels", "volumes", "clone", "image_pull_secrets")
_STEP_OUT_OF_REACH = ("privileged", "volumes", "pull", "devices", "network_mode", "entrypoint",
                      "command", "working_dir", "directory", "dns", "extra_hosts")


def localize_1x(text, woodpecker):
    """A Drone 1.x file or a Woodpecker workflow made to run here, as read
    by cirunner's own YAML reader (anchors and Woodpecker's splices): every
    step in the stand-in image, each command an echo of itself, plugins the
    stand-in plugin, services httpd, secrets plain text; what only a
    trusted repository or another machine could have (volumes, privileged,
    platform, runner labels) left out."""
    import yaml

    read = cirunner._YamlReader(".woodpecker.yml" if woodpecker else ".drone.yml",
                                cirunner._Problems("x"), drone=not woodpecker,
                                woodpecker=woodpecker).read(text)
    documents = cirunner._plain(read if isinstance(read, list) else [read])

    def plain_secrets(value):
        if isinstance(value, dict):
            return "stand-in" if "from_secret" in value else {
                key: plain_secrets(item) for key, item in value.items()}
        return [plain_secrets(item) for item in value] if isinstance(value, list) else value

    def step(body, service=False):
        body = plain_secrets({key: value for key, value in body.items()
                              if key not in _STEP_OUT_OF_REACH})
        commands = body.get("commands")
        commands = [commands] if isinstance(commands, str) else commands
        if service:
            body.update(image=f"{IMAGE}:1", commands=["httpd -f -p 80 -h /www"])
        elif commands:
            body.update(image=f"{IMAGE}:1", commands=[
                "echo " + cirunner.shlex.quote(str(command)) for command in commands])
        else:
            body["image"] = PLUGIN
        return body

    def steps(value, service=False):
        if isinstance(value, dict):
            return {name: step(body or {}, service) for name, body in value.items()}
        return [step(body, service) for body in value or []]

    for document in documents:
        for key in _OUT_OF_REACH:
            document.pop(key, None)
        for key in ("steps", "services"):
            if key in document:
                document[key] = steps(document[key], key == "services")
    return yaml.safe_dump_all(documents, sort_keys=False)


@pytest.mark.parametrize("kind", sorted(REAL_RUNS))
def test_real_drone_1x_and_woodpecker_files_run_the_steps_their_plans_say(tmp_path, servers,
                                                                          kind):
    server = servers(tmp_path / "data")
    with open(os.path.join(REAL_PIPELINES, kind, "index.json")) as handle:
        index = {entry["file"]: entry for entry in json.load(handle)}
    with open(os.path.join(REAL_PIPELINES, kind, "expected.json")) as handle:
        expected = json.load(handle)
    for number, name in enumerate(REAL_RUNS[kind], start=1):
        path = os.path.join(REAL_PIPELINES, kind, name)
        if os.path.isdir(path):
            files = {f".woodpecker/{one}": localize_1x(
                pathlib.Path(path, one).read_text(), woodpecker=True)
                for one in sorted(os.listdir(path))}
        else:
            files = {".drone.yml" if kind == "drone" else ".woodpecker.yml": localize_1x(
                pathlib.Path(path).read_text(), woodpecker=kind == "woodpecker")}
        repo = str(tmp_path / f"repo{number}")
        # what their `path` conditions look for (the plans take changed files as unknown)
        files.update({"Dockerfile": "FROM scratch\n", "README.md": "# read me\n"})
        commit_files(repo, files, branch=index[name]["default_branch"])
        full_name = f"{index[name]['repo'].split('/')[0]}/real{number}"
        server.api("POST", f"/api/repos/{full_name}", {"url": repo, "private": False})
        assert server.api("POST", f"/api/repos/{full_name}/builds", {"event": "push"})[0] == 201
    for number, name in enumerate(REAL_RUNS[kind], start=1):
        full_name = f"{index[name]['repo'].split('/')[0]}/real{number}"
        build = finished(server, full_name, 1, timeout=300)
        logs = "".join(http_text(f"{server.url}/api/repos/{full_name}/logs/1/{job['number']}")
                       for job in build["jobs"])
        assert build["status"] == "success", (name, build["error"], logs[-3000:])
        ran = {}
        for job in build["jobs"]:
            ran.setdefault(job["pipeline"] or "default", set()).update(
                step["name"] for step in job["steps"]
                if step["status"] == "success" and step["kind"] != "service")
        wanted = {pipeline: set(names) for pipeline, names in expected[name]["push"].items()
                  if names is not None}
        assert {pipeline: names - {"clone"} for pipeline, names in ran.items()} == wanted, name


def test_commit_message_text_never_runs_in_a_container(tmp_path, servers):
    data = tmp_path / "data"
    server = servers(data, "--keep-workspaces")
    repo = str(tmp_path / "repo")
    message = 'Fix typo"; touch INJECTED; echo "'
    commit_files(repo, {".drone.yml": (
        "pipeline:\n  t:\n    image: localhost/cirunner-test:1\n"
        "    commands: ['echo \"${CI_COMMIT_MESSAGE}\"', 'echo \"$DRONE_COMMIT_MESSAGE\"']\n")},
        message=message)
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    assert finished(server, "alice/hello", 1)["status"] == "success"
    assert http_text(server.url + "/api/repos/alice/hello/logs/1/1").count(message) >= 2
    assert not (workspace_of(data, "alice/hello", 1, 1) / "INJECTED").exists()
