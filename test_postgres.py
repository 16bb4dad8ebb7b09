"""The store on a real PostgreSQL: the store tests of test_cirunner.py once
more on it, and several `serve` and `agent` processes sharing one database.

A throwaway cluster is made for the session in a temporary directory
(initdb and pg_ctl, as the `postgres` user when run as root: PostgreSQL
refuses to run as root) on a free port, and removed after. The tests skip
only where PostgreSQL is not installed; .ci/run installs it.
"""
import collections
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest

import cirunner
import test_cirunner
from test_cirunner import CIRUNNER, commit_files, free_port, step_writable, wait_for

psycopg = pytest.importorskip("psycopg", reason="the postgres extra is not installed")


class PostgresCluster:
    """A PostgreSQL server of its own in a temporary directory, on 127.0.0.1."""

    def __init__(self, *, fsync=True):
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        initdb = binaries[-1] if binaries else shutil.which("initdb")
        if initdb is None:
            raise FileNotFoundError("initdb (apt-get install postgresql)")
        self.bin = os.path.dirname(initdb)
        self.base = tempfile.mkdtemp(prefix="cirunner-pg-")
        self.port = free_port()
        # As root, the server runs as `postgres` (it refuses root).
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.base, "postgres")
        self.data = os.path.join(self.base, "data")
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync",
                  "-E", "UTF8")
        options = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
                   f"-c max_connections=300 -c fsync={'on' if fsync else 'off'}")
        self.options = options
        self.resume()
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program, *args):
        subprocess.run([*self.as_user, os.path.join(self.bin, program), *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.base)

    def create_database(self):
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def drop_database(self, url):
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")

    def pause(self):
        """Stop the server (an outage); `resume` starts it again as it was."""
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def resume(self):
        self._run("pg_ctl", "-D", self.data, "-o", self.options, "-l",
                  os.path.join(self.base, "server.log"), "-w", "start")

    def stop(self):
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster():
    try:
        cluster = PostgresCluster(fsync=False)  # tests: speed; the bench keeps fsync on
    except FileNotFoundError as exc:
        pytest.skip(f"PostgreSQL is not installed here: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster):
    url = pg_cluster.create_database()
    yield url
    pg_cluster.drop_database(url)


# -- the store tests of test_cirunner.py, on PostgreSQL ------------------------

# Fixtures of test_cirunner.py, with `store` replaced below.
from test_cirunner import (  # noqa: F401 - steps_reach_tmp_path is autouse
    admin_token,
    app,
    data_dir,
    executor,
    git_daemon,
    hook_repo,
    make_repo,
    servers,
    site,
    steps_reach_tmp_path,
    v1,
)


@pytest.fixture
def store(data_dir, pg_url):  # noqa: F811 - the point: the same tests on PostgreSQL
    store = cirunner.open_store(data_dir, pg_url)
    yield store
    store.close()


# What only SQLite has (its file, WAL, pages, data_version read cache), and
# tests that look into the SQLite file itself or run the command line on the
# data directory alone; the rest of the store tests run here as they are
# (the command line on PostgreSQL: test_cli_and_agents_share_one_postgresql).
_SQLITE_ONLY = {
    "test_deleted_builds_give_their_space_back",
    "test_a_big_wal_is_checkpointed_at_once_not_at_the_next_round",
    "test_read_cache_answers_a_repeat_until_anything_is_committed",
    # another process's commit on SQLite (on PostgreSQL its NOTIFY is the event):
    "test_jobs_queued_by_another_process_are_told_to_the_agents_polls",
    "test_schema_is_versioned_and_reopening_keeps_data",
    # sqlite3.connect(store.path):
    "test_big_log_is_stored_in_bounded_chunks_and_reads_back_exactly",
    "test_a_runner_whose_pid_is_now_another_process_is_gone",
    "test_a_token_is_accepted_without_waiting_for_a_busy_writer",
    "test_v1_delete_leaves_nothing_and_numbers_are_not_reused",
    "test_missed_cron_runs_start_once",
    "test_badges_are_well_formed_for_every_state",
    "test_sealed_values_are_aes_gcm_bound_to_their_row_and_field",
    "test_retention_prunes_old_builds_but_never_pinned_or_active_ones",
    "test_logs_are_stored_compressed_and_old_raw_chunks_still_read",
    "test_a_build_keeps_what_it_was_made_with_when_its_repository_changes",
    "test_what_an_answer_acknowledges_is_on_disk_when_it_commits",  # the WAL's syncs
    "test_retention_keeps_the_store_near_its_limit_under_a_steady_stream",  # the file's size
    "test_a_store_restored_beside_its_live_source_inherits_none_of_its_runners",  # backup
    # the command line with --data only:
    "test_secrets_cli_and_api_never_show_values",
    "test_only_admins_point_a_repository_at_local_files_and_never_into_the_data_dir",
    "test_what_a_caller_makes_the_server_keep_and_list_is_bounded",
    "test_approve_and_decline_from_the_command_line",
    # how requests are read and answered, whatever the store: once is enough
    "test_bad_input_gets_a_json_error_with_the_right_status",
    "test_audit_inputs_get_the_json_error_not_a_500",
    "test_lone_surrogate_in_json_is_a_400_never_a_500",
    "test_a_lone_surrogate_in_json_is_a_400_never_a_500",
}
_STORE_TESTS = [name for name, function in vars(test_cirunner).items()
                if name.startswith("test_") and callable(function)
                and "store" in function.__code__.co_varnames[:function.__code__.co_argcount]
                and name not in _SQLITE_ONLY]
for _name in _STORE_TESTS:
    globals()[_name] = getattr(test_cirunner, _name)


# -- several processes on one PostgreSQL store ---------------------------------

class Agent:
    """A real `cirunner agent` process on the test database."""

    def __init__(self, directory, db, *extra, hostname=None):
        self.data_dir = str(directory)
        os.makedirs(self.data_dir, exist_ok=True)
        self.log_path = os.path.join(self.data_dir, "agent.log")
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CIRUNNER_")}
        # Another machine, as far as cirunner can tell: a host name of its own
        # (a UTS namespace), though it shares this one's files and processes.
        other_host = ([*(["unshare", "--uts"] if os.geteuid() == 0 else
                         ["unshare", "--user", "--map-root-user", "--uts"]),
                       "sh", "-c", 'hostname "$0" && exec "$@"', hostname] if hostname else [])
        self.process = subprocess.Popen(
            [*other_host, sys.executable, CIRUNNER, "agent", "--data", self.data_dir, "--db", db,
             "--workers", "2", "--grace", "2", "--engine", "none", "--sandbox", "none",
             *extra], stdout=self.log, stderr=self.log, env=env)
        wait_for(lambda: "runs jobs from" in self.output() or self.process.poll() is not None,
                 timeout=15)
        assert self.process.poll() is None, self.output()

    def output(self):
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

    def stop(self):
        test_cirunner.stop_process(self.process)
        self.log.close()


def share_key(source, *directories):
    """Give each data directory the key of `source`, as an operator copies it."""
    for directory in directories:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        shutil.copy(os.path.join(source, "secret.key"), os.path.join(directory, "secret.key"))
        os.chmod(os.path.join(directory, "secret.key"), 0o600)


class Fleet:
    """Two `serve` and three `agent` processes on one PostgreSQL database;
    agent 1 alone has the label pool=a1. Every process declares a runner
    lost after 10 s without a heartbeat (a loaded machine may stall one for seconds)."""

    TIMEOUT = "10"

    def __init__(self, tmp_path, db):
        self.db = db
        self.servers, self.agents = [], []
        common = ("--db", db, "--sandbox", "none", "--agent-timeout", self.TIMEOUT)
        # One after the other: the first makes the admin and prints its token,
        # and the key that every other machine is given.
        self.servers.append(test_cirunner.Server(tmp_path / "serve-a", *common))
        share_key(tmp_path / "serve-a", tmp_path / "serve-b", tmp_path / "cli",
                  tmp_path / "observer", *(tmp_path / f"agent-{n}" for n in (1, 2, 3)))
        self.servers.append(test_cirunner.Server(tmp_path / "serve-b", *common))
        token = self.servers[0].token
        for server in self.servers:
            server.token = token
        for number in (1, 2, 3):
            labels = ("--labels", "pool=a1") if number == 1 else ()
            self.agents.append(Agent(tmp_path / f"agent-{number}", db, "--agent-timeout",
                                     self.TIMEOUT, *labels))
        self.store = cirunner.open_store(str(tmp_path / "observer"), db)

    def stop(self):
        for process in self.agents + self.servers:
            process.stop()
        self.store.close()

    def sql(self, statement, params=()):
        """Rows of a statement on the database, as an operator would read them."""
        with psycopg.connect(self.db, autocommit=True) as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description else []

    def build(self, full_name, number):
        repo = self.store.get_repo(*full_name.split("/"))
        return self.store.get_build(repo["id"], number)


@pytest.fixture
def fleet(tmp_path, pg_url):
    fleet = Fleet(tmp_path, pg_url)
    yield fleet
    fleet.stop()


def _add_repo(tmp_path, fleet, pipeline, name="hello"):
    path = str(tmp_path / "repos" / name)
    commit_files(path, {".cirunner.yml": pipeline})
    result = test_cirunner.run_cli("repo", "add", f"alice/{name}", "--url", path,
                                   "--data", str(tmp_path / "cli"), "--db", fleet.db)
    assert result.returncode == 0, result.stderr
    return path


def test_two_servers_and_three_agents_run_each_of_300_jobs_once(tmp_path, fleet):
    ran = step_writable(tmp_path / "ran.txt")
    _add_repo(tmp_path, fleet, (
        "matrix:\n  N: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n"
        "pipeline:\n  t:\n    commands:\n"
        f"      - echo \"$DRONE_BUILD_NUMBER-$N\" >> {ran}\n"))
    for number in range(30):
        server = fleet.servers[number % 2]
        status, body = server.api("POST", "/api/repos/alice/hello/builds", {})
        assert status == 201, body
    wait_for(lambda: all(fleet.build("alice/hello", number)["status"] not in ("pending", "running")
                         for number in range(1, 31)), timeout=180, interval=0.5)
    statuses = {fleet.build("alice/hello", number)["status"] for number in range(1, 31)}
    assert statuses == {"success"}, fleet.sql("SELECT id, status, error, claimed_by FROM jobs "
                                              "WHERE status != 'success'")
    lines = ran.read_text().splitlines()
    assert len(lines) == 300 and len(set(lines)) == 300  # each job once, none twice
    by_runner = collections.Counter(row[0] for row in fleet.sql("SELECT claimed_by FROM jobs"))
    agent_pids = {str(agent.process.pid) for agent in fleet.agents}
    # Agents 2 and 3 take any job; agent 1 too (a job that requires nothing).
    assert sum(count for runner, count in by_runner.items()
               if runner.split(":")[1] in agent_pids) > 0, by_runner
    assert sum(by_runner.values()) == 300
    # The command line on the same store.
    listed = test_cirunner.run_cli("builds", "alice/hello", "--data", str(tmp_path / "cli"),
                                   "--db", fleet.db)
    assert listed.returncode == 0 and "30\tsuccess" in listed.stdout, listed.stderr
    # An agent stops on SIGTERM as serve does, and drains on SIGUSR1.
    for agent, sig in ((fleet.agents[1], signal.SIGTERM), (fleet.agents[2], signal.SIGUSR1)):
        agent.process.send_signal(sig)
        assert agent.process.wait(timeout=15) == 0, agent.output()
    assert "shutting down" in fleet.agents[1].output()
    assert "draining" in fleet.agents[2].output()


def _running_job(fleet, number, full_name="alice/hello"):
    build = fleet.build(full_name, number)
    job = fleet.store.get_job(build["id"], 1)
    return job if job["status"] == "running" else None


def test_a_cancel_on_one_server_kills_the_job_on_an_agent_within_a_second(tmp_path, fleet):
    pidfile = step_writable(tmp_path / "step.pid")
    _add_repo(tmp_path, fleet, "labels: {pool: a1}\npipeline:\n  t:\n    commands:\n"
                               f"      - echo $$ > {pidfile}; exec sleep 60\n")
    fleet.servers[0].api("POST", "/api/repos/alice/hello/builds", {})
    wait_for(lambda: _running_job(fleet, 1) and pidfile.exists() and pidfile.read_text(),
             timeout=20)
    job = _running_job(fleet, 1)
    agent = fleet.agents[0]
    assert job["claimed_by"].split(":")[1] == str(agent.process.pid)  # only it has pool=a1
    pid = int(pidfile.read_text())
    started = time.monotonic()
    status, _ = fleet.servers[1].api("DELETE", "/api/repos/alice/hello/builds/1")
    assert status == 200
    wait_for(lambda: fleet.store.get_job_by_id(job["id"])["status"] == "killed", timeout=10,
             interval=0.01)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"the job ended {elapsed:.2f} s after the cancel"
    wait_for(lambda: test_cirunner.process_gone(pid), timeout=5)


def test_a_live_log_is_followed_through_the_other_server(tmp_path, fleet):
    _add_repo(tmp_path, fleet, (
        "labels: {pool: a1}\npipeline:\n  t:\n    commands:\n"
        "      - for i in $(seq 3000); do [ -e gate ] && break; sleep 0.02; done;"
        " echo LIVE-LINE-$(date +%s%N)\n      - sleep 1\n"))
    fleet.servers[0].api("POST", "/api/repos/alice/hello/builds", {})
    server = fleet.servers[1]
    gate = test_cirunner.workspace_of(fleet.agents[0].data_dir, "alice/hello", 1, 1) / "gate"
    assert 0 <= test_cirunner.live_line_delay(server, gate, server.auth) < 1_000_000_000


def test_a_killed_agent_loses_its_job_and_the_others_go_on(tmp_path, fleet):
    ran = step_writable(tmp_path / "ran.txt")
    pidfile = step_writable(tmp_path / "step.pid")
    _add_repo(tmp_path, fleet, "labels: {pool: a1}\npipeline:\n  t:\n    commands:\n"
                               f"      - echo once >> {ran}; echo $$ > {pidfile}; "
                               "exec sleep 60\n", name="pinned")
    _add_repo(tmp_path, fleet, "matrix:\n  N: [1, 2, 3, 4, 5, 6]\npipeline:\n  t:\n"
                               f"    commands:\n      - echo $N >> {step_writable(tmp_path / 'others.txt')}\n",
              name="others")
    fleet.servers[0].api("POST", "/api/repos/alice/pinned/builds", {})
    wait_for(lambda: _running_job(fleet, 1, "alice/pinned") and pidfile.exists()
             and pidfile.read_text(), timeout=20)
    step_pid = int(pidfile.read_text())
    fleet.agents[0].process.kill()  # kill -9: no goodbye, no cleanup
    fleet.agents[0].process.wait()
    killed_at = time.monotonic()
    fleet.servers[1].api("POST", "/api/repos/alice/others/builds", {})
    wait_for(lambda: fleet.build("alice/pinned", 1)["status"] == "error",
             timeout=float(Fleet.TIMEOUT) * 2 + 5, interval=0.1)
    assert time.monotonic() - killed_at < float(Fleet.TIMEOUT) * 2 + 5
    job = fleet.store.get_job(fleet.build("alice/pinned", 1)["id"], 1)
    assert "runner stopped" in job["error"] or "agent lost" in job["error"]
    wait_for(lambda: fleet.build("alice/others", 1)["status"] == "success", timeout=30)
    wait_for(lambda: test_cirunner.process_gone(step_pid), timeout=10)  # its leftover
    # Ended error (a final status: never claimed again), and the other agents
    # have since run every job there was: it ran once.
    assert fleet.build("alice/pinned", 1)["status"] == "error"
    assert ran.read_text() == "once\n"
    assert sorted((tmp_path / "others.txt").read_text().split()) == list("123456")


def test_a_cron_fires_once_with_five_processes_running(tmp_path, fleet):
    _add_repo(tmp_path, fleet, "pipeline:\n  t:\n    commands: [echo cron]\n")
    status, _ = fleet.servers[0].api("POST", "/api/repos/alice/hello/crons",
                                     {"name": "yearly", "expression": "0 0 1 1 *"})
    assert status in (200, 201)
    # due now; once fired, not again for a year (every minute, a run that
    # crossed a minute's end counted a second, rightful build)
    fleet.sql("UPDATE crons SET next_at = 1")
    wait_for(lambda: fleet.sql("SELECT count(*) FROM builds WHERE event = 'cron'")[0][0],
             timeout=10)
    # Taken with its build in one transaction that moves next_at on a year:
    # once moved, no process can fire it again.
    wait_for(lambda: fleet.sql("SELECT next_at FROM crons")[0][0] > time.time() + 86400,
             timeout=10)
    assert fleet.sql("SELECT count(*) FROM builds WHERE event = 'cron'")[0][0] == 1


def test_only_an_agent_with_the_labels_a_job_requires_claims_it(tmp_path, fleet):
    _add_repo(tmp_path, fleet, "labels: {pool: a1}\nplatform: linux/amd64\npipeline:\n"
                               "  t:\n    commands: [echo here]\n")
    _add_repo(tmp_path, fleet, "node: {pool: nowhere}\npipeline:\n  t:\n"
                               "    commands: [echo never]\n", name="nowhere")
    for _ in range(6):
        fleet.servers[0].api("POST", "/api/repos/alice/hello/builds", {})
    fleet.servers[0].api("POST", "/api/repos/alice/nowhere/builds", {})
    wait_for(lambda: all(fleet.build("alice/hello", number)["status"] == "success"
                         for number in range(1, 7)), timeout=30)
    runners = {row[0].split(":")[1] for row in fleet.sql(
        "SELECT j.claimed_by FROM jobs j JOIN builds b ON b.id = j.build_id "
        "JOIN repos r ON r.id = b.repo_id WHERE r.name = 'hello'")}
    assert runners == {str(fleet.agents[0].process.pid)}
    assert fleet.build("alice/nowhere", 1)["status"] == "pending"
    status, queue = fleet.servers[1].api("GET", "/api/queue")
    assert status == 200 and queue["pending"][0]["repo"] == "alice/nowhere", queue
    assert "no runner has the labels it requires: pool=nowhere" in queue["pending"][0]["reason"]


def test_an_agent_that_stops_answering_is_lost_and_cleans_up_when_it_comes_back(tmp_path,
                                                                             pg_url):
    pidfile = step_writable(tmp_path / "step.pid")
    server = test_cirunner.Server(tmp_path / "serve", "--db", pg_url, "--agent-timeout", "3")
    share_key(tmp_path / "serve", tmp_path / "agent", tmp_path / "observer")
    agent = Agent(tmp_path / "agent", pg_url, "--agent-timeout", "3", "--labels", "pool=far",
                  hostname="far-away")
    store = cirunner.open_store(str(tmp_path / "observer"), pg_url)
    try:
        path = str(tmp_path / "repo")
        commit_files(path, {".cirunner.yml": "labels: {pool: far}\npipeline:\n  t:\n"
                                             "    commands:\n"
                                             f"      - echo $$ > {pidfile}; exec sleep 60\n"})
        server.api("POST", "/api/repos/alice/hello", {"url": path, "private": False})
        server.api("POST", "/api/repos/alice/hello/builds", {})
        wait_for(lambda: pidfile.exists() and pidfile.read_text(), timeout=20)
        step_pid = int(pidfile.read_text())
        build = store.get_build(store.get_repo("alice", "hello")["id"], 1)
        assert store.get_job(build["id"], 1)["claimed_by"].startswith("far-away:")
        os.kill(agent.process.pid, signal.SIGSTOP)  # alive, but silent: a network outage
        stopped_at = time.monotonic()
        wait_for(lambda: store.get_build_by_id(build["id"])["status"] == "error", timeout=20)
        # The timeout, the seconds a session stopped inside a write keeps the
        # write lock (the stop may land there), and a recovery round.
        assert time.monotonic() - stopped_at < 3 + 5 + 3 + 2
        assert "agent lost" in store.get_job(build["id"], 1)["error"]
        assert not test_cirunner.process_gone(step_pid)  # on "another machine": left to its agent
        os.kill(agent.process.pid, signal.SIGCONT)  # back: it stops what it still runs
        wait_for(lambda: test_cirunner.process_gone(step_pid), timeout=10)
        wait_for(lambda: any(runner["id"].startswith("far-away:")
                             for runner in store.active_runners()), timeout=10)
        assert "found lost" in agent.output()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(agent.process.pid, signal.SIGCONT)
        agent.stop()
        server.stop()
        store.close()


def test_a_machine_without_the_stores_key_is_stopped_with_what_to_do(tmp_path, pg_url):
    first = cirunner.open_store(str(tmp_path / "first"), pg_url)  # makes the key
    first.close()
    for data in (tmp_path / "no-key", tmp_path / "other-key"):
        if data.name == "other-key":
            os.makedirs(data, mode=0o700)
            (data / "secret.key").write_text("ab" * 32 + "\n")
        result = test_cirunner.run_cli("agent", "--data", str(data), "--db", pg_url)
        assert result.returncode == 1, result.stderr
        assert "copy DATA/secret.key of the machine that first served" in result.stderr
    share_key(tmp_path / "first", tmp_path / "copied")
    cirunner.open_store(str(tmp_path / "copied"), pg_url).close()  # the right key opens it


def test_each_commit_status_reaches_the_forge_once_from_two_servers(tmp_path, fleet):
    forge = test_cirunner.StandInForge()
    try:
        path = str(tmp_path / "repos" / "hello")
        commit_files(path, {".cirunner.yml": "pipeline: {t: {commands: [true]}}\n"})
        status, body = fleet.servers[0].api("POST", "/api/repos/alice/hello", {
            "url": path, "forge": "github", "forge_url": forge.url + "/api/v3",
            "forge_token": "forge-token-1"})
        assert status == 201, body
        for number in range(6):
            fleet.servers[number % 2].api("POST", "/api/repos/alice/hello/builds", {})
        wait_for(lambda: all(fleet.build("alice/hello", number)["status"] == "success"
                             for number in range(1, 7)), timeout=30)
        # Queued, running, succeeded: three reports a build, each sent once.
        wait_for(lambda: len(forge.requests) >= 18, timeout=20)
        # Every report of the outbox delivered (done): nothing is left to send.
        wait_for(lambda: fleet.sql("SELECT count(*) FROM reports WHERE done = 0")[0][0] == 0,
                 timeout=20)
        sent = [json.loads(request["body"]) for request in forge.requests]
        assert len(sent) == 18
        assert len({(body["target_url"], body["description"]) for body in sent}) == 18
    finally:
        forge.close()


def test_recovery_never_overwrites_a_job_that_ended_while_it_waited(store, pg_url,
                                                                   make_repo):  # noqa: F811
    repo = make_repo({".cirunner.yml": "pipeline: {t: {commands: [true]}}\n"})
    build = cirunner.create_build(store, store.get_repo_by_id(repo["id"]))
    store.register_runner("far:1:a", "far", 1)
    job = store.claim_next_job("far:1:a")
    with psycopg.connect(pg_url, autocommit=True) as runner, \
            psycopg.connect(pg_url, autocommit=True) as watcher:
        runner.execute("UPDATE runners SET heartbeat_at = 0 WHERE id = 'far:1:a'")  # silent
        # The runner ends its job, holding the build's row as every writer does ...
        runner.execute("BEGIN")
        runner.execute("SELECT 1 FROM builds WHERE id = %s FOR NO KEY UPDATE", (build["id"],))
        recovery = threading.Thread(target=store.recover_lost_jobs,
                                    args=("here:2:b", "here", 2), kwargs={"max_age": 5})
        recovery.start()  # ... while recovery, which has read the job as running, waits
        wait_for(lambda: watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        ).fetchone()[0] == 1)
        runner.execute("UPDATE jobs SET status = 'success', finished_at = 1 WHERE id = %s",
                       (job["id"],))
        runner.execute("COMMIT")
    recovery.join(10)
    assert store.get_job_by_id(job["id"])["status"] == "success"
    assert [status["status"] for status in store.list_statuses(build["id"])
            if status["job_id"] == job["id"]] == ["running"]


def test_claims_from_many_threads_take_each_job_once_and_keep_max_parallel(
        store, make_repo):  # noqa: F811
    # Claims skip the builds (and repositories) other claims hold and wait
    # only for the oldest's, holding no other build: twelve threads over three
    # builds, one with max_parallel, and three of a repository with max_builds,
    # whose builds start in order (a newer one never overtakes a held one).
    limited = make_repo({".cirunner.yml": "pipeline: {t: {commands: [true]}}\n"}, "alice/two",
                        max_builds=2)
    builds = [store.create_build(limited["id"], {"event": "manual"},
                                 [{"N": str(n)} for n in range(20)]) for _ in range(3)]
    repo = make_repo({".cirunner.yml": "pipeline: {t: {commands: [true]}}\n"})
    builds += [store.create_build(repo["id"], {"event": "manual", "max_parallel": limit},
                                  [{"N": str(n)} for n in range(size)])
               for size, limit in ((150, 0), (40, 2), (150, 0))]
    claimed, errors, lock = [], [], threading.Lock()

    def claim(runner):
        try:
            while (job := store.claim_next_job(runner)) is not None:
                with lock:
                    claimed.append(job)
        except Exception as exc:  # noqa: BLE001 - a deadlock would show here
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(f"r{n}",)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    claim("last")  # a claim may find every build held and give up: none is left after this
    assert not errors
    ids = [job["id"] for job in claimed]
    assert len(ids) == len(set(ids)) == 150 + 2 + 150 + 20 + 20
    assert collections.Counter(job["build_id"] for job in claimed) == {
        builds[0]["id"]: 20, builds[1]["id"]: 20,  # the third of alice/two waits
        builds[3]["id"]: 150, builds[4]["id"]: 2, builds[5]["id"]: 150}
    assert [store.get_build_by_id(build["id"])["status"] for build in builds] == [
        "running", "running", "pending", "running", "running", "running"]
    statuses = store.list_statuses(builds[3]["id"])
    assert [status["id"] for status in statuses] == list(range(1, len(statuses) + 1))


def test_a_big_matrix_gets_the_planner_statistics_of_jobs_its_claims_need(
        store, pg_url, make_repo):  # noqa: F811
    # Without them a claim sorted every pending job (8 ms for 2,500) until
    # autovacuum's next analyze; autovacuum is off here, so only the store's
    # own ANALYZE, after a build of 500 jobs or more, can make them.
    repo = make_repo({".cirunner.yml": "pipeline: {t: {commands: [true]}}\n"})
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE jobs SET (autovacuum_enabled = off)")

        def analyzed():
            return sorted(row[0] for row in conn.execute(
                "SELECT attname FROM pg_stats WHERE tablename = 'jobs'"))

        store.create_build(repo["id"], {"event": "manual"}, [{"N": str(n)} for n in range(499)])
        assert analyzed() == []
        store.create_build(repo["id"], {"event": "manual"}, [{"N": str(n)} for n in range(500)])
        assert analyzed() == ["build_id", "labels", "status", "waiting"]
        plan = "\n".join(row[0] for row in conn.execute(
            "EXPLAIN SELECT id FROM jobs WHERE status = 'pending' ORDER BY id LIMIT 64"))
        assert "jobs_queue" in plan and "Sort" not in plan, plan


def test_only_the_commits_an_answer_acknowledges_wait_for_the_databases_sync(
        data_dir, pg_url, tmp_path):  # noqa: F811
    # The database's own setting, which the store keeps for acknowledged
    # commits (a build made, a job's end): remote_apply, not the default.
    # A trigger notes each row's change with the setting it commits under.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {pg_url.rsplit('/', 1)[1]} "
                     "SET synchronous_commit = remote_apply")
    store = cirunner.open_store(data_dir, pg_url)
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("""
                CREATE TABLE noted (what TEXT, mode TEXT);
                CREATE FUNCTION note() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                    INSERT INTO noted VALUES (concat_ws(' ', TG_TABLE_NAME, lower(TG_OP),
                        to_jsonb(NEW) ->> 'status'), current_setting('synchronous_commit'));
                    RETURN NEW; END $$;
                CREATE TRIGGER note AFTER INSERT OR UPDATE ON builds
                    FOR EACH ROW EXECUTE FUNCTION note();
                CREATE TRIGGER note AFTER INSERT OR UPDATE ON jobs
                    FOR EACH ROW EXECUTE FUNCTION note();
                CREATE TRIGGER note AFTER INSERT ON log_chunks
                    FOR EACH ROW EXECUTE FUNCTION note();
            """)
        path = str(tmp_path / "repos" / "hello")
        commit_files(path, {".cirunner.yml": "pipeline: {t: {commands: [true]}}\n"})
        repo = store.create_repo("alice", "hello", path)
        store.register_runner("here:1:a", "here", os.getpid())
        build = store.create_build(repo["id"], {"event": "manual"}, [{}])
        job = store.claim_next_job("here:1:a")
        store.append_log(job["id"], 0, 0, b"hello\n", lease=job["lease"])
        store.finish_job(job["id"], cirunner.SUCCESS, lease=job["lease"])
        assert store.get_build_by_id(build["id"])["status"] == cirunner.SUCCESS
        with psycopg.connect(pg_url, autocommit=True) as conn:
            noted = [tuple(row) for row in conn.execute("SELECT what, mode FROM noted")]
    finally:
        store.close()
    assert noted == [
        ("builds insert pending", "remote_apply"), ("jobs insert pending", "remote_apply"),
        ("jobs update running", "off"), ("builds update running", "off"),
        ("log_chunks insert", "off"),
        ("jobs update success", "remote_apply"), ("builds update success", "remote_apply")]


