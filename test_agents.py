"""Agents over HTTP: real `cirunner serve` (SQLite, running no jobs itself)
and real `cirunner agent --server` processes on 127.0.0.1, steps in the
bubblewrap sandbox. Each rule of the agent boundary is tried as an attack:
an agent's token on every other route, on another agent's job and runner,
and a job's secrets asked for by an agent that did not claim it.
"""
import base64
import collections
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import cirunner
import test_cirunner
from test_cirunner import (  # noqa: F401 - steps_reach_tmp_path is autouse
    CIRUNNER,
    Server,
    commit_files,
    http_json,
    process_gone,
    run_cli,
    steps_reach_tmp_path,
    wait_for,
)


class Agent:
    """A real `cirunner agent --server URL --token TOKEN` process."""

    def __init__(self, directory, server, token, *extra):
        self.data_dir = str(directory)
        os.makedirs(self.data_dir, exist_ok=True)
        self.log_path = os.path.join(self.data_dir, "agent.log")
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CIRUNNER_")}
        self.process = subprocess.Popen(
            [sys.executable, CIRUNNER, "agent", "--server", server.url, "--token", token,
             "--data", self.data_dir, "--workers", "2", "--grace", "2", "--engine", "none",
             *extra], stdout=self.log, stderr=self.log, env=env)
        wait_for(lambda: "runs jobs from" in self.output() or self.process.poll() is not None,
                 timeout=20)
        assert self.process.poll() is None, self.output()

    def output(self):
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

    def stop(self):
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGCONT)
        test_cirunner.stop_process(self.process)
        self.log.close()


