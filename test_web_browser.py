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
    GitDaemon,
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
    # The earlier window starts and ends on a line boundary, and says which bytes it shows.
    texts = page.evaluate("[...document.querySelectorAll('#log .rows div span')]"
                          ".map(row => row.textContent)")
    assert texts[0] == texts[-1] == line
    shown = re.search(r"Showing bytes (\d+) to (\d+) of (\d+)", page.inner_text("#log-window"))
    start, end, size = map(int, shown.groups())
    assert (end - start) == len(texts) * (len(line) + 1) and size > end
    assert page.get_attribute("#later", "href") is not None
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
    assert "2 of 2 done" in page.inner_text("#live")
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
                                  "/alice/hello/1/1", "/queue", "/new", "/tokens", "/users",
                                  "/agents", "/alice/hello/settings", "/alice/hello/secrets",
                                  "/alice/hello/schedules"])
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
    if path != "/login":
        sign_in(phone, server)
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


# -- pages that act -------------------------------------------------------------

AXE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node_modules", "axe-core",
                   "axe.min.js")


def phone_or_desktop(browser, width):
    context = browser.new_context(viewport={"width": width, "height": 800},
                                  is_mobile=width < 600)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    return context, page


def fits(page):
    """No sideways scrolling of the page (tables may scroll inside their box)."""
    width = page.evaluate("document.documentElement.scrollWidth")
    viewport = page.evaluate("window.innerWidth")
    assert width <= viewport, f"{page.url} is {width} px wide on a {viewport} px screen"


def user_with_token(server, login, admin=False):
    assert server.api("POST", "/api/users", {"login": login, "admin": admin})[0] == 201
    status, made = server.api("POST", "/api/user/tokens", {"login": login, "name": "test"})
    assert status == 201
    return made["token"]


def sign_in_with(page, server, token):
    page.goto(server.url + "/login")
    page.fill("input[name=token]", token)
    page.click("main button:has-text('Sign in')")
    page.wait_for_url(server.url + "/")


def form_error(page):
    return page.inner_text("#form-error")


@pytest.mark.parametrize("width", [1200, 375])
def test_a_user_adds_a_repository_a_secret_and_builds_with_a_variable_from_the_browser(
        server, browser, tmp_path, width):
    """bob (not an admin) signs in, adds a repository by its git:// URL, gives
    it a secret, starts a build with a variable from the form, watches it go
    green, then makes a token and revokes it: all in the browser, on a desktop
    and on a 375 px phone, without the page scrolling sideways."""
    git_daemon = GitDaemon(tmp_path / "served")
    url = git_daemon.repo("hello", {".cirunner.yml": (
        "pipeline:\n  t:\n    commands:\n      - echo \"greeting=$GREETING\"\n"
        "      - test \"$API_KEY\" = s3cr3t-value && echo key-matches\n")})
    bob = user_with_token(server, "bob")
    context, page = phone_or_desktop(browser, width)
    sign_in_with(page, server, bob)
    fits(page)

    page.click("header a:has-text('add repository')")
    assert page.input_value("#owner") == "bob"
    page.fill("#name", "hello")
    page.fill("#url", "/etc")  # a path on the server: for admins only
    page.click("button:has-text('Add repository')")
    assert "only an admin may point a repository at a local path" in form_error(page)
    assert page.input_value("#name") == "hello"  # what was typed is kept
    page.fill("#url", url)
    page.click("button:has-text('Add repository')")
    page.wait_for_selector("#webhook-secret")
    assert page.url == server.url + "/new"
    secret = page.inner_text("#webhook-secret")
    assert len(secret) >= 24
    assert page.inner_text("#webhook-url") == f"{server.url}/hook?repo=bob/hello"
    fits(page)
    screenshot(page, "settings.png" if width > 600 else "settings-phone.png")
    assert server.api("GET", "/api/repos/bob/hello")[1]["webhook_secret_set"] is True
    page.click("#show-secret")
    assert page.inner_text("#webhook-secret") == secret

    # Settings: a change is saved; a bad value is refused with the API's message.
    page.fill("#f-timeout", "0")
    page.click("button:has-text('Save settings')")
    assert "timeout" in form_error(page)
    page.fill("#f-timeout", "45")
    page.click("button:has-text('Save settings')")
    page.wait_for_selector("#saved")
    assert server.api("GET", "/api/repos/bob/hello")[1]["timeout"] == 45
    assert page.query_selector("input[name=trusted]") is None  # for admins only

    page.click("nav.tabs a:has-text('secrets')")
    # By keyboard alone: each field is reached with Tab, and Enter sends the form.
    page.focus("#secret-name")
    page.keyboard.type("API_KEY")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "secret-value"
    page.keyboard.type("s3cr3t-value")
    while page.evaluate("document.activeElement.id") != "secret-images":
        page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    page.wait_for_selector("td:has-text('API_KEY')")
    assert "s3cr3t-value" not in page.content()
    assert [secret["name"] for secret in server.api("GET", "/api/repos/bob/hello/secrets")[1]] \
        == ["API_KEY"]
    fits(page)
    screenshot(page, "secrets.png" if width > 600 else "secrets-phone.png")

    page.click("nav.tabs a:has-text('builds')")
    page.click("summary:has-text('Start a build')")
    page.fill(".vars .row:nth-of-type(1) input[name=var_name]", "GREETING")
    page.fill(".vars .row:nth-of-type(1) input[name=var_value]", "hi from the form")
    fits(page)
    screenshot(page, "start-build.png" if width > 600 else "start-build-phone.png")
    page.click("button:has-text('Start build')")
    page.wait_for_url(server.url + "/bob/hello/1")
    page.wait_for_function(
        "document.getElementById('build-status').textContent === 'success'", timeout=60_000)
    build = server.api("GET", "/api/repos/bob/hello/builds/1")[1]
    assert build["variables"] == {"GREETING": "hi from the form"}
    fits(page)
    page.click("text=job 1")
    page.wait_for_selector("#log div")
    log = page.inner_text("#log")
    assert "greeting=hi from the form" in log and "key-matches" in log
    fits(page)

    page.click("header a:has-text('tokens')")
    page.fill("#token-name", "laptop")
    page.click("button:has-text('Make token')")
    made = page.inner_text("#new-token")
    assert made.startswith("cir_")
    assert http_json("GET", server.url + "/api/user",
                     headers={"Authorization": f"Token {made}"})[0] == 200
    fits(page)
    screenshot(page, "tokens.png" if width > 600 else "tokens-phone.png")
    page.goto(server.url + "/tokens")
    assert made not in page.content()  # shown once
    row = page.locator("tr", has_text="laptop")
    row.locator("button:has-text('Revoke')").click()
    page.wait_for_url(server.url + "/tokens")
    assert page.locator("tr", has_text="laptop").count() == 0
    assert http_json("GET", server.url + "/api/user",
                     headers={"Authorization": f"Token {made}"})[0] == 401
    context.close()
    git_daemon.stop()