def test_a_process_stopped_inside_a_write_holds_the_write_lock_for_seconds_only(store,
                                                                                pg_url):
    # As an agent SIGSTOPped (or a VM paused) between two statements of a
    # write: with the store's own session settings, it holds the one lock.
    holder = cirunner._PgConnection(psycopg, pg_url)
    try:
        holder.execute("BEGIN")
        holder.execute("SELECT pg_advisory_xact_lock($1)", (cirunner._PG_WRITE_LOCK,))
        user = store.create_user("waited")  # a write: it waits, then gets the lock
        assert store.get_user("waited")["id"] == user["id"]
        with pytest.raises(psycopg.Error):  # the silent holder's session ended
            holder.execute("SELECT 1")
    finally:
        holder.close()


def test_a_postgresql_outage_ends_no_job_and_the_api_answers_503(tmp_path, pg_cluster, pg_url):
    """Two servers (one runs jobs itself) and an HTTP agent; PostgreSQL stops
    for 10 s while three jobs log."""
    import test_agents

    common = ("--db", pg_url, "--sandbox", "none", "--agent-timeout", "60")
    first = test_cirunner.Server(tmp_path / "serve-a", *common, "--workers", "1")
    share_key(tmp_path / "serve-a", tmp_path / "serve-b")
    second = test_cirunner.Server(tmp_path / "serve-b", *common, "--workers", "0")
    second.token = first.token
    agent = None
    try:
        status, made = first.api("POST", "/api/agents", {"name": "builder"})
        assert status == 201, made
        agent = test_agents.Agent(tmp_path / "agent", second, made["token"], "--sandbox", "none")
        path = str(tmp_path / "repo")
        commit_files(path, {".cirunner.yml": (
            "matrix:\n  N: [1, 2, 3]\npipeline:\n  t:\n    commands:\n"
            "      - for i in $(seq 1 300); do echo line-$i; sleep 0.05; done\n")})
        assert first.api("POST", "/api/repos/alice/hello", {"url": path, "private": False})[0] == 201
        assert first.api("POST", "/api/repos/alice/hello/builds", {})[0] == 201

        def running():
            build = first.api("GET", "/api/repos/alice/hello/builds/1")[1]
            return all(job["status"] == "running" for job in build["jobs"])

        wait_for(running, timeout=30)
        time.sleep(1.0)  # each job logs a while before the outage
        pg_cluster.pause()
        try:
            answers = [server.api("GET", "/api/repos/alice/hello/builds/1")
                       for server in (first, second)]
            for status, body in answers:
                assert status == 503, body
                assert "store cannot be reached" in body["message"]
            request = urllib.request.Request(first.url + "/api/repos/alice/hello/builds/1",
                                             headers=first.auth)
            with pytest.raises(urllib.error.HTTPError) as raised:
                urllib.request.urlopen(request, timeout=10)
            assert raised.value.code == 503 and raised.value.headers["Retry-After"]
            time.sleep(10.0)  # the outage lasts 10 s
        finally:
            pg_cluster.resume()
        wait_for(lambda: first.api("GET", "/api/repos/alice/hello/builds/1")[1].get("status")
                 in ("success", "failure", "error", "killed"), timeout=90, interval=0.5)
        build = first.api("GET", "/api/repos/alice/hello/builds/1")[1]
        assert build["status"] == "success", [(job["status"], job["error"])
                                              for job in build["jobs"]]
        for job in build["jobs"]:
            request = urllib.request.Request(
                f"{first.url}/api/repos/alice/hello/logs/1/{job['number']}",
                headers={**first.auth, "Accept": "text/plain"})
            with urllib.request.urlopen(request, timeout=10) as response:
                lines = [line for line in response.read().decode().splitlines()
                         if line.startswith("line-")]
            assert lines == [f"line-{n}" for n in range(1, 301)], job["number"]
    finally:
        if agent is not None:
            agent.stop()
        second.stop()
        first.stop()