class Fleet:
    """`serve --workers 0` and the agents the test starts; the server finds a
    silent agent lost after TIMEOUT seconds."""

    TIMEOUT = 4

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.server = Server(tmp_path / "serve", "--workers", "0", "--agent-timeout",
                             str(self.TIMEOUT))
        self.agents = []

    def token(self, name, labels=None):
        status, body = self.server.api("POST", "/api/agents",
                                       {"name": name, "labels": labels or {}})
        assert status == 201, body
        return body["token"]

    def agent(self, name, *extra):
        agent = Agent(self.tmp_path / name, self.server, self.token(name), *extra)
        self.agents.append(agent)
        return agent

    def repo(self, pipeline, name="hello", filename=".cirunner.yml"):
        path = str(self.tmp_path / "repos" / name)
        commit_files(path, {filename: pipeline})
        status, body = self.server.api("POST", f"/api/repos/alice/{name}", {"url": path})
        assert status == 201, body

    def build(self, number, name="hello"):
        status, body = self.server.api("GET", f"/api/repos/alice/{name}/builds/{number}")
        assert status == 200, body
        return body

    def log(self, number, job=1, name="hello"):
        request = urllib.request.Request(
            f"{self.server.url}/api/repos/alice/{name}/logs/{number}/{job}",
            headers={**self.server.auth, "Accept": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode(errors="replace")

    def history(self, number, name="hello"):
        """The build's status history (every entry)."""
        build_id = self.build(number, name)["id"]
        entries = []
        while True:
            status, page = self.server.api(
                "GET", f"/api/v1/alice/{name}/builds/{build_id}/statuses?limit=100"
                f"&offset={len(entries)}")
            assert status == 200, page
            entries += page["results"]
            if not page["next"]:
                return entries

    def restart_server(self):
        """kill -9 the server, then start it again on the same port and data."""
        self.server.process.kill()
        self.server.process.wait()
        token = self.server.token
        self.server.log.close()
        self.server.out.close()
        self.server = Server(self.tmp_path / "serve", "--workers", "0", "--agent-timeout",
                             str(self.TIMEOUT), port=self.server.port)
        self.server.token = token

    def stop(self):
        for agent in self.agents:
            agent.stop()
        self.server.stop()


@pytest.fixture
def fleet(tmp_path):
    fleet = Fleet(tmp_path)
    yield fleet
    fleet.stop()


def agent_call(server, token, path, body):
    """An agent route called as an agent would (or as one that tries more)."""
    return http_json("POST", server.url + path, body, {"Authorization": f"Bearer {token}"})


def connect(server, token, runner, **fields):
    return agent_call(server, token, "/api/agent/connect", {
        "protocol": cirunner.AGENT_PROTOCOL, "version": "test", "runner": runner, "hostname": "test-host",
        "pid": os.getpid(), "pid_start": 1, "workers": 1, "labels": {}, **fields})


def finished(build):
    return build["status"] not in ("pending", "running")


# -- the fleet at work ------------------------------------------------------------


def test_two_agents_run_30_jobs_each_exactly_once_in_the_sandbox(fleet):
    fleet.repo("matrix:\n  N: [" + ", ".join(str(n) for n in range(1, 31)) + "]\n"
               "pipeline:\n  t:\n    commands:\n      - echo ran-$N as $(id -un)\n")
    first, second = fleet.agent("one"), fleet.agent("two")
    status, body = fleet.server.api("POST", "/api/repos/alice/hello/builds", {})
    assert status == 201, body
    wait_for(lambda: finished(fleet.build(1)), timeout=120, interval=0.2)
    build = fleet.build(1)
    assert build["status"] == "success", [(job["number"], job["error"]) for job in build["jobs"]]
    logs = {job["number"]: fleet.log(1, job["number"]) for job in build["jobs"]}
    for number, log in logs.items():
        assert log.startswith("cirunner: steps on the host run in bwrap"), log
        assert log.count(f"ran-{number} ") == 1, log  # each job ran once, sandboxed
    # Each job was claimed once, by an agent (the server runs none itself).
    history = fleet.history(1)
    starts = collections.Counter(entry["job"] for entry in history if entry["status"] == "running"
                                 and entry.get("job"))
    assert sorted(starts) == list(range(1, 31)) and set(starts.values()) == {1}, history
    status, agents = fleet.server.api("GET", "/api/agents")
    assert status == 200 and {agent["name"] for agent in agents} == {"one", "two"}
    assert all(agent["version"] and agent["last_seen_at"] for agent in agents), agents
    listed = run_cli("agents", "list", "--server", fleet.server.url, "--token",
                     fleet.server.token)
    assert listed.returncode == 0 and "one\t" in listed.stdout and "two\t" in listed.stdout
    for agent in (first, second):
        agent.process.send_signal(signal.SIGTERM)
        assert agent.process.wait(timeout=30) == 0, agent.output()


def test_a_sha256_repository_builds_on_an_agent(fleet):
    """The agent's mirror fetches over the server's git route: of the
    repository's own object format."""
    path = str(fleet.tmp_path / "repos" / "sha256")
    test_cirunner.git(fleet.tmp_path, "init", "-q", "--object-format=sha256", "-b", "main", path)
    sha = commit_files(path, {".cirunner.yml": "pipeline:\n  t:\n    commands: [git rev-parse "
                                               "HEAD]\n"})
    status, body = fleet.server.api("POST", "/api/repos/alice/sha256", {"url": path})
    assert status == 201, body
    fleet.agent("one")
    status, body = fleet.server.api("POST", "/api/repos/alice/sha256/builds", {})
    assert status == 201 and body["commit"] == sha, body
    wait_for(lambda: finished(fleet.build(1, "sha256")), timeout=60, interval=0.1)
    assert fleet.build(1, "sha256")["status"] == "success", fleet.build(1, "sha256")
    assert f"+ git rev-parse HEAD\n{sha}\n" in fleet.log(1, name="sha256")


def test_a_drone_1x_pipeline_on_an_agent_hears_which_pipelines_failed_before_it(fleet):
    """DRONE_FAILED_STAGES and DRONE_BUILD_STATUS come with the claim (as
    drone-runner has them from its server when the stage starts)."""
    fleet.repo("kind: pipeline\ntype: exec\nname: test\nsteps:\n- {name: t, commands: [exit 1]}\n"
               "---\nkind: pipeline\ntype: exec\nname: notify\ndepends_on: [test]\n"
               "trigger: {status: [failure]}\nsteps:\n- name: post\n  commands:\n"
               "  - echo \"build=$DRONE_BUILD_STATUS stages=$DRONE_FAILED_STAGES\"\n",
               filename=".drone.yml")
    fleet.agent("one")
    assert fleet.server.api("POST", "/api/repos/alice/hello/builds", {})[0] == 201
    wait_for(lambda: finished(fleet.build(1)), timeout=60, interval=0.1)
    assert [job["status"] for job in fleet.build(1)["jobs"]] == ["failure", "success"]
    assert "\nbuild=failure stages=test\n" in fleet.log(1, job=2)


def test_a_cancel_reaches_a_job_on_an_agent_at_once(fleet):
    fleet.repo("pipeline:\n  t:\n    commands:\n      - echo started\n      - sleep 60\n")
    fleet.agent("one")
    # The poll the agent holds open answers at once (not at its end): within
    # 1 s, as the issue asks. A loaded machine may stall one try, so the best
    # of up to three builds counts; each figure is printed.
    times = []
    for number in (1, 2, 3):
        fleet.server.api("POST", "/api/repos/alice/hello/builds", {})
        wait_for(lambda: "+ sleep 60" in fleet.log(number), timeout=30)  # noqa: B023
        started = time.monotonic()
        status, _ = fleet.server.api("DELETE", f"/api/repos/alice/hello/builds/{number}")
        assert status == 200
        wait_for(lambda: fleet.build(number)["jobs"][0]["status"] == "killed",  # noqa: B023
                 timeout=30, interval=0.02)
        times.append(time.monotonic() - started)
        print(f"cancel to killed on an agent: {times[-1]:.3f} s")
        if times[-1] < 1:
            break
    assert min(times) < 1, times


def test_a_killed_agent_has_its_job_ended_and_a_restart_cleans_up(fleet, tmp_path):
    pidfile = test_cirunner.step_writable(tmp_path / "step.pid")
    fleet.repo(f"pipeline:\n  t:\n    commands:\n      - echo $$ > {pidfile}; exec sleep 60\n")
    agent = fleet.agent("one", "--sandbox", "none")  # the step's pid, as the host sees it
    fleet.server.api("POST", "/api/repos/alice/hello/builds", {})
    wait_for(lambda: pidfile.read_text().strip(), timeout=30)
    step_pid = int(pidfile.read_text())
    agent.process.kill()  # kill -9: no goodbye
    agent.process.wait()
    killed_at = time.monotonic()
    wait_for(lambda: finished(fleet.build(1)), timeout=Fleet.TIMEOUT + 30, interval=0.1)
    elapsed = time.monotonic() - killed_at
    job = fleet.build(1)["jobs"][0]
    assert job["status"] == "error" and ("runner stopped" in job["error"]
                                         or "agent lost" in job["error"]), job
    print(f"kill -9 of an agent to its job ended: {elapsed:.2f} s")
    assert elapsed < Fleet.TIMEOUT + 10
    # Started again on its data directory, the agent ends what was left.
    again = Agent(agent.data_dir, fleet.server, fleet.token("one-again"), "--sandbox", "none")
    fleet.agents.append(again)
    wait_for(lambda: process_gone(step_pid), timeout=20)


def test_a_paused_agent_never_writes_to_the_job_it_lost(fleet):
    fleet.repo("pipeline:\n  t:\n    commands:\n"
               "      - for i in $(seq 100000); do echo tick $i; sleep 0.05; done\n")
    agent = fleet.agent("one")
    fleet.server.api("POST", "/api/repos/alice/hello/builds", {})
    wait_for(lambda: "tick 3" in fleet.log(1), timeout=30)
    os.kill(agent.process.pid, signal.SIGSTOP)  # alive but silent: a partition
    stopped_at = time.monotonic()
    wait_for(lambda: finished(fleet.build(1)), timeout=Fleet.TIMEOUT + 30, interval=0.2)
    elapsed = time.monotonic() - stopped_at
    job = fleet.build(1)["jobs"][0]
    assert job["status"] == "error" and "agent lost" in job["error"], job
    print(f"a silent agent to its job ended: {elapsed:.2f} s (timeout {Fleet.TIMEOUT} s)")
    assert elapsed < Fleet.TIMEOUT + 10  # the documented bound: timeout + 10 s
    size = len(fleet.log(1))
    os.kill(agent.process.pid, signal.SIGCONT)
    # Back, it hears that the job ended elsewhere and stops it; it connects again.
    wait_for(lambda: "ended elsewhere" in agent.output(), timeout=30)
    wait_for(lambda: any(entry["runners"] for entry in fleet.server.api("GET", "/api/agents")[1]),
             timeout=30)
    assert len(fleet.log(1)) == size
    assert fleet.build(1)["jobs"][0]["status"] == "error"
    history = fleet.history(1)
    assert [entry["status"] for entry in history if entry.get("job")].count("running") == 1


def test_a_server_restart_during_a_job_on_an_agent_loses_no_line(fleet):
    fleet.repo("pipeline:\n  t:\n    commands:\n"
               "      - for i in $(seq 1 120); do echo line-$i; sleep 0.05; done\n")
    agent = fleet.agent("one")
    fleet.server.api("POST", "/api/repos/alice/hello/builds", {})
    wait_for(lambda: "line-10\n" in fleet.log(1), timeout=30)
    fleet.restart_server()
    try:
        wait_for(lambda: finished(fleet.build(1)), timeout=60, interval=0.2)
    except AssertionError:  # where it stands: the build, the agent's and server's logs
        raise AssertionError((fleet.build(1), agent.output()[-3000:],
                              fleet.server.output()[-3000:])) from None
    assert fleet.build(1)["status"] == "success", fleet.build(1)
    lines = [line for line in fleet.log(1).splitlines() if line.startswith("line-")]
    assert lines == [f"line-{n}" for n in range(1, 121)]


def test_an_agent_removed_stops_at_once(fleet):
    agent = fleet.agent("one")
    status, _ = fleet.server.api("DELETE", "/api/agents/one")
    assert status == 200
    assert agent.process.wait(timeout=30) == 1
    assert "refused this agent" in agent.output()


# -- the boundary, attacked -------------------------------------------------------------


def test_an_agent_token_reaches_nothing_but_the_agent_routes(fleet):
    fleet.repo("pipeline:\n  t:\n    commands: [sleep 30]\n")
    fleet.server.api("POST", "/api/repos/alice/hello/secrets", {"name": "KEY", "value": "v" * 20})
    token, other = fleet.token("one"), fleet.token("two")
    headers = {"Authorization": f"Token {token}"}
    for path in ("/api/repos/alice/hello/secrets", "/api/user", "/api/repos",
                 "/api/repos/alice/hello/builds", "/api/agents", "/api/queue"):
        status, body = http_json("GET", fleet.server.url + path, None, headers)
        assert status == 403, (path, status, body)
    status, _ = http_json("POST", fleet.server.url + "/api/repos/alice/hello/builds", {},
                          headers)
    assert status == 403
    # One agent's job, claimed; the other agent tries to act on it.
    assert connect(fleet.server, token, "one-runner")[0] == 200
    assert connect(fleet.server, other, "two-runner")[0] == 200
    fleet.server.api("POST", "/api/repos/alice/hello/builds", {})
    status, news = agent_call(fleet.server, token, "/api/agent/poll",
                              {"runner": "one-runner", "wait": 5})
    assert status == 200 and len(news["jobs"]) == 1, news
    job = news["jobs"][0]["job"]
    for runner in ("one-runner", "two-runner"):  # another's runner, its own runner
        status, body = agent_call(fleet.server, other, "/api/agent/report", {
            "runner": runner, "messages": [{"job": job["id"], "lease": job["lease"],
                                            "type": "end", "status": "success"}]})
        assert status == 403, body
    status, body = agent_call(fleet.server, other, "/api/agent/poll",
                              {"runner": "one-runner", "wait": 0})
    assert status == 403, body
    status, body = connect(fleet.server, other, "one-runner")  # taking another's runner over
    assert status == 403, body
    # Git: only the repository of a job the agent runs, and only fetches.
    status, body = http_json("GET", fleet.server.url + "/api/agent/git/alice/hello/info/refs"
                             "?service=git-upload-pack", None, {"Authorization": f"Bearer {other}"})
    assert status == 403, body
    status, body = http_json("GET", fleet.server.url + "/api/agent/git/alice/hello/info/refs"
                             "?service=git-receive-pack", None, {"Authorization": f"Bearer {token}"})
    assert status == 403, body
    # A guessed lease: refused as not this claim's.
    status, answer = agent_call(fleet.server, token, "/api/agent/report", {
        "runner": "one-runner", "messages": [{"job": job["id"], "lease": "guess",
                                              "type": "log", "seq": 0, "offset": 0,
                                              "data": base64.b64encode(b"x").decode()}]})
    assert status == 200 and str(job["id"]) in answer["ended"], answer
    # The same for a step's change, and for its own lease on a step it never told.
    for lease, number in (("guess", 1), (job["lease"], 99)):
        status, answer = agent_call(fleet.server, token, "/api/agent/report", {
            "runner": "one-runner", "messages": [{"job": job["id"], "lease": lease,
                                                  "type": "step", "number": number,
                                                  "fields": {"status": "success"}}]})
        assert status == 200 and str(job["id"]) in answer["ended"], answer
    # A step's field names go into SQL: only a step's own fields are taken.
    status, body = agent_call(fleet.server, token, "/api/agent/report", {
        "runner": "one-runner", "messages": [{"job": job["id"], "lease": job["lease"],
                                              "type": "step", "number": 1,
                                              "fields": {"status = 'success', exit_code": 0}}]})
    assert status == 400 and "unknown step field" in body["message"], body
    # A chunk that would grow past a chunk's size (a zstd "bomb"), or that is
    # not what its codec says: refused before anything is decompressed.
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(b"\0" * (4 * 1024 * 1024))
    for codec, data in (("zstd", bomb), ("zstd", b"not zstd"), ("xz", b"x")):
        status, body = agent_call(fleet.server, token, "/api/agent/report", {
            "runner": "one-runner", "messages": [{
                "job": job["id"], "lease": job["lease"], "type": "log", "seq": 0, "offset": 0,
                "codec": codec, "data": base64.b64encode(data).decode()}]})
        assert status == 400 and "cannot be read" in body["message"], body
    # A user's token is not an agent's.
    status, _ = agent_call(fleet.server, fleet.server.token, "/api/agent/poll",
                           {"runner": "one-runner"})
    assert status == 401


def test_a_jobs_secrets_reach_only_the_agent_that_claimed_it(fleet):
    fleet.repo("pipeline:\n  t:\n    commands: [true]\n")
    fleet.repo("pipeline:\n  t:\n    commands: [true]\n", name="other")
    fleet.server.api("POST", "/api/repos/alice/hello/secrets",
                     {"name": "DEPLOY_KEY", "value": "the-deploy-key-of-hello"})
    fleet.server.api("POST", "/api/repos/alice/other/secrets",
                     {"name": "OTHER_KEY", "value": "the-key-of-other"})
    # limited to an image no step of the job runs: the server keeps it
    fleet.server.api("POST", "/api/repos/alice/hello/secrets",
                     {"name": "DOCKER_PASSWORD", "value": "the-registry-password",
                      "images": ["plugins/docker"]})
    one, two = fleet.token("one"), fleet.token("two")
    connect(fleet.server, one, "one-runner")
    connect(fleet.server, two, "two-runner")
    fleet.server.api("POST", "/api/repos/alice/hello/builds", {})
    status, news = agent_call(fleet.server, one, "/api/agent/poll",
                              {"runner": "one-runner", "wait": 5})
    assert status == 200 and len(news["jobs"]) == 1
    claim = news["jobs"][0]
    assert claim["secrets"] == {"DEPLOY_KEY": "the-deploy-key-of-hello"}
    assert "the-registry-password" not in json.dumps(claim)
    assert "webhook_secret" not in claim["repo"] and "forge_token" not in claim["repo"]
    status, news = agent_call(fleet.server, two, "/api/agent/poll",
                              {"runner": "two-runner", "wait": 0})
    assert status == 200 and news["jobs"] == [], news
    raw = json.dumps(news)
    assert "the-deploy-key-of-hello" not in raw and "the-key-of-other" not in raw


def test_an_agent_gets_the_secrets_a_woodpecker_plugin_names_inside_its_settings(fleet):
    """Woodpecker reads {from_secret} inside a setting's maps and lists (a
    registry login's password): the agent that runs it gets that secret,
    and still no other."""
    fleet.repo("steps:\n  - name: publish\n    image: plugins/x\n    settings:\n"
               "      logins:\n        - registry: r.example\n"
               "          password: {from_secret: registry_pw}\n", filename=".woodpecker.yml")
    for name, value in (("registry_pw", "the-registry-password"), ("unused", "not-for-it")):
        fleet.server.api("POST", "/api/repos/alice/hello/secrets", {"name": name, "value": value})
    token = fleet.token("one")
    connect(fleet.server, token, "one-runner")
    fleet.server.api("POST", "/api/repos/alice/hello/builds", {})
    news = poll_holding(fleet, token, [], wait=5)
    assert [claim["secrets"] for claim in news["jobs"]] == [
        {"registry_pw": "the-registry-password"}], news


def poll_holding(fleet, token, holding, wait=0):
    """One poll of runner one-runner that says it holds `holding`."""
    status, news = agent_call(fleet.server, token, "/api/agent/poll",
                              {"runner": "one-runner", "wait": wait, "holding": holding})
    assert status == 200, news
    return news


def claimed_by_one(fleet):
    """Agent one's token and the answer of its first poll, which claims the
    one job of a new build."""
    fleet.repo("pipeline:\n  t:\n    commands: [true]\n")
    token = fleet.token("one")
    connect(fleet.server, token, "one-runner")
    fleet.server.api("POST", "/api/repos/alice/hello/builds", {})
    news = poll_holding(fleet, token, [], wait=5)
    assert len(news["jobs"]) == 1, news
    return token, news


def test_a_claim_whose_answer_was_lost_comes_again_not_stranded(fleet):
    """A poll's answer can be lost after the server claimed jobs for it (the
    connection cut, the agent's retry): the next poll says what the agent
    holds, and a job claimed for it that it does not hold comes again with
    the same claim, never a second one; a job it holds does not."""
    token, lost = claimed_by_one(fleet)  # this answer "never arrived"
    again = poll_holding(fleet, token, [])
    assert [claim["job"]["id"] for claim in again["jobs"]] == [lost["jobs"][0]["job"]["id"]]
    assert again["jobs"][0]["job"]["lease"] == lost["jobs"][0]["job"]["lease"]
    assert poll_holding(fleet, token, [lost["jobs"][0]["job"]["id"]])["jobs"] == []
    # Cancelled while its claim was lost: it ends killed here, never runs.
    assert fleet.server.api("DELETE", "/api/repos/alice/hello/builds/1")[0] == 200
    assert poll_holding(fleet, token, [])["jobs"] == []
    assert fleet.build(1)["status"] == "killed"


def test_a_job_its_agent_started_and_dropped_ends_error_not_again(fleet):
    """An agent drops a job whose report the server refused; the server
    ends it (error), and never sends a started job again."""
    token, news = claimed_by_one(fleet)
    claim = news["jobs"][0]["job"]
    status, answer = agent_call(fleet.server, token, "/api/agent/report", {
        "runner": "one-runner", "messages": [{"job": claim["id"], "lease": claim["lease"],
                                              "type": "steps", "steps": [["t", "step"]]}]})
    assert status == 200 and answer["ended"] == {}, answer
    assert poll_holding(fleet, token, [])["jobs"] == []
    build = fleet.build(1)
    assert build["status"] == "error" and "no longer runs it" in build["jobs"][0]["error"], build


def test_a_log_chunk_sent_again_with_other_bytes_ends_its_job_not_a_retry_loop(fleet):
    """A chunk sent again as it was (an answer lost) changes nothing; the same
    chunk with other bytes cannot be stored beside it: the job ends error
    saying so, where it used to answer 500 and the agent sent it for ever."""
    token, news = claimed_by_one(fleet)
    claim = news["jobs"][0]["job"]

    def report(data):
        return agent_call(fleet.server, token, "/api/agent/report", {
            "runner": "one-runner", "messages": [
                {"job": claim["id"], "lease": claim["lease"], "type": "log", "seq": 0,
                 "offset": 0, "data": base64.b64encode(data).decode()}]})

    assert report(b"hello\n") == (200, {"ended": {}})
    assert report(b"hello\n") == (200, {"ended": {}})  # the same again: nothing changes
    status, answer = report(b"other bytes\n")
    assert status == 200 and "came again with other bytes" in answer["ended"][str(claim["id"])]
    build = fleet.build(1)
    assert build["status"] == "error", build
    assert "came again with other bytes" in build["jobs"][0]["error"]
    assert fleet.log(1) == "hello\n"


def test_an_agent_never_takes_a_job_it_already_holds(tmp_path):
    store = cirunner._AgentStore("http://127.0.0.1:9", "cia_unused", str(tmp_path / "agent"))
    claim = {"job": {"id": 7, "lease": "l"}, "build": {}, "repo": {}}
    store._news({"jobs": [claim]})
    store._news({"jobs": [dict(claim)]})  # the same claim, sent again
    assert [job["id"] for job in store.queue] == [7]
    store.close()


def test_an_agent_of_another_protocol_is_told_what_to_do(fleet):
    status, body = connect(fleet.server, fleet.token("one"), "one-runner", protocol=99)
    assert status == 409
    assert f"agent protocol {cirunner.AGENT_PROTOCOL}" in body["message"]
    assert "99" in body["message"]
    assert "same cirunner version" in body["message"]


def test_one_process_per_agent_token_on_a_host(fleet):
    token = fleet.token("one")
    assert connect(fleet.server, token, "first")[0] == 200
    status, body = connect(fleet.server, token, "second")
    assert status == 409 and "one process per agent token" in body["message"], body
    # The same process coming back (its previous runner named) is let in.
    assert connect(fleet.server, token, "second", previous="first")[0] == 200


def test_agents_are_made_listed_and_removed_by_admins_only(fleet, tmp_path):
    result = run_cli("agents", "add", "builder", "--labels", "arch=arm64", "--server",
                     fleet.server.url, "--token", fleet.server.token)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.startswith("cia_") and "shown once" in result.stderr
    status, agents = fleet.server.api("GET", "/api/agents")
    assert [(agent["name"], agent["labels"]) for agent in agents] == [("builder",
                                                                       {"arch": "arm64"})]
    assert token not in json.dumps(agents)
    assert fleet.server.api("POST", "/api/users", {"login": "bob"})[0] == 201
    status, made = fleet.server.api("POST", "/api/user/tokens", {"login": "bob"})
    bob = {"Authorization": f"Token {made['token']}"}
    for method, path, body in (("GET", "/api/agents", None),
                               ("POST", "/api/agents", {"name": "mine"}),
                               ("DELETE", "/api/agents/builder", None)):
        status, answer = http_json(method, fleet.server.url + path, body, bob)
        assert status == 403, (method, path, answer)
    status, answer = fleet.server.api("POST", "/api/agents", {"name": "builder"})
    assert status == 409, answer
    status, answer = fleet.server.api("POST", "/api/agents", {"name": "../x"})
    assert status == 400, answer
    result = run_cli("agents", "remove", "builder", "--server", fleet.server.url, "--token",
                     fleet.server.token)
    assert result.returncode == 0, result.stderr
    assert connect(fleet.server, token, "r")[0] == 401  # revoked at once


def test_the_agents_journal_is_written_whole_by_many_threads_at_once(tmp_path):
    """The poll and every worker write the journal of running jobs; at once,
    they once broke each other's rename and stopped the agent's poll."""
    import threading

    store = cirunner._AgentStore("http://127.0.0.1:9", "cia_unused", str(tmp_path / "agent"))
    store.jobs = {number: {} for number in range(50)}
    failures = []

    def write():
        try:
            for _ in range(50):
                store._write_journal()
        except Exception as exc:  # noqa: BLE001 - what the test looks for
            failures.append(exc)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert json.loads((tmp_path / "agent" / "agent-jobs.json").read_text()) == list(range(50))
    store.close()


def test_a_checkout_from_a_server_that_is_away_is_tried_again_not_failed(tmp_path):
    """What git says when the server an agent fetches from is not there (a
    restart) is told from a fetch the server refused: only the first is tried
    again, as the agent holds a job's output through an outage."""
    port = test_cirunner.free_port()  # nothing listens there
    store = cirunner._AgentStore(f"http://127.0.0.1:{port}", "cia_token", str(tmp_path / "a"))
    away = subprocess.run(["git", "ls-remote", f"http://127.0.0.1:{port}/api/agent/git/a/b"],
                          capture_output=True, text=True, check=False)
    assert away.returncode != 0 and store.unreachable(away.stderr), away.stderr
    refused = subprocess.run(["git", "ls-remote", str(tmp_path / "no-such-repository")],
                             capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and not store.unreachable(refused.stderr), refused.stderr


def test_an_answer_cut_off_by_a_dying_server_is_a_server_away_not_a_crash():
    """A server killed while it answered (headers sent, body cut short):
    the agent's sender thread died on http.client's IncompleteRead and the
    job's end was never delivered. It is the server being away: tried again."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_half():
        connection, _ = listener.accept()
        request = b""
        while b"\r\n\r\n" not in request:  # the whole request read: no reset
            request += connection.recv(65536)
        head, _, body = request.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE).group(1))
        while len(body) < length:
            body += connection.recv(65536)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 13\r\n\r\n{\"ok\"")  # 5 of 13 bytes
        connection.shutdown(socket.SHUT_WR)  # then the end: the body cut short
        while connection.recv(65536):
            pass
        connection.close()

    thread = threading.Thread(target=answer_half, daemon=True)
    thread.start()
    link = cirunner._AgentLink(f"http://127.0.0.1:{listener.getsockname()[1]}", "cia_token")
    with pytest.raises(cirunner._ServerAway, match="cannot reach"):
        link.call("/api/agent/report", {"messages": []}, timeout=10)
    thread.join(10)
    listener.close()


def test_a_short_jobs_messages_go_up_in_one_report(tmp_path):
    """The sender waits briefly after a message for those that follow it: a
    short job's steps, log and end reach the server in one report (one round
    trip), and its end is sent at once, never held for the rest of the wait."""
    outbox = cirunner._Outbox(str(tmp_path))
    outbox.put({"job": 1, "type": "step", "number": 1})

    def rest_of_the_job():
        outbox.put({"job": 1, "type": "log", "seq": 0, "offset": 0}, b"hello\n")
        outbox.put({"job": 1, "type": "end", "status": "success"})

    thread = threading.Thread(target=rest_of_the_job)
    thread.start()
    started = time.monotonic()
    batch = outbox.take(max_bytes=1 << 20, wait=60, linger=600)  # ends with the end
    thread.join()
    assert [message["type"] for message in batch] == ["step", "log", "end"]
    assert time.monotonic() - started < 300  # the end cut the wait short
    outbox.done(len(batch))
    # A message that comes alone goes up once the linger is over.
    outbox.put({"job": 2, "type": "step", "number": 1})
    assert [message["job"] for message in outbox.take(max_bytes=1 << 20, wait=60,
                                                      linger=0.05)] == [2]
    outbox.close()
