"""The web pages in a real headless Chromium (Debian's, driven by Playwright)
against a real `cirunner serve` on 127.0.0.1. Its own file: it needs a browser.

Set CIRUNNER_SCREENSHOTS=DIR to keep the screenshots (the README's come from here).
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest

from test_cirunner import (
    WEBHOOK_SECRET,
    XSS,
    Server,
    commit_files,
    github_push,
    http_json,
    http_text,
    sign,
    steps_reach_tmp_path,  # noqa: F401 - autouse
    wait_for,
    workspace_of,
)

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")
# Without the networking flags Chromium tries to reach Google's hosts, which
# this machine's closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path / "data")
    yield server
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)  # kill what is still running, then exit
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=20)
    server.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.dialogs = dialogs
    yield page
    context.close()


def screenshot(page, name):
    folder = os.environ.get("CIRUNNER_SCREENSHOTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        page.screenshot(path=os.path.join(folder, name), full_page=False)


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def sign_in(page, server):
    page.goto(server.url + "/login")
    page.fill("input[name=token]", server.token)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(server.url + "/")


def test_live_log_cancel_and_restart_in_a_browser(server, page, tmp_path):
    repo = str(tmp_path / "repo")
    commit_files(repo, {".cirunner.yml": (
        "pipeline:\n  t:\n    commands:\n"
        "      - for i in $(seq 1200); do [ -e gate ] && break; sleep 0.05; done; echo \"LIVE-$((6*7))\"\n"
        "      - sleep 600\n")}, message=f"Try the web {XSS}")
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    status, _ = server.api("POST", "/api/repos/alice/hello/builds", {})
    assert status == 201
    gate = workspace_of(server.data_dir, "alice/hello", 1, 1) / "gate"  # the step sees it
    wait_for(lambda: server.api("GET", "/api/repos/alice/hello/builds/1")[1]["jobs"][0]
             ["status"] == "running")

    sign_in(page, server)
    assert "alice/hello" in page.inner_text("main")
    screenshot(page, "repositories.png")
    page.click("text=alice/hello")
    page.click("a:has-text('#1')")
    assert page.inner_text("#build-status") == "running"
    page.click("text=job 1")
    page.wait_for_selector("#log div")  # the echoed command is already there
    assert "LIVE-42" not in page.inner_text("#log")
    gate.touch()  # the workspace exists: the step is running in it
    started = time.monotonic()
    page.wait_for_function("document.getElementById('log').innerText.includes('LIVE-42')",
                           timeout=2000)  # within 2 s, without reloading
    print(f"\nlive line shown {time.monotonic() - started:.2f} s after it was printed")
    screenshot(page, "job-log.png")

    page.goto(server.url + "/alice/hello/1")
    screenshot(page, "build.png")
    page.click("#cancel")
    page.wait_for_url(server.url + "/alice/hello/1")
    page.goto(server.url + "/alice/hello/1/1")
    page.wait_for_function("document.getElementById('job-status').textContent === 'killed'",
                           timeout=10000)
    page.goto(server.url + "/alice/hello/1")
    assert page.inner_text("#build-status") == "killed"
    page.click("#restart")
    page.wait_for_url(server.url + "/alice/hello/1")
    assert page.inner_text("#build-status") in ("pending", "running")
    wait_for(gate.parent.is_dir)  # the restarted job's new workspace
    gate.touch()
    page.goto(server.url + "/alice/hello/1/1")
    page.wait_for_function("document.getElementById('log').innerText.includes('LIVE-42')",
                           timeout=5000)  # it ran again

    # the commit message's script tag is text: no dialog, no script element made
    page.goto(server.url + "/alice/hello/1")
    assert XSS in page.inner_text("main")
    assert page.evaluate("document.querySelectorAll('main script').length") == 0
    assert page.dialogs == []


def test_log_line_with_a_script_tag_stays_text(server, page, tmp_path):
    repo = str(tmp_path / "repo")
    commit_files(repo, {".cirunner.yml": (
        "clone: false\npipeline: {t: {commands: ['printf \"%s\\\\n\" \"$PAYLOAD\"']}}\n")})
    server.api("POST", "/api/repos/alice/xss", {"url": repo, "private": False})
    server.api("POST", "/api/repos/alice/xss/builds", {"variables": {"PAYLOAD": XSS}})
    wait_for(lambda: server.api("GET", "/api/repos/alice/xss/builds/1")[1]["status"] == "success")
    page.goto(server.url + "/alice/xss/1/1")  # a public repo: no sign-in needed
    assert XSS in page.inner_text("#log")
    assert page.evaluate("document.querySelectorAll('#log script').length") == 0
    assert page.dialogs == []


def test_a_50_mb_log_page_opens_fast_and_memory_stays_flat(server, page, tmp_path):
    repo = str(tmp_path / "repo")
    line = "0123456789" * 10
    commit_files(repo, {".cirunner.yml": (
        f"clone: false\npipeline: {{t: {{commands: ['yes {line} | head -c 52428800']}}}}\n")})
    server.api("POST", "/api/repos/alice/big", {"url": repo, "private": False})
    server.api("POST", "/api/repos/alice/big/builds", {})
    wait_for(lambda: server.api("GET", "/api/repos/alice/big/builds/1")[1]["status"] == "success",
             timeout=60)
    before = rss_mib(server.process.pid)
    started = time.monotonic()
    page.goto(server.url + "/alice/big/1/1")
    page.wait_for_selector("#earlier")
    page.click("#follow")  # interactive: the page answers input
    elapsed = time.monotonic() - started
    print(f"\n50 MB log page interactive after {elapsed:.2f} s")
    assert elapsed < 5
    assert page.evaluate("document.querySelectorAll('#log .rows div').length") < 5000
    last = page.evaluate("[...document.querySelectorAll('#log .rows div')].pop().id")
    # numbered as in the whole log: the isolation line, the echoed command, the full
    # lines, the cut last one
    head = http_text(server.url + "/api/repos/alice/big/logs/1/1")[:400]
    assert int(last[1:]) == 2 + 52428800 // (len(line) + 1) + 1, head
    page.click("#earlier")
    page.wait_for_selector("#log div")
    grown = rss_mib(server.process.pid) - before
    print(f"server RSS grew {grown:.1f} MiB while two pages of the log were served")
    assert grown < 16
    status, _ = http_json("GET", server.url + "/healthz")
    assert status == 200


def test_a_two_step_build_is_watched_live_and_its_failing_step_is_shown(server, page, tmp_path):
    repo = str(tmp_path / "repo")
    commit_files(repo, {".cirunner.yml": (
        "pipeline:\n"
        "  compile:\n    commands:\n"
        "      - echo compiling\n"
        "      - for i in $(seq 1200); do [ -e gate ] && break; sleep 0.05; done\n"
        "  test:\n    commands:\n"
        "      - echo testing\n"
        "      - test -z \"$FAIL\" || exit 3\n")})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    gate = workspace_of(server.data_dir, "alice/hello", 1, 1) / "gate"
    wait_for(lambda: server.api("GET", "/api/repos/alice/hello/builds/1")[1]["jobs"][0]
             ["status"] == "running")
    page.goto(server.url + "/alice/hello")  # the repository page, open all along
    repo_page = page.context.new_page()
    repo_page.goto(server.url + "/alice/hello")
    page.goto(server.url + "/alice/hello/1")
    assert page.inner_text("#build-status") == "running"
    assert repo_page.inner_text("#live tr:nth-child(2) .status") == "running"
    gate.touch()
    # no reload: the page's one EventSource brings the change
    page.wait_for_function("document.getElementById('build-status').textContent === 'success'",
                           timeout=10000)
    repo_page.wait_for_function(
        "document.querySelector('#live tr:nth-child(2) .status').textContent === 'success'",
        timeout=10000)
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
    assert "2/2" in page.inner_text("#live")
    page.click("#job-1")
    summaries = page.eval_on_selector_all("#log details summary", "s => s.map(e => e.innerText)")
    assert [text.split()[:2] for text in summaries] == [
        ["success", "clone"], ["success", "compile"], ["success", "test"]], summaries
    assert all(re.search(r"\d+ s$", text) for text in summaries[1:]), summaries  # durations
    screenshot(page, "job-log.png")
    # a failing second step: opened, named, scrolled to; the others closed
    server.api("POST", "/api/repos/alice/hello/builds", {"variables": {"FAIL": "1"}})
    wait_for(lambda: (workspace_of(server.data_dir, "alice/hello", 2, 1)).is_dir())
    (workspace_of(server.data_dir, "alice/hello", 2, 1) / "gate").touch()
    page.goto(server.url + "/alice/hello/2/1")
    page.wait_for_function("document.getElementById('job-status').textContent === 'failure'",
                           timeout=10000)
    assert page.evaluate("document.getElementById('step-2').open") is True
    assert page.evaluate("document.getElementById('step-1').open") is False
    page.reload()  # as a finished job's page opens
    assert page.inner_text("#failed") == "failed in test (exit 3)"
    assert page.evaluate("document.getElementById('step-2').open") is True
    assert page.evaluate("document.getElementById('step-1').open") is False
    assert "failure" in page.inner_text("#step-2 summary")
    assert page.evaluate("document.getElementById('step-2').getBoundingClientRect().top") < 800
    screenshot(page, "job-failed.png")
    page.goto(server.url + "/alice/hello/2")
    screenshot(page, "build.png")
    page.goto(server.url + "/")
    assert "main" in page.inner_text("main") and "#2" in page.inner_text("main")
    screenshot(page, "repositories.png")
    repo_page.close()


@pytest.mark.parametrize("path", ["/login", "/", "/alice/hello", "/alice/hello/1",
                                  "/alice/hello/1/1"])
def test_pages_fit_a_phone(server, browser, tmp_path, path):
    repo = str(tmp_path / "repo")
    commit_files(repo, {".cirunner.yml": "pipeline: {t: {commands: ['echo a long line "
                                         + "x" * 300 + "']}}\n"})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    wait_for(lambda: server.api("GET", "/api/repos/alice/hello/builds/1")[1]["status"]
             == "success")
    context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True)
    phone = context.new_page()
    phone.goto(server.url + path)
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= 360, f"{path} is {width} px wide on a 360 px screen"
    context.close()


def test_the_pages_work_mounted_under_a_prefix(tmp_path, page):
    server = Server(tmp_path / "data", "--url-prefix", "/ci", prefix="/ci")
    try:
        repo = str(tmp_path / "repo")
        commit_files(repo, {".cirunner.yml": "pipeline: {t: {commands: [echo mounted]}}\n"})
        assert server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})[0] == 201
        server.api("POST", "/api/repos/alice/hello/builds", {})
        wait_for(lambda: server.api("GET", "/api/repos/alice/hello/builds/1")[1]["status"]
                 == "success", timeout=30)

        def links_stay_under_the_prefix():
            targets = page.evaluate(
                "[...document.querySelectorAll('a[href], form[action]')]"
                ".map(e => e.getAttribute('href') ?? e.getAttribute('action'))")
            outside = [target for target in targets if target.startswith("/")
                       and not target.startswith("/ci/") and target != "/ci"]
            assert outside == [], outside

        page.goto(server.url + "/login")
        links_stay_under_the_prefix()
        page.fill("input[name=token]", server.token)
        page.click("button:has-text('Sign in')")
        page.wait_for_url(server.url + "/")
        links_stay_under_the_prefix()
        page.click("text=alice/hello")
        page.wait_for_url(server.url + "/alice/hello")
        links_stay_under_the_prefix()
        page.click("a:has-text('#1')")
        page.wait_for_url(server.url + "/alice/hello/1")
        links_stay_under_the_prefix()
        page.click("text=job 1")
        page.wait_for_url(server.url + "/alice/hello/1/1")
        links_stay_under_the_prefix()
        assert "mounted" in page.inner_text("#log")
        page.click("text=raw log")
        assert "mounted" in page.inner_text("body")
        page.goto(server.url + "/alice/hello/1")
        page.click("#restart")
        page.wait_for_url(server.url + "/alice/hello/1")
        page.click("button:has-text('Sign out')")
        page.wait_for_url(server.url + "/")
        assert "Sign in" in page.inner_text("header")
    finally:
        server.stop()


WOODPECKER_WORKFLOWS = {
    ".woodpecker/build.yml": "steps:\n  compile:\n    commands: [echo compiled]\n",
    ".woodpecker/test.yml": "depends_on: [build]\nsteps:\n  unit:\n    commands: [echo tested]\n",
    ".woodpecker/lint.yml": "depends_on: [build]\nsteps:\n  vet:\n    commands: [echo linted]\n",
    ".woodpecker/deploy.yml": ("depends_on: [test, lint]\nwhen:\n  event: tag\nsteps:\n"
                               "  ship:\n    commands: [echo shipped]\n"),
}


def test_a_woodpecker_folder_runs_through_a_webhook_with_its_graph_on_the_page(server, page,
                                                                              tmp_path):
    """build -> test and lint side by side -> deploy, only for a tag: pushed
    through a signed GitHub webhook to a real server, shown in a browser."""
    work, bare = str(tmp_path / "work"), str(tmp_path / "hello.git")
    sha = commit_files(work, WOODPECKER_WORKFLOWS, message="three workflows")
    subprocess.run(["git", "clone", "-q", "--bare", work, bare], check=True)
    status, _ = server.api("POST", "/api/repos/alice/hello", {
        "url": "file://" + bare, "private": False, "webhook_secret": WEBHOOK_SECRET})
    assert status == 201

    def hook(ref):
        body = json.dumps(github_push(sha, "three workflows", ref=ref)).encode()
        request = urllib.request.Request(server.url + "/hook", body, method="POST", headers={
            "X-GitHub-Event": "push", "Content-Type": "application/json",
            **sign(body, "github")})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())["number"]

    def finished(number):
        build = server.api("GET", f"/api/repos/alice/hello/builds/{number}")[1]
        return build if build["status"] not in ("pending", "running") else None

    number = hook("refs/heads/main")
    pushed = wait_for(lambda: finished(number), timeout=60)
    assert pushed["status"] == "success"
    assert sorted(job["pipeline"] for job in pushed["jobs"]) == ["build", "lint", "test"]
    number = hook("refs/tags/v1")
    tagged = wait_for(lambda: finished(number), timeout=60)
    assert tagged["status"] == "success", tagged
    jobs = {job["pipeline"]: job for job in tagged["jobs"]}
    assert jobs["deploy"]["depends_on"] == ["test", "lint"]
    assert jobs["deploy"]["started_at"] >= max(jobs["test"]["finished_at"],
                                               jobs["lint"]["finished_at"])

    sign_in(page, server)
    page.goto(f"{server.url}/alice/hello/{tagged['number']}")
    rows = [row.split("\t") for row in page.inner_text("table.jobs, .wide table").splitlines()]
    pipelines = [cells[1].strip() for cells in rows[1:] if len(cells) > 2]
    assert pipelines[0] == "build" and pipelines[-1] == "deploy after test, lint", rows
    assert set(pipelines[1:3]) == {"test after build", "lint after build"}, rows
    assert "% " not in page.inner_text("main")  # no template text leaks into the page
    screenshot(page, "woodpecker-graph.png")