class RoundRobin:
    """A TCP load balancer on 127.0.0.1: each connection goes to the next of
    `urls` in turn (what a proxy in front of several `serve` does)."""

    def __init__(self, urls):
        self.backends = [urllib.parse.urlsplit(url) for url in urls]
        self.counts = [0] * len(urls)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        turn = 0
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            backend = self.backends[turn % len(self.backends)]
            self.counts[turn % len(self.backends)] += 1
            turn += 1
            try:
                server = socket.create_connection((backend.hostname, backend.port))
            except OSError:
                client.close()
                continue
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source, target):
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        for end in (source, target):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def close(self):
        self.closed = True
        self.listener.close()


def test_an_http_agent_behind_a_load_balancer_works_with_any_server(tmp_path, pg_url):
    """Two serves on one PostgreSQL store behind a round-robin balancer: the
    agent's polls, reports and git fetches land on either (each serve has a
    mirror of its own), and every job runs once, checked out and green."""
    import test_agents

    common = ("--db", pg_url, "--sandbox", "none", "--workers", "0")
    first = test_cirunner.Server(tmp_path / "serve-a", *common)
    share_key(tmp_path / "serve-a", tmp_path / "serve-b")
    second = test_cirunner.Server(tmp_path / "serve-b", *common)
    second.token = first.token
    balancer = RoundRobin([first.url, second.url])
    agent = None
    try:
        status, made = first.api("POST", "/api/agents", {"name": "builder"})
        assert status == 201, made
        agent = test_agents.Agent(tmp_path / "agent", balancer, made["token"], "--sandbox",
                                  "none")
        path = str(tmp_path / "repo")
        commit_files(path, {".cirunner.yml": (
            "matrix:\n  N: [1, 2]\npipeline:\n  t:\n    commands:\n"
            "      - test -f .cirunner.yml\n      - echo job-$N-of-$CI_BUILD_NUMBER\n")})
        assert first.api("POST", "/api/repos/alice/hello", {"url": path, "private": False})[0] \
            == 201
        for _ in range(4):
            assert second.api("POST", "/api/repos/alice/hello/builds", {})[0] == 201

        def ended(number):
            return first.api("GET", f"/api/repos/alice/hello/builds/{number}")[1]["status"] \
                in ("success", "failure", "error", "killed")

        wait_for(lambda: all(ended(number) for number in (1, 2, 3, 4)), timeout=120,
                 interval=0.2)
        for number in (1, 2, 3, 4):
            build = first.api("GET", f"/api/repos/alice/hello/builds/{number}")[1]
            assert build["status"] == "success", [(job["status"], job["error"])
                                                  for job in build["jobs"]]
            for job in build["jobs"]:
                request = urllib.request.Request(
                    f"{first.url}/api/repos/alice/hello/logs/{number}/{job['number']}",
                    headers={**first.auth, "Accept": "text/plain"})
                with urllib.request.urlopen(request, timeout=30) as answer:
                    log = answer.read().decode()
                assert log.count(f"\njob-{job['environment']['N']}-of-{number}\n") == 1, log
        assert min(balancer.counts) > 0, balancer.counts  # both serves answered the agent
    finally:
        if agent is not None:
            agent.stop()
        balancer.close()
        second.stop()
        first.stop()
