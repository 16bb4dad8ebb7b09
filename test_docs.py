"""The docs as a reader follows them: every command block they mark runnable
runs against a real `serve`, and the service install runs in a temporary
prefix with a virtual environment of its own (pip installs into it: the
setup that gives this file of its own)."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from test_cirunner import (
    CIRUNNER,
    HERE,
    Server,
    free_port,
    http_json,
    steps_reach_tmp_path,  # noqa: F401 - autouse, as in test_cirunner.py
    stop_process,
    wait_for,
)

# -- the docs: every command block marked runnable runs ----------------------------
# A block is marked runnable by an HTML comment line `<!-- runnable -->` right
# before a fenced block whose info string is `sh` (see docs/development.md).


_RUNNABLE_BLOCK = re.compile(r"^<!-- runnable -->\n```sh\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _runnable_blocks():
    """(where, text) of every runnable block of README.md and docs/*.md, where
    being "FILE:LINE" of the block's first line."""
    paths = [pathlib.Path(HERE, "README.md"), *sorted(pathlib.Path(HERE, "docs").glob("*.md"))]
    blocks = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        for match in _RUNNABLE_BLOCK.finditer(text):
            line = text.count("\n", 0, match.start(1)) + 1
            blocks.append((f"{path.relative_to(HERE)}:{line}", match.group(1)))
    return blocks


def test_the_docs_mark_runnable_blocks_and_the_readme_tour_is_one():
    where = [where for where, _ in _runnable_blocks()]
    assert any(place.startswith("README.md:") for place in where), where


@pytest.mark.parametrize("where, block", _runnable_blocks(),
                         ids=[where for where, _ in _runnable_blocks()])
def test_every_runnable_block_of_the_docs_runs(tmp_path, where, block):
    """Each block runs as a reader would paste it, in a fresh directory that
    stands for the checkout, with `serve` running there on `./cirunner-data`.

    How a block gets its environment:
    - `cirunner` is the code under test: `.venv/bin/cirunner` in the directory
      runs this cirunner.py with this Python, and `.venv/bin` comes first on
      PATH; `. .venv/bin/activate` (as the README says) puts it first again.
    - The server is a real `serve` (the `Server` of these tests: `--engine
      none`, two workers) with its data in `./cirunner-data`, the CLI's default,
      so blocks that use the store directly and blocks that use the API meet.
      It listens on a free port: the docs' `http://127.0.0.1:8080` is replaced
      by its address, the only change made to a block's text.
    - No CIRUNNER_* variable of the caller's gets through (as in `run_cli`), and
      `CIRUNNER_ENGINE=none` as there; HOME, XDG_CONFIG_HOME (where `cirunner
      login` writes) and TMPDIR (`mktemp`) are folders of this test.
    - bash runs it with -e and pipefail: every command must exit 0; -x shows
      which one did not.
    """
    work = tmp_path / "checkout"
    bin_dir = work / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    wrapper = bin_dir / "cirunner"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{CIRUNNER}" "$@"\n')
    wrapper.chmod(0o755)
    (bin_dir / "activate").write_text(f'PATH="{bin_dir}:$PATH"; export PATH\n')
    for folder in ("home", "config", "tmp"):
        (tmp_path / folder).mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRUNNER_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', os.defpath)}",
               HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "config"),
               TMPDIR=str(tmp_path / "tmp"), CIRUNNER_ENGINE="none")
    server = Server(work / "cirunner-data")
    try:
        script = block.replace("http://127.0.0.1:8080", server.url)
        result = subprocess.run(["bash", "-e", "-o", "pipefail", "-x", "-c", script], cwd=work,
                                env=env, text=True, capture_output=True, timeout=240,
                                check=False)
    finally:
        server.stop()
    assert result.returncode == 0, (f"{where} exited {result.returncode}\n--- stdout\n"
                                    f"{result.stdout[-4000:]}\n--- stderr\n"
                                    f"{result.stderr[-4000:]}\n--- serve\n"
                                    f"{server.output()[-2000:]}")


# -- the docs: the service install of docs/operations.md, followed literally ----------


def _fenced_block(text, marker_or_info):
    """The body of the first fenced block after the line `marker_or_info`
    (an HTML comment), or of the first ```ini block naming ExecStart."""
    if marker_or_info == "ini":
        match = re.search(r"^```ini\n((?:(?!^```).)*?^ExecStart=.*?)^```$", text,
                          re.MULTILINE | re.DOTALL)
    else:
        match = re.search(rf"^{re.escape(marker_or_info)}\n```sh\n(.*?)^```$", text,
                          re.MULTILINE | re.DOTALL)
    assert match, f"docs/operations.md has no block for {marker_or_info}"
    return match.group(1)


def test_the_service_install_of_the_docs_runs_and_its_unit_serves(tmp_path):
    """The service install of docs/operations.md, run as written in a
    temporary prefix instead of /opt/cirunner, then `serve` started as its
    systemd unit says.

    What cannot run here, and what stands in for it:
    - `sudo` is dropped: the steps run as the user running the tests (root in
      CI, where sudo would change nothing; elsewhere the prefix is theirs).
    - `useradd` is skipped (a test adds no system user); its line must still be
      there. The same user then runs serve, as the unit's `User=` would.
    - /opt/cirunner becomes the prefix and the unit's /var/lib/cirunner a
      temporary data directory; the port is a free one (CIRUNNER_PORT), since
      8080 may be taken. The rest of the unit (Environment=, ExecStart=,
      WorkingDirectory=) is used as written.
    - `git clone "$PWD"` runs in this checkout: it clones what is committed.
    - pip installs as written (`-c constraints.txt .`), from the package index
      pip is configured with, as the README's commands and .ci/run do.
    """
    if not os.path.isdir(os.path.join(HERE, ".git")):
        pytest.skip("not a git checkout: the install clones it")
    text = pathlib.Path(HERE, "docs", "operations.md").read_text(encoding="utf-8")
    prefix = tmp_path / "opt-cirunner"
    data = tmp_path / "var-lib-cirunner"
    commands = []
    skipped = []
    for line in _fenced_block(text, "<!-- service-install -->").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if re.match(r"sudo useradd\b", line):
            skipped.append(line)
            continue
        line = re.sub(r"^sudo ", "", line)
        assert "sudo " not in line, f"sudo inside a command: {line}"
        commands.append(line.replace("/opt/cirunner", str(prefix)))
    assert len(skipped) == 1 and "cirunner" in skipped[0], skipped
    script = "\n".join(commands)
    for step in ("git clone", "-m venv .venv", "pip install -c constraints.txt ."):
        assert step in script, f"the service install lost its step {step!r}"
    assert "cp -r" not in script, "the service install copies a checkout"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CIRUNNER_") and k != "VIRTUAL_ENV"}
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-x", "-c", script], cwd=HERE,
                            env=env, text=True, capture_output=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-6000:]
    # A fresh clone: nothing of the checkout's venv or data came with it, and
    # the service's cirunner is the one installed in the prefix's own venv.
    assert not (prefix / "cirunner-data").exists()
    where = subprocess.run([str(prefix / ".venv" / "bin" / "python"), "-c",
                            "import cirunner; print(cirunner.__file__)"], cwd=tmp_path,
                           env=env, text=True, capture_output=True, check=True).stdout.strip()
    assert where.startswith(str(prefix / ".venv")), where

    unit = _fenced_block(text, "ini").replace("/opt/cirunner", str(prefix))
    settings = dict(line.split("=", 1) for line in unit.splitlines()
                    if re.match(r"(Environment|ExecStart|WorkingDirectory)=", line))
    environment = [line.split("=", 1)[1] for line in unit.splitlines()
                   if line.startswith("Environment=")]
    service_env = dict(env, **dict(item.split("=", 1) for item in environment))
    assert service_env["CIRUNNER_DATA"] == settings["WorkingDirectory"] == "/var/lib/cirunner"
    service_env.update(CIRUNNER_DATA=str(data), CIRUNNER_PORT=str(free_port()))
    data.mkdir(mode=0o700)  # what StateDirectory= makes
    argv = shlex.split(settings["ExecStart"])
    assert argv[0] == str(prefix / ".venv" / "bin" / "cirunner"), argv
    with open(tmp_path / "serve.out", "wb") as out, open(tmp_path / "serve.log", "wb") as log:
        process = subprocess.Popen(argv, cwd=data, env=service_env, stdout=out, stderr=log)
        url = f"http://127.0.0.1:{service_env['CIRUNNER_PORT']}"

        def healthy():
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return http_json("GET", url + "/healthz")
            except OSError:
                return None

        try:
            status, health = wait_for(healthy, timeout=30)
        finally:
            stop_process(process)
    assert status == 200 and health["status"], health
    # The admin token the docs send the reader to the journal for: on stdout.
    assert re.search(r"cir_[A-Za-z0-9_-]+", (tmp_path / "serve.out").read_text())
    assert (data / "cirunner.db").exists()