@pytest.mark.parametrize("width", [1200, 375])
def test_an_admin_adds_a_user_and_approves_a_forks_build_after_the_queue_says_why(
        server, browser, tmp_path, width):
    work, bare = str(tmp_path / "work"), str(tmp_path / "hello.git")
    commit_files(work, {".cirunner.yml": "pipeline: {t: {commands: [cat version]}}\n",
                        "version": "one\n"})
    subprocess.run(["git", "clone", "-q", "--bare", work, bare], check=True)
    server.api("POST", "/api/repos/alice/hello", {
        "url": "file://" + bare, "private": False, "webhook_secret": WEBHOOK_SECRET})
    fork = str(tmp_path / "fork")
    subprocess.run(["git", "clone", "-q", bare, fork], check=True)
    head = commit_files(fork, {"version": "from the fork\n"}, message="Fork change")
    subprocess.run(["git", "-C", fork, "push", "-q", bare, "HEAD:refs/pull/7/head"], check=True)
    body = json.dumps({"action": "opened", "number": 7, "pull_request": {
        "number": 7, "title": "Make it better",
        "html_url": "https://github.com/alice/hello/pull/7",
        "head": {"ref": "feature", "sha": head, "repo": {
            "full_name": "mallory/hello", "clone_url": "https://github.com/mallory/hello.git"}},
        "base": {"ref": "main", "sha": "2" * 40, "repo": {"full_name": "alice/hello"}},
        "user": {"login": "mallory", "avatar_url": "https://avatars.example/m"}},
        "repository": {"full_name": "alice/hello"}}).encode()
    request = urllib.request.Request(server.url + "/hook", body, method="POST", headers={
        "X-GitHub-Event": "pull_request", "Content-Type": "application/json",
        **sign(body, "github")})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert json.loads(answer.read())["status"] == "blocked"

    context, page = phone_or_desktop(browser, width)
    sign_in(page, server)
    page.click("header a:has-text('users')")
    page.fill("#login", "carol")
    page.fill("#email", "carol@example.com")
    page.click("button:has-text('Add user')")
    token = page.inner_text("#new-token")
    assert token.startswith("cir_")
    fits(page)
    if width > 600:
        screenshot(page, "users.png")
    carol = http_json("GET", server.url + "/api/user", headers={"Authorization": f"Token {token}"})
    assert carol[0] == 200 and carol[1]["login"] == "carol" and carol[1]["admin"] is False
    page.click("#admin-carol")
    page.wait_for_url(server.url + "/users")
    assert server.api("GET", "/api/users/carol")[1]["admin"] is True
    page.fill("#login", "carol")
    page.click("button:has-text('Add user')")
    assert form_error(page) == "user carol already exists"

    page.click("header a:has-text('queue')")
    reason = page.inner_text("td.reason")
    assert "its build waits for approval" in reason
    assert "alice/hello #1 job 1" in page.inner_text("main")
    fits(page)
    if width > 600:
        screenshot(page, "queue.png")

    page.goto(server.url + "/alice/hello/1")
    blocked = page.inner_text("#blocked")
    assert "mallory" in blocked and "mallory/hello" in blocked
    page.click("summary:has-text('What it would run')")
    assert "cat version" in page.inner_text("#would-run")
    fits(page)
    if width > 600:
        screenshot(page, "approval.png")
    page.click("#approve")
    page.wait_for_function(
        "document.getElementById('build-status').textContent === 'success'", timeout=60_000)
    assert server.api("GET", "/api/repos/alice/hello/builds/1")[1]["reviewed_by"] == "admin"
    fits(page)
    context.close()


def test_a_form_with_a_stale_csrf_token_is_refused_with_a_clear_message(server, browser,
                                                                         tmp_path):
    repo = str(tmp_path / "repo")
    commit_files(repo, {".cirunner.yml": "pipeline: {t: {commands: [echo a]}}\n"})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    context = browser.new_context()
    first, second = context.new_page(), context.new_page()
    sign_in(first, server)
    first.goto(server.url + "/alice/hello/secrets")
    first.fill("#secret-name", "LATE")
    first.fill("#secret-value", "value")
    # Signing in as someone else in another tab makes a new session: the first tab's
    # form is stale. (Signing in again with the same token within the same second
    # signs the same session cookie: that form would still be current.)
    sign_in_with(second, server, user_with_token(server, "bob", admin=True))
    with first.expect_navigation():
        first.click("button:has-text('Save secret')")
    assert "this form is out of date" in first.inner_text("main")
    assert server.api("GET", "/api/repos/alice/hello/secrets")[1] == []
    context.close()


def test_every_page_has_no_serious_accessibility_violations(server, page, tmp_path):
    """axe-core (npm, pinned in package.json), injected into every page."""
    if not os.path.exists(AXE):
        pytest.skip("needs axe-core: npm ci")  # .ci/run installs it
    repo = str(tmp_path / "repo")
    commit_files(repo, {".cirunner.yml": "pipeline: {t: {commands: [echo a, 'exit 3']}}\n"})
    server.api("POST", "/api/repos/alice/hello", {"url": repo, "private": False})
    server.api("POST", "/api/repos/alice/hello/builds", {})
    server.api("POST", "/api/repos/alice/hello/secrets", {"name": "KEY", "value": "v"})
    server.api("POST", "/api/repos/alice/hello/crons", {"name": "nightly",
                                                         "expression": "0 3 * * 1-5"})
    wait_for(lambda: server.api("GET", "/api/repos/alice/hello/builds/1")[1]["status"]
             == "failure", timeout=60)
    with open(AXE) as handle:
        axe = handle.read()
    pages = ["/login", "/", "/queue", "/new", "/tokens", "/users", "/agents", "/alice/hello",
             "/alice/hello/settings", "/alice/hello/secrets", "/alice/hello/schedules",
             "/alice/hello/1", "/alice/hello/1/1"]
    found = {}
    for path in pages:
        if path == "/":
            sign_in(page, server)
        page.goto(server.url + path)
        page.add_script_tag(content=axe)
        result = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
        bad = [f"{violation['id']}: {violation['help']} "
               f"({[node['target'] for node in violation['nodes']][:3]})"
               for violation in result["violations"]
               if violation["impact"] in ("serious", "critical")]
        if bad:
            found[path] = bad
    assert found == {}


def test_the_favicon_is_an_icon(server):
    with urllib.request.urlopen(server.url + "/favicon.ico", timeout=10) as answer:
        data = answer.read()
        assert answer.headers["Content-Type"] == "image/x-icon"
    assert data[:4] == b"\0\0\1\0" and len(data) > 1000
