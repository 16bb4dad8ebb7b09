#!/usr/bin/env python3
"""cirunner: a CI build runner in one Python file.

cirunner keeps users, repositories, builds, jobs, status history and logs in
one SQLite file, expands each build's pipeline matrix into jobs, runs their
steps as isolated processes in worker threads, and serves a Drone-style REST
API and web pages over them.

Quick start, in a checkout (cirunner is not on PyPI)::

    python3 -m venv .venv && .venv/bin/pip install -c constraints.txt . && .venv/bin/cirunner serve
    .venv/bin/cirunner repo add alice/hello --url ~/src/hello
    .venv/bin/cirunner build alice/hello --wait   # streams the log, exits 0 on success

Embedding::

    import cirunner
    store = cirunner.Store.open("ci-data")
    executor = cirunner.Executor(store, workers=2)
    executor.start()
    app = cirunner.make_app(store, executor)   # any WSGI server can serve it

The file reads top to bottom, each section using only those above it:
constants, errors, pipeline, sealing and signing, git, store, builds,
processes, jobs, executor, access, resources, HTTP API, webhooks, pages,
make_app, server, command line.

License: MIT (see LICENSE).
"""

__version__ = "0.2.0"

__all__ = [
    "ACTIVE_STATUSES",
    "AGENT_MAX_BODY",
    "AGENT_POLL_SECONDS",
    "AGENT_PROTOCOL",
    "AGENT_RETRY_SECONDS",
    "AGENT_TOKEN_PREFIX",
    "APPROVALS",
    "BACKGROUND_GRACE_SECONDS",
    "BLOCKED",
    "BUILD_STATUSES",
    "CHECKPOINT_SECONDS",
    "CSRF_COOKIE",
    "DECLINED",
    "DEFAULT_CONNECTION_LIMIT",
    "DEFAULT_DATA_DIR",
    "DEFAULT_GRACE_SECONDS",
    "DEFAULT_HOST",
    "DEFAULT_HTTP_THREADS",
    "DEFAULT_KEEP_BUILDS",
    "DEFAULT_KEEP_DAYS",
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_JOBS",
    "DEFAULT_MAX_LOG_BYTES",
    "DEFAULT_PER_PAGE",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT_MINUTES",
    "DONE_STATUSES",
    "ENGINES",
    "ERROR",
    "EVENTS",
    "EVENT_CRON",
    "EVENT_DEPLOYMENT",
    "EVENT_MANUAL",
    "EVENT_PULL_REQUEST",
    "EVENT_PUSH",
    "EVENT_TAG",
    "FAILURE",
    "FORGES",
    "HEARTBEAT_SECONDS",
    "IDLE_CONNECTION_SECONDS",
    "KILLED",
    "LOG_CHUNK_BYTES",
    "LOG_FLUSH_SECONDS",
    "LOG_PAGE_BYTES",
    "LOG_TAIL_BYTES",
    "MASK",
    "MAX_DESCRIPTION",
    "MAX_FIELD",
    "MAX_MESSAGE",
    "MAX_PER_PAGE",
    "MAX_RUNNER_LABELS",
    "MAX_SCRIPT_BYTES",
    "MAX_VARIABLES_BYTES",
    "MAX_WEBHOOK_BODY",
    "MIN_FREE_BYTES",
    "MIN_MASKED_LENGTH",
    "MIRROR_LOCK_SECONDS",
    "OUTBOX_DISK_BYTES",
    "OUTBOX_MEMORY_BYTES",
    "PAGE_BYTES",
    "PENDING",
    "PIPELINE_FILES",
    "PIPE_BYTES",
    "PRUNE_BATCH_BUILDS",
    "PRUNE_BATCH_LOG_BYTES",
    "PRUNE_SECONDS",
    "RECOVER_SECONDS",
    "REPORT_ATTEMPTS",
    "REPORT_CONTEXT",
    "RESERVE_BYTES",
    "RETRY_AFTER_SECONDS",
    "RUNNER_LOST_SECONDS",
    "RUNNING",
    "SANDBOXES",
    "SANDBOX_NETWORKS",
    "SECRET_EVENTS",
    "SESSION_COOKIE",
    "SESSION_SECONDS",
    "SKIPPED",
    "SSE_HEARTBEAT_SECONDS",
    "STATUSES",
    "STRAGGLER_SECONDS",
    "SUCCESS",
    "TOKEN_PREFIX",
    "TOKEN_SCOPES",
    "V1_PAGE_SIZE",
    "VACUUM_BATCH_PAGES",
    "WAL_BACKSTOP_BYTES",
    "WAL_CHECKPOINT_BYTES",
    "WATCHDOG_SECONDS",
    "WOODPECKER_FOLDER",
    "App",
    "BadRequest",
    "CIRunnerError",
    "ConfigError",
    "Conflict",
    "Executor",
    "Forbidden",
    "JobSpec",
    "NoBuild",
    "NotFound",
    "Operations",
    "Pipeline",
    "PostgresStore",
    "RunnerLost",
    "Step",
    "StorageFull",
    "Store",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "backup",
    "create_build",
    "expand_matrix",
    "is_remote_url",
    "local_admin",
    "main",
    "make_app",
    "normalize_repo_url",
    "open_store",
    "parse_pipeline",
    "plan_pipeline",
    "prune",
    "read_pipeline_file",
    "restart_build",
    "restore",
    "running_pipelines",
    "serve",
    "step_units",
    "substitute",
]

###############################################################################
# Imports #####################################################################
###############################################################################

import argparse
import base64
import codecs
import collections
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import functools
import getpass
import hashlib
import hmac
import http.client
import importlib
import importlib.util
import inspect
import io
import ipaddress
import itertools
import json
import logging
import os
import posixpath
import pwd
import queue
import re
import resource
import secrets
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
import zlib
from datetime import datetime, timezone
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

# Imported when first needed, not at start: cryptography (sealed secrets),
# zstandard (log chunks) and prometheus_client (/metrics) together would add
# 25 MiB to every process, also those that never use them; waitress (serve),
# cronsim (schedules) and xml.sax (the CCTray feed) 1.6 MiB to an agent.
# Bottle (the HTTP API and pages) loads at its first use, which make_app
# makes (so before any thread of a server reads it): an agent or a CLI
# process never loads it, nor the few modules only it imports (1.5 MiB).
# PyYAML loads at the first pipeline file read (_pyyaml), difflib and
# tarfile where they are used: 1.8 MiB a server, an agent and the CLI
# carry only once they need them.


def _lazy_module(name):
    """The module `name`, loaded when an attribute of it is first read (the
    stdlib's LazyLoader, as importlib's documentation recipe); ImportError
    now if it is not installed."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ImportError(f"No module named {name!r} (pip install {name})", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bottle = _lazy_module("bottle")


def _optional(module, purpose, install, extra=""):
    """`module` imported, or CIRunnerError saying what needs it and how to get
    it: cirunner's `extra` (installed from its checkout: it is not on PyPI),
    or the package itself."""
    try:
        return importlib.import_module(module)
    except ImportError:
        how = (f"install cirunner's {extra} extra from its checkout (.venv/bin/pip install "
               f"-c constraints.txt '.[{extra}]'), or pip install {install}" if extra
               else f"pip install {install}")
        raise CIRunnerError(f"{purpose} needs the {module.split('.')[0]} package: "
                            f"{how}") from None

_log = logging.getLogger("cirunner")

###############################################################################
# Constants ###################################################################
###############################################################################

# -- vocabulary ----------------------------------------------------------------

# Job, step and build statuses: one closed set for all three (DESIGN.md section 3).
PENDING = "pending"
RUNNING = "running"
SUCCESS = "success"
FAILURE = "failure"
KILLED = "killed"
ERROR = "error"
SKIPPED = "skipped"
STATUSES = (PENDING, RUNNING, SUCCESS, FAILURE, KILLED, ERROR, SKIPPED)
ACTIVE_STATUSES = (PENDING, RUNNING)
# A build also waits for approval (a fork's pull request: nothing is cloned or
# run until someone with write access approves it) or was declined.
BLOCKED = "blocked"
DECLINED = "declined"
BUILD_STATUSES = STATUSES + (BLOCKED, DECLINED)
DONE_STATUSES = (SUCCESS, FAILURE, KILLED, ERROR, SKIPPED, DECLINED)
APPROVALS = ("never", "forks", "always")  # which builds of a repository wait for approval

# Build events.
EVENT_PUSH = "push"
EVENT_TAG = "tag"
EVENT_PULL_REQUEST = "pull_request"
EVENT_CRON = "cron"
EVENT_MANUAL = "manual"
EVENT_DEPLOYMENT = "deployment"
EVENTS = (EVENT_PUSH, EVENT_TAG, EVENT_PULL_REQUEST, EVENT_CRON, EVENT_MANUAL, EVENT_DEPLOYMENT)
SECRET_EVENTS = (EVENT_PUSH, EVENT_TAG, EVENT_CRON, EVENT_MANUAL, EVENT_DEPLOYMENT)  # not forks
# Drone's top-level `branches` filter applies to these; tags and deployments
# always build.
_FILTERED_EVENTS = (EVENT_PUSH, EVENT_PULL_REQUEST, EVENT_MANUAL, EVENT_CRON)

FORGES = ("github", "gitea", "gitlab")
TOKEN_SCOPES = ("read", "write")
TOKEN_PREFIX = "cir_"           # lets secret scanners recognise a leaked token
AGENT_TOKEN_PREFIX = "cia_"     # an agent's token (it works on the agent routes only)
MASK = "********"
REPORT_CONTEXT = "cirunner/build"
PIPELINE_FILES = (".cirunner.yml", ".drone.yml", ".woodpecker.yml", ".woodpecker.yaml")
WOODPECKER_FOLDER = ".woodpecker/"  # the file name of a folder's several workflows

# -- limits ----------------------------------------------------------------------

DEFAULT_MAX_JOBS = 256          # matrix size limit; larger is an error, never a cut
DEFAULT_MAX_BODY = 1024 * 1024  # request bodies of the API
MAX_WEBHOOK_BODY = 25 * 1024 * 1024  # webhook payloads (GitHub's own cap)
MAX_VARIABLES_BYTES = 64 * 1024  # a build's variables, names and values together
_LAST_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z
MAX_DESCRIPTION = 10_000        # characters of a build's description
MAX_MESSAGE = 16 * 1024         # characters of a commit message kept with a build
MAX_FIELD = 2048                # characters of its other commit and forge texts
MAX_CHANGED_FILES = 3000        # the files `when.paths` sees of one build (GitHub's compare)
MAX_SCRIPT_BYTES = 96 * 1024    # a step's script is one argv entry (Linux allows 128 KiB)
MIN_MASKED_LENGTH = 4           # shorter secret values would mask half the log
DEFAULT_PER_PAGE = 25
MAX_PER_PAGE = 100
V1_PAGE_SIZE = 20
REPORT_ATTEMPTS = 5             # tries to post one commit status before giving up
LOG_PAGE_BYTES = 256 * 1024     # a log page shows this much; earlier parts on request

# -- defaults and tuning -------------------------------------------------------

DEFAULT_DATA_DIR = "cirunner-data"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_HTTP_THREADS = 32       # each open live-log stream holds one
DEFAULT_KEEP_BUILDS = 500       # builds kept per repository (retention; 0: no limit)
DEFAULT_KEEP_DAYS = 90          # days a build is kept (retention; 0: no limit)
DEFAULT_MAX_LOG_BYTES = 100 * 1024 * 1024  # a job's log keeps its start and its last part
LOG_TAIL_BYTES = 1024 * 1024    # the last part a capped log keeps
PRUNE_SECONDS = 10.0            # the executor prunes this often (and at once while behind)
PRUNE_BATCH_BUILDS = 10         # builds deleted per transaction...
PRUNE_BATCH_LOG_BYTES = 4 * 1024 * 1024  # ...or fewer, if their logs are this big
VACUUM_BATCH_PAGES = 512        # free pages given back to the file system per transaction
DEFAULT_CONNECTION_LIMIT = 1000  # open connections (each an idle socket, not a thread)
IDLE_CONNECTION_SECONDS = 30    # a connection silent this long between requests is closed
DEFAULT_TIMEOUT_MINUTES = 60
DEFAULT_GRACE_SECONDS = 10.0    # SIGTERM -> SIGKILL
STEP_GRAPH_PARALLEL = 8         # steps of a graph (depends_on) that run at once, at most
SSE_HEARTBEAT_SECONDS = 15.0    # keeps proxies from closing a silent stream
SESSION_SECONDS = 12 * 3600     # a web sign-in lasts this long
# A log is stored in chunks of at most half a step's pipe: the step goes on
# writing into one half while the other half is committed.
LOG_CHUNK_BYTES = 512 * 1024
PIPE_BYTES = 1024 * 1024        # a step's pipe (the most Linux gives without privileges)
PAGE_BYTES = 4 * 1024           # SQLite's usual page: every small commit writes whole pages
WAL_CHECKPOINT_BYTES = 128 * 1024 * 1024  # the executor checkpoints past this...
WAL_BACKSTOP_BYTES = 256 * 1024 * 1024    # ...and a writer itself past this
LOG_FLUSH_SECONDS = 0.05        # longest a byte waits in memory before the store
STRAGGLER_SECONDS = 0.5         # read on this long after a step's leader exits
BACKGROUND_GRACE_SECONDS = 1.0  # a service's SIGTERM -> SIGKILL at its job's end
HEARTBEAT_SECONDS = 10.0        # a runner stamps itself (and its jobs) this often
MIRROR_LOCK_SECONDS = 600.0     # the longest wait for another process's fetch (git's timeout)
WATCHDOG_SECONDS = 1260.0       # a job outside its steps this long is reported stuck (two
                                # waits for a mirror's lock and a fetch fit in it)
MIN_FREE_BYTES = 1024 * 1024    # less free space than this is a full disk (at start)
RESERVE_BYTES = 1024 * 1024     # DATA/reserve: given back when the disk fills (see keep_reserve)
RUNNER_LOST_SECONDS = 60.0      # a runner silent this long is gone
RECOVER_SECONDS = 5.0           # servers look for lost runners at least this often
RETRY_AFTER_SECONDS = 5         # what a 503 tells the client to wait
AGENT_RETRY_SECONDS = 2         # an agent tries an unreachable server again at least this often
AGENT_PROTOCOL = 3              # what `agent --server` and the server speak (see _AgentService)
AGENT_POLL_SECONDS = 20.0       # the longest an agent's poll waits for work
AGENT_MAX_BODY = 16 * 1024 * 1024  # an agent's report (log chunks) or git request
MAX_RUNNER_LABELS = 9           # a claim matches every subset of them: 2**9 at most
CHECKPOINT_SECONDS = 5.0        # the executor checkpoints the WAL at least this often
SANDBOXES = ("auto", "bwrap", "none")  # how steps run on the host (see _SandboxRunner)
SANDBOX_NETWORKS = ("private", "none", "host")  # a sandboxed step's network
ENGINES = ("auto", "podman", "docker", "none")  # how steps with an image run

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_COMMIT_PATTERN = re.compile(r"^[0-9a-fA-F]{4,64}$")
_BRANCH_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|^-|^/|/$|\.lock$|^$")
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off", "")

###############################################################################
# Errors ######################################################################
###############################################################################


class CIRunnerError(Exception):
    """Base of every error cirunner raises on purpose; carries its HTTP status."""

    status = 500
    code = "internal_error"

    def __init__(self, message):
        super().__init__(message)
        self.message = message

    def to_json(self):
        """The error as every API error body: {error, message, status}."""
        return {"error": self.code, "message": self.message, "status": self.status}


class BadRequest(CIRunnerError):
    """The request or its input is malformed."""

    status = 400
    code = "bad_request"


class ConfigError(BadRequest):
    """A pipeline file cannot be used; `problems` lists each (line, problem)."""

    code = "invalid_pipeline"

    def __init__(self, message, filename=None, line=None, *, problems=None):
        self.problems = problems or [(line, message)]
        self.filename = filename
        self.line = self.problems[0][0]
        parts = []
        for index, (problem_line, problem) in enumerate(self.problems):
            where = " ".join(part for part in (filename if index == 0 else "",
                                               f"line {problem_line}" if problem_line else "")
                             if part)
            parts.append(f"{where}: {problem}" if where else problem)
        super().__init__("; ".join(parts))

    @classmethod
    def from_problems(cls, filename, problems):
        """One error naming every problem, in the order of their lines."""
        ordered = sorted(dict.fromkeys(problems), key=lambda item: (item[0] or 0))
        return cls(ordered[0][1], filename, ordered[0][0], problems=ordered)


class Unauthorized(CIRunnerError):
    """No credentials, or credentials that are not valid."""

    status = 401
    code = "unauthorized"


class Forbidden(CIRunnerError):
    """Valid credentials that do not allow this action."""

    status = 403
    code = "forbidden"


class NotFound(CIRunnerError):
    """The repository, build, job or route does not exist."""

    status = 404
    code = "not_found"


class Conflict(CIRunnerError):
    """The action conflicts with the current state (e.g. restart while running)."""

    status = 409
    code = "conflict"


class _ChunkMismatch(Conflict):
    """A log chunk sent again with other bytes than the stored one."""


class RunnerLost(Conflict):
    """An agent's runner is not registered (any more): found lost, or never
    connected. The agent connects again."""

    code = "runner_lost"


class NoBuild(CIRunnerError):
    """The pipeline asks for no build here (its `branches` filter excludes the branch)."""

    status = 409
    code = "no_build"


class TooLarge(CIRunnerError):
    """The request body is larger than the server accepts."""

    status = 413
    code = "too_large"


class Unavailable(CIRunnerError):
    """The server cannot take this request now (e.g. too many live streams)."""

    status = 503
    code = "unavailable"


class StorageFull(CIRunnerError):
    """The store (or the data directory's disk) has no room for a write."""

    status = 507
    code = "insufficient_storage"


_ERRORS = (BadRequest, Unauthorized, Forbidden, NotFound, RunnerLost, Conflict, NoBuild,
           TooLarge, Unavailable, StorageFull)


def _error_of_answer(code, status, message):
    """The CIRunnerError that an API error answer (its `error` code and HTTP
    status) stands for: the command line on a server raises what the server
    raised, with its message."""
    kind = next((error for error in _ERRORS if error.code == code), None) or next(
        (error for error in _ERRORS if error.status == status), CIRunnerError)
    return kind(message)


def _is_disk_full(exc):
    """Whether `exc` is a database's or the file system's "no space left"."""
    if isinstance(exc, sqlite3.OperationalError):
        return (getattr(exc, "sqlite_errorcode", None) == getattr(sqlite3, "SQLITE_FULL", 13)
                or "disk is full" in str(exc))
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(exc, psycopg.errors.DiskFull):
        return True
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def _database_errors():
    """The base error classes of the databases this process has loaded
    (sqlite3, and psycopg once a PostgreSQL store imported it)."""
    psycopg = sys.modules.get("psycopg")
    return (sqlite3.Error,) if psycopg is None else (sqlite3.Error, psycopg.Error)


def _store_away(error):
    """What a request hears while the store cannot be reached (or stays
    locked): 503, try again shortly. Logged once per kind of error."""
    _log.warning("the store cannot be reached: %s", error)
    return Unavailable(f"the store cannot be reached now ({str(error).strip()}); "
                       f"try again in {RETRY_AFTER_SECONDS} s")


def _disk_full_message(exc):
    return (f"disk full: the data directory has no space left ({exc}); free some and the "
            "server goes on by itself")


class _GitError(CIRunnerError):
    """A git command failed; the message holds what git printed."""


class _JobError(CIRunnerError):
    """The runner could not prepare or check out a job (job status error)."""


def _check_name(value, what):
    """`value` if it is a valid owner, repository, user or cron name, else BadRequest."""
    if not isinstance(value, str) or not _NAME_PATTERN.match(value) or value in (".", ".."):
        raise BadRequest(f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-'")
    return value


def _check_branch(value):
    """`value` if git would accept it as a branch name, else BadRequest."""
    if not isinstance(value, str) or _BRANCH_FORBIDDEN.search(value) or len(value) > 255:
        raise BadRequest(f"invalid branch name {value!r}")
    return value


def _check_commit(value):
    """A hexadecimal commit id in lower case, else BadRequest."""
    if not isinstance(value, str) or not _COMMIT_PATTERN.match(value):
        raise BadRequest(f"invalid commit {value!r}: expected a hexadecimal SHA")
    return value.lower()


def _check_variable_name(name):
    if not isinstance(name, str) or not _ENV_NAME_PATTERN.match(name):
        raise BadRequest(f"invalid variable name {name!r}")
    return name


def _check_variables(variables):
    """Build variables checked: names as environment variable names, values strings."""
    if not isinstance(variables, dict):
        raise BadRequest("variables must be an object of NAME: value")
    checked = {}
    for name, value in variables.items():
        _check_variable_name(name)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise BadRequest(f"variable {name} must be a string")
        value = str(value)
        if "\x00" in value:
            raise BadRequest(f"variable {name} contains a NUL byte")
        checked[name] = value
    size = sum(len(name) + len(value.encode()) for name, value in checked.items())
    if size > MAX_VARIABLES_BYTES:
        raise BadRequest(f"build variables take {size} bytes, names and values together; "
                         f"at most {MAX_VARIABLES_BYTES}")
    return checked


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _parse_json(raw, what):
    """JSON text as Python values; 400 for malformed JSON, NaN or Infinity, text
    with a lone surrogate (no UTF-8 can carry it), and nesting too deep for the
    parser (its RecursionError is a clean stop)."""
    try:
        value = json.loads(raw, parse_constant=_no_json_constant)
    except ValueError as exc:
        raise BadRequest(f"the {what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(f"the {what} nests too deeply to be read") from None
    pending = [value]
    while pending:
        item = pending.pop()
        # (an ASCII text, say the base64 of an agent's log chunk, holds none)
        if isinstance(item, str) and not item.isascii() and _LONE_SURROGATE.search(item):
            raise BadRequest(f"the {what} holds a lone surrogate (\\ud800-\\udfff), which is "
                             "not text")
        if isinstance(item, dict):
            pending += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            pending += item
    return value


def _no_json_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _check_int(value, name, *, default=None, minimum=0, maximum=None):
    """A whole number from JSON or query text, within [minimum, maximum], else BadRequest."""
    if value in ("", None):
        return default
    if isinstance(value, bool) or not (isinstance(value, int) or (
            isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,15}", value))):
        raise BadRequest(f"{name} must be a whole number")
    number = int(value)
    if number < minimum or (maximum is not None and number > maximum):
        raise BadRequest(f"{name} must be between {minimum} and {maximum}"
                         if maximum is not None else f"{name} must be {minimum} or more")
    return number


def _check_text(value, name, maximum):
    """A string of at most `maximum` characters, else BadRequest."""
    if not isinstance(value, str) or len(value) > maximum or "\x00" in value:
        raise BadRequest(f"{name} must be a string of at most {maximum} characters")
    return value


def _check_positive(value, name):
    """A number of 1 or more (path parts such as a build number), else BadRequest."""
    if isinstance(value, str) and not re.fullmatch(r"[0-9]{1,15}", value):
        raise BadRequest(f"{name} must be a positive whole number, not {value!r}")
    return _check_int(value, name, minimum=1)


def _parse_labels(text):
    """{name: value} from "k=v,k2=v2"."""
    labels = {}
    for pair in filter(None, (item.strip() for item in (text or "").split(","))):
        name, equals, value = pair.partition("=")
        if not equals or not name.strip():
            raise BadRequest(f"--labels expects NAME=VALUE,..., not {pair!r}")
        labels[name.strip()] = value.strip()
    return labels


def _check_labels(value, name="labels"):
    """Labels as {name: value}, both short strings; BadRequest otherwise."""
    if not isinstance(value, dict) or len(value) >= MAX_RUNNER_LABELS:
        raise BadRequest(f"{name} must be an object of at most {MAX_RUNNER_LABELS - 1} "
                         "name: value pairs")
    for key, item in value.items():
        if not (isinstance(key, str) and _ENV_NAME_PATTERN.match(key) and isinstance(item, str)
                and len(key) <= 64 and len(item) <= 200 and "\x00" not in item):
            raise BadRequest(f"invalid label {key!r}: a name of letters, digits and _, "
                             "and a string value")
    return value


def _check_bool(value, name):
    """True or False from JSON or text ('true', '1', 'no'...), else BadRequest."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE_WORDS + _FALSE_WORDS:
        return value.lower() in _TRUE_WORDS
    raise BadRequest(f"{name} must be true or false")

###############################################################################
# Pipeline ####################################################################
###############################################################################

# -- Go's path.Match, which Drone's branch and `when` filters use ----------------


def _go_glob(pattern, *, slashes=False):
    """A compiled regex for Go's `path.Match(pattern)`, or None if the pattern is
    malformed (Go then matches nothing). `*` and `?` never match `/` (with
    `slashes` they do, as in the copy of path.Match in Drone's envsubst);
    `[^...]` negates a class; a backslash escapes the next character.
    (Filters match with _path_match, which never backtracks.)"""
    out, index = [], 0
    not_slash = "" if slashes else "/"
    while index < len(pattern):
        char = pattern[index]
        if char == "*":
            out.append(f"[^{not_slash}]*" if not_slash else ".*")
        elif char == "?":
            out.append(f"[^{not_slash}]" if not_slash else ".")
        elif char == "\\":
            index += 1
            if index == len(pattern):
                return None
            out.append(re.escape(pattern[index]))
        elif char == "[":
            found = _go_class(pattern, index, not_slash)
            if found is None:
                return None
            regex, index = found
            out.append(regex)
        else:
            out.append(re.escape(char))
        index += 1
    try:
        return re.compile("\\A" + "".join(out) + "\\Z", re.DOTALL)
    except re.error:  # a class Go would refuse too ([z-a]): matches nothing
        return None


def _go_class(pattern, index, not_slash="/"):
    """(the regex of one character of the class that opens at `index`, the
    index of its `]`), or None if malformed; a negated class never matches
    `not_slash`."""
    end = _go_class_end(pattern, index + 1)
    if end is None:
        return None
    body = pattern[index + 1:end]
    negated = body.startswith("^")
    body = body[1:] if negated else body
    if not body:
        return None
    return (("[^" + not_slash if negated else "[") + re.sub(r"([\]\[^])", r"\\\1", body)
            + "]"), end


def _go_class_end(pattern, start):
    """The index of the `]` closing a class that starts at `start`, or None."""
    index = start + (1 if pattern[start:start + 1] == "^" else 0)
    while index < len(pattern):
        if pattern[index] == "\\":
            index += 2
            continue
        if pattern[index] == "]" and index > start:
            return index
        index += 1
    return None


def _path_match(pattern, name, *, doublestar=False):
    """Whether `name` matches `pattern` as Go's path.Match decides (with
    `doublestar`, as bmatcuk/doublestar, which Drone 1.x uses: ``**`` also
    matches across ``/``, as a component of its own zero or more
    directories, and `{a,b}` either). Matched in time linear in the name for
    each token of the pattern, never by backtracking: a pipeline file writes
    the patterns, a pull request the names."""
    expansions = _glob_expansions(pattern) if doublestar else (pattern,)
    return any(tokens is not None and _glob_run(tokens, name)
               for tokens in (_glob_tokens(one, doublestar) for one in expansions or ()))


_GLOB_EXPANSIONS = 64  # `{a,b}` alternatives a pattern may expand to (more: no match)


@functools.lru_cache(maxsize=1024)
def _glob_expansions(pattern):
    """`pattern` with each `{a,b}` expanded (the first `}` closes), or None past
    _GLOB_EXPANSIONS."""
    start = pattern.find("{")
    end = pattern.find("}", start)
    if start < 0 or end < 0:
        return (pattern,)
    out = []
    for option in pattern[start + 1:end].split(","):
        more = _glob_expansions(pattern[:start] + option + pattern[end + 1:])
        if more is None or len(out) + len(more) > _GLOB_EXPANSIONS:
            return None
        out += more
    return tuple(out)


@functools.lru_cache(maxsize=1024)
def _glob_tokens(pattern, doublestar):
    """The tokens of a glob with no `{}`: ("c", char), ("?",), ("[", regex of
    one character), ("*",), ("**",) across `/`, ("**/",) zero or more
    directories, ("/**",) nothing or `/` and anything; None if malformed."""
    tokens, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        whole = doublestar and pattern.startswith("**", index) and pattern[index - 1:index] in (
            "", "/")
        if whole and pattern.startswith("**/", index):
            tokens.append(("**/",))
            index += 3
            continue
        if whole and index + 2 == len(pattern) and index:
            tokens[-1] = ("/**",)  # the "/" before it: `a/**` is `a` and all below it
            index += 2
            continue
        if char == "*" and doublestar and pattern.startswith("**", index):
            tokens.append(("**",))
            index += 2
            continue
        if char == "\\":
            if index + 1 == len(pattern):
                return None
            tokens.append(("c", pattern[index + 1]))
            index += 2
            continue
        if char == "[":
            found = _go_class(pattern, index)
            if found is None:
                return None
            try:
                tokens.append(("[", re.compile(found[0], re.DOTALL)))
            except re.error:  # a class Go would refuse too ([z-a]): matches nothing
                return None
            index = found[1] + 1
            continue
        tokens.append(("*",) if char == "*" else ("?",) if char == "?" else ("c", char))
        index += 1
    return tuple(tokens)


def _glob_run(tokens, name):
    """Whether `name` is matched by `tokens` (see _glob_tokens): the set of
    positions reached, token by token."""
    size = len(name)
    reached = [True] + [False] * size
    for token in tokens:
        kind, after = token[0], [False] * (size + 1)
        if kind in ("*", "**", "**/", "/**"):
            any_before = False
            for position in range(size + 1):
                if kind == "*":  # within a component
                    after[position] = reached[position] or (
                        position > 0 and after[position - 1] and name[position - 1] != "/")
                elif kind == "**":
                    after[position] = any_before = any_before or reached[position]
                elif kind == "**/":  # nothing, or anything that ends with "/"
                    after[position] = reached[position] or (
                        position > 0 and any_before and name[position - 1] == "/")
                    any_before = any_before or reached[position]
                else:  # "/**": nothing, or "/" and anything
                    after[position] = reached[position] or any_before
                    any_before = any_before or (reached[position] and position < size
                                                and name[position] == "/")
        else:
            for position in range(size):
                if reached[position]:
                    char = name[position]
                    after[position + 1] = (char == token[1] if kind == "c" else
                                           char != "/" if kind == "?" else
                                           bool(token[1].fullmatch(char)))
        reached = after
        if not any(reached):
            return False
    return reached[size]


# -- substitution: Drone's envsubst -------------------------------------------

_INERT = re.compile(r"[A-Za-z0-9._/:+=,@%-]*")  # safe to paste into a shell word


class _Substitution:
    """One pass of Drone's `envsubst` over a text.

    ``${X}``, ``${X:-d}``, ``${X-d}``, ``${X:=d}``, ``${X=d}``, ``${X:+w}``,
    ``${X+w}``, ``${X:?m}``, ``${#X}``, ``${X:o}``, ``${X:o:l}``, ``${X^}``,
    ``${X^^}``, ``${X,}``, ``${X,,}``, ``${X/a/b}``, ``${X//a/b}``,
    ``${X/#a/b}``, ``${X/%a/b}``, ``${X#p}``, ``${X##p}``, ``${X%p}``,
    ``${X%%p}``; arguments may hold expressions. ``$$`` is a literal ``$``
    (``$${X}`` is ``${X}``, ``$$HOME`` is ``$HOME``), as in Drone's envsubst;
    with `dollars` unset only ``$${`` is (the shell keeps its ``$$``).
    An expression whose variable has no value is left as written, for the
    shell. With `shell` set, an expression is replaced only when its value is
    inert in a shell word; any other is left for the shell, which reads the
    value from the job's environment, so that no value becomes code.
    """

    def __init__(self, variables, *, shell=False, dollars=True):
        self.variables = variables
        self.shell = shell
        self.dollars = dollars

    def __call__(self, text):
        out, index = [], 0
        while True:
            found = text.find("$", index)
            if found < 0:
                out.append(text[index:])
                return "".join(out)
            out.append(text[index:found])
            if self.dollars and text.startswith("$$", found):
                out.append("$")
                index = found + 2
            elif text.startswith("$${", found):
                out.append("${")
                index = found + 3
            elif text.startswith("${", found):
                try:
                    end, value = self._expression(text, found + 2)
                except ConfigError:
                    if not self.shell:
                        raise
                    end = (self._closing(text, found + 2) or len(text) - 1) + 1
                    value = None  # a form only a shell knows (${1}, ${A[@]}): the shell's
                original = text[found:end]
                if value is None or (self.shell and not _INERT.fullmatch(value)):
                    value = original
                out.append(value)
                index = end
            else:
                out.append("$")
                index = found + 1

    def _expression(self, text, start):
        """(end, value or None) of the expression whose body starts at `start`."""
        close = self._closing(text, start)
        if close is None:
            raise ConfigError(f"bad substitution in {text[start - 2:start + 30]!r}: "
                              "no closing '}'")
        body = text[start:close]
        if body.startswith("#") and re.fullmatch(r"#[A-Za-z_][A-Za-z0-9_]*", body):
            value = self.variables.get(body[1:])
            return close + 1, None if value is None else str(len(value))
        match = re.match(r"[A-Za-z_][A-Za-z0-9_]*", body)
        if not match:
            raise ConfigError(f"bad substitution: ${{{body}}}")
        name, rest = match.group(0), body[match.end():]
        return close + 1, self._apply(name, rest)

    @staticmethod
    def _closing(text, start):
        depth = 0
        for index in range(start, len(text)):
            if text.startswith("${", index):
                depth += 1
            elif text[index] == "}":
                if depth == 0:
                    return index
                depth -= 1
        return None

    def _argument(self, text):
        """An argument of a function, with its own expressions substituted."""
        return _Substitution(self.variables, dollars=self.dollars)(text)

    def _apply(self, name, rest):
        value = self.variables.get(name)
        if rest == "":
            return value
        for operators, function in self._DEFAULTS:
            for operator in operators:
                if rest.startswith(operator):
                    return function(self, value, self._argument(rest[len(operator):]))
        if value is None:
            return None
        return self._transform(name, value, rest)

    def _transform(self, name, value, rest):
        casing = {"^^": str.upper, ",,": str.lower,
                  "^": lambda s: s[:1].upper() + s[1:], ",": lambda s: s[:1].lower() + s[1:]}
        if rest in casing:
            return casing[rest](value)
        if rest.startswith(":"):
            return self._substring(value, rest[1:])
        if rest.startswith("/"):
            return self._replace(value, rest[1:])
        for operator, suffix, longest in (("##", False, True), ("#", False, False),
                                          ("%%", True, True), ("%", True, False)):
            if rest.startswith(operator):
                return _trim(value, self._argument(rest[len(operator):]), suffix=suffix,
                             longest=longest)
        raise ConfigError(f"bad substitution: ${{{name}{rest}}}")

    def _substring(self, value, spec):
        """${X:offset} and ${X:offset:length}; X as it is if either is not a
        number, as Drone's envsubst (and bash, for an unset name) answers."""
        first, second = _split_argument(spec, ":")
        try:
            offset = int(self._argument(first).strip())
            length = None if second is None else int(self._argument(second).strip())
        except ValueError:
            return value
        start = offset if offset >= 0 else max(0, len(value) + offset)
        return value[start:] if length is None else value[start:start + max(0, length)]

    def _replace(self, value, spec):
        mode = ""
        if spec[:1] in ("/", "#", "%"):
            mode, spec = spec[0], spec[1:]
        pattern, replacement = _split_argument(spec, "/")
        pattern, replacement = (self._argument(re.sub(r"\\([/\\])", r"\1", part or ""))
                                for part in (pattern, replacement))
        if not pattern:
            return value
        if mode == "/":
            return value.replace(pattern, replacement)
        if mode == "#":
            return replacement + value[len(pattern):] if value.startswith(pattern) else value
        if mode == "%":
            return value[:-len(pattern)] + replacement if value.endswith(pattern) else value
        return value.replace(pattern, replacement, 1)

    def _default(self, value, argument):        # ${X:-d}, ${X:=d}, ${X=d}: unset or empty
        return argument if not value else value

    def _unset_default(self, value, argument):  # ${X-d}: unset only (bash's)
        return argument if value is None else value

    def _alternate(self, value, argument):      # ${X:+w}: w if set and not empty
        return argument if value else ""

    def _unset_alternate(self, value, argument):  # ${X+w}: w if set
        return "" if value is None else argument

    def _required(self, value, argument):       # ${X:?message}
        if not value:
            raise ConfigError(f"a required variable is empty: {argument or 'no value'}")
        return value

    # `=` is `:=` in Drone's envsubst (bash keeps an empty value)
    _DEFAULTS = ((((":-", ":=", "="), _default), ((":+",), _alternate), ((":?",), _required),
                  (("-",), _unset_default), (("+",), _unset_alternate)))


def _split_argument(text, separator):
    """(before, after) at the first `separator` of `text` outside a nested
    ``${...}`` and not escaped by a backslash; (text, None) without one."""
    depth, index = 0, 0
    while index < len(text):
        if text[index] == "\\":
            index += 2
            continue
        if text.startswith("${", index):
            depth, index = depth + 1, index + 2
            continue
        if text[index] == "}" and depth:
            depth -= 1
        elif text[index] == separator and not depth:
            return text[:index], text[index + 1:]
        index += 1
    return text, None


def _trim(value, pattern, *, suffix=False, longest=False):
    """`value` without its shortest (or longest) prefix (or suffix) matching
    `pattern`, a glob whose `*` crosses `/` as in Drone's envsubst."""
    compiled = _go_glob(pattern, slashes=True)
    cuts = range(len(value) + 1)
    if suffix != longest:  # the longest prefix, the shortest suffix: from the end
        cuts = reversed(cuts)
    for cut in cuts:
        if compiled and compiled.match(value[cut:] if suffix else value[:cut]):
            return value[:cut] if suffix else value[cut:]
    return value


def substitute(text, variables, *, shell=False, dollars=True):
    """Replace ``${VAR}`` expressions (Drone's envsubst forms) in `text`.

    ``$$`` is a literal ``$`` (``$$HOME`` is ``$HOME``); with `dollars` false
    only ``$${VAR}`` is (as ``${VAR}``), the shell's ``$$`` kept (Drone 0.4
    files and .cirunner.yml). A ``${VAR}`` with no value and
    no default is left as it is, so the shell can still expand it from the
    job's environment. With `shell`, only values inert in a shell word are
    pasted in (see `_Substitution`). Raises ConfigError for a malformed one.
    """
    return _Substitution(variables, shell=shell, dollars=dollars)(text)


def _substitute_04(text, matrix, *, shell=False):
    """Drone 0.4's ``$$NAME``: the job's matrix value, found and replaced (in
    shell text only where inert; else left as ``${NAME}`` for the shell)."""
    def replace(match):
        value = matrix.get(match.group(1))
        if value is None:
            return match.group(0)
        return value if not shell or _INERT.fullmatch(value) else "${" + match.group(1) + "}"

    names = "|".join(re.escape(name) for name in sorted(matrix, key=len, reverse=True))
    return re.sub(rf"\$\$({names})(?![A-Za-z0-9_])", replace, text) if names else text


# -- YAML with line numbers, duplicate keys and a size budget --------------------


class _YamlMap(dict):
    """A YAML mapping that remembers the line of each key, for error messages."""

    def __init__(self, line):
        super().__init__()
        self.line = line
        self.lines = {}


class _YamlList(list):
    """A YAML sequence that remembers the line of each item."""

    def __init__(self, line):
        super().__init__()
        self.line = line
        self.lines = []


# Scalars under these keys keep their source text: `1.10` stays "1.10", `yes`
# stays "yes", `- true` is the command `true`. They become environment
# variables or shell text, where the text is what counts.
_RAW_SCALAR_KEYS = ("matrix", "environment", "commands")
_MAX_YAML_DEPTH = 50
_MAX_YAML_NODES = 200_000  # aliases can make a small file huge ("billion laughs")
_DRONE_1_KEYS = ("kind", "steps", "trigger", "depends_on", "concurrency",
                 "image_pull_secrets", "type")


_DRONE_04_SECTIONS = ("publish", "deploy", "notify")  # Drone 0.4's plugin sections
_READ_AS_STEPS = ("1", "woodpecker")  # eras of files with `steps:` (1: Drone 1.x and 2.x)
_RULES_08 = ("0.8", *_READ_AS_STEPS)  # eras with Drone 0.8's rules


if importlib.util.find_spec("yaml") is None:  # required: missing is an error now, not later
    raise ImportError("No module named 'yaml' (pip install pyyaml)", name="yaml")


def _pyyaml():
    """PyYAML, imported when a pipeline file is first read: an agent, and a
    CLI command that reads none, do without its 1.7 MiB and 50 ms."""
    import yaml

    return yaml


def _close_matches(word, possibilities, n):
    """difflib's close matches (imported only where a file holds an unknown key)."""
    import difflib

    return difflib.get_close_matches(word, possibilities, n=n)


class _YamlReader:
    """Reads pipeline YAML into `_YamlMap`/`_YamlList` values, noting problems
    (duplicate keys first of all) instead of stopping at the first."""

    def __init__(self, filename, problems, *, drone=False, woodpecker=False):
        self.filename = filename
        self.problems = problems
        self.drone = drone  # duplicate keys are read as Drone read them, with a warning
        self.woodpecker = woodpecker  # one document: a workflow
        self.nodes = 0
        self.yaml = _pyyaml()

    def read(self, text):
        """The document, or None (problems noted) when it cannot be read."""
        documents = self._compose(text)
        if documents is None:
            return None
        drone1 = not self.woodpecker and (
            len(documents) > 1 or bool(documents) and isinstance(documents[0], self.yaml.MappingNode)
            and any(key.value in _DRONE_1_KEYS for key, _ in documents[0].value
                    if isinstance(key, self.yaml.ScalarNode)))
        if not documents:
            return None
        loader = self._loader(text)
        try:
            if drone1:  # Drone 1.x: every document, read as a list of them
                converted = _YamlList(1)
                converted.drone1 = True
                for document in documents:
                    converted.append(self._convert(loader, document, raw=False, depth=0))
                    converted.lines.append(document.start_mark.line + 1)
                return converted
            return self._convert(loader, documents[0], raw=False, depth=0)
        except _YamlBudget:
            self.problems.add(1, f"the YAML expands to more than {_MAX_YAML_NODES} values "
                                 "(aliases?)")
        except self.yaml.YAMLError as exc:
            self._note_yaml_error(exc)
        finally:
            loader.dispose()
        return None

    def _loader(self, text):
        # libyaml, where PyYAML has it, parses large files several times faster.
        return getattr(self.yaml, "CSafeLoader", self.yaml.SafeLoader)(text)

    def _compose(self, text):
        loader = self._loader(text)
        try:
            documents = []
            while loader.check_node():
                documents.append(loader.get_node())
                if self.woodpecker:  # Woodpecker reads the first document, and no further
                    break
            return documents
        except self.yaml.YAMLError as exc:
            self._note_yaml_error(exc)
            return None
        finally:
            loader.dispose()

    def _note_yaml_error(self, exc):
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        self.problems.add(mark.line + 1 if mark else None, f"invalid YAML: {problem}")

    def _convert(self, loader, node, raw, depth, key=None):
        self.nodes += 1
        if self.nodes > _MAX_YAML_NODES:
            raise _YamlBudget()
        if depth > _MAX_YAML_DEPTH:
            raise self.yaml.constructor.ConstructorError(None, None, "YAML nested too deeply",
                                                    node.start_mark)
        line = node.start_mark.line + 1
        if isinstance(node, self.yaml.ScalarNode):
            if not raw:
                return loader.construct_object(node, deep=True)
            return "" if node.tag == "tag:yaml.org,2002:null" else node.value
        if isinstance(node, self.yaml.SequenceNode):
            items = _YamlList(line)
            for child in node.value:
                for one in self._spliced(child):  # Woodpecker's `- <<: *list`
                    items.append(self._convert(loader, one, raw, depth + 1))
                    items.lines.append(one.start_mark.line + 1)
            return items
        steps = key in ("pipeline", "services", "compose") + _DRONE_04_SECTIONS
        return self._convert_mapping(loader, node, raw, depth, line,
                                     steps=depth == 1 and steps, named=key in _DRONE_04_SECTIONS)

    def _spliced(self, node):
        """A sequence's item, or the items it merges in: a mapping of one
        merge key whose value is a sequence (``- <<: *anchor`` of a list) is
        that sequence's items, as Woodpecker's YAML (xyaml) reads it."""
        if isinstance(node, self.yaml.MappingNode) and len(node.value) == 1:
            key, value = node.value[0]
            if key.tag == "tag:yaml.org,2002:merge" and isinstance(value, self.yaml.SequenceNode) \
                    and not any(isinstance(item, self.yaml.MappingNode) for item in value.value):
                return value.value
        return [node]

    def _convert_mapping(self, loader, node, raw, depth, line, *, steps=False, named=False):
        """A mapping; in a Drone file a repeated key is kept as Drone's type
        kept it: both steps of a section of steps (`named`: whose key names
        the plugin, the repeat then keyed "KEY (line N)"), else the last."""
        mapping = _YamlMap(line)
        explicit = set()
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self._merge(mapping, loader, value_node, raw, depth)
                continue
            if not isinstance(key_node, self.yaml.ScalarNode):
                raise self.yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be plain scalars", key_node.start_mark)
            key, key_line = key_node.value, key_node.start_mark.line + 1
            value = self._convert(loader, value_node, raw or key in _RAW_SCALAR_KEYS,
                                  depth + 1, key)
            if key in explicit:
                first = mapping.lines[key]
                if not self.drone:
                    self.problems.add(key_line, f"duplicate key {key!r} (first on line {first}): "
                                                "keys must be unique; give each step a name "
                                                "of its own")
                    continue
                if steps and isinstance(value, _YamlMap):
                    # Drone kept a pipeline's steps in order (yaml.MapSlice): both run.
                    self.problems.warn(key_line, f"duplicate step {key!r} (first on line "
                                                 f"{first}): both run, as in Drone")
                    if not named:
                        value.setdefault("name", key)
                        value.lines.setdefault("name", key_line)
                    key = f"{key} (line {key_line})"
                else:  # a Go struct field or map: the last one wins
                    self.problems.warn(key_line, f"duplicate key {key!r} (first on line "
                                                 f"{first}): this one is used, as in Drone")
                    del mapping[key]
            explicit.add(key)
            mapping[key] = value
            mapping.lines[key] = key_line
        return mapping

    def _merge(self, mapping, loader, value_node, raw, depth):
        """YAML merge keys (``<<: *anchor``): the merged mappings' keys that the
        mapping does not set itself (the first merged mapping wins)."""
        sources = value_node.value if isinstance(value_node, self.yaml.SequenceNode) else [value_node]
        for source in sources:
            if not isinstance(source, self.yaml.MappingNode):
                raise self.yaml.constructor.ConstructorError(
                    None, None, "a merge key ('<<') needs a mapping", source.start_mark)
            merged = self._convert(loader, source, raw, depth + 1)
            for key, value in merged.items():
                if key not in mapping:
                    mapping[key] = value
                    mapping.lines[key] = merged.lines[key]


class _YamlBudget(Exception):
    """The document holds more values than a pipeline file needs."""


def _line_of(container, key=None):
    """The source line of `container[key]` (or of the container itself)."""
    if key is not None and isinstance(container, _YamlMap):
        return container.lines.get(key, container.line)
    if isinstance(container, _YamlList) and isinstance(key, int) and key < len(container.lines):
        return container.lines[key]
    return getattr(container, "line", None)


class _Problems:
    """The problems found in a pipeline file, each with its line."""

    def __init__(self, filename):
        self.filename = filename
        self.found = []
        self.warnings = []

    def add(self, line, message):
        self.found.append((line, message))

    def warn(self, line, message):
        """Something Drone accepted and cirunner does as Drone did, said."""
        self.warnings.append((line or 0, f"{self.filename} line {line}: {message}" if line
                              else f"{self.filename}: {message}"))

    def warning_texts(self, limit=50):
        """The warnings in the order of their lines, each once, at most `limit`."""
        texts = list(dict.fromkeys(text for _, text in sorted(
            self.warnings, key=lambda warning: warning[0])))
        return texts[:limit] + ([f"{self.filename}: and {len(texts) - limit} more warnings"]
                                if len(texts) > limit else [])

    def raise_any(self):
        if self.found:
            raise ConfigError.from_problems(self.filename, self.found)


# -- steps, services and pipelines ----------------------------------------------------

_STATUS_WORDS = (SUCCESS, FAILURE, "changed", "change")
_EVENT_WORDS = EVENTS
_WHEN_KEYS = ("branch", "event", "status", "matrix", "environment", "platform", "ref", "repo",
              "instance", "local", "paths", "cron", "evaluate", "action",
              "success", "failure", "change")  # the last three: Drone 0.4's


def _constraint_matches(constraint, value):
    """Drone's `Constraint.Match`: excluded patterns never match; with include
    patterns, one must match; with none, anything does. A third item says how
    they match: true, as Drone 1.x's and Woodpecker's globs (doublestar:
    ``**`` crosses ``/``); "exact", as Woodpecker's event lists (no glob)."""
    include, exclude, *flavour = constraint
    if flavour and flavour[0] == "exact":
        return value not in exclude and (not include or value in include)
    match = functools.partial(_path_match, doublestar=bool(flavour and flavour[0]))
    if any(match(pattern, value) for pattern in exclude):
        return False
    return not include or any(match(pattern, value) for pattern in include)


_EXPR_TOKEN = re.compile(r"""\s*(?:(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|(?P<number>\d+(?:\.\d+)?)|(?P<op>==|!=|<=|>=|&&|\|\||[()!<>\[\],])|(?P<word>[A-Za-z_][A-Za-z0-9_]*))""")
_EXPR_WORDS = ("contains", "matches", "startsWith", "endsWith", "in")


_REGEX_CHILD = ("import re, sys\n"
                "pattern, text = sys.stdin.read().split('\\0', 1)\n"
                "sys.exit(0 if re.search(pattern, text) else 1)\n")
_REGEX_SECONDS = 2.0  # a `matches` that takes longer is false (Go's RE2 never would)


def _regex_is_plain(pattern):
    """Whether Python's backtracking cannot blow up on `pattern`: at most one
    unbounded repeat, no repeated group, no backreference."""
    unbounded, index, in_class = 0, 0, False
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            if pattern[index + 1:index + 2].isdigit():
                return False  # a backreference
            index += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char in "*+" or char == "{" and re.match(r"\{\d*,\}", pattern[index:]):
            unbounded += 1
            if pattern[index - 1:index] == ")":
                return False
        elif char in "?{" and pattern[index - 1:index] == ")":
            return False
        index += 1
    return unbounded <= 1 and "(?P=" not in pattern


@functools.lru_cache(maxsize=256)
def _regex_search(pattern, text):
    """`re.search(pattern, text)` for a pipeline's `matches`: a plain pattern
    here; any other in a child process stopped after _REGEX_SECONDS, since
    Python's regular expressions backtrack (Go's RE2, which Woodpecker uses,
    does not) and a pattern from a pipeline file could hold the server for
    hours. ValueError: malformed, or too slow."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"the pattern {pattern!r} is not a regular expression: {exc}") \
            from None
    if _regex_is_plain(pattern):
        return bool(compiled.search(text))
    try:
        result = subprocess.run([sys.executable, "-I", "-S", "-c", _REGEX_CHILD],
                                input=f"{pattern}\0{text}", text=True, capture_output=True,
                                timeout=_REGEX_SECONDS, env={}, check=False)
    except subprocess.TimeoutExpired:
        raise ValueError(f"the pattern {pattern!r} took longer than {_REGEX_SECONDS:g} s") \
            from None
    if result.returncode not in (0, 1):
        raise ValueError(f"the pattern {pattern!r} could not be matched")
    return result.returncode == 0


class _Expression:
    """Woodpecker's `when.evaluate`: the part of the expr language that
    conditions use (``CI_COMMIT_MESSAGE contains "[release]"``, ``not (A ==
    "b") && C matches "^v"``): strings, numbers, true, false, nil, variables
    (undefined ones are nil), ``== != < > <= >=``, contains, matches,
    startsWith, endsWith, in (a list), ``! not && and || or`` and
    parentheses. ValueError for anything else."""

    def __init__(self, text):
        self.tokens, index = [], 0
        while index < len(text.rstrip()):
            found = _EXPR_TOKEN.match(text, index)
            if not found or found.end() == index:
                raise ValueError(f"cannot read {text[index:].strip()[:20]!r}")
            self.tokens.append((found.lastgroup, found.group(found.lastgroup)))
            index = found.end()
        depth = negations = 0
        for _, token in self.tokens:  # the parser recurses: bounded, as the text is
            depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(token, 0)
            negations = negations + 1 if token in ("!", "not") else 0
            if depth > 32 or negations > 32 or len(text) > 4096:
                raise ValueError("the expression is nested too deeply or too long")
        self.text = text
        self.evaluate({})  # reads the whole of it, or ValueError

    def evaluate(self, variables):
        self.variables, self.at, self.reading = variables, 0, False
        value = self._or()
        if self.at != len(self.tokens):
            raise ValueError(f"unexpected {self.tokens[self.at][1]!r}")
        return bool(value)

    def _peek(self, *words):
        return self.at < len(self.tokens) and self.tokens[self.at][1] in words

    def _take(self, *words):
        if not self._peek(*words):
            raise ValueError(f"expected {' or '.join(words)}")
        self.at += 1

    def _or(self):
        value = self._and()
        while self._peek("||", "or"):
            self.at += 1
            value = self._unless(value, self._and) or value
        return value

    def _and(self):
        value = self._not()
        while self._peek("&&", "and"):
            self.at += 1
            value = self._unless(not value, self._not) and value
        return value

    def _unless(self, decided, operand):
        """The operand's value; once the operator's result is `decided`, the
        operand is only read, never evaluated, as expr short-circuits: a
        `matches` on its right cannot fail what its left made true."""
        if not decided or self.reading:
            return operand()
        self.reading = True
        try:
            operand()
        finally:
            self.reading = False
        return None

    def _not(self):
        if self._peek("!", "not"):
            self.at += 1
            return not self._not()
        return self._compare()

    def _compare(self):
        left = self._primary()
        if not self._peek("==", "!=", "<", ">", "<=", ">=", *_EXPR_WORDS):
            return left
        operator = self.tokens[self.at][1]
        self.at += 1
        right = self._primary()
        if self.reading:
            return None
        text = ("" if left is None else str(left), "" if right is None else str(right))
        if operator in ("==", "!="):
            return (left == right) is (operator == "==")
        if operator == "in":
            return isinstance(right, list) and left in right
        if operator in ("<", ">", "<=", ">="):
            with contextlib.suppress(TypeError):
                return {"<": left < right, ">": left > right, "<=": left <= right,
                        ">=": left >= right}[operator]
            return False
        return {"contains": lambda: text[1] in text[0],
                "matches": lambda: _regex_search(text[1], text[0]),
                "startsWith": lambda: text[0].startswith(text[1]),
                "endsWith": lambda: text[0].endswith(text[1])}[operator]()

    def _primary(self):
        if self.at >= len(self.tokens):
            raise ValueError("the expression ends too soon")
        kind, text = self.tokens[self.at]
        self.at += 1
        if text == "(":
            value = self._or()
            self._take(")")
            return value
        if text == "[":
            items = []
            while not self._peek("]"):
                items.append(self._primary())
                if not self._peek("]"):
                    self._take(",")
            self._take("]")
            return items
        if kind == "string":
            return re.sub(r"\\(.)", lambda found: {"n": "\n", "t": "\t"}.get(
                found.group(1), found.group(1)), text[1:-1])
        if kind == "number":
            return float(text) if "." in text else int(text)
        if kind == "word" and text not in _EXPR_WORDS + ("and", "or", "not"):
            return {"true": True, "false": False, "nil": None}.get(
                text, self.variables.get(text))
        raise ValueError(f"unexpected {text!r}")


def _evaluated(expression, variables):
    """An `evaluate` condition's result; one that cannot be told (a pattern
    from a variable that is no safe regular expression) is false."""
    try:
        return _Expression(expression).evaluate(variables)
    except ValueError:
        return False


def _filled(constraint, variables):
    """A constraint's patterns with their ``${VAR}`` filled from `variables`."""
    if not variables or not any("$" in pattern for part in constraint[:2] for pattern in part):
        return constraint

    def fill(pattern):
        with contextlib.suppress(ConfigError):
            return substitute(pattern, variables)
        return pattern

    include, exclude, *rest = constraint
    return [[fill(pattern) for pattern in include], [fill(pattern) for pattern in exclude],
            *rest]


def _paths_match(paths, files, event, message):
    """Whether a build that changes `files` (None: not known) passes a
    `paths` condition. Drone 1.x's (as drone-convert-pathschanged, which
    gives Drone its paths): some changed file is included and not excluded,
    for every event. Woodpecker's (`Path.Match`), for pushes and pull
    requests only: a commit message holding `ignore_message` passes, no
    changed file gives `on_empty`, every file excluded fails, and with
    include patterns one file must match one."""
    def matches(patterns, name):
        return any(_path_match(pattern, name, doublestar=True) for pattern in patterns)

    include, exclude = paths["include"], paths["exclude"]
    if files is None:
        return True
    if paths["rule"] != "woodpecker":  # an empty change excludes nothing (pathschanged 0.4)
        return not include if not files else any(
            not matches(exclude, name) and (not include or matches(include, name))
            for name in files)
    if event not in (EVENT_PUSH, EVENT_PULL_REQUEST):
        return True
    ignore = paths.get("ignore_message") or ""
    if ignore and ignore.lower() in (message or "").lower():
        return True
    if not files:
        return paths.get("on_empty", True)
    if exclude and all(matches(exclude, name) for name in files):
        return False
    return not include or any(matches(include, name) for name in files)


def _matrix_matches(constraint, axis):
    """Drone's `ConstraintMap.Match`: excluded when every exclude pair matches;
    else every include pair must match. A third item true: values are
    doublestar globs (Woodpecker's map.go)."""
    include, exclude, *globs = constraint

    def matches(key, value):
        if globs and globs[0]:
            return _path_match(value, axis.get(key, ""), doublestar=True)
        return axis.get(key) == value

    if exclude and all(matches(key, value) for key, value in exclude.items()):
        return False
    return all(matches(key, value) for key, value in include.items())


def _plugin_variable(key):
    """A plugin setting's variable: PLUGIN_ and its key in upper case, any
    character a variable name cannot hold made _ (Woodpecker's rule too)."""
    return "PLUGIN_" + re.sub(r"[^A-Za-z0-9_]", "_", str(key)).upper()


def _setting_text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


@dataclasses.dataclass
class Step:
    """One pipeline step: commands run by ``/bin/sh -e`` (in its image, if it
    names one), a plugin (an image with settings and no commands), or a
    service (an image running beside the steps until the job ends).

    `when` holds Drone's constraints: each of branch, event, status,
    environment, platform, ref, repo and instance as [include, exclude] glob
    lists, matrix as [include, exclude] mappings, local as a flag.
    """

    name: str
    commands: list
    image: str = ""
    environment: dict = dataclasses.field(default_factory=dict)
    when: dict = dataclasses.field(default_factory=dict)
    ignore_failure: bool = False
    kind: str = "step"          # "step", "plugin" or "service"
    settings: dict = dataclasses.field(default_factory=dict)  # a plugin's, as PLUGIN_*
    secrets: list = None        # [[source, target], ...]; None: every secret the event gets
    group: str = ""             # consecutive steps of one group run at once
    detach: bool = False        # runs in the background until the job ends
    pull: bool = False
    privileged: bool = False
    volumes: list = dataclasses.field(default_factory=list)
    devices: list = dataclasses.field(default_factory=list)
    network_mode: str = ""
    entrypoint: list = dataclasses.field(default_factory=list)
    command: list = dataclasses.field(default_factory=list)
    shm_size: str = ""
    dns: list = dataclasses.field(default_factory=list)
    dns_search: list = dataclasses.field(default_factory=list)
    extra_hosts: list = dataclasses.field(default_factory=list)
    working_dir: str = ""
    directory: str = ""         # Woodpecker's: where the step runs, in its workspace
    temp_volumes: list = dataclasses.field(default_factory=list)  # Drone 1.x's: "NAME:PATH"
    labels: dict = dataclasses.field(default_factory=dict)
    depends_on: list = dataclasses.field(default_factory=list)  # Drone 1.x's, as written

    def applies(self, *, branch, event, environment, job_status=SUCCESS, deploy_to="",
                platform="linux/amd64", ref="", repo="", instance="", local=False,
                files=None, message="", cron="", action="", variables=None):
        """True if the step's ``when`` lets it run for this job (the status
        constraint defaults to success; ``changed`` is resolved beforehand;
        a `job_status` of None leaves the status out, as Drone does when it
        plans a job before it runs). A Woodpecker `when` list matches if any
        of its conditions does. `files` are the paths the build changes (None:
        not known, and `paths` lets it run), `message` its commit's, `cron`
        the name of the schedule that started it, `action` a pull request's
        (opened, synchronized, reopened) or a tag's (created); `variables` fill the
        ``${VAR}`` of a pattern (``branch: ${CI_REPO_DEFAULT_BRANCH}``), as
        Drone 1.x and Woodpecker substitute their files before reading them."""
        when = self.when
        if "any" in when:
            arguments = {"branch": branch, "event": event, "environment": environment,
                         "job_status": job_status, "deploy_to": deploy_to, "platform": platform,
                         "ref": ref, "repo": repo, "instance": instance, "local": local,
                         "files": files, "message": message, "cron": cron,
                         "action": action, "variables": variables}
            return any(dataclasses.replace(self, when=one).applies(**arguments)
                       for one in when["any"])
        for key, value in (("branch", branch), ("event", event), ("environment", deploy_to),
                           ("platform", platform), ("ref", ref), ("repo", repo),
                           ("instance", instance), ("cron", cron), ("action", action)):
            if key == "branch" and event == EVENT_TAG and when.get("branch_on_tags") is False:
                continue
            if key == "cron" and event != EVENT_CRON and when.get("cron_on_cron_only"):
                continue
            if key in when and not _constraint_matches(_filled(when[key], variables), value):
                return False
        if "paths" in when and not _paths_match(when["paths"], files, event, message):
            return False
        if "evaluate" in when and not _evaluated(when["evaluate"], variables or {}):
            return False
        if "matrix" in when and not _matrix_matches(when["matrix"], environment):
            return False
        if local and when.get("local") is False:
            return False
        return job_status is None or _constraint_matches(when.get("status", ([SUCCESS], [])),
                                                         job_status)

    def with_variables(self, variables, matrix=None, *, shell_variables=None, dollars=False):
        """A copy with ``${VAR}`` (and, for a Drone 0.4 file, ``$$VAR`` from
        `matrix`) substituted; in commands only where the value is inert, and
        from `shell_variables` if given (secrets stay out of shell text);
        ``$$`` made ``$`` with `dollars` (see Pipeline.dollars)."""
        def plain(text):
            if matrix is not None:
                text = _substitute_04(text, matrix)
            return substitute(text, variables, dollars=dollars)

        def shell(text):
            if matrix is not None:
                text = _substitute_04(text, matrix, shell=True)
            return substitute(text, variables if shell_variables is None else shell_variables,
                              shell=True, dollars=dollars)

        return dataclasses.replace(
            self, image=plain(self.image), commands=[shell(command) for command in self.commands],
            environment={name: plain(value) for name, value in self.environment.items()},
            settings=_map_strings(self.settings, plain),
            entrypoint=[plain(part) for part in self.entrypoint],
            command=[plain(part) for part in self.command], working_dir=plain(self.working_dir),
            directory=plain(self.directory))

    def script(self):
        """The shell script for this step: each command echoed as ``+ cmd``, then run."""
        lines = []
        for command in self.commands:
            lines.append("printf '%s\\n' " + shlex.quote("+ " + command))
            lines.append(command)
        return "\n".join(lines) + "\n"

    def plugin_environment(self, secrets=None):
        """A plugin's settings as Drone passes them: ``PLUGIN_<KEY>`` (upper
        case); strings as they are, lists of scalars joined with commas, the
        rest as compact JSON with sorted keys (Drone 0.8's params.go); a null
        setting sets nothing. With `secrets` ({name in lower case: value}),
        each ``{from_secret: NAME}`` inside a setting's maps and lists is
        that secret's value (Woodpecker's ParamsToEnv)."""
        settings = self.settings if secrets is None else _resolve_from_secret(
            self.settings, lambda name: secrets.get(name.lower(), ""))
        return {_plugin_variable(key): _setting_variable(value)
                for key, value in settings.items() if value is not None}

    def setting_secrets(self):
        """The names of the secrets a plugin's settings name inside their maps
        and lists (``{from_secret: NAME}`` below a setting's top), in order."""
        names = []
        _resolve_from_secret(self.settings, names.append)
        return names


def _setting_variable(value):
    """A setting as the text of its variable: strings as they are, lists of
    scalars joined with commas, the rest as compact JSON with sorted keys
    (Drone 0.8's params.go; Woodpecker's ParamsToEnv, for its environment
    values too)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list) and all(not isinstance(item, (dict, list)) for item in value):
        return ",".join(_setting_text(item) for item in value)
    if isinstance(value, (int, float)):
        return _setting_text(value)
    return json.dumps(value, default=str, sort_keys=True, separators=(",", ":"))


def _plain(value):
    """`value` with the YAML reader's line-keeping maps and lists made plain."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _resolve_from_secret(value, resolve):
    """`value` with each ``{from_secret: NAME}`` in its maps and lists
    replaced by what `resolve(NAME)` returns."""
    if isinstance(value, dict):
        if set(value) == {"from_secret"} and isinstance(value["from_secret"], str):
            return resolve(value["from_secret"])
        return {key: _resolve_from_secret(item, resolve) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve_from_secret(item, resolve) for item in value]
    return value


def _map_strings(value, function):
    """`value` with `function` applied to every string in it (lists and maps too)."""
    if isinstance(value, str):
        return function(value)
    if isinstance(value, list):
        return [_map_strings(item, function) for item in value]
    if isinstance(value, dict):
        return {key: _map_strings(item, function) for key, item in value.items()}
    return value


def _zero_sha(value):
    """Whether a push's commit id is all zeros (of 40 or, SHA-256, 64 digits):
    its `before` for a new branch, its `after` for a deletion."""
    return bool(value) and not value.strip("0")


def _tree_names(data, id_bytes=20):
    """The names in a raw git tree object (``MODE NAME\\0`` and an object id
    each: 20 bytes in a SHA-1 repository, 32 in a SHA-256 one)."""
    names, index = [], 0
    while index < len(data):
        end = data.index(b"\0", index)
        names.append(data[index:end].split(b" ", 1)[1].decode("utf-8", errors="replace"))
        index = end + 1 + id_bytes
    return sorted(names)


def _woodpecker_folder(names, read):
    """The pipeline file of a .woodpecker/ folder holding `names`, whose
    files `read(filename)` gives as text: (filename, text) of its one
    workflow, or for several (".woodpecker/", JSON of {filename: text}, which
    parse_pipeline reads as one build's workflows); None for none."""
    workflows = sorted(name for name in names if name.endswith((".yml", ".yaml")))
    texts = {f".woodpecker/{name}": read(f".woodpecker/{name}") for name in workflows}
    texts = {name: text for name, text in texts.items() if text is not None}
    if len(texts) > 1:
        return WOODPECKER_FOLDER, json.dumps(texts, sort_keys=True)
    return next(iter(texts.items()), None)


def _is_woodpecker_file(filename):
    """Whether a pipeline file is Woodpecker's: .woodpecker.yml (.yaml), or a
    file of a .woodpecker/ folder."""
    parts = filename.split("/")
    return parts[-1].startswith(".woodpecker.") or ".woodpecker" in parts[:-1]


def _is_drone_file(filename):
    """Whether a pipeline file is Drone's (its name says drone: `.drone.yml`,
    `ci/drone.yml`): read as Drone read it. Any other is cirunner's own,
    read strictly (an unknown key is an error, `$$` is the shell's)."""
    return "drone" in os.path.basename(filename).lower()


_RUNS_ON_SUCCESS = {"success": True, "failure": False, "of": "build"}


@dataclasses.dataclass
class Pipeline:
    """A parsed pipeline file: ordered steps and services, matrix jobs, options."""

    steps: list
    matrix: list
    filename: str = PIPELINE_FILES[0]
    fail_fast: bool = False
    max_parallel: int = 0
    timeout: float = 0      # minutes (fractions allowed); 0 means the repository's default
    clone: bool = True
    services: list = dataclasses.field(default_factory=list)
    clone_settings: dict = dataclasses.field(default_factory=dict)  # depth, tags, recursive...
    workspace: dict = dataclasses.field(default_factory=dict)       # base, path
    branches: list = None   # [include, exclude] globs of the branches that build, or None
    trigger: dict = dataclasses.field(default_factory=dict)  # Drone 1.x: when builds are made
    name: str = "default"   # a Drone 1.x pipeline's name
    drone04: bool = False   # a Drone 0.4 file: $$VAR is a matrix value
    era: str = "0.5"        # whose rules the file gets: Drone 0.4, 0.5 or 0.8 (see _drone_era)
    warnings: list = dataclasses.field(default_factory=list)  # what Drone accepted, said
    platform: str = ""
    labels: dict = dataclasses.field(default_factory=dict)
    depends_on: list = dataclasses.field(default_factory=list)  # pipelines it runs after
    # After them, it runs if they ended as these allow: {"success": bool,
    # "failure": bool, "of": "build" (Drone: any job of the build failed) or
    # "needs" (Woodpecker: each job of the pipelines it depends on)}.
    runs_on: dict = dataclasses.field(default_factory=lambda: dict(_RUNS_ON_SUCCESS))
    pipelines: list = dataclasses.field(default_factory=list)  # a file's several pipelines
    step_graph: bool = False  # its steps' depends_on make a graph (Drone 1.x, Woodpecker)
    concurrency: int = 0    # Drone 1.x: its jobs that may run at once in the repository
    trusted_volumes: list = dataclasses.field(default_factory=list)  # Drone 1.x: host, memory

    def each(self):
        """The pipelines of the file: its several, or itself alone."""
        return self.pipelines or [self]

    def named(self, name):
        """The file's pipeline called `name` (itself when it is one pipeline)."""
        return next((pipeline for pipeline in self.pipelines if pipeline.name == name), self)

    def steps_for(self, variables, matrix=None):
        """The steps with ``${VAR}`` substituted from `variables`."""
        matrix = matrix if self.drone04 else None
        return [step.with_variables(variables, matrix, dollars=self.dollars())
                for step in self.steps]

    def status_resolved(self, step, previous_status):
        """`step`, its `when.status` word ``changed`` made the status that
        differs from `previous_status` (the previous build's; None: there was
        none, and failure is the change) in 0.4 and 0.5 files (0.8 compared
        the word with success and failure only). A copy where it changes."""
        if "status" not in step.when or self.era in _RULES_08:
            return step
        means = SUCCESS if previous_status == FAILURE else FAILURE
        include, *rest = step.when["status"]
        return dataclasses.replace(step, when={**step.when, "status": [
            [means if word in ("changed", "change") else word for word in include], *rest]})

    def when_branch(self, event, branch, ref):
        """The branch a `when.branch` or `trigger.branch` is matched with: for
        a tag in a Drone 0.4 or 0.5 file the tag's ref (refs/tags/v1), which
        their GitHub remote made the build's branch; in a Drone 1.x file
        none (a tag's build has no branch there: `branch: [main]` leaves it
        out); else `branch`."""
        if event == EVENT_TAG and self.era == "1":
            return ""
        if event == EVENT_TAG and self.era not in _RULES_08 and _is_drone_file(self.filename):
            return ref
        return branch

    def dollars(self):
        """Whether ``$$`` is a literal ``$`` (Drone's envsubst): in Drone 0.5
        and 0.8 files; a .cirunner.yml keeps the shell's ``$$``, and a 0.4
        file its ``$$NAME`` matrix values."""
        return not self.drone04 and (_is_drone_file(self.filename)
                                     or _is_woodpecker_file(self.filename))

    def runner_labels(self):
        """The labels a runner must have to run this pipeline's jobs, as stored."""
        labels = dict(self.labels, **({"platform": self.platform} if self.platform else {}))
        return json.dumps(labels, sort_keys=True)

    def builds_branch(self, branch):
        """Whether the top-level `branches` filter lets `branch` build."""
        return self.branches is None or _constraint_matches(self.branches, branch)

    def triggered(self, *, event, branch, ref, repo="", deploy_to="", **change):
        """Whether a Drone 1.x `trigger` lets this build be made (no trigger:
        yes); `change`: the files, message and cron of Step.applies."""
        return not self.trigger or Step(name="trigger", commands=[], when=self.trigger).applies(
            branch=branch, event=event, environment={}, job_status=None, deploy_to=deploy_to,
            ref=ref, repo=repo, **change)

    def uses_paths(self):
        """Whether any `when` or trigger of the file looks at the changed files."""
        def looks(when):
            return "paths" in when or any(map(looks, when.get("any", ())))

        return any(looks(one.trigger) or any(looks(step.when) for step in
                                             one.steps + one.services) for one in self.each())

    def to_json(self):
        """The parsed pipeline as JSON text: kept with a build, so that its jobs
        never parse YAML again."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text):
        """The pipeline `to_json` wrote."""
        return cls._from_data(json.loads(text))

    @classmethod
    def _from_data(cls, data):
        known = {field.name for field in dataclasses.fields(cls)}
        data = {key: value for key, value in data.items() if key in known}
        data["steps"] = [Step(**step) for step in data["steps"]]
        data["services"] = [Step(**step) for step in data.get("services", [])]
        data["pipelines"] = [cls._from_data(child) for child in data.get("pipelines", [])]
        return cls(**data)


# -- parsing --------------------------------------------------------------------------

_STEP_KEYWORDS = ("name", "image", "commands", "environment", "when", "failure", "pull",
                  "detach", "privileged", "volumes", "devices", "network_mode", "entrypoint",
                  "command", "shm_size", "dns", "dns_search", "extra_hosts", "working_dir",
                  "group", "secrets", "labels")
_UNSUPPORTED_STEP_KEYS = {
    "build": "building an image from the pipeline file is not supported: run `podman build` "
             "in a step of a trusted repository, or use a plugin",
    "auth_config": "registry credentials in the pipeline file are not supported: log in once "
                   "with `podman login` (or `docker login`) as the server's user",
    "volumes_from": "not supported: use volumes on a trusted repository",
    "networks": "not supported: steps and services of a job share a network of their own",
    "net": "not supported: steps and services of a job share a network of their own",
    "links": "not needed: services are reached by their name on the job's network",
    **{key: "resource limits are not supported: cirunner sets none" for key in (
        "mem_limit", "memswap_limit", "mem_swappiness", "cpu_quota", "cpu_shares", "cpuset",
        "oom_kill_disable", "ulimits", "sysctls", "tmpfs", "isolation", "ipc_mode", "cap_add",
        "cap_drop")},
}
_RESOURCE_KEYS = ("mem_limit", "memswap_limit", "cpu_quota", "cpu_shares", "cpuset")  # Drone 1.x
_SERVICE_IGNORED = ("ports",)  # services are reached by name: no ports to publish
_TOP_LEVEL_KEYS = ("pipeline", "services", "matrix", "workspace", "clone", "branches",
                   "drone_version",
                   "platform", "labels", "node", "fail_fast", "max_parallel", "timeout",
                   "build", "compose", "publish", "deploy", "notify",
                   "plugin",  # Drone 0.4 plugins' own metadata (for its plugin index): unused
                   "trigger")  # a Drone 1.x pipeline's conditions (see _Drone1)
_UNSUPPORTED_TOP_LEVEL = {
    "networks": "named networks are not supported: each job's steps and services share a "
                "network of their own",
    "volumes": "named volumes are not supported: use step volumes on a trusted repository",
    "cache": "the cache section is not supported: use a cache plugin step, or a volume on a "
             "trusted repository",
    "image": "a default image is not supported: set image on each step",
    "debug": "not supported: every step's output is in the job's log",
}
_CLONE_KEYS = ("depth", "tags", "recursive", "submodule_override", "submodules", "path",
               "skip_verify", "image", "pull", "when")


class _AnyValue(dict):
    """Every variable set (to "x"): substitution checks syntax, not values."""

    def get(self, key, default=None):
        return "x"


def _drone_era(document):
    """"0.8" if a key only Drone 0.8 reads is in the file, else "0.5": a
    step's `secrets` (0.8's per-step secrets), a service's `when`, a `when`
    on `ref` or `instance`, clone as named clone steps."""
    def bodies(key):
        node = document.get(key)
        return [body for body in node.values() if isinstance(body, dict)] \
            if isinstance(node, dict) else []

    steps, services = bodies("pipeline"), bodies("services")
    clone = document.get("clone")
    return "0.8" if (
        any("secrets" in body for body in steps + services)
        or any("when" in body for body in services)
        or any(isinstance(body.get("when"), dict) and {"ref", "instance"} & set(body["when"])
               for body in steps)
        or (isinstance(clone, dict) and clone
            and all(isinstance(item, dict) for item in clone.values()))) else "0.5"


def _bytes_of_size(value):
    """A size as Docker reads it (units.RAMInBytes: 1kb, 64m, 1.5GiB; binary
    multiples), as a number of bytes in text; anything else as it was."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(int(value))
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?) ?([kmgtp])?i?b?", str(value).strip().lower())
    if not isinstance(value, str) or not match:
        return value
    power = " kmgtp".index(match.group(2) or " ")
    return str(int(float(match.group(1)) * 1024 ** power))


# Drone 1.x's event names for cirunner's (a rollback has none here: it matches nothing)
_DRONE_1_EVENTS = {"custom": EVENT_MANUAL, "promote": EVENT_DEPLOYMENT}
_VOLUME_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")  # a Drone 1.x volume
_DRONE_1_PIPELINE_KEYS = ("kind", "type", "name", "steps", "services", "trigger", "clone",
                          "workspace", "platform", "node", "depends_on", "concurrency",
                          "image_pull_secrets", "volumes")


class _Drone1:
    """A Drone 1.x/2.x file (`kind: pipeline` documents) read into the form
    the rest of the parser knows: its steps in order (with `depends_on`: each
    step in a group with the others whose dependencies are as deep, the groups
    in order of depth), its services, clone, workspace (/drone/src) and trigger. Its
    rules are Drone 0.8's (era "1"). Each `kind: pipeline` document is read
    on its own (`_pipeline`, `pipeline_needs`): several make one Pipeline of
    several, run as running_pipelines and Store._release_waiting say."""

    def __init__(self, parser):
        self.parser = parser
        self.depends_on = {}  # step name: the names it depends on, as written
        self.step_graph = False  # whether they make a graph
        self.name = "default"
        self.keyed_graph = False  # Woodpecker: any depends_on (even []) makes the graph
        self.volumes = {}  # the pipeline's volumes: name -> host path, "" for temp
        self.concurrency = 0  # the pipeline's concurrency.limit
        self.trusted = []  # its volumes only a trusted repository may declare
        self.environment = {}  # the pipeline's environment, beneath each step's
        self.cloned = True  # the pipeline clones: a step may depend on "clone"

    def document(self, documents):
        parser = self.parser
        parser.era = "1"
        pipelines = []
        for document, line in zip(documents, documents.lines):
            if document is None:  # an empty document (a trailing ---)
                continue
            kind = document.get("kind", "pipeline") if isinstance(document, dict) else None
            if kind == "pipeline":
                pipelines.append((document, line))
            elif kind in ("secret", "signature"):
                parser.problems.warn(line, f"a 'kind: {kind}' document is not read: " + (
                    "secrets come from the repository's own (cirunner secret add)"
                    if kind == "secret" else "no signature is checked: forks wait for "
                    "approval instead"))
            elif isinstance(kind, str) and kind:  # registry, cron, template...: runner-go skips
                parser.problems.warn(line, f"a 'kind: {kind}' document is not read: Drone's "
                                           "runners skip it too")
            else:
                parser.add(line, "each YAML document must be a mapping of kind pipeline, "
                                 "secret or signature")
        if not pipelines:
            parser.add(1, "no 'kind: pipeline' document")
        return pipelines

    def pipeline_needs(self, document, line):
        """(depends_on, runs_on) of a pipeline document: the names it runs
        after, and on which outcome (Drone's on_success and on_failure from
        `trigger.status`: failure only when the status names it)."""
        needs = document.get("depends_on") or []
        needs = [needs] if isinstance(needs, str) else needs
        if not isinstance(needs, list) or not all(isinstance(name, str) for name in needs):
            self.parser.add(_line_of(document, "depends_on"), "'depends_on' must be a list of "
                                                              "pipeline names")
            needs = []
        needs = [str(name) for name in needs]  # plain strings, not the YAML reader's
        trigger = document.get("trigger")
        status = trigger.get("status") if isinstance(trigger, dict) else None
        if status is None:
            return needs, dict(_RUNS_ON_SUCCESS)
        status = self.parser._constraint(status, "status", _line_of(trigger, "status"))
        return needs, {"success": _constraint_matches(status, SUCCESS),
                       "failure": _constraint_matches(status, FAILURE), "of": "build"}

    def _pipeline(self, document, line):
        parser, out = self.parser, _YamlMap(line)
        self.name = str(document.get("name") or "default")
        kind = document.get("type", "docker")
        if kind not in ("docker", "exec"):
            parser.add(_line_of(document, "type"), f"pipeline type {kind!r} is not supported "
                                                   "(docker or exec)")
        self._read_first(document, kind)
        for key, value in document.items():
            at = _line_of(document, key)
            if key == "steps":
                value = self._steps(value, at, kind)
                key = "pipeline"
            elif key == "services":
                value = self._named(value, at, "service", kind)
            elif key == "trigger":
                value = self._when(value, at)
            elif key == "clone":
                value = self._clone(value, at)
            elif key in ("workspace", "platform") and isinstance(value, dict):
                value = (self._platform(value, at, kind) if key == "platform" else
                         self._workspace(value, at))
            elif key in ("volumes", "environment"):
                continue  # read first, for the steps
            elif key == "concurrency":
                self.concurrency = self._concurrency(value, at)
                continue
            elif key in ("image_pull_secrets", "depends_on"):
                if value and key != "depends_on":  # depends_on: read by pipeline_needs
                    parser.problems.warn(at, f"{key!r} is not read: the engine's own login "
                                             "(`podman login` as the server's user) is used")
                continue
            elif key not in _DRONE_1_PIPELINE_KEYS:
                parser.unknown(at, f"unknown pipeline key {key!r}")
                continue
            if key not in ("kind", "type", "name"):
                out[key], out.lines[key] = value, at
        out.setdefault("workspace", {"base": "/drone", "path": "src"})
        for name in set(out.get("pipeline") or ()) & set(out.get("services") or ()):
            parser.add(line, f"a step and a service are both named {name!r}")
        return out

    def _workspace(self, value, line):
        """A pipeline's `workspace: {base, path}`: base an absolute path."""
        base, path = value.get("base") or "/drone", value.get("path") or "src"
        if not (isinstance(base, str) and base.startswith("/") and isinstance(path, str)):
            self.parser.add(line, "'workspace' takes base (an absolute path) and path")
            return {"base": "/drone", "path": "src"}
        return {"base": base, "path": path}

    def _read_first(self, document, kind):
        """What a pipeline's steps are read with: its volumes, its
        environment, whether it clones; its concurrency starts unset."""
        self.trusted = []
        self.volumes = self._pipeline_volumes(document.get("volumes"),
                                              _line_of(document, "volumes"), kind)
        self.environment = self._pipeline_environment(document.get("environment"),
                                                      _line_of(document, "environment"))
        clone = document.get("clone")
        self.cloned = not (isinstance(clone, dict) and clone.get("disable") is True)
        self.concurrency = 0

    def _platform(self, value, line, kind):
        """`platform: {os, arch}` as OS/ARCH; for a docker pipeline, one Drone's
        linter accepts."""
        system, arch = str(value.get("os") or "linux"), str(value.get("arch") or "amd64")
        if kind == "docker" and system not in ("linux", "windows"):
            self.parser.add(line, f"unsupported os: {system} (linux or windows)")
        if kind == "docker" and arch not in ("amd64", "arm", "arm64", "386", "ppc64le",
                                             "s390x"):
            self.parser.add(line, f"unsupported architecture: {arch}")
        return f"{system}/{arch}"

    def _pipeline_environment(self, value, line):
        """A pipeline's `environment`: plain values every step starts from."""
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(item, (str, int, float, bool))
                                                  for item in value.values()):
            self.parser.add(line, "a pipeline's 'environment' must be a mapping of plain "
                                  "values")
            return {}
        return {str(key): _setting_variable(item) for key, item in value.items()}

    def _clone(self, value, line):
        if not isinstance(value, dict):
            self.parser.add(line, "'clone' takes disable, depth and skip_verify")
            return True
        if value.get("disable") is True:
            return False
        return {key: item for key, item in value.items() if key != "disable"}

    def _named(self, items, line, what, kind):
        """A list of steps (or services) as the mapping of names the parser reads."""
        out = _YamlMap(line)
        if not isinstance(items, list):
            self.parser.add(line, f"'{what}s' must be a list of {what}s")
            return out
        for index, body in enumerate(items, start=1):
            at = items.lines[index - 1] if isinstance(items, _YamlList) else line
            if not isinstance(body, dict):
                self.parser.add(at, f"{what} {index} must be a mapping")
                continue
            name = body.get("name")
            if not isinstance(name, str) or not name:
                self.parser.add(at, f"{what} {index} needs a 'name'")
                name = f"{what}-{index}"
            if name in out:
                self.parser.add(at, f"two {what}s are named {name!r} (first on line "
                                    f"{out.lines[name]})")
                continue
            if kind == "exec" and "image" in body:
                self.parser.add(at, f"{what} {name!r}: an exec pipeline's steps run on the "
                                    "host: no 'image'")
            elif kind == "docker" and not body.get("image"):
                self.parser.add(at, f"{what} {name!r} needs an image (a docker pipeline)")
            out[name], out.lines[name] = self._step(body), at
        return out

    def _concurrency(self, value, line):
        """`concurrency: {limit: N}`: N (0 for no limit)."""
        limit = value.get("limit", 0) if isinstance(value, dict) else None
        if not isinstance(value, dict) or set(value) - {"limit"} or isinstance(
                limit, bool) or not isinstance(limit, int) or limit < 0:
            self.parser.add(line, "'concurrency' takes {limit: a whole number}")
            return 0
        return limit

    def _dependency(self, item, steps):
        """A step's dependency's name; Woodpecker's {name, optional: true} of a
        step that is not there: None (dropped, as Woodpecker drops it)."""
        if isinstance(item, dict) and isinstance(self, _Woodpecker) and isinstance(
                item.get("name"), str) and set(item) <= {"name", "optional"}:
            return None if item.get("optional") is True and item["name"] not in steps \
                else item["name"]
        return item

    def _pipeline_volumes(self, value, line, kind):
        """{name: host path, or "" for a temp volume} of a pipeline's
        `volumes` ({name, host: {path}} or {name, temp: {}})."""
        if value is None or value == []:
            return {}
        if kind == "exec" or not isinstance(value, list):
            self.parser.add(line, "'volumes' must be a list of {name, host: {path}} or "
                                  "{name, temp: {}}" + (" (of a docker pipeline: an exec "
                                                        "pipeline has none)" if kind == "exec"
                                                        else ""))
            return {}
        volumes = {}
        for index, item in enumerate(value):
            at = _line_of(value, index) or line
            host = item.get("host") if isinstance(item, dict) else None
            name = item.get("name") if isinstance(item, dict) else None
            path = host.get("path") if isinstance(host, dict) else None
            host_path = isinstance(path, str) and path.startswith("/")
            if not (isinstance(name, str) and _VOLUME_NAME_PATTERN.fullmatch(name) and (
                    host_path and "temp" not in item or host is None and "temp" in item)):
                self.parser.add(at, f"volume {index + 1}: a name ([a-z0-9_-]) and host: "
                                    "{path: /absolute} or temp: {}")
                continue
            volumes[name] = path if host is not None else ""
            temp = item.get("temp")
            if host is not None or isinstance(temp, dict) and temp.get("medium") == "memory":
                self.trusted.append(name)  # Drone's linter: host paths and memory, trusted only
        return volumes

    def _step_volumes(self, out, value, line):
        """A step's `volumes` ({name, path} of the pipeline's): host paths as
        the trusted `volumes` key ("HOST:PATH"), temp ones apart."""
        if not isinstance(value, list) or not all(
                isinstance(item, dict) and isinstance(item.get("path"), str)
                and item["path"].startswith("/") and isinstance(item.get("name"), str)
                for item in value):
            self.parser.add(line, "a step's 'volumes' must be a list of {name, path: "
                                  "/absolute} of the pipeline's volumes")
            return
        host, temp = _YamlList(line), _YamlList(line)
        for item in value:
            if (re.sub("^/+", "/", posixpath.normpath(item["path"])) + "/").startswith(
                    "/run/drone/"):
                self.parser.add(line, f"cannot mount a volume at {item['path']}: /run/drone "
                                      "is the runner's own")
            elif item.get("name") not in self.volumes:
                self.parser.add(line, f"volume {item.get('name')!r} is no volume of the "
                                      "pipeline")
            elif self.volumes[item["name"]]:
                host.append(f"{self.volumes[item['name']]}:{item['path']}")
            else:
                temp.append(f"{item['name']}:{item['path']}")
        for key, items in (("volumes", host), ("temp_volumes", temp)):
            if items:
                items.lines = [line] * len(items)
                out[key], out.lines[key] = items, line

    def _from_secret(self, values, at, secrets, variable):
        """`values` without its {from_secret: NAME} items, each added to
        `secrets` as the variable `variable(key)` names."""
        plain = _YamlMap(at)
        for key, item in values.items():
            if isinstance(item, dict) and "from_secret" in item:
                if set(item) != {"from_secret"} or not isinstance(item["from_secret"], str) \
                        or not item["from_secret"]:
                    self.parser.add(_line_of(values, key), f"{key!r}: from_secret takes the "
                                                           "name of a secret")
                    continue
                secrets.append({"source": item["from_secret"], "target": variable(key)})
            else:
                plain[key], plain.lines[key] = item, _line_of(values, key)
        if isinstance(self, _Woodpecker):  # which reads a setting's inside maps and lists too
            self._nested_from_secret(plain, settings=variable is _plugin_variable)
        return plain

    def _nested_from_secret(self, values, *, settings):
        """Name each ``{from_secret: ...}`` inside the maps and lists of
        `values` (a plugin's `settings`, else a step's environment) that is
        not what it must be: in settings a secret's name; in a variable's map
        or list it is not read at all."""
        where, takes = ("setting", "the name of a secret") if settings else (
            "environment", ("a variable's whole value here; inside a map or list, only a "
                            "plugin's settings read it"))

        def bad(value):
            if isinstance(value, dict):
                if "from_secret" in value and (
                        not settings or set(value) != {"from_secret"}
                        or not isinstance(value["from_secret"], str) or not value["from_secret"]):
                    return True
                return any(bad(item) for item in value.values())
            return isinstance(value, list) and any(bad(item) for item in value)

        for key, value in values.items():
            if isinstance(value, (dict, list)) and bad(value):
                self.parser.add(_line_of(values, key), f"{where} {key!r}: from_secret takes "
                                                       f"{takes}")

    def _step(self, body):
        out, secrets = _YamlMap(body.line), []
        for key, value in body.items():
            at = _line_of(body, key)
            if key in ("name", "depends_on"):
                continue
            if key == "temp_volumes":  # cirunner's own word for what `volumes` names
                self.parser.unknown(at, "unknown step key 'temp_volumes'")
                continue
            if key == "settings":  # the plugin's settings, kept apart from the step's keys
                if not isinstance(value, dict):
                    self.parser.add(at, "'settings' must be a mapping")
                    continue
                value = self._from_secret(value, at, secrets, _plugin_variable)
            elif key == "environment" and isinstance(value, dict):
                value = self._from_secret(value, at, secrets, str)
                for name, item in self.environment.items():  # the pipeline's, beneath
                    if name not in value:
                        value[name], value.lines[name] = item, at
            elif key == "devices" and not isinstance(self, _Woodpecker):
                value = self._step_devices(value, at)
            elif key == "pull":  # never, if-not-exists: the engine's own; Woodpecker's a flag
                value = value == "always" or value is True and isinstance(self, _Woodpecker)
            elif key == "when":
                value = self._when(value, at)
            elif key == "volumes" and not isinstance(self, _Woodpecker):
                self._step_volumes(out, value, at)
                continue
            out[key], out.lines[key] = value, at
        if self.environment and "environment" not in out:
            out["environment"] = _YamlMap(body.line)
            out["environment"].update(self.environment)
            out.lines["environment"] = body.line
        if secrets:
            out["secrets"], out.lines["secrets"] = secrets, body.line
        return out

    def _step_devices(self, value, line):
        """Drone 1.x's `devices: [{name, path}]` (a host volume of the
        pipeline's, by name) as the trusted `devices` key ("HOST:PATH")."""
        if not isinstance(value, list) or not all(
                isinstance(item, dict) and isinstance(item.get("path"), str)
                and isinstance(item.get("name", ""), str) for item in value):
            self.parser.add(line, "'devices' must be a list of {name, path}")
            return []
        devices = _YamlList(line)
        for item in value:  # a name that is no host volume: the device at that path
            devices.append(f"{self.volumes.get(item.get('name')) or item['path']}:"
                           f"{item['path']}")
            devices.lines.append(line)
        return devices

    def _steps(self, items, line, kind):
        """The steps, in the order of their depth in the `depends_on` graph (a
        step's is one more than its deepest dependency's), each in the group
        of its depth; the executor runs the graph itself (_JobRun._run_graph:
        a step starts as soon as its own dependencies have ended)."""
        steps = self._named(items, line, "step", kind)
        bodies = {body.get("name"): body for body in items or ()
                  if isinstance(body, dict) and isinstance(body.get("name"), str)} \
            if isinstance(items, list) else {}
        needs = {name: bodies.get(name, {}).get("depends_on") or [] for name in steps}
        needs = {name: [need] if isinstance(need, str) else list(need) if isinstance(
            need, list) else [] for name, need in needs.items()}
        for name, need in needs.items():
            need = [self._dependency(item, steps) for item in need]
            if not all(isinstance(item, str) for item in need if item is not None):
                self.parser.add(steps.lines[name], f"step {name!r}: 'depends_on' must be a "
                                                   "list of step names")
            needs[name] = [item for item in need if isinstance(item, str)]
        self.depends_on = needs
        graph = any(needs.values()) or (self.keyed_graph and any(
            "depends_on" in body for body in bodies.values()))
        self.step_graph = graph
        if not graph:
            return steps  # in order, one after another
        depths = {}

        def depth(name, path):
            if name in path:
                self.parser.add(steps.lines[name], "steps depend on each other in a cycle: "
                                                   + " -> ".join([*path, name]))
                return 0
            if name not in depths:
                known = [need for need in needs[name] if need in steps]
                cloned = {"clone"} if self.cloned else set()  # ended before any step starts
                for need in set(needs[name]) - set(known) - cloned:
                    self.parser.add(steps.lines[name], f"step {name!r} depends on "
                                                       f"{need!r}, which is no step")
                depths[name] = 1 + max((depth(need, (*path, name)) for need in known),
                                       default=-1)
            return depths[name]

        for name in steps:
            depth(name, ())
        out = _YamlMap(steps.line)
        for name in sorted(steps, key=lambda name: depths[name]):  # stable: file order kept
            body = steps[name]
            body["group"], body.lines["group"] = f"depth {depths[name]}", steps.lines[name]
            out[name], out.lines[name] = body, steps.lines[name]
        return out

    paths_key = "paths"  # Drone 1.x's (drone-convert-pathschanged's); Woodpecker's: path

    def _when(self, when, line):
        """Drone 1.x's conditions in cirunner's words: its event names, target
        as environment, paths kept; action and evaluate cannot be told here
        (warned)."""
        if not isinstance(when, dict):
            return when
        out = _YamlMap(when.line)
        for key, value in when.items():
            at = _line_of(when, key)
            if key == "event":
                value = self._events(value)
            elif key == "target":
                key = "environment"
            elif key == self.paths_key:
                key = "paths"
            elif key in ("paths", "path") or key == (  # the other format's own key
                    "action" if isinstance(self, _Woodpecker) else "evaluate"):
                self.parser.problems.warn(at, f"when.{key} is not evaluated here: it "
                                              "matches every build")
                continue
            out[key], out.lines[key] = value, at
        return out

    @staticmethod
    def _events(value):
        def one(name):
            return _DRONE_1_EVENTS.get(name, name) if isinstance(name, str) else name

        if isinstance(value, dict):
            return {key: [one(item) for item in (items if isinstance(items, list) else [items])]
                    for key, items in value.items()}
        return [one(item) for item in value] if isinstance(value, list) else one(value)


_WOODPECKER_DEPRECATED = (("CI_COMMIT_PRERELEASE", "CI_PIPELINE_RELEASE_PRE"),
                          ("CI_COMMIT_AUTHOR_AVATAR", "CI_PIPELINE_AVATAR"),
                          ("CI_PREV_COMMIT_AUTHOR_AVATAR", "CI_PREV_PIPELINE_AVATAR"))
_WOODPECKER_FORMERLY_PRIVILEGED = ("plugins/docker", "plugins/gcr", "plugins/ecr",
                                   "woodpeckerci/plugin-docker-buildx")
_WOODPECKER_WORKFLOW_KEYS = ("steps", "pipeline", "services", "when", "depends_on", "runs_on",
                             "skip_clone", "clone", "workspace", "matrix", "labels", "platform",
                             "variables")


class _Woodpecker(_Drone1):
    """A Woodpecker workflow (.woodpecker.yml, or the one file of .woodpecker/)
    read into the parser's 0.8 form, with Woodpecker's rules (era
    "woodpecker": a step gets the secrets it names with from_secret, plugins
    run for every event): `steps` as a mapping or a list, `when` as a mapping
    or a list (any one matching), `depends_on` (any step that has it, even
    empty, makes the graph), `skip_clone`, the workspace /woodpecker/src/...
    A folder's several workflows are read one file at a time (see
    parse_pipeline) and run as one build's pipelines."""

    needs = ([], None)
    paths_key = "path"

    def workflow(self, document):
        parser, out = self.parser, _YamlMap(document.line)
        parser.era, self.keyed_graph = "woodpecker", True
        self.name = os.path.splitext(os.path.basename(parser.filename))[0].lstrip(".") \
            if "/" in parser.filename else "woodpecker"
        for key, value in document.items():
            at = _line_of(document, key)
            if key == "pipeline" and "steps" in document:  # Woodpecker 3 reads steps alone
                parser.unknown(at, "unknown workflow key 'pipeline' (steps are read)")
                continue
            if key in ("steps", "pipeline", "services"):
                value = self._as_list(value, at)
                value = (self._steps(value, at, None) if key != "services"
                         else self._named(value, at, "service", None))
                key = "pipeline" if key == "steps" else key
            elif key == "when":
                key, value = "trigger", self._when(value, at)
            elif key == "skip_clone":
                key, value = "clone", value is not True
            elif key == "workspace" and isinstance(value, dict):
                value = {"base": str(value.get("base") or "/woodpecker"),
                         **({"path": str(value["path"])} if value.get("path") else {})}
            elif key in ("runs_on", "variables", "depends_on"):
                continue  # depends_on, runs_on: read by _needs; variables: YAML anchors
            elif key not in _WOODPECKER_WORKFLOW_KEYS:
                parser.unknown(at, f"unknown workflow key {key!r}")
                continue
            out[key], out.lines[key] = value, at
        out.setdefault("workspace", {"base": "/woodpecker"})
        self.needs = self._needs(document)
        return out

    def lint(self, document, text):
        """Woodpecker's linter warnings: deprecated variables (any reference
        in the file), and steps with no event filter where the workflow has
        none (lintBadHabits)."""
        for old, new in _WOODPECKER_DEPRECATED:
            if re.search(rf"\$\{{{old}\}}|\$\$?{old}\b", text):
                self.parser.problems.warn(1, f"Usage of `{old}` is deprecated, use `{new}`")
        self._lint_images(document)

        def constraints(when):
            return when if isinstance(when, list) else [when] if isinstance(when, dict) else []

        root = constraints(document.get("when"))
        if root and all(isinstance(one, dict) and one.get("event") for one in root):
            return
        steps = document.get("steps")
        named = steps.items() if isinstance(steps, dict) else (
            (body.get("name") if isinstance(body, dict) else None, body) for body in steps or [])
        for key, body in named:
            if not isinstance(body, dict):
                continue
            name, when = body.get("name") or key, constraints(body.get("when"))
            if not when:
                self.parser.problems.warn(_line_of(body), f"step {name!r}: consider adding a "
                                          "`when` block with an `event` filter to this step "
                                          "or the entire workflow")
            elif not all(isinstance(one, dict) and one.get("event") for one in when):
                self.parser.problems.warn(_line_of(body), f"step {name!r}: set an event filter "
                                          "for all steps or the entire workflow on all items "
                                          "of the `when` block")

    def _lint_images(self, document):
        """Woodpecker's linter on images: a formerly privileged plugin that is
        not made privileged, a clone step not of the allow list (here a
        clone step is never run: cirunner checks the commit out itself)."""
        def name_of(image):
            name = re.sub(r"(:[\w.-]+)?(@sha256:[0-9a-f]+)?$", "", str(image or ""))
            return re.sub(r"^(docker\.io/)?(library/)?", "", name)

        steps = document.get("steps")
        for body in (steps.values() if isinstance(steps, dict) else steps or []):
            if isinstance(body, dict) and not body.get("privileged") and name_of(
                    body.get("image")) in _WOODPECKER_FORMERLY_PRIVILEGED:
                self.parser.problems.warn(_line_of(body), (
                    f"The formerly privileged plugin `{body['image']}` is no longer privileged "
                    "by default, if required, add it to `WOODPECKER_PLUGINS_PRIVILEGED` "
                    "(here: privileged: true on a trusted repository)"))
        clone = document.get("clone")
        for name, body in (clone.items() if isinstance(clone, dict) else ()):
            if isinstance(body, dict) and name_of(body.get("image")) not in (
                    "woodpeckerci/plugin-git", "quay.io/woodpeckerci/plugin-git"):
                self.parser.problems.warn(_line_of(clone, name), (
                    f"clone.{name}: Specified clone image does not match allow list, netrc is "
                    "not injected (here no clone step runs: the commit is checked out by "
                    "cirunner)"))

    def _needs(self, document):
        """(depends_on, runs_on) of a workflow: the workflows it runs after,
        and on which of their outcomes (`runs_on`; a `when` that matches a
        failure status makes it run on either, as Woodpecker's builder does)."""
        needs, runs_on = document.get("depends_on") or [], document.get("runs_on") or []
        needs, runs_on = ([value] if isinstance(value, str) else value
                          for value in (needs, runs_on))
        for key, value in (("depends_on", needs), ("runs_on", runs_on)):
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                self.parser.add(_line_of(document, key), f"'{key}' must be a list of names")
        needs = [str(name) for name in needs if isinstance(name, str)] \
            if isinstance(needs, list) else []
        runs_on = runs_on if isinstance(runs_on, list) else []
        when = document.get("when")
        failure = any(isinstance(one, dict) and FAILURE in (
            [one["status"]] if isinstance(one.get("status"), str) else one.get("status") or [])
            for one in (when if isinstance(when, list) else [when]))
        return needs, {"success": not runs_on or SUCCESS in runs_on or failure,
                       "failure": FAILURE in runs_on or failure, "of": "needs"}

    @staticmethod
    def _as_list(value, line):
        """Steps (or services) as a mapping of names, or a list: a list, each
        named (as Woodpecker names unnamed ones, step-N)."""
        if not isinstance(value, dict):
            return value
        items = _YamlList(line)
        for name, body in value.items():
            if isinstance(body, dict) and "name" not in body:
                named = _YamlMap(body.line)
                named["name"], named.lines["name"] = str(name), value.lines.get(name, line)
                for key, item in body.items():
                    named[key], named.lines[key] = item, _line_of(body, key)
                body = named
            items.append(body)
            items.lines.append(value.lines.get(name, line))
        return items

    def _when(self, when, line):
        """Woodpecker's conditions: a mapping, or a list of them of which any
        one matching is enough; evaluate cannot be told here."""
        if isinstance(when, list):
            out = _YamlMap(line)
            out["any"], out.lines["any"] = [self._when(one, line) for one in when], line
            return out
        return super()._when(when, line)


def _pipeline_graph_problems(pipelines):
    """What is wrong with the `depends_on` between a file's (or folder's)
    pipelines: a name used twice, a name that is no pipeline, a cycle."""
    problems, names = [], {}
    for pipeline in pipelines:
        if pipeline.name in names:
            problems.append(f"two pipelines are named {pipeline.name!r}")
        names[pipeline.name] = pipeline.depends_on
    for name, needs in names.items():
        problems += [f"pipeline {name!r} depends on {need!r}, which is no pipeline of this "
                     "file" for need in needs if need not in names]
    state = {}

    def visit(name, path):
        if state.get(name) == "done" or name not in names:
            return
        if name in path:
            cycle = path[path.index(name):] + (name,)
            problems.append("pipelines depend on each other in a cycle: " + " -> ".join(cycle))
            return
        for need in names[name]:
            visit(need, (*path, name))
        state[name] = "done"

    for name in names:
        visit(name, ())
    return list(dict.fromkeys(problems))


class _PipelineParser:
    """Turns a pipeline document into a `Pipeline`, noting every problem."""

    def __init__(self, filename, max_jobs, *, one_of_several=False):
        self.filename = filename
        self.max_jobs = max_jobs
        self.one_of_several = one_of_several  # a folder's workflow: its graph is the folder's
        self.problems = _Problems(filename)
        self.era = "0.5"
        self.clone_step = None  # a Drone 0.5 pipeline step named clone
        # A Drone file gets what Drone's parser did (unknown keys ignored,
        # duplicate keys kept as Drone kept them), each said in a warning; a
        # .cirunner.yml gets errors, so that a typo never passes.
        self.drone = _is_drone_file(filename)
        self.woodpecker = _is_woodpecker_file(filename)

    def add(self, line, message):
        self.problems.add(line, message)

    def unknown(self, line, message):
        """An unknown key: ignored in a Drone file (as yaml.v2 ignored it), with
        a warning; an error in a .cirunner.yml."""
        if self.drone or self.woodpecker:
            whose = "Drone" if self.drone else "Woodpecker"
            self.problems.warn(line, f"{message}: ignored, as {whose} ignored it")
        else:
            self.add(line, message)

    def parse(self, text):
        document = _YamlReader(self.filename, self.problems, drone=self.drone,
                               woodpecker=self.woodpecker).read(text)
        pipelines = []
        if self.woodpecker and isinstance(document, dict):
            reader = _Woodpecker(self)
            pipelines = [self._read(reader, reader.workflow(document), reader.needs)]
            reader.lint(document, text)
        elif getattr(document, "drone1", False):
            reader = _Drone1(self)
            pipelines = [self._read(reader, reader._pipeline(body, line),
                                    reader.pipeline_needs(body, line))
                         for body, line in reader.document(document)]
        elif document is None:
            self.problems.raise_any()
            self.add(1, "the pipeline file is empty: it needs a 'pipeline' mapping of steps")
        elif not isinstance(document, dict):
            self.add(_line_of(document), "the pipeline file must be a mapping with a "
                                         "'pipeline' key")
        else:
            pipelines = [self._document(document)]
        for problem in () if self.one_of_several else _pipeline_graph_problems(pipelines):
            self.add(None, problem)
        self.problems.raise_any()
        pipeline = pipelines[0] if len(pipelines) == 1 else Pipeline(
            steps=[], matrix=[{}], filename=self.filename, era=self.era, pipelines=pipelines)
        pipeline.warnings = self.problems.warning_texts()
        return pipeline

    def _read(self, reader, document, needs):
        """The Pipeline of one Drone 1.x pipeline or Woodpecker workflow that
        `reader` made into the parser's form: its steps' graph, its name and
        what it runs after (`needs`: depends_on, runs_on)."""
        self.clone_step = None
        pipeline = self._document(document)
        for step in pipeline.steps:
            step.depends_on = reader.depends_on.get(step.name, [])
        pipeline.name, pipeline.step_graph = reader.name, reader.step_graph
        pipeline.concurrency, pipeline.trusted_volumes = reader.concurrency, reader.trusted
        pipeline.depends_on, pipeline.runs_on = needs
        return pipeline

    def _document(self, document):
        for key in document:
            if key in _UNSUPPORTED_TOP_LEVEL:
                self.add(_line_of(document, key), f"{key!r} is a Drone key this server does "
                                                  f"not support: {_UNSUPPORTED_TOP_LEVEL[key]}")
            elif key not in _TOP_LEVEL_KEYS:
                self.unknown(_line_of(document, key), f"unknown top-level key {key!r} "
                                                      f"(expected one of "
                                                      f"{', '.join(_TOP_LEVEL_KEYS)})")
        drone04 = "pipeline" not in document and any(
            key in document for key in ("build", "compose") + _DRONE_04_SECTIONS)
        if "pipeline" in document:
            for key in ("compose",) + _DRONE_04_SECTIONS:
                if key in document:
                    self.add(_line_of(document, key), f"{key!r} is a section of Drone 0.4 "
                                                      "files; beside 'pipeline', make it "
                                                      "steps (plugins) or services")
        self.era = self._era(document, drone04)
        pipeline = Pipeline(steps=self._steps(document, drone04), matrix=[{}],
                            filename=self.filename, drone04=drone04, era=self.era)
        pipeline.services = self._services(document, "compose" if drone04 else "services")
        self._options(document, pipeline)
        self._clone(document, pipeline)
        pipeline.workspace = self._workspace(document)
        if "branches" in document:
            pipeline.branches = list(self._constraint(document["branches"], "branches",
                                                      _line_of(document, "branches")))
        if "trigger" in document:
            pipeline.trigger = self._when(document["trigger"], "trigger",
                                          _line_of(document, "trigger"))
        if document.get("matrix") not in (None, ""):
            matrix = document["matrix"]
            if self.era == "woodpecker" and isinstance(matrix, dict):  # matrix.go: skipped
                matrix = {name: values for name, values in matrix.items()
                          if values not in ([], None, "")}
            try:
                pipeline.matrix = expand_matrix(matrix, max_jobs=self.max_jobs,
                                                filename=self.filename,
                                                line=_line_of(document, "matrix"))
            except ConfigError as exc:
                for line, message in exc.problems:
                    self.add(line, message)
        return pipeline

    def _era(self, document, drone04):
        """Whose rules this file gets: "0.4" for Drone 0.4's sections, else
        what `drone_version` says, else "0.8" where a key only Drone 0.8 reads
        marks a Drone file (see _drone_era), else "0.5" (cirunner's own files
        too: their rules are 0.5's unless they say otherwise)."""
        if drone04:
            return "0.4"
        if self.era in _READ_AS_STEPS:  # read by _Drone1, _Woodpecker
            return self.era
        if "drone_version" not in document:
            return _drone_era(document) if self.drone else "0.5"
        said = str(document["drone_version"])
        if said not in ("0.5", "0.8"):
            self.add(_line_of(document, "drone_version"),
                     "'drone_version' must be 0.5 or 0.8 (the Drone whose rules the file "
                     "follows)")
            return "0.5"
        return said

    # -- options ------------------------------------------------------------------

    def _options(self, document, pipeline):
        for key in ("fail_fast",):
            if key in document and not isinstance(document[key], bool):
                self.add(_line_of(document, key), f"'{key}' must be true or false")
            pipeline.fail_fast = document.get("fail_fast") is True
        value = document.get("max_parallel", 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.add(_line_of(document, "max_parallel"),
                     "'max_parallel' must be a whole number, 0 or more")
        else:
            pipeline.max_parallel = value
        value = document.get("timeout", 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            self.add(_line_of(document, "timeout"), "'timeout' must be a number of minutes")
        else:
            pipeline.timeout = value
        platform = document.get("platform", "")
        if not isinstance(platform, str):
            self.add(_line_of(document, "platform"), "'platform' must be like linux/amd64")
        else:
            pipeline.platform = platform
        for key in ("labels", "node"):  # Drone 0.8's agent labels; Drone 1's node
            pipeline.labels.update(self._string_map(document.get(key, {}), f"'{key}'",
                                                    _line_of(document, key)))

    def _clone_steps(self, steps, pipeline):
        """Drone 0.8's clone steps: those with commands run first in the job
        (after cirunner's checkout, as Drone ran them in its clone stage); the
        first other one gives the checkout its settings (its image is not run)."""
        first = []
        for name, body in steps.items():
            if "commands" in body:
                self.problems.warn(_line_of(steps, name), f"clone step {name!r} runs as the "
                                                          "job's first step, after cirunner's "
                                                          "checkout")
                step = self._step(name, body, _line_of(steps, name))
                first += [step] if step is not None else []
        pipeline.steps[:0] = first
        return next((body for body in steps.values() if "commands" not in body), {})

    def _clone(self, document, pipeline):
        """`clone: false`, clone settings (0.4, 0.5), or 0.8's map of clone steps."""
        value = document.get("clone", True)
        line = _line_of(document, "clone")
        if self.clone_step is not None and "clone" not in document:
            value, line = self.clone_step, self.clone_step.line
        if isinstance(value, bool):
            pipeline.clone = value
            return
        if not isinstance(value, dict):
            self.add(line, "'clone' must be true, false or a mapping of clone settings")
            return
        if value and all(isinstance(item, dict) for item in value.values()):
            value = self._clone_steps(value, pipeline)  # Drone 0.8: {git: {image: ...}, ...}
        for key in value:
            if key not in _CLONE_KEYS:
                self.unknown(_line_of(value, key), f"unknown clone setting {key!r} (expected "
                                                   f"one of {', '.join(_CLONE_KEYS)})")
        pipeline.clone_settings = {key: value[key] for key in
                                   ("depth", "tags", "recursive", "submodule_override",
                                    "submodules", "path") if key in value}
        if pipeline.clone_settings.get("submodules"):
            pipeline.clone_settings["recursive"] = True
        overrides = pipeline.clone_settings.get("submodule_override", {})
        pipeline.clone_settings["submodule_override"] = self._string_map(
            overrides, "'submodule_override'", _line_of(value, "submodule_override"))

    def _workspace(self, document):
        value = document.get("workspace", {})
        line = _line_of(document, "workspace")
        if not isinstance(value, dict) or set(value) - {"base", "path"} or not all(
                isinstance(item, str) for item in value.values()):
            self.add(line, "'workspace' takes base and path, both strings")
            return {}
        return dict(value)

    # -- steps ----------------------------------------------------------------------

    def _steps(self, document, drone04):
        if "pipeline" in document and "build" in document:
            self.add(_line_of(document, "build"), "use either 'pipeline' or 'build', not both")
        key = "pipeline" if "pipeline" in document or not drone04 else "build"
        node = document.get(key)
        if key == "build" and isinstance(node, dict) and ("commands" in node or "image" in node):
            wrapper = _YamlMap(_line_of(document, "build"))  # Drone 0.4: one step named build
            wrapper["build"], wrapper.lines["build"] = node, wrapper.line
            node = wrapper
        if not isinstance(node, dict) or not node:
            if self.era in _READ_AS_STEPS:  # said of its 'steps' already, or:
                if not self.problems.found:
                    self.add(1, "a pipeline needs 'steps'")
            elif not (drone04 and node is None):
                self.add(_line_of(document, key) if key in document else 1,
                         "'pipeline' must be a mapping of step names to steps")
            node = {}
        if (self.drone and self.era == "0.5" and isinstance(node.get("clone"), dict)
                and "commands" not in node["clone"]):
            self.clone_step = node["clone"]  # Drone 0.5's clone step: see _clone
            self.problems.warn(_line_of(node, "clone"), "step 'clone' is Drone 0.5's clone: "
                                                        "its settings apply to cirunner's "
                                                        "checkout, its image is not run")
        steps = [step for name, body in node.items() if body is not self.clone_step
                 if (step := self._step(name, body, _line_of(node, name))) is not None]
        if drone04:
            for section in _DRONE_04_SECTIONS:
                steps += self._plugin_section(document, section)
        return steps

    def _plugin_section(self, document, section):
        """Drone 0.4's publish, deploy and notify: plugin steps after the build."""
        node = document.get(section)
        if node is None:
            return []
        if not isinstance(node, dict):
            self.add(_line_of(document, section), f"'{section}' must map plugin names to "
                                                  "settings")
            return []
        steps = []
        for key, body in node.items():
            name = re.sub(r" \(line [0-9]+\)\Z", "", key)  # a repeated key (both run)
            body = body if body is not None else _YamlMap(_line_of(node, key))
            if isinstance(body, dict) and "image" not in body:
                body = _YamlMap(body.line) if not body else body
                body["image"] = f"plugins/drone-{name}"
            step = self._step(f"{section}-{name}", body, _line_of(node, key))
            if step is not None:
                if section == "notify" and "status" not in step.when:
                    step.when["status"] = [[SUCCESS, FAILURE], []]
                if section == "notify" and not (isinstance(body, dict) and isinstance(
                        body.get("when"), dict) and "event" in body["when"]):
                    step.when.pop("event", None)  # 0.4 notified of pull requests too
                steps.append(step)
        return steps

    def _services(self, document, key):
        node = document.get(key)
        if node is None:
            return []
        if not isinstance(node, dict):
            self.add(_line_of(document, key), f"'{key}' must map service names to services")
            return []
        services = []
        for name, body in node.items():
            service = self._step(name, body, _line_of(node, name), service=True)
            if service is not None:
                services.append(service)
        return services

    def _step_kind(self, name, body, where, line, service):
        """(kind, image) of a step: a service, a plugin (an image and no
        commands) or a step with commands."""
        commands = body.get("commands")
        image = body.get("image", "")
        if commands == [] and image and self.era in _READ_AS_STEPS:
            commands = None  # Drone 1.x, Woodpecker: no commands, the image's own (a plugin)
        if not image and commands is None and not service and self.drone and self.era == "0.5":
            image = str(name)
            self.problems.warn(line, f"{where} has no image: Drone 0.5 ran the image named "
                                     "after the step, and so does cirunner")
        return ("service" if service else "plugin" if image and commands is None
                else "step"), image

    def _step(self, name, body, line, *, service=False):
        where = f"{'service' if service else 'step'} {name!r}"
        if not isinstance(body, dict):
            self.add(line, f"{where} must be a mapping")
            return None
        kind, image = self._step_kind(name, body, where, line, service)
        step = Step(name=str(body.get("name") or name), commands=[], kind=kind)
        settings, unknown = {}, []
        for key, value in body.items():
            key_line = _line_of(body, key)
            if key == "settings" and self.era in _READ_AS_STEPS:
                continue  # the plugin's settings (below)
            if key in _RESOURCE_KEYS and self.era == "1":  # the runner applies them; none here
                self.problems.warn(key_line, f"{where}: {key!r} is not applied: "
                                             f"{_UNSUPPORTED_STEP_KEYS[key]}")
            elif key in _UNSUPPORTED_STEP_KEYS:
                self.add(key_line, f"{where}: {key!r} is a Drone key this server does not "
                                   f"support: {_UNSUPPORTED_STEP_KEYS[key]}")
            elif key in _STEP_KEYWORDS:
                self._step_key(step, key, value, where, key_line)
            elif (key, self.era) in (("directory", "woodpecker"), ("temp_volumes", "1")):
                # Woodpecker's step directory; Drone 1.x's temp volumes (see _Drone1)
                setattr(step, key, self._directory(value, where, key_line) if key == "directory"
                        else self._string_list(value, f"{where}: volumes", key_line))
            elif kind == "plugin":
                settings[key] = value
            elif not (service and key in _SERVICE_IGNORED):
                unknown.append(key)
                close = _close_matches(str(key), _STEP_KEYWORDS, n=1)
                hint = (f"did you mean {close[0]!r}?" if close else
                        f"a step with commands takes {', '.join(_STEP_KEYWORDS)}; settings "
                        "belong to plugin steps, which have an image and no commands")
                if self.era == "0.8" and not service:  # 0.8's linter refused it
                    self.add(key_line, f"{where}: unknown key {key!r}: Drone 0.8 refused "
                                       f"settings beside commands ({hint})")
                else:
                    self.unknown(key_line, f"{where}: unknown key {key!r} ({hint})")
        if self.era in _READ_AS_STEPS and isinstance(body.get("settings"), dict):
            settings.update(body["settings"])  # Drone 1.x, Woodpecker: settings of their own
        step.settings = _plain(settings)
        if kind == "plugin" and "image" not in body:  # 0.5: the step's name (see above)
            step.image = image
        # A plugin skips pull requests unless its when.event says otherwise: 0.4's
        # and 0.5's rule, not 0.8's; 0.5 took a step with settings beside its
        # commands for a plugin too.
        taken_for_plugin = kind == "step" and unknown and self.drone and self.era == "0.5"
        if taken_for_plugin:
            self.problems.warn(line, f"{where}: with settings beside its commands, Drone 0.5 "
                                     "took it for a plugin, which skips pull requests unless "
                                     "its when.event says otherwise; so does cirunner")
        if ((kind == "plugin" or taken_for_plugin) and "event" not in step.when
                and self.era not in _RULES_08):
            step.when["event"] = [[], [EVENT_PULL_REQUEST]]
        self._check_step(step, body, where, line, unknown)
        return step

    def _check_woodpecker_settings(self, body, where, line):
        """Woodpecker's linter: settings are a plugin's, never beside commands
        or an entrypoint (an error), nor beside environment (a warning)."""
        if self.era != "woodpecker" or not body.get("settings"):
            return
        for key in ("commands", "entrypoint"):
            if body.get(key):
                self.add(line, f"{where}: cannot configure both {key} and settings")
        if body.get("environment"):
            self.problems.warn(line, f"{where}: should not configure both environment and "
                                     "settings")

    def _check_step(self, step, body, where, line, unknown):
        self._check_woodpecker_settings(body, where, line)
        misspelt = _close_matches("commands", [str(key) for key in unknown], n=1)
        if step.kind == "step" and not step.commands and not (misspelt and not self.drone):
            self.add(_line_of(body, "commands") if "commands" in body else line,
                     f"{where}: 'commands' must be a list of strings (" + (
                         f"is {misspelt[0]!r} a misspelling?)" if misspelt
                         else "a plugin step needs an image)"))
        if step.kind == "service" and not step.image:
            self.add(line, f"{where}: a service needs an image")
        overridden = [key for key in ("entrypoint", "command") if getattr(step, key)]
        if self.drone and self.era != "1" and step.kind != "service" and not step.detach \
                and overridden:
            # Drone 0.5 (transform.CheckEntrypoint) and 0.8 (its linter) refused it
            self.add(_line_of(body, overridden[0]),
                     f"{where}: Drone refused {overridden[0]!r} on a pipeline step (only "
                     "services and detached steps may set it); use commands")
        if len(step.script().encode()) > MAX_SCRIPT_BYTES:
            self.add(line, f"{where}: commands longer than {MAX_SCRIPT_BYTES} bytes")
        for text in self._strings_of(step):
            try:
                substitute(text, _AnyValue(), dollars=self.drone and self.era != "0.4")
            except ConfigError as exc:
                self.add(line, f"{where}: {exc.message}")

    @staticmethod
    def _strings_of(step):
        """The strings substituted outside shell text (where a bad form is an error)."""
        strings = [step.image, step.working_dir, step.directory, *step.environment.values(),
                   *step.entrypoint, *step.command]
        _map_strings(step.settings, lambda text: strings.append(text) or text)
        return [text for text in strings if "${" in text]

    def _step_key(self, step, key, value, where, line):
        handler = {
            "commands": self._commands, "environment": self._environment,
            "when": self._when, "secrets": self._secrets, "failure": self._failure,
            "labels": lambda value, where, line: self._string_map(value, f"{where}: 'labels'",
                                                                  line),
        }.get(key)
        if handler is not None:
            setattr(step, "ignore_failure" if key == "failure" else key,
                    handler(value, where, line))
        elif key in ("pull", "detach", "privileged"):
            if not isinstance(value, bool):
                self.add(line, f"{where}: '{key}' must be true or false")
            setattr(step, key, value is True)
        elif key in ("volumes", "devices", "dns", "dns_search", "extra_hosts", "entrypoint",
                     "command"):
            setattr(step, key, self._string_list(value, f"{where}: '{key}'", line,
                                                 split=key in ("entrypoint", "command")))
        elif key == "name":
            if not isinstance(value, str) or not value:
                self.add(line, f"{where}: 'name' must be a string")
        else:  # image, network_mode, shm_size, working_dir, group
            if key == "shm_size":
                value = _bytes_of_size(value)
            if not isinstance(value, str):
                self.add(line, f"{where}: '{key}' must be a string")
                value = ""
            setattr(step, key, value)

    def _directory(self, value, where, line):
        """Woodpecker's step `directory`: a path in the workspace (absolute:
        a container's own path, as Woodpecker takes it)."""
        if not isinstance(value, str) or "\x00" in value:
            self.add(line, f"{where}: 'directory' must be a string")
            return ""
        if ".." in posixpath.normpath(value).split("/"):
            self.add(line, f"{where}: 'directory' {value!r} leaves the workspace")
            return ""
        return value

    def _commands(self, value, where, line):
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.add(line, f"{where}: 'commands' must be a list of strings")
            return []
        return list(value)

    def _failure(self, value, where, line):
        if value not in ("", "ignore", "fail"):
            self.add(line, f"{where}: 'failure' must be 'ignore' (or 'fail')")
        return value == "ignore"

    def _environment(self, value, where, line):
        """Environment as a mapping, or Drone's list of NAME=value strings."""
        where = f"{where}: 'environment'"
        if isinstance(value, list):
            pairs = {}
            for item in value:
                if not isinstance(item, str) or "=" not in item:
                    self.add(line, f"{where} items must be NAME=value")
                    continue
                name, _, text = item.partition("=")
                pairs[name] = text
            value = pairs
        if not isinstance(value, dict):
            self.add(line, f"{where} must be a mapping of NAME: value")
            return {}
        if self.woodpecker:  # a list or a mapping is its text, as a setting's
            value = {name: _setting_variable(_plain(text)) if isinstance(text, list) or (
                isinstance(text, dict) and "from_secret" not in text) else text
                for name, text in value.items()}
        for name, text in value.items():
            if not _ENV_NAME_PATTERN.match(str(name)):
                self.add(_line_of(value, name) or line, f"{where}: invalid variable name "
                                                        f"{name!r}")
            elif not isinstance(text, str):
                self.add(_line_of(value, name) or line, f"{where}: {name} must be a string")
        return {str(name): text for name, text in value.items() if isinstance(text, str)}

    def _secrets(self, value, where, line):
        """Drone 0.8's step secrets: names, or {source, target} pairs."""
        if not isinstance(value, list):
            self.add(line, f"{where}: 'secrets' must be a list of names or of "
                           "{source, target}")
            return None
        pairs = []
        for item in value:
            if isinstance(item, str):
                pairs.append([item, item])
            elif (isinstance(item, dict) and set(item) <= {"source", "target"}
                  and isinstance(item.get("source"), str)):
                pairs.append([item["source"], str(item.get("target") or item["source"])])
            else:
                self.add(line, f"{where}: each of 'secrets' is a name or {{source, target}}")
        for _, target in pairs:
            if not _ENV_NAME_PATTERN.match(target):
                self.add(line, f"{where}: secret target {target!r} is not a variable name")
        return pairs

    def _string_list(self, value, where, line, *, split=False):
        if isinstance(value, str):
            return shlex.split(value) if split else [value]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [str(value)]
        if not isinstance(value, list) or not all(
                isinstance(item, (str, int, float)) and not isinstance(item, bool)
                for item in value):
            self.add(line, f"{where} must be a string or a list of strings")
            return []
        return [str(item) for item in value]

    def _string_map(self, value, where, line):
        if isinstance(value, list):
            value = dict(item.partition("=")[::2] for item in value if isinstance(item, str))
        if not isinstance(value, dict):
            self.add(line, f"{where} must be a mapping of strings")
            return {}
        return {str(key): _setting_text(item) for key, item in value.items()}

    # -- when ---------------------------------------------------------------------

    def _when(self, when, where, line):
        if when is None:  # `when:` with nothing under it: no condition, as Drone read it
            return {}
        if not isinstance(when, dict):
            self.add(line, f"{where}: 'when' must be a mapping")
            return {}
        parsed = {}
        for key, value in when.items():
            key_line = _line_of(when, key)
            if key == "any" and isinstance(value, list) and self.woodpecker:
                parsed["any"] = [self._when(one, where, key_line) for one in value]
            elif key not in _WHEN_KEYS:
                self.add(key_line, f"{where}: unknown 'when' key {key!r} (expected one of "
                                   f"{', '.join(_WHEN_KEYS)})")
            else:
                self._when_key(parsed, key, value, where, key_line)
        if self.era == "woodpecker":
            self._woodpecker_when(parsed)
        if self.era in _RULES_08 and {"changed", "change"}.intersection(
                *parsed.get("status", [[]])[:1]):
            # Drone 0.8 compares the word with "success" and "failure" only.
            self.problems.warn(_line_of(when, "status"), f"{where}: when.status 'changed' is "
                               "Drone 0.5's; Drone 0.8 matched it with no status, and so "
                               "does cirunner for this 0.8 file")
        return parsed

    def _when_key(self, parsed, key, value, where, line):
        """One known key of a `when` into `parsed`."""
        if key == "matrix":
            parsed["matrix"] = self._when_matrix(value, where, line) + (
                [True] if self.era == "woodpecker" else [])
        elif key == "local":
            if not isinstance(value, bool) and value is not None:
                self.add(line, f"{where}: when.local must be true or false")
            parsed["local"] = value is not False
        elif key in ("success", "failure", "change"):
            self._when_04(parsed, key, value, where, line)
        elif key == "paths":
            parsed["paths"] = self._paths(value, f"{where}: when.paths", line)
        elif key == "evaluate":
            self._evaluate(parsed, value, where, line)
        else:
            parsed[key] = list(self._constraint(value, f"{where}: when.{key}", line))
            self._check_words(parsed[key], key, where, line)
            if self.era == "woodpecker" and key == "event":
                parsed[key].append("exact")  # Woodpecker's events: a list, no glob
            elif self.era in ("1", "woodpecker"):
                parsed[key].append(True)  # Drone 1.x's and Woodpecker's globs: doublestar

    def _evaluate(self, parsed, value, where, line):
        """Woodpecker's `evaluate`: an expression kept if it can be read here,
        else a warning (it then matches every build). Woodpecker's envsubst
        pass over the file first makes ``\\\\`` ``\\`` and ``\\/`` ``/``."""
        value = re.sub(r"\\([\\/])", r"\1", str(value))
        try:
            _Expression(value)
        except ValueError as exc:
            self.problems.warn(line, f"{where}: when.evaluate {value!r} cannot be read here "
                                     f"({exc}): it matches every build")
            return
        parsed["evaluate"] = value

    @staticmethod
    def _woodpecker_when(parsed):
        """Woodpecker leaves a branch condition out for a tag, and looks at a
        cron condition for cron builds only."""
        if "branch" in parsed:
            parsed["branch_on_tags"] = False
        if "cron" in parsed:
            parsed["cron_on_cron_only"] = True

    def _paths(self, value, where, line):
        """A `paths` condition: {include, exclude, rule} from a glob, a list
        or {include, exclude} (Woodpecker's also ignore_message, on_empty);
        see _paths_match."""
        woodpecker = self.era == "woodpecker"
        extra = {"ignore_message", "on_empty"} if woodpecker else set()
        options = value if isinstance(value, dict) else {}
        for key in set(options) - {"include", "exclude"} - extra:
            self.add(line, f"{where}: unknown key {key!r} (expected include, exclude"
                           f"{', ignore_message, on_empty' if woodpecker else ''})")
        plain = {key: item for key, item in options.items() if key in ("include", "exclude")}
        include, exclude = self._constraint(plain if isinstance(value, dict) else value,
                                            where, line)
        out = {"include": include, "exclude": exclude,
               "rule": "woodpecker" if woodpecker else "drone"}
        if "on_empty" in options:
            if not isinstance(options["on_empty"], bool):
                self.add(line, f"{where}.on_empty must be true or false")
            out["on_empty"] = options["on_empty"] is not False
        if options.get("ignore_message") is not None:
            out["ignore_message"] = str(options["ignore_message"])
        return out

    def _when_04(self, parsed, key, value, where, line):
        """Drone 0.4's ``success: false``, ``failure: true``, ``change: true``
        (the status differs from the last build's): a status constraint."""
        if not isinstance(value, bool):
            self.add(line, f"{where}: when.{key} must be true or false")
            return
        key = "changed" if key == "change" else key
        include = parsed.setdefault("status", [[SUCCESS], []])[0]
        if value and key not in include:
            include.append(key)
        elif not value and key in include:
            include.remove(key)

    def _check_words(self, constraint, key, where, line):
        words = {"event": _EVENT_WORDS, "status": _STATUS_WORDS}.get(key)
        if words is None:
            return
        exact = key == "event" and self.era == "woodpecker"  # no glob there
        for pattern in constraint[0] + constraint[1]:
            if pattern not in words if exact else not any(_path_match(pattern, word)
                                                          for word in words):
                message = f"{where}: when.{key} {pattern!r} matches none of {', '.join(words)}"
                if self.drone or self.woodpecker:  # accepted there, matching nothing
                    self.problems.warn(line, message)
                else:
                    self.add(line, message)

    def _constraint(self, value, where, line):
        """([include], [exclude]) from a glob, a list, or {include, exclude}."""
        if value is None or value == "":
            return [], []
        if isinstance(value, dict):
            if set(value) - {"include", "exclude"}:
                self.add(line, f"{where} takes include and exclude")
            return (self._string_list(value.get("include") or [], where, line),
                    self._string_list(value.get("exclude") or [], where, line))
        return self._string_list(value, where, line), []

    def _when_matrix(self, value, where, line):
        """[include, exclude] mappings from {AXIS: value} or {include, exclude}."""
        if value is None or value == "":
            return [{}, {}]
        if not isinstance(value, dict):
            self.add(line, f"{where}: 'when.matrix' must be a mapping")
            return [{}, {}]
        if set(value) <= {"include", "exclude"} and all(isinstance(part, dict) or part is None
                                                        for part in value.values()):
            return [self._string_map(value.get("include") or {}, where, line),
                    self._string_map(value.get("exclude") or {}, where, line)]
        return [self._string_map(value, where, line), {}]


def parse_pipeline(text, filename=PIPELINE_FILES[0], *, max_jobs=DEFAULT_MAX_JOBS):
    """Parse and validate pipeline `text` (YAML) into a `Pipeline`.

    Drone's 0.4, 0.5, 0.8 and 1.x forms are read as Drone reads them, a
    Woodpecker workflow as Woodpecker does. Raises
    ConfigError naming `filename` and every problem with its line.
    """
    if filename == WOODPECKER_FOLDER:  # several workflows: JSON of {filename: text}
        return _parse_workflows(json.loads(text), max_jobs)
    return _PipelineParser(filename, max_jobs).parse(text)


def _parse_workflows(texts, max_jobs):
    """A .woodpecker/ folder's workflows, each file parsed as Woodpecker
    parses it, as one Pipeline of several; a ConfigError names every
    problem of every file."""
    workflows, problems, warnings = [], [], []
    for filename, text in sorted(texts.items()):
        try:
            workflow = _PipelineParser(filename, max_jobs, one_of_several=True).parse(text)
        except ConfigError as exc:
            problems += [(None, f"{filename}{f' line {line}' if line else ''}: {problem}")
                         for line, problem in exc.problems]
            continue
        workflows.append(workflow)
        warnings += workflow.warnings
    if not problems:  # a file that failed would make the graph's problems wrong
        problems += [(None, problem) for problem in _pipeline_graph_problems(workflows)]
    if problems:
        raise ConfigError.from_problems(None, problems)
    return Pipeline(steps=[], matrix=[{}], filename=WOODPECKER_FOLDER, era="woodpecker",
                    pipelines=workflows, warnings=warnings)


def expand_matrix(matrix, *, max_jobs=DEFAULT_MAX_JOBS, filename=None, line=None):
    """Expand a matrix mapping into a list of job environments (dicts of str).

    Axes are sorted by name and combined as their cartesian product (the first
    axis varies slowest); ``exclude`` drops matching combinations; a non-empty
    ``include`` is the list of jobs (Drone's rule), the axes then unused. An
    empty matrix is one job with no axes. More than `max_jobs` jobs is a
    ConfigError, never a silent cut.
    """
    if matrix is None or matrix == "":
        return [{}]
    if not isinstance(matrix, dict):
        raise ConfigError("'matrix' must be a mapping of axis names to lists", filename, line)
    include = _matrix_entries(matrix, "include", filename)
    exclude = _matrix_entries(matrix, "exclude", filename)
    if not matrix:
        return [{}]
    if include:
        jobs = [entry for entry in include
                if not any(all(entry.get(k) == v for k, v in rule.items()) for rule in exclude)]
    else:
        jobs = _axis_product(_matrix_axes(matrix, filename), exclude, max_jobs, filename, line)
    if len(jobs) > max_jobs:
        raise ConfigError(f"matrix expands to {len(jobs)} jobs, more than the limit of "
                          f"{max_jobs}", filename, line)
    if not jobs:
        raise ConfigError("matrix expands to no jobs", filename, line)
    return jobs


_AXIS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def _matrix_axes(matrix, filename):
    axes = {}
    for name, values in matrix.items():
        if name in ("include", "exclude"):
            continue
        where = _line_of(matrix, name)
        if not _AXIS_NAME.match(str(name)):
            raise ConfigError(f"matrix axis {name!r} is not a valid name", filename, where)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"matrix axis {name!r} must be a non-empty list", filename, where)
        if not all(isinstance(value, str) for value in values):
            raise ConfigError(f"matrix axis {name!r} must list plain values", filename, where)
        axes[name] = values
    return axes


def _axis_product(axes, exclude, max_jobs, filename, line):
    """The combinations of the axes, sorted by name, less the excluded ones."""
    names = sorted(axes)
    if not names:
        return []
    size = 1
    for name in names:
        size *= len(axes[name])
    # With exclusions a product may be cut down to the limit; without, never.
    if size > max_jobs * 64 or (size > max_jobs and not exclude):
        raise ConfigError(f"matrix expands to {size} jobs, more than the limit of "
                          f"{max_jobs}", filename, line)
    jobs = []
    for combination in itertools.product(*(axes[name] for name in names)):
        environment = dict(zip(names, combination))
        if not any(all(environment.get(k) == v for k, v in rule.items()) for rule in exclude):
            jobs.append(environment)
    return jobs


def _matrix_entries(matrix, key, filename):
    entries = matrix.get(key) or []
    where = _line_of(matrix, key)
    if not isinstance(entries, list):
        raise ConfigError(f"matrix '{key}' must be a list of mappings", filename, where)
    checked = []
    for entry in entries:
        if not isinstance(entry, dict) or not entry or not all(
                isinstance(value, str) and _AXIS_NAME.match(str(name))
                for name, value in entry.items()):
            raise ConfigError(f"matrix '{key}' entries must map axis names to values",
                              filename, where)
        checked.append(dict(entry))
    return checked


def _axis_text(environment):
    """A job's matrix axis as ``NAME=value NAME=value``."""
    return " ".join(f"{name}={value}" for name, value in environment.items())


def read_pipeline_file(directory, config_path=""):
    """Return (filename, text) of the pipeline file in a working `directory`.

    Looks for `config_path` if given, else `PIPELINE_FILES` in order, then a
    ``.woodpecker/`` folder's workflow.
    """
    names = (config_path,) if config_path else PIPELINE_FILES
    found = next((name for name in names if os.path.isfile(os.path.join(directory, name))),
                 None)

    def read(name):
        with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as handle:
            return handle.read()

    folder = os.path.join(directory, ".woodpecker")
    if found is None and config_path in ("", WOODPECKER_FOLDER) and os.path.isdir(folder):
        workflows = _woodpecker_folder(os.listdir(folder), read)
        if workflows is not None:
            return workflows
    if found is None:
        raise ConfigError(f"no pipeline file ({', '.join(names)}) in {directory}")
    return found, read(found)


def step_units(steps):
    """`steps` in the order they run: each alone, or a run of consecutive steps
    of one group at once (as lists)."""
    units = []
    for step in steps:
        if step.group and units and units[-1][0].group == step.group:
            units[-1].append(step)
        else:
            units.append([step])
    return units


def _condition_variables(repo, default_branch, event, branch, ref, deploy_to=""):
    """What a condition's ``${VAR}`` (or `evaluate`) may name before a job
    runs: Drone's and Woodpecker's variables of the repository and the build."""
    tag = ref[len("refs/tags/"):] if ref.startswith("refs/tags/") else ""
    values = {"REPO": repo, "BRANCH": branch, "COMMIT_BRANCH": branch, "COMMIT_REF": ref,
              "BUILD_EVENT": event, "TAG": tag}
    return {**{prefix + name: value for name, value in values.items()
               for prefix in ("CI_", "DRONE_")},
            "DRONE_REPO_BRANCH": default_branch, "CI_REPO_DEFAULT_BRANCH": default_branch,
            "CI_PIPELINE_EVENT": event, "CI_COMMIT_TAG": tag,
            **_woodpecker_build_variables(event, branch, ref, deploy_to)}


def _woodpecker_build_variables(event, branch, ref, deploy_to):
    """Woodpecker's variables of a pull request (its number, the branch it
    targets) and of a deployment (its target), set only where they apply
    (metadata/environment.go). A pull request's source branch is not kept."""
    variables = {}
    if event == EVENT_PULL_REQUEST:
        number = re.search(r"\d+", ref)
        variables.update(CI_COMMIT_TARGET_BRANCH=branch,
                         CI_COMMIT_PULL_REQUEST=number.group(0) if number else "")
    if deploy_to:
        variables["CI_PIPELINE_DEPLOY_TARGET"] = deploy_to
    return {name: value for name, value in variables.items() if value}


def plan_pipeline(pipeline, *, event, branch, ref="", repo="", deploy_to="",
                  previous_status=SUCCESS, default_branch="main", **change):
    """What a build of `pipeline` would run for `event` on `branch` (`ref`:
    default refs/heads/BRANCH, or refs/tags/BRANCH for a tag), without running
    it, as `cirunner plan --json` prints it: {"pipelines": [{"name",
    "depends_on", "runs", "jobs": [{"matrix", "steps": [{"name", "image",
    "depends_on", "runs"}], "services"}]}], "warnings"}. A pipeline runs if
    its branches filter lets the build be made; a step if its `when` matches,
    the steps before it having succeeded (`previous_status`: the previous
    build's, for `status: changed`). `change`: the files, message and cron
    that `paths` and `cron` conditions look at (see Step.applies);
    `default_branch` the repository's, for ``${CI_REPO_DEFAULT_BRANCH}``."""
    if event not in EVENTS:
        raise BadRequest(f"event must be one of {', '.join(EVENTS)}")
    ref = ref or (f"refs/tags/{branch}" if event == EVENT_TAG else f"refs/heads/{branch}")
    change.setdefault("variables", _condition_variables(repo, default_branch, event, branch, ref,
                                                        deploy_to))
    running = running_pipelines(pipeline, event=event, branch=branch, ref=ref, repo=repo,
                                deploy_to=deploy_to, **change)
    return {"pipelines": [{
        "name": one.name, "depends_on": list(one.depends_on), "runs": one.name in running,
        "jobs": _planned_jobs(one, event=event, branch=branch, ref=ref, repo=repo,
                              deploy_to=deploy_to, previous_status=previous_status, **change)}
        for one in pipeline.each()], "warnings": list(pipeline.warnings)}


def running_pipelines(pipeline, *, event, branch, ref, repo="", deploy_to="", **change):
    """{name: the names it runs after} of the file's pipelines that a build
    for `event` on `branch` runs: those its branches filter and trigger let
    be made; one that depends on a pipeline that does not run runs after
    that one's own dependencies (Drone's rewiring), or, in Woodpecker, does
    not run either."""
    needs = {one.name: list(one.depends_on) for one in pipeline.each()}
    runs = {one.name: (event not in _FILTERED_EVENTS or one.builds_branch(branch))
            and one.triggered(event=event, branch=one.when_branch(event, branch, ref), ref=ref,
                              repo=repo, deploy_to=deploy_to, **change)
            for one in pipeline.each()}
    if pipeline.era == "woodpecker":
        while any(runs[name] and not all(runs.get(need) for need in needs[name])
                  for name in needs):
            runs = {name: runs[name] and all(runs.get(need) for need in needs[name])
                    for name in needs}
        return {name: needs[name] for name in needs if runs[name]}

    def rewired(name, seen):
        found = []
        for need in needs.get(name, ()):
            if need not in seen:
                found += [need] if runs.get(need) else rewired(need, seen | {need})
        return list(dict.fromkeys(found))

    return {name: rewired(name, {name}) for name in needs if runs[name]}


def _matrix_image(image, axis):
    """A step's image as a job of matrix `axis` pulls it: each plain
    ``${NAME}`` of an axis replaced; any other expression (a variable the build
    sets, a default, a check) left as written."""
    return re.sub(r"\$\{(\w+)\}", lambda found: axis.get(found.group(1), found.group(0)),
                  image)


def _planned_jobs(pipeline, *, event, branch, ref, repo, deploy_to, previous_status, **change):
    jobs = []
    for axis in pipeline.matrix:
        when = {"branch": pipeline.when_branch(event, branch, ref), "event": event,
                "environment": axis, "ref": ref, "repo": repo, "deploy_to": deploy_to,
                **change}
        steps = [pipeline.status_resolved(step, previous_status) for step in pipeline.steps]
        jobs.append({
            "matrix": dict(axis),
            "steps": [{"name": step.name, "image": _matrix_image(step.image, axis) or None,
                       "depends_on": list(step.depends_on),
                       "runs": step.applies(job_status=SUCCESS, **when)} for step in steps],
            # Drone 0.8 starts a service only where its `when` matches (the executor's rule)
            "services": [service.name for service in pipeline.services if
                         pipeline.era not in _RULES_08 or service.applies(job_status=None,
                                                                           **when)]})
    return jobs


###############################################################################
# Sealing and signing #########################################################
###############################################################################


class _Sealer:
    """Seals secret values for the store with a key kept beside it.

    The key lives in ``DATA/secret.key`` (64 hex digits, mode 0600), not in the
    database: a copy of the database alone does not open the secrets. It is
    made once, atomically: written to a temporary file, flushed to disk, then
    linked into place, so no process ever reads a partial key. Values are
    sealed with AES-256-GCM (the `cryptography` package) under a key derived
    from it, with what the value belongs to as associated data: a sealed
    value copied to another row, or another field, does not open.
    """

    PREFIX = "v2:"

    def __init__(self, key_path):
        self.key_path = key_path
        self._key = None
        self._aead = None
        self._lock = threading.Lock()

    @property
    def key(self):
        """The master key, read (or made) once."""
        with self._lock:
            if self._key is None:
                if not os.path.exists(self.key_path):
                    self._create_key()
                self._key = self._read_key()
            return self._key

    def _create_key(self):
        directory = os.path.dirname(os.path.abspath(self.key_path))
        descriptor, temporary = tempfile.mkstemp(prefix=".secret.key.", dir=directory)
        try:
            with os.fdopen(descriptor, "w") as handle:  # mkstemp's mode is 0600
                handle.write(secrets.token_hex(32) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):  # another process made one first
                os.link(temporary, self.key_path)
            _fsync_directory(directory)
        finally:
            os.unlink(temporary)

    def _read_key(self):
        with open(self.key_path, "rb") as handle:
            text = handle.read()
        try:
            key = bytes.fromhex(text.decode("ascii").strip())
        except ValueError:
            key = b""
        if len(key) != 32:
            raise CIRunnerError(
                f"{self.key_path} is not a key ({len(text)} bytes; a key is 64 hex digits): "
                "restore it from a backup, or, if no secrets were ever stored, remove it and "
                "a new one is made")
        return key

    def derive(self, purpose):
        """A key for one purpose (sessions, CSRF...), derived from the master key."""
        return hmac.new(self.key, purpose.encode(), hashlib.sha256).digest()

    def _cipher(self):
        if self._aead is None:
            aead = _optional("cryptography.hazmat.primitives.ciphers.aead", "sealing secrets",
                             "cryptography")
            self._aead = aead.AESGCM(self.derive("seal with AES-GCM"))
        return self._aead

    def seal(self, text, context):
        """`text` encrypted and authenticated for `context` (what it belongs
        to, e.g. ``secret 4 TOKEN``), as text for a database column."""
        nonce = secrets.token_bytes(12)
        sealed = self._cipher().encrypt(nonce, text.encode(), context.encode())
        return self.PREFIX + base64.b64encode(nonce + sealed).decode()

    def unseal(self, sealed, context):
        """The text `seal` made for `context`; CIRunnerError if it was changed,
        belongs elsewhere or the key differs."""
        if not sealed:
            return ""
        try:
            raw = base64.b64decode(sealed.removeprefix(self.PREFIX), validate=True)
            if not sealed.startswith(self.PREFIX) or len(raw) < 12 + 16:
                raise ValueError(sealed[:3])
            return self._cipher().decrypt(raw[:12], raw[12:], context.encode()).decode()
        except (ValueError, _optional("cryptography.exceptions", "sealing secrets",
                                      "cryptography").InvalidTag):
            raise CIRunnerError(f"the sealed value of {context} does not open with "
                                f"{self.key_path}: it was changed, copied from elsewhere, or "
                                "sealed with another key") from None

    def unseal_v1(self, sealed):
        """A value sealed before AES-GCM (HMAC-SHA256 in counter mode, then
        HMAC): read once, by the migration that seals it again."""
        raw = bytes.fromhex(sealed[3:])
        body, tag = raw[:-32], raw[-32:]
        expected = hmac.new(self.derive("authenticate"), body, hashlib.sha256).digest()
        if not sealed.startswith("v1:") or not hmac.compare_digest(tag, expected):
            raise CIRunnerError("a stored secret does not match the secret key file")
        key, nonce, data, out = self.derive("encrypt"), body[:16], body[16:], bytearray()
        for counter in range(0, len(data), 32):
            block = hmac.new(key, nonce + counter.to_bytes(8, "big"), hashlib.sha256).digest()
            out += bytes(a ^ b for a, b in zip(data[counter:counter + 32], block))
        return bytes(out).decode()


def _make_private(path, *, create=False):
    """Give the file `path` mode 0600 (making it empty first if `create`)."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    try:
        descriptor = os.open(path, flags, 0o600)
    except FileNotFoundError:
        return
    try:
        os.fchmod(descriptor, 0o600)
    finally:
        os.close(descriptor)


def _fsync_directory(path):
    """Make a new name in `path` durable (a rename or link is not, until then)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class _Signer:
    """Signs short texts (web sessions, CSRF tokens) so that they cannot be
    forged or kept past their expiry: ``text:expires:HMAC``."""

    def __init__(self, key):
        self._key = key

    def _digest(self, payload):
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()

    def sign(self, text, seconds):
        """`text` signed, valid for `seconds` from now."""
        payload = f"{text}:{int(time.time() + seconds)}"
        return f"{payload}:{self._digest(payload)}"

    def verify(self, value):
        """The text of a valid, unexpired signed `value`, else None."""
        if not isinstance(value, str):
            return None
        payload, _, digest = value.rpartition(":")
        text, _, expires = payload.rpartition(":")
        if not (digest and expires.isdigit()) or not hmac.compare_digest(
                digest, self._digest(payload)):
            return None
        return text if int(expires) > time.time() else None

###############################################################################
# Git #########################################################################
###############################################################################

_REMOTE_SCHEMES = ("https://", "http://", "ssh://", "git://")
_SCP_LIKE_URL = re.compile(r"^[\w.-]+@[\w.-]+:")  # git@host:path
_AUTHOR_PATTERN = re.compile(rb"^author (.*) <(.*)> (\d+) [+-]\d{4}$", re.MULTILINE)
_PULL_REF_PREFIXES = ("refs/pull/", "refs/merge-requests/")

# What a host process may keep of the server's environment: the settings of
# the tool itself, which the operator made. Nothing else of the server's, and
# never a pipeline's, reaches bwrap, git or an engine.
_HOST_KEEPS = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "HOME", "USER",
               "LOGNAME", "TMPDIR")
_GIT_KEEPS = _HOST_KEEPS + ("SSH_AUTH_SOCK", "GIT_SSH_COMMAND", "GIT_SSH", "GIT_SSL_CAINFO",
                            "SSL_CERT_FILE", "SSL_CERT_DIR", "http_proxy", "https_proxy",
                            "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
def _host_environment(environ, keep):
    """The names of `keep` from the server's `environ`, with PATH less the
    virtual environment cirunner runs in (a job's `pip install` must not
    write into it, nor its tools shadow the system's)."""
    environment = {name: environ[name] for name in keep if name in environ}
    if sys.prefix != sys.base_prefix and "PATH" in environment:
        own = os.path.realpath(os.path.join(sys.prefix, "bin"))
        environment["PATH"] = os.pathsep.join(
            part for part in environment["PATH"].split(os.pathsep)
            if part and os.path.realpath(part) != own)
    environment.setdefault("PATH", os.defpath)
    return environment


def normalize_repo_url(url):
    """Return the clone URL to store: a URL as given, a local path made absolute.

    Raises BadRequest for a URL git could take as an option. Whether a local
    path exists, and may be used, is the store's to check (`Store.check_repo_url`).
    """
    if (not isinstance(url, str) or not url.strip() or url.startswith("-")
            or any(char in url for char in "\x00\r\n")):
        raise BadRequest(f"invalid repository URL {_redact_url(url)!r}")
    if is_remote_url(url) or url.startswith("file://"):
        return url
    return os.path.abspath(os.path.expanduser(url))


def is_remote_url(url):
    """Whether `url` names a repository on another machine: https://, http://,
    ssh://, git:// or git@host:path (not a local path or a file:// URL)."""
    return url.startswith(_REMOTE_SCHEMES) or bool(_SCP_LIKE_URL.match(url))


def _local_repo_path(url):
    """The directory a local path or file:// URL names, symbolic links resolved."""
    return os.path.realpath(urlsplit(url).path if url.startswith("file://") else url)


def _redact_url(text):
    """`text` with the credentials of any URL in it shown as ``***``:
    ``https://user:TOKEN@host/x.git`` becomes ``https://***@host/x.git``."""
    if not isinstance(text, str) or "@" not in text:
        return text
    return re.sub(r"\b([a-z][a-z0-9+.-]*://)([^/@\s]+)@",
                  lambda match: match.group(1) + (
                      match.group(2) if match.group(1) in ("ssh://", "git+ssh://")
                      and ":" not in match.group(2) else "***") + "@", text)


def _pull_ref(ref):
    """`ref` if it names a pull or merge request's head (fetched by that name), else ""."""
    return ref if ref.startswith(_PULL_REF_PREFIXES) else ""


class _LRU:
    """A small mapping that forgets its least recently used entries past `size`."""

    def __init__(self, size):
        self.size = size
        self._entries = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            return None

    def put(self, key, value):
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


class _MirrorState:
    """One mirror's fetches: callers that need a fresh fetch share the next one."""

    def __init__(self):
        self.changed = threading.Condition()
        self.started = 0      # fetches begun
        self.done = 0         # fetches ended
        self.running = False
        self.error = None     # the last fetch's error, if it failed
        self.heads = {}       # refs/heads/... and refs/tags/... -> commit, as of the last fetch


# What git lists as the paths a commit changes: against its first parent (a
# merge's), all its files for a root commit, NUL-separated.
_COMMIT_FILES = ("diff-tree", "-r", "--name-only", "-z", "--no-commit-id", "--root",
                 "--no-renames", "--diff-merges=first-parent")


class _GitMirrors:
    """Bare mirrors of the repositories (``DATA/mirrors/OWNER/NAME.git``) and
    what was read from them.

    Fetches of one mirror are shared: a caller that needs the remote's latest
    branches waits for the next fetch to start after it asked, so one `git
    fetch` serves every trigger queued behind it. A commit and its pipeline
    file never change, so what was read for a commit id is remembered.
    """

    def __init__(self, root, *, environ=None, cache_size=256, source=None, config=None):
        self.root = root
        # Only the operator's settings for git (never a pipeline's, nor the rest of
        # the server's); git never asks for a password, and speaks plain English.
        self.env = dict(_host_environment(os.environ if environ is None else environ,
                                          _GIT_KEEPS),
                        GIT_TERMINAL_PROMPT="0", LC_ALL="C", GIT_ASKPASS="/bin/true")
        # Settings of this process's own (an agent's token for its server's
        # URL): in the environment, not on command lines other users can see.
        first = int(self.env.get("GIT_CONFIG_COUNT") or 0)
        for number, (key, value) in enumerate((config or {}).items(), start=first):
            self.env[f"GIT_CONFIG_KEY_{number}"], self.env[f"GIT_CONFIG_VALUE_{number}"] = \
                key, value
            self.env["GIT_CONFIG_COUNT"] = str(number + 1)
        # Where a repository's mirror fetches from: its URL, or (an agent's)
        # the server's mirror of it.
        self.source = source or (lambda repo: repo["url"])
        self._commits = _LRU(cache_size)
        self._states = {}
        self._states_lock = threading.Lock()

    def run(self, args, *, cwd=None, timeout=600):
        """Run git with `args`; its output, or _GitError with what it printed."""
        try:
            result = subprocess.run(["git", *args], cwd=cwd, capture_output=True,
                                    timeout=timeout, env=self.env, check=False)
        except subprocess.TimeoutExpired:
            raise _GitError(f"git {args[0]} took longer than {timeout} s") from None
        except OSError as exc:
            raise _GitError(f"cannot run git: {exc}") from None
        if result.returncode != 0:
            message = result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}"
            command = next(arg for index, arg in enumerate(args)
                           if not arg.startswith("-") and args[index - 1] not in ("-c", "-C"))
            raise _GitError(_redact_url(f"git {command} failed: {message}"))
        return result.stdout

    def path(self, repo):
        """Where `repo`'s bare mirror lives."""
        return os.path.join(self.root, repo["owner"], repo["name"] + ".git")

    def _state(self, mirror):
        with self._states_lock:
            return self._states.setdefault(mirror, _MirrorState())

    def remove(self, repo):
        """Delete `repo`'s mirror (the repository was removed)."""
        mirror = self.path(repo)
        shutil.rmtree(mirror, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(mirror + ".lock")
        with self._states_lock:
            self._states.pop(mirror, None)

    # -- fetching -------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, mirror, timeout=MIRROR_LOCK_SECONDS):
        """Hold the mirror's lock file: one fetch at a time across processes
        too. A lock that cannot be opened, or that another process holds
        for `timeout` seconds, is a _GitError that names it."""
        lock = mirror + ".lock"
        try:
            os.makedirs(os.path.dirname(mirror), mode=0o700, exist_ok=True)
            handle = os.fdopen(os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600), "w")
        except OSError as exc:
            raise _GitError(f"cannot open the mirror's lock {lock}: {exc} (was it made by "
                            "another user? remove it, or run cirunner as the user that owns "
                            "the data directory)") from None
        with handle:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise _GitError(f"another process has held the mirror's lock {lock} "
                                        f"for {timeout:g} s") from None
                    time.sleep(0.05)
            yield

    def fetch(self, repo):
        """Bring the mirror up to date with the remote's branches and tags, in a
        fetch that starts after this call; returns {ref: commit} as of it."""
        mirror = self.path(repo)
        state = self._state(mirror)
        with state.changed:
            wanted = state.started + 1
            while state.done < wanted and state.running:
                state.changed.wait()
            leader = state.done < wanted
            if leader:
                state.started += 1
                state.running = True
        if leader:
            # Whatever ends the fetch (a lock file of another user, a full disk,
            # a bug) ends it for everyone waiting on it, and the next caller
            # fetches again: the mark is never left set.
            error, heads = _GitError("the fetch was interrupted"), {}
            try:
                heads = self._fetch(repo, mirror)
                error = None
            except _GitError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - named to every caller, never a hang
                error = _GitError(f"cannot update the mirror {mirror}: {exc}")
            finally:
                with state.changed:
                    state.done, state.running, state.error = state.started, False, error
                    if error is None:
                        state.heads = heads
                    state.changed.notify_all()
        with state.changed:
            if state.error is not None:
                raise state.error
            return dict(state.heads)

    def _fetch(self, repo, mirror):
        with self._locked(mirror):
            made = not os.path.isdir(os.path.join(mirror, "objects"))
            if made:
                # Files 0600 and directories 0700, whatever the umask; object
                # ids as the remote's (a SHA-256 repository: Forgejo, Gitea).
                self.run(["init", "--bare", "--quiet", "--shared=0600",
                          *self._object_format(repo), mirror])
            listing = b""
            try:
                self.run(["-C", mirror, "fetch", "--quiet", "--prune", "--force",
                          "--end-of-options", self.source(repo), "+refs/heads/*:refs/heads/*",
                          "+refs/tags/*:refs/tags/*"])
                listing = self.run(["-C", mirror, "for-each-ref",
                                    "--format=%(objectname) %(refname)", "refs/heads/",
                                    "refs/tags/"])
            finally:
                # A new mirror of a remote that was away or empty is not kept:
                # the next fetch makes it again, in the format the remote has then.
                if made and not listing:
                    shutil.rmtree(mirror, ignore_errors=True)
        return dict(reversed(line.split(" ", 1)) for line in listing.decode().splitlines())

    def _object_format(self, repo):
        """git init's option for a SHA-256 remote (its ids are 64 hex digits),
        else none: git fetches nothing across object formats. (A remote that
        cannot be listed: none, and the fetch says what is wrong.)"""
        try:
            listing = self.run(["ls-remote", "--end-of-options", self.source(repo)])
        except _GitError:
            return []
        first = listing.split(b"\t", 1)[0].strip()
        return ["--object-format=sha256"] if len(first) == 64 else []

    def fetch_commit(self, repo, commit, pull_ref=""):
        """Make sure `commit` is in the mirror: a commit on no branch (a pull
        request from a fork) is fetched by `pull_ref`, then by its id."""
        mirror = self.path(repo)
        if self.has_commit(mirror, commit):
            return
        self.fetch(repo)
        with self._locked(mirror):
            for ref in ([f"+{pull_ref}:{pull_ref}"] if pull_ref else []) + [commit]:
                if self.has_commit(mirror, commit):
                    return
                with contextlib.suppress(_GitError):
                    self.run(["-C", mirror, "fetch", "--quiet", "--force", "--end-of-options",
                              self.source(repo), ref])

    def has_commit(self, mirror, commit):
        if not os.path.isdir(mirror):
            return False
        try:
            self.run(["-C", mirror, "cat-file", "-e", "--end-of-options", commit + "^{commit}"])
        except _GitError:
            return False
        return True

    def remembered_default_branch(self, repo):
        """The default branch learned earlier, or "" (never asks the remote)."""
        with contextlib.suppress(OSError), open(os.path.join(
                self.path(repo), "cirunner-default-branch")) as handle:
            return handle.read().strip()
        return ""

    def known_branches(self, repo):
        """The branches the mirror has as of its last fetch (never asks the
        remote; none before the first build)."""
        mirror = self.path(repo)
        if not os.path.isdir(os.path.join(mirror, "refs")):
            return []
        with contextlib.suppress(_GitError):
            return self.run(["-C", mirror, "for-each-ref", "--format=%(refname:short)",
                             "--sort=-committerdate", "--count=200",
                             "refs/heads/"]).decode().split()
        return []

    def default_branch(self, repo):
        """The remote's default branch, learned once (from the remote's HEAD)
        and kept beside the mirror. Set a repository's branch explicitly to
        follow a changed default."""
        mirror = self.path(repo)
        remembered = os.path.join(mirror, "cirunner-default-branch")
        with contextlib.suppress(OSError), open(remembered) as handle:
            branch = handle.read().strip()
            if branch:
                return branch
        branch = ""
        with contextlib.suppress(_GitError):
            head = self.run(["ls-remote", "--symref", "--end-of-options", repo["url"],
                             "HEAD"]).decode()
            match = re.search(r"^ref: refs/heads/(\S+)\s+HEAD", head, re.MULTILINE)
            branch = match.group(1) if match else ""
        if not branch:
            branches = self.run(["-C", mirror, "for-each-ref", "--format=%(refname:short)",
                                 "refs/heads/"]).decode().split()
            branch = next((name for name in ("main", "master") if name in branches),
                          branches[0] if branches else "")
        if branch:
            with open(remembered, "w") as handle:
                handle.write(branch + "\n")
        return branch

    # -- reading commits ---------------------------------------------------------

    def changed_files(self, repo, commit, bases=()):
        """The paths `commit` changes (at most MAX_CHANGED_FILES, in git's
        order): since its merge base with the first of `bases` (a push's
        previous head, a pull request's target) that the mirror has, else
        against its first parent (a root commit: all its files)."""
        mirror = self.path(repo)
        base = next((base for base in bases if base and not _zero_sha(base)
                     and self.has_commit(mirror, base)), None)
        if base:
            args = ["diff", "--name-only", "-z", "--no-renames", "--end-of-options",
                    f"{base}...{commit}"]
        else:
            args = [*_COMMIT_FILES, "--end-of-options", commit]
        names = self.run(["-C", mirror, *args]).decode(errors="replace").split("\0")
        return [name for name in names if name][:MAX_CHANGED_FILES]


    def read_commit(self, repo, commit):
        """(commit fields, (filename, text) of its pipeline file or None) for a
        full commit id in the mirror, or None if the mirror lacks it."""
        mirror = self.path(repo)
        key = (mirror, repo["url"], commit, repo["config_path"])
        found = self._commits.get(key)
        if found is None and os.path.isdir(mirror):
            found = self._read_commit(mirror, commit, repo["config_path"])
            if found is not None:
                key = (mirror, repo["url"], found[0]["commit_sha"], repo["config_path"])
                self._commits.put(key, found)
        return None if found is None else (dict(found[0]), found[1])

    def _read_commit(self, mirror, revision, config_path):
        """Resolve `revision` and read its commit and pipeline file with one
        `git cat-file --batch` process, asked one object at a time."""
        process = subprocess.Popen(["git", "-C", mirror, "cat-file", "--batch"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, env=self.env)

        def ask(spec):
            """(sha, kind, data) of an object, or Nones."""
            process.stdin.write(spec.encode() + b"\n")
            process.stdin.flush()
            header = process.stdout.readline().split()
            if len(header) != 3 or header[1] not in (b"commit", b"blob", b"tree", b"tag"):
                return None, None, None
            data = process.stdout.read(int(header[2]))
            process.stdout.read(1)
            return header[0].decode(), header[1].decode(), data

        try:
            sha, _, raw = ask(f"{revision}^{{commit}}")
            if sha is None:
                return None
            fields = _commit_fields(sha, raw)
            def blob(filename):
                _, kind, text = ask(f"{sha}:{filename}")
                return (filename, text.decode("utf-8", errors="replace")) if kind == "blob" \
                    else None

            found = next(filter(None, map(blob, (config_path,) if config_path
                                          else PIPELINE_FILES)), None)
            if found is None and not config_path:  # then a Woodpecker folder's workflows
                _, kind, tree = ask(f"{sha}:.woodpecker")
                found = _woodpecker_folder(_tree_names(tree, len(sha) // 2) if kind == "tree"
                                           else [],
                                           lambda name: (blob(name) or (None, None))[1])
            return fields, found
        except (OSError, ValueError) as exc:
            raise _GitError(f"git cat-file failed: {exc}") from None
        finally:
            process.stdin.close()
            process.stdout.close()
            process.wait()

    # -- workspaces ------------------------------------------------------------

    def check_out(self, repo, commit, workspace, pull_ref="", *, group=None):
        """Check `commit` out into `workspace` with one git process: a .git that
        borrows the mirror's objects (what `clone --shared` makes), HEAD at the
        commit, then `read-tree -u`. A mirror that lacks the commit is fetched
        once and the checkout tried again. With `group`, the mirror's objects
        are shared with that group (steps that run as another user read them)."""
        mirror = self.path(repo)
        dot_git = os.path.join(workspace, ".git")
        for attempt in range(2):
            try:
                if attempt or not os.path.isdir(mirror):
                    self.fetch_commit(repo, commit, pull_ref)
                if group is not None:
                    self._share_objects(mirror, group)
                for folder in ("objects/info", "refs/heads", "refs/tags"):
                    os.makedirs(os.path.join(dot_git, folder), exist_ok=True)
                with open(os.path.join(dot_git, "objects", "info", "alternates"), "w") as handle:
                    handle.write(os.path.join(os.path.abspath(mirror), "objects") + "\n")
                with open(os.path.join(dot_git, "HEAD"), "w") as handle:
                    handle.write(commit + "\n")
                with open(os.path.join(dot_git, "config"), "w") as handle:
                    handle.write("[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n"
                                 "\tbare = false\n" if len(commit) != 64 else
                                 "[core]\n\trepositoryformatversion = 1\n\tfilemode = true\n"
                                 "\tbare = false\n[extensions]\n\tobjectformat = sha256\n")
                self.run(["-C", workspace, "read-tree", "--reset", "-u", "HEAD"])
                return
            except (_GitError, OSError):
                if attempt:
                    raise


    def _share_objects(self, mirror, group):
        """Let `group` read the mirror's objects, now and as they are fetched
        (git's core.sharedRepository, setgid folders); others still cannot."""
        objects = os.path.join(mirror, "objects")
        info = os.stat(objects)
        if info.st_gid == group and info.st_mode & 0o2050 == 0o2050:
            return
        with self._locked(mirror):
            self.run(["-C", mirror, "config", "core.sharedRepository", "0640"])
            for root, folders, files in os.walk(objects):
                os.chown(root, -1, group)
                os.chmod(root, (os.stat(root).st_mode & 0o777) | 0o2050)
                for name in files:
                    path = os.path.join(root, name)
                    os.chown(path, -1, group, follow_symlinks=False)
                    os.chmod(path, (os.stat(path).st_mode & 0o777) | 0o040)


def _update_submodules(git, workspace, overrides):
    """`git submodule update --init --recursive` in a checkout, with the URLs
    of `overrides` ({name: url}) in place of those .gitmodules gives."""
    if not os.path.exists(os.path.join(workspace, ".gitmodules")):
        return
    git.run(["-C", workspace, "submodule", "init"])
    for name, url in overrides.items():
        git.run(["-C", workspace, "config", f"submodule.{name}.url", url])
    # Never from a local path, whatever .gitmodules or the server's git config says:
    # `../x.git` next to the mirror would be another user's repository.
    git.run(["-c", "protocol.file.allow=never", "-C", workspace, "submodule", "update",
             "--init", "--recursive"])


def _commit_fields(sha, raw):
    """A build's commit fields from a raw commit object."""
    headers, _, message = raw.partition(b"\n\n")
    author = _AUTHOR_PATTERN.search(headers)
    name, email, timestamp = author.groups() if author else (b"", b"", b"0")
    email = email.decode(errors="replace")
    return {"commit_sha": sha, "author": name.decode(errors="replace"), "author_email": email,
            "timestamp": int(timestamp), "message": message.decode(errors="replace").strip(),
            "author_avatar": _gravatar(email)}


def _gravatar(email):
    """The Gravatar address of an e-mail address ("" for none)."""
    email = (email or "").strip().lower()
    return ("https://www.gravatar.com/avatar/" + hashlib.md5(email.encode()).hexdigest()
            if email else "")

###############################################################################
# Store #######################################################################
###############################################################################

# Raised when parsing gives a file another meaning (its era's rules, its
# warnings): a file parsed before is parsed again, not read from the store.
_PIPELINE_RULES = 4


def _pipeline_digest(filename, text):
    return hashlib.sha256(f"{_PIPELINE_RULES}\x00{filename}\x00{text}".encode()).hexdigest()


def _move_pipelines_out_of_builds(conn, _sealer):
    """Migration 6: each build's copy of its pipeline file becomes one row of
    `pipelines` shared by every build that ran the same file."""
    rows = conn.execute("SELECT id, pipeline_file, pipeline FROM builds "
                        "WHERE pipeline != ''").fetchall()
    for build_id, filename, text in rows:
        digest = _pipeline_digest(filename, text)
        conn.execute("INSERT INTO pipelines (digest, filename, text) VALUES ($1, $2, $3) "
                     "ON CONFLICT (digest) DO NOTHING", (digest, filename, text))
        conn.execute("UPDATE builds SET pipeline = '', pipeline_id = (SELECT id FROM pipelines "
                     "WHERE digest = $1) WHERE id = $2", (digest, build_id))


def _store_builds_as_they_happened(conn, _sealer):
    """Migration 15: builds keep every field as it was made. Until now a field
    that equalled what could be derived was stored empty and derived again on
    read; each is filled with what was read for it until now: refs/heads/
    BRANCH, the Gravatar of the author's address, the pipeline row's file name
    (all fixed when the build was made) and the repository's URL (the one
    field that may have changed since: the value shown until this upgrade)."""
    conn.execute("UPDATE builds SET ref = 'refs/heads/' || branch "
                 "WHERE ref = '' AND branch != ''")
    conn.execute("UPDATE builds SET pipeline_file = (SELECT filename FROM pipelines "
                 "WHERE pipelines.id = builds.pipeline_id) "
                 "WHERE pipeline_file = '' AND pipeline_id IS NOT NULL")
    for repo_id, url in conn.execute("SELECT id, url FROM repos").fetchall():
        conn.execute("UPDATE builds SET remote = $1 WHERE repo_id = $2 AND remote = ''",
                     (_redact_url(url), repo_id))
    emails = conn.execute("SELECT DISTINCT author_email FROM builds "
                          "WHERE author_avatar = '' AND author_email != ''").fetchall()
    for (email,) in emails:
        conn.execute("UPDATE builds SET author_avatar = $1 WHERE author_avatar = '' "
                     "AND author_email = $2", (_gravatar(email), email))


def _reseal_with_aes_gcm(conn, sealer):
    """Migration 8: secrets and forge tokens sealed the old way (HMAC-CTR, no
    associated data) are sealed again with AES-GCM for their row and field;
    webhook secrets, stored as plain text until now, are sealed too."""
    for secret_id, repo_id, name, value in conn.execute(
            "SELECT id, repo_id, name, value FROM secrets").fetchall():
        text = sealer.unseal_v1(value) if value.startswith("v1:") else value
        conn.execute("UPDATE secrets SET value = $1 WHERE id = $2",
                     (sealer.seal(text, f"repo {repo_id} secret {name}"), secret_id))
    for repo_id, webhook_secret, forge_token in conn.execute(
            "SELECT id, webhook_secret, forge_token FROM repos").fetchall():
        values = {"webhook_secret": webhook_secret,
                  "forge_token": sealer.unseal_v1(forge_token) if forge_token else ""}
        for key, text in values.items():
            if text:
                conn.execute(f"UPDATE repos SET {key} = $1 WHERE id = $2",
                             (sealer.seal(text, f"repo {repo_id} {key}"), repo_id))


# Each entry upgrades the schema by one version (PRAGMA user_version) and runs
# in one transaction: SQL text, or a function of the open connection and the
# store's sealer. Append new entries; never change what a released one does.
# The text is what SQLite and PostgreSQL both read (BIGINT, DOUBLE PRECISION)
# but for three words each says its own way (Store._DIALECT): $row_id (an
# integer key the database numbers), $bytes and $without_rowid.
_MIGRATIONS = [
    """
    CREATE TABLE users (
        id $row_id,
        login TEXT NOT NULL UNIQUE,
        email TEXT NOT NULL DEFAULT '',
        admin BIGINT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE tokens (
        id $row_id,
        user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name TEXT NOT NULL DEFAULT '',
        hash TEXT NOT NULL UNIQUE,
        scope TEXT NOT NULL DEFAULT 'write',
        created_at BIGINT NOT NULL,
        last_used_at BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE repos (
        id $row_id,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        url TEXT NOT NULL,
        default_branch TEXT NOT NULL DEFAULT '',
        config_path TEXT NOT NULL DEFAULT '',
        private BIGINT NOT NULL DEFAULT 0,
        timeout BIGINT NOT NULL DEFAULT 60,
        webhook_secret TEXT NOT NULL DEFAULT '',
        max_builds BIGINT NOT NULL DEFAULT 0,
        last_number BIGINT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL,
        UNIQUE (owner, name)
    );
    CREATE TABLE builds (
        id $row_id,
        repo_id BIGINT NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
        number BIGINT NOT NULL,
        parent BIGINT NOT NULL DEFAULT 0,
        event TEXT NOT NULL,
        status TEXT NOT NULL,
        error TEXT NOT NULL DEFAULT '',
        created_at BIGINT NOT NULL,
        enqueued_at BIGINT NOT NULL,
        started_at BIGINT NOT NULL DEFAULT 0,
        finished_at BIGINT NOT NULL DEFAULT 0,
        commit_sha TEXT NOT NULL DEFAULT '',
        branch TEXT NOT NULL DEFAULT '',
        ref TEXT NOT NULL DEFAULT '',
        remote TEXT NOT NULL DEFAULT '',
        message TEXT NOT NULL DEFAULT '',
        timestamp BIGINT NOT NULL DEFAULT 0,
        author TEXT NOT NULL DEFAULT '',
        author_avatar TEXT NOT NULL DEFAULT '',
        author_email TEXT NOT NULL DEFAULT '',
        link_url TEXT NOT NULL DEFAULT '',
        description TEXT NOT NULL DEFAULT '',
        tags TEXT NOT NULL DEFAULT '[]',
        pinned BIGINT NOT NULL DEFAULT 0,
        pipeline TEXT NOT NULL DEFAULT '',
        pipeline_file TEXT NOT NULL DEFAULT '',
        variables TEXT NOT NULL DEFAULT '{}',
        fail_fast BIGINT NOT NULL DEFAULT 0,
        max_parallel BIGINT NOT NULL DEFAULT 0,
        UNIQUE (repo_id, number)
    );
    CREATE INDEX builds_active ON builds(repo_id) WHERE status IN ('pending', 'running');
    CREATE TABLE jobs (
        id $row_id,
        build_id BIGINT NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
        number BIGINT NOT NULL,
        status TEXT NOT NULL,
        error TEXT NOT NULL DEFAULT '',
        exit_code BIGINT NOT NULL DEFAULT 0,
        environment TEXT NOT NULL DEFAULT '{}',
        enqueued_at BIGINT NOT NULL,
        started_at BIGINT NOT NULL DEFAULT 0,
        finished_at BIGINT NOT NULL DEFAULT 0,
        claimed_by TEXT NOT NULL DEFAULT '',
        heartbeat_at BIGINT NOT NULL DEFAULT 0,
        cancel_requested BIGINT NOT NULL DEFAULT 0,
        UNIQUE (build_id, number)
    );
    CREATE INDEX jobs_queue ON jobs(id) WHERE status = 'pending';
    CREATE INDEX jobs_running ON jobs(claimed_by) WHERE status = 'running';
    CREATE TABLE statuses (
        id $row_id,
        build_id BIGINT NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
        job_id BIGINT REFERENCES jobs(id) ON DELETE CASCADE,
        status TEXT NOT NULL,
        message TEXT NOT NULL DEFAULT '',
        created_at BIGINT NOT NULL
    );
    CREATE INDEX statuses_build ON statuses(build_id);
    CREATE INDEX statuses_job ON statuses(job_id) WHERE job_id IS NOT NULL;
    CREATE TABLE log_chunks (
        job_id BIGINT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        seq BIGINT NOT NULL,
        "offset" BIGINT NOT NULL,
        data $bytes NOT NULL,
        PRIMARY KEY (job_id, seq)
    );
    CREATE TABLE secrets (
        id $row_id,
        repo_id BIGINT NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        events TEXT NOT NULL DEFAULT '["push", "tag", "cron", "manual"]',
        UNIQUE (repo_id, name)
    );
    CREATE TABLE runners (
        id TEXT PRIMARY KEY,
        hostname TEXT NOT NULL,
        pid BIGINT NOT NULL,
        started_at BIGINT NOT NULL,
        heartbeat_at BIGINT NOT NULL
    );
    """,
    # 2: which events a repository builds (webhooks of other events are ignored).
    """
    ALTER TABLE repos ADD COLUMN events TEXT NOT NULL
        DEFAULT '["push", "tag", "pull_request", "cron", "manual"]';
    """,
    # 3: cron schedules; commit statuses posted back to the forge (an outbox,
    # so a crash or a forge outage delays a report but never loses it).
    """
    CREATE TABLE crons (
        id $row_id,
        repo_id BIGINT NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        expression TEXT NOT NULL,
        branch TEXT NOT NULL DEFAULT '',
        next_at BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        UNIQUE (repo_id, name)
    );
    ALTER TABLE repos ADD COLUMN forge TEXT NOT NULL DEFAULT '';
    ALTER TABLE repos ADD COLUMN forge_url TEXT NOT NULL DEFAULT '';
    ALTER TABLE repos ADD COLUMN forge_token TEXT NOT NULL DEFAULT '';
    ALTER TABLE repos ADD COLUMN forge_project TEXT NOT NULL DEFAULT '';
    ALTER TABLE builds ADD COLUMN report_error TEXT NOT NULL DEFAULT '';
    CREATE TABLE reports (
        id $row_id,
        build_id BIGINT NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
        state TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        attempts BIGINT NOT NULL DEFAULT 0,
        next_at DOUBLE PRECISION NOT NULL,
        claimed_until DOUBLE PRECISION NOT NULL DEFAULT 0,
        done BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX reports_due ON reports(next_at) WHERE done = 0;
    """,
    # 4: numbers of deleted builds. Numbers are otherwise gap-free, so a page
    # deep in a long history is found by arithmetic, not by an OFFSET walk.
    """
    CREATE TABLE deleted_builds (
        repo_id BIGINT NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
        number BIGINT NOT NULL,
        PRIMARY KEY (repo_id, number)
    ) $without_rowid;
    """,
    # 5: pipeline files, each stored once with its parsed form however many
    # builds run it; builds refer to theirs.
    """
    CREATE TABLE pipelines (
        id $row_id,
        digest TEXT NOT NULL UNIQUE,
        filename TEXT NOT NULL,
        text TEXT NOT NULL,
        parsed TEXT NOT NULL DEFAULT ''
    );
    ALTER TABLE builds ADD COLUMN pipeline_id BIGINT REFERENCES pipelines(id);
    """,
    _move_pipelines_out_of_builds,
    # 7: trusted repositories (privileged container keys); each step of a job
    # as a record, with where its output lies in the job's log.
    """
    ALTER TABLE repos ADD COLUMN trusted BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE builds ADD COLUMN deploy_to TEXT NOT NULL DEFAULT '';
    CREATE TABLE steps (
        id $row_id,
        job_id BIGINT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        number BIGINT NOT NULL,
        name TEXT NOT NULL,
        kind TEXT NOT NULL DEFAULT 'step',
        status TEXT NOT NULL DEFAULT 'pending',
        exit_code BIGINT NOT NULL DEFAULT 0,
        started_at BIGINT NOT NULL DEFAULT 0,
        finished_at BIGINT NOT NULL DEFAULT 0,
        log_start BIGINT NOT NULL DEFAULT 0,
        log_end BIGINT NOT NULL DEFAULT 0,
        UNIQUE (job_id, number)
    );
    """,
    _reseal_with_aes_gcm,
    # 9: a runner's process is its pid and its start time (a pid is reused).
    "ALTER TABLE runners ADD COLUMN pid_start BIGINT NOT NULL DEFAULT 0",
    # 10: retention and the log cap per repository (0: the server's), how
    # many workers a runner has (for the queue's explanations), and an index
    # for pruning (deleting a build deletes its reports).
    """
    ALTER TABLE repos ADD COLUMN keep_builds BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE repos ADD COLUMN keep_days BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE repos ADD COLUMN max_log_bytes BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE runners ADD COLUMN workers BIGINT NOT NULL DEFAULT 0;
    CREATE INDEX IF NOT EXISTS reports_build ON reports(build_id);
    """,
    # 11: a log chunk says how it is stored ('' raw, 'zstd', 'zlib') and how
    # many bytes of log it holds; older chunks stay raw, their size their length.
    """
    ALTER TABLE log_chunks ADD COLUMN codec TEXT NOT NULL DEFAULT '';
    ALTER TABLE log_chunks ADD COLUMN size BIGINT;
    """,
    # 12: a build's status history is stored by build (its rows side by side,
    # no index of their own); a status is numbered within its build, and names
    # its job without a foreign key (a restart deletes the old jobs' statuses).
    # Existing numbers are kept.
    """
    CREATE TABLE statuses_12 (
        build_id BIGINT NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
        id BIGINT NOT NULL,
        job_id BIGINT,
        status TEXT NOT NULL,
        message TEXT NOT NULL DEFAULT '',
        created_at BIGINT NOT NULL,
        PRIMARY KEY (build_id, id)
    ) $without_rowid;
    INSERT INTO statuses_12 SELECT build_id, id, job_id, status, message, created_at
        FROM statuses;
    DROP TABLE statuses;
    ALTER TABLE statuses_12 RENAME TO statuses;
    """,
    # 13: the labels a job requires of its runner and those a runner has, as
    # JSON objects with sorted keys ({"platform": "linux/arm64"}).
    """
    ALTER TABLE jobs ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE runners ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
    """,
    # 14: which builds wait for approval, per repository; whether a build's
    # pipeline came from a fork (and which), and who approved or declined it.
    """
    ALTER TABLE repos ADD COLUMN approval TEXT NOT NULL DEFAULT 'forks';
    ALTER TABLE builds ADD COLUMN fork BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE builds ADD COLUMN source_repo TEXT NOT NULL DEFAULT '';
    ALTER TABLE builds ADD COLUMN reviewed_by TEXT NOT NULL DEFAULT '';
    ALTER TABLE builds ADD COLUMN reviewed_at BIGINT NOT NULL DEFAULT 0;
    """,
    _store_builds_as_they_happened,
    # 16: the log chunks' "offset" (a keyword in SQL) is their start.
    'ALTER TABLE log_chunks RENAME COLUMN "offset" TO start',
    # 17: agents (build machines that join over HTTP with a token of their
    # own), the agent a runner is, and each claim's lease: what a runner must
    # show to write a job's log, steps and end (a job ended elsewhere refuses).
    """
    CREATE TABLE agents (
        id $row_id,
        name TEXT NOT NULL UNIQUE,
        hash TEXT NOT NULL UNIQUE,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at BIGINT NOT NULL,
        last_seen_at BIGINT NOT NULL DEFAULT 0,
        version TEXT NOT NULL DEFAULT '',
        address TEXT NOT NULL DEFAULT ''
    );
    ALTER TABLE runners ADD COLUMN agent TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN lease TEXT NOT NULL DEFAULT '';
    """,
    # 18: what a build's pipeline file did that Drone accepted and cirunner
    # does as Drone did (an unknown key ignored...): a JSON list of strings.
    "ALTER TABLE builds ADD COLUMN warnings TEXT NOT NULL DEFAULT '[]'",
    # 19: where a serving runner answers (its public URL): the command line
    # on the same data directory links to it.
    "ALTER TABLE runners ADD COLUMN url TEXT NOT NULL DEFAULT ''",
    # 20: the images a secret is limited to (Drone's `image` list): a JSON
    # list of patterns, empty for every image.
    "ALTER TABLE secrets ADD COLUMN images TEXT NOT NULL DEFAULT '[]'",
    # 21: a file's several pipelines: the one a job runs, the pipelines it
    # runs after (a JSON list), on which of their outcomes (JSON, see
    # Pipeline.runs_on), and whether it still waits for them (not claimed).
    """
    ALTER TABLE jobs ADD COLUMN pipeline TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN depends_on TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN runs_on TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN waiting INTEGER NOT NULL DEFAULT 0;
    """,
    # 22: what `when.paths` and `when.cron` look at: the files a build
    # changes (a JSON list; '' when its pipeline file has no use for them)
    # and the schedule that started it.
    """
    ALTER TABLE builds ADD COLUMN changed_files TEXT NOT NULL DEFAULT '';
    ALTER TABLE builds ADD COLUMN cron TEXT NOT NULL DEFAULT '';
    """,
    # 23: a pull request's action (Drone 1.x's `when.action`: opened,
    # synchronized, reopened; a tag's: created), and how many jobs of a
    # pipeline of that name may run at once in the repository (Drone 1.x's
    # `concurrency: {limit}`; 0: any number).
    """
    ALTER TABLE builds ADD COLUMN action TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN concurrency INTEGER NOT NULL DEFAULT 0;
    """,
]

_SEALED_REPO_FIELDS = ("webhook_secret", "forge_token")
_REPO_FIELDS = ("url", "default_branch", "config_path", "private", "timeout", "max_builds",
                "events", "webhook_secret", "forge", "forge_url", "forge_token", "forge_project",
                "trusted", "keep_builds", "keep_days", "max_log_bytes", "approval")
_BUILD_FIELDS = ("parent", "event", "commit_sha", "branch", "ref", "remote", "message",
                 "timestamp", "author", "author_avatar", "author_email", "link_url",
                 "pipeline_id", "pipeline_file", "variables", "fail_fast", "max_parallel",
                 "deploy_to", "fork", "source_repo", "warnings", "changed_files", "cron",
                 "action")


def _now():
    return int(time.time())


def _next_cron_time(expression, after):
    """The first time (Unix seconds, UTC) after `after` that `expression` names."""
    cronsim = _optional("cronsim", "cron schedules", "cronsim")
    start = datetime.fromtimestamp(int(after), timezone.utc)
    try:
        return int(next(cronsim.CronSim(expression, start)).timestamp())
    except (cronsim.CronSimError, StopIteration) as exc:
        raise BadRequest(f"invalid cron expression {expression!r}: {exc}") from None


def _token_hash(secret):
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


_RUNNER_STOPPED = "runner stopped: the runner running this job is gone (crash or kill)"


def _label_subsets(labels):
    """Every set of labels a runner with `labels` may run, as stored (JSON
    with sorted keys): a job requires a subset of its runner's labels."""
    items = sorted(labels.items())
    return [json.dumps(dict(chosen), sort_keys=True)
            for size in range(len(items) + 1)
            for chosen in itertools.combinations(items, size)]


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A job of a new build: its matrix `environment`, and for a file of
    several pipelines the `pipeline` it runs, the pipelines it runs after
    (`depends_on`) and on which of their outcomes (`runs_on`, see
    Pipeline.runs_on); `labels` a runner needs (JSON), if not the build's."""

    environment: dict
    pipeline: str = ""
    depends_on: tuple = ()
    runs_on: dict = None
    labels: str = ""
    concurrency: int = 0    # jobs of its pipeline that may run at once in the repository


def _job_needs(job):
    """The pipelines a job runs after (its build's other pipelines)."""
    return json.loads(job["depends_on"] or "[]")


def _pipeline_cell(job):
    """A build page's cell naming a job's pipeline and what it runs after (HTML)."""
    needs = _job_needs(job)
    after = f" <small>after {bottle.html_escape(', '.join(needs))}</small>" if needs else ""
    return f"<td class=pipeline>{bottle.html_escape(job['pipeline'])}{after}</td>"


def _in_graph_order(jobs):
    """A build's jobs with each pipeline's after those it runs after (by
    their depth in the graph), each pipeline's jobs together, in their
    numbers' order otherwise."""
    needs = {job["pipeline"]: _job_needs(job) for job in jobs}
    depths = {}

    def depth(name, seen=()):
        if name not in depths:
            depths[name] = 1 + max((depth(need, (*seen, name)) for need in needs.get(name, ())
                                    if need in needs and need not in seen), default=-1)
        return depths[name]

    first = {}
    for job in jobs:
        first.setdefault(job["pipeline"], job["number"])
    return sorted(jobs, key=lambda job: (depth(job["pipeline"]), first[job["pipeline"]],
                                         job["number"]))


def _runs_after(job, statuses):
    """Whether a job that waits for other pipelines runs: (None, "") while
    any of their jobs is active, else (True, "") or (False, why not).
    `statuses` are (job id, pipeline, status) of every job of its build.
    Drone asks whether any job of the build failed; Woodpecker how the jobs
    of the pipelines it depends on ended."""
    needs = _job_needs(job)
    rule = json.loads(job["runs_on"] or "null") or _RUNS_ON_SUCCESS
    theirs = [status for _, pipeline, status in statuses if pipeline in needs]
    if any(status in (PENDING, RUNNING) for status in theirs):
        return None, ""
    words = " or ".join(word for word in (SUCCESS, FAILURE) if rule[word]) or "nothing"
    if rule["of"] == "build":
        failed = any(status in (FAILURE, KILLED, ERROR) for _, _, status in statuses)
        runs = rule[FAILURE] if failed else rule[SUCCESS]
        why = f"the build has {'' if failed else 'not '}failed"
    else:
        succeeded = [status == SUCCESS for status in theirs]
        runs = (rule[SUCCESS] and rule[FAILURE]) or (rule[SUCCESS] and all(succeeded)) or (
            rule[FAILURE] and not any(succeeded))
        why = f"{', '.join(needs)} {'succeeded' if all(succeeded) else 'did not succeed'}"
    return runs, "" if runs else f"not run: {why}, and pipeline {job['pipeline']!r} runs on " \
                                 f"{words}"


def _make_data_dir(data_dir):
    """A data directory private to this user (0700, as are its mirrors/ and
    workspaces/). The passage (0710) an executor gave the step user's group
    (`_StepUser.open_path`) stays: a store opened beside a running server
    (`cirunner backup`, the CLI) must not lock its next steps out."""
    for directory in (data_dir, os.path.join(data_dir, "mirrors"),
                      os.path.join(data_dir, "workspaces")):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.stat(directory)
        passage = info.st_mode & 0o010 if info.st_gid != os.getegid() else 0
        os.chmod(directory, 0o700 | passage)


class _Transaction:
    """An open write transaction: its statements, and the notifications that
    go out once it has committed (never for a transaction rolled back)."""

    def __init__(self, conn):
        self.conn = conn
        self.events = []
        self.after = []  # what to do once it has committed, in order
        self.locked_builds = set()  # builds whose rows this transaction holds

    def execute(self, sql, params=()):
        return self.conn.execute(sql, params)

    def insert(self, sql, params=()):
        """Run an INSERT; the new row's id."""
        return self.conn.execute(sql, params).lastrowid

    def notify(self, event, ids):
        """Tell the store's listeners about `ids` (jobs, or a report) after COMMIT."""
        if ids:
            self.events.append((event, list(ids)))


_REPORT_DESCRIPTIONS = {PENDING: "the build is queued", RUNNING: "the build is running",
                        SUCCESS: "the build succeeded", FAILURE: "the build failed",
                        KILLED: "the build was cancelled", ERROR: "the build errored",
                        SKIPPED: "the build was skipped",
                        BLOCKED: "the build waits for approval",
                        DECLINED: "the build was declined"}


# A status's usual words by (for the build as a whole, status): stored as "",
# shown when read (five rows of history per build, most of them these).
_DEFAULT_MESSAGES = {(True, PENDING): "build created", (True, RUNNING): "build running",
                     (True, SUCCESS): "build finished: every job succeeded",
                     (False, SUCCESS): "exit code 0", (False, RUNNING): "started by runner {}"}


def _with_message(row):
    if not row["message"]:
        words = _DEFAULT_MESSAGES.get((row["job_id"] is None, row["status"]), "")
        row["message"] = words.format(row.pop("claimed_by", "") or "?")
    row.pop("claimed_by", None)
    return row


class _LogCodec:
    """How a store keeps log chunks: zstandard at level 1 (faster than zlib at
    a better ratio on build logs; the figures are in the README's performance
    section), imported when the first chunk is written or read; a chunk that
    does not shrink is kept raw. Chunks are read whatever they were written
    with (zlib, by cirunners of before)."""

    def __init__(self):
        self._local = threading.local()  # a zstandard (de)compressor per thread

    def _zstd(self, kind):
        tool = getattr(self._local, kind, None)
        if tool is None:
            zstd = _optional("zstandard", "storing logs", "zstandard")
            tool = zstd.ZstdCompressor(level=1) if kind == "compressor" else \
                zstd.ZstdDecompressor()
            setattr(self._local, kind, tool)
        return tool

    def encode(self, data):
        """(codec, stored bytes) for a chunk of log."""
        if len(data) < 64:
            return "", data
        packed = self._zstd("compressor").compress(data)
        return ("zstd", packed) if len(packed) < len(data) else ("", data)

    def decode_at_most(self, codec, stored, limit):
        """A chunk as another process sent it, (codec, stored); ValueError if
        it is not one, or would be longer than `limit` (never decompressed
        past it: a zstd frame states its size first)."""
        if codec == "zstd":
            zstd = _optional("zstandard", "storing logs", "zstandard")
            try:
                size = zstd.frame_content_size(stored)
            except zstd.ZstdError as exc:
                raise ValueError(f"not a zstd frame: {exc}") from None
            if not 0 <= size <= limit:
                raise ValueError(f"a chunk of at most {limit} bytes, stating its size")
        elif codec:
            raise ValueError(f"unknown codec {codec!r}")
        try:
            data = self.decode(codec, stored)
        except Exception as exc:  # noqa: BLE001 - zstandard's own error: bad input
            raise ValueError(f"cannot decode the chunk: {exc}") from None
        if len(data) > limit:
            raise ValueError(f"a chunk of at most {limit} bytes")
        return data

    def decode(self, codec, stored):
        if not codec:
            return stored
        if codec == "zlib":
            return zlib.decompress(stored)
        if codec == "zstd":
            return self._zstd("decompressor").decompress(stored)
        raise CIRunnerError(f"a log chunk is stored as {codec!r}, which this cirunner "
                            "cannot read")


def _marks(count, first=1):
    """`count` numbered marks from `first` on: "$1, $2, $3"."""
    return ", ".join(f"${number}" for number in range(first, first + count))


def _assignments(columns):
    """An UPDATE's "a = $1, b = $2" for `columns`, in their order."""
    return ", ".join(f"{column} = ${number}" for number, column in enumerate(columns, 1))


class _SqliteConnection(sqlite3.Connection):
    """A SQLite connection that binds numbered marks from a sequence, as
    PostgreSQL does: SQLite reads ``$1`` as the parameter named "1"."""

    def execute(self, sql, parameters=()):
        if not isinstance(parameters, dict):
            parameters = {str(number): value for number, value in enumerate(parameters, 1)}
        return super().execute(sql, parameters)


class _Listeners:
    """Change listeners in this process: ``callback(event, ids)`` after a
    change (a store's commits; an agent's news from its server). One that
    fails is logged and never breaks the change or the others."""

    def add_listener(self, callback):
        self._listeners.append(callback)

    def remove_listener(self, callback):
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    def _notify(self, event, ids):
        for callback in list(self._listeners):
            try:
                callback(event, ids)
            except Exception:  # noqa: BLE001 - one bad listener must not break a change
                _log.exception("store listener failed")


class Store(_Listeners):
    """The SQLite store: users, repositories, builds, jobs, status history and logs.

    One connection per thread (threads that come and go lend theirs back), WAL
    journal, ``BEGIN IMMEDIATE`` for every read-modify-write. Safe to share
    between threads and between processes that open the same file.

    Listeners (`add_listener`) hear of committed changes in this process:
    ``("enqueued", job_ids)``, ``("cancel", job_ids)`` and ``("report", [0])``.

    Statements are written once, in the form both SQLite and PostgreSQL read:
    numbered marks ``$1, $2, …`` bound from a sequence of values. Errors are
    the database's own, by their DB-API names on the store: ``Error``,
    ``IntegrityError`` (a constraint) and ``OperationalError`` (busy, locked,
    unreachable, full).
    """

    Error = sqlite3.Error
    IntegrityError = sqlite3.IntegrityError
    OperationalError = sqlite3.OperationalError

    read_only = ""   # why every write is refused (a full disk at start), or ""
    _read_only_uri = ""
    _generation = 0  # connections of an older one are not used again

    def __init__(self, path, *, data_dir=None, busy_timeout=5.0, read_only_if_full=False):
        self.path = path
        self.busy_timeout = busy_timeout
        self._setup(data_dir or os.path.dirname(os.path.abspath(path)))
        # The database holds webhook secrets and token hashes: private to this
        # user (SQLite gives the WAL and shared-memory files the same mode).
        for name in (path, path + "-wal", path + "-shm"):
            _make_private(name, create=name == path)
        if read_only_if_full and shutil.disk_usage(self.data_dir).free < MIN_FREE_BYTES:
            # No room to write: read-only whether or not SQLite could still open
            # the file as usual (that depends on the index pages a crash left).
            self._open_read_only(f"less than {MIN_FREE_BYTES} bytes free in {self.data_dir}")
            return
        try:
            self._migrate()
        except sqlite3.OperationalError as exc:
            if not read_only_if_full or not self._no_room(exc):
                raise
            self._open_read_only(exc)

    def _no_room(self, exc):
        """Whether `exc` comes of a full disk (opening a WAL store on one
        fails as a disk I/O error: its shared-memory file cannot be made)."""
        return (_is_disk_full(exc) or "disk I/O error" in str(exc)) and \
            shutil.disk_usage(self.data_dir).free < MIN_FREE_BYTES

    def _open_read_only(self, exc):
        """Serve what is stored, writing nothing, until `try_writable`: only
        a store at this version. With commits still in its log (the WAL: a
        crash, or a last checkpoint the full disk cut short), it is read with
        them, through the index files already there; without those files it
        is not served at all (the main file alone would be stale)."""
        wal = self.path + "-wal"
        pending = os.path.exists(wal) and os.path.getsize(wal) > 0
        self._read_only_uri = f"file:{quote(os.path.abspath(self.path))}?mode=ro" + (
            "" if pending else "&immutable=1")
        self.read_only = f"the disk is full ({exc})"
        try:
            version = self._connect().execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error:
            self.read_only = ""
            raise CIRunnerError(f"the disk is full and the store's last commits cannot be read "
                                f"without room for its index: free some space in "
                                f"{self.data_dir} ({exc})") from None
        if version != len(_MIGRATIONS):
            self.read_only = ""
            raise CIRunnerError(f"the disk is full and the store needs upgrading first: free "
                                f"some space in {self.data_dir} ({exc})") from None

    def try_writable(self):
        """After a read-only start: whether the store can be written again
        (there is room, and it opens as usual); from then on it is: the
        read-only connections are dropped as their threads let them go."""
        if not self.read_only:
            return True
        if shutil.disk_usage(self.data_dir).free < MIN_FREE_BYTES:
            return False
        try:
            self._migrate(writable=True)
        except sqlite3.Error:
            return False
        with self._connections_lock:
            self._generation += 1
            self.read_only = ""
            stale, self._idle_connections = self._idle_connections, []
        for conn in stale:
            self._forget(conn)
        return True

    def _forget(self, conn):
        with self._connections_lock, contextlib.suppress(ValueError):
            self._connections.remove(conn)
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    def _setup(self, data_dir):
        """What every store has, whatever its database."""
        self.data_dir = data_dir
        self.sealer = _Sealer(os.path.join(self.data_dir, "secret.key"))
        self._local = threading.local()
        self._connections = []
        self._idle_connections = []
        self._connections_lock = threading.Lock()
        # Writers of this process queue here, in turn, rather than in SQLite's
        # busy handler, which sleeps 1, 2, 5, 10... ms between tries.
        self._write_lock = threading.Lock()
        self._columns = {}  # statement text -> the names of its result columns
        self._listeners = []
        self._closed = False
        # Followers of live logs wait on this; appends and job ends count up.
        self._log_changed = threading.Condition()
        self._log_events = 0
        self._git = None
        self._git_lock = threading.Lock()
        self.codec = _LogCodec()
        self._counter, self._counter_lock = None, threading.Lock()  # see commit_counter

    @classmethod
    def open(cls, data_dir, **options):
        """Open (creating if needed) the store ``cirunner.db`` in `data_dir`,
        a directory private to this user (0700, as are its mirrors/ and
        workspaces/)."""
        _make_data_dir(data_dir)
        return cls(os.path.join(data_dir, "cirunner.db"), data_dir=data_dir, **options)

    @property
    def git(self):
        """The git mirrors of this store's repositories (``DATA/mirrors``), shared by
        everything that builds from this store in this process."""
        with self._git_lock:
            if self._git is None:
                self._git = _GitMirrors(os.path.join(self.data_dir, "mirrors"))
            return self._git

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- connections and transactions ---------------------------------------

    def _connect(self, writable=False):
        """A new connection with every pragma the store relies on (read-only,
        after a start on a full disk: nothing made, nothing written)."""
        generation = self._generation  # before read_only: a switch makes it stale
        read_only = self.read_only and not writable
        conn = sqlite3.connect(self._read_only_uri if read_only else self.path, uri=read_only,
                               timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False, factory=_SqliteConnection)
        conn.generation = generation
        conn.row_factory = sqlite3.Row
        if read_only:
            return conn
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        # Checkpoints run in the executor's maintenance thread, beside the
        # writers; left to the writer, they stall whoever writes a big log.
        page_bytes = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_BACKSTOP_BYTES // page_bytes}")
        # A small page cache per connection: the OS caches the file anyway.
        conn.execute("PRAGMA cache_size = -1024")
        return conn

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.generation != self._generation and not conn.in_transaction:
            self._local.conn = None
            self._forget(conn)
            conn = None
        if conn is None:
            if self._closed:
                raise CIRunnerError("the store is closed")
            with self._connections_lock:
                conn = self._idle_connections.pop() if self._idle_connections else None
            if conn is None:
                conn = self._connect()
                with self._connections_lock:
                    self._connections.append(conn)
            self._local.conn = conn
        return conn

    def connection_count(self):
        """How many connections the store has opened (for tests and metrics)."""
        with self._connections_lock:
            return len(self._connections)

    def release_connection(self):
        """Lend this thread's connection to whichever thread needs one next. The
        HTTP server calls this after each request, so its many threads share the
        few connections in use at once (each has its own caches)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.in_transaction:
            self._local.conn = None
            with self._connections_lock:  # as try_writable swaps: none stale is pooled
                current = conn.generation == self._generation
                if current and not self._closed:
                    self._idle_connections.append(conn)
            if not current:
                self._forget(conn)

    @contextlib.contextmanager
    def _write(self, *, rows_only=False, durable=False):
        """A write transaction. With `rows_only`, it changes rows of its own
        and locks them (a claim, a step, a heartbeat): PostgreSQL runs such
        ones side by side; SQLite runs every write in turn. A `durable` one
        (what an answer acknowledges: a build made, restarted or cancelled,
        a job's end) is on disk when it commits, a power cut included; the
        rest (log chunks, steps, heartbeats) at the next one or checkpoint."""
        conn = self._connection()
        with self._durably(conn, durable), self._begin(conn, rows_only, durable):
            transaction = self._transaction_class(conn)
            try:
                yield transaction
                self._publish(conn, transaction.events)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        for event, ids in transaction.events:
            self._notify(event, ids)
        for action in transaction.after:
            action()

    _transaction_class = _Transaction

    @contextlib.contextmanager
    def _durably(self, conn, durable):
        """SQLite in WAL mode syncs the log at each commit only with
        synchronous=FULL; NORMAL (the default here) syncs it at checkpoints."""
        if not durable:
            yield
            return
        conn.execute("PRAGMA synchronous = FULL")
        try:
            yield
        finally:
            conn.execute("PRAGMA synchronous = NORMAL")

    def _check_writable(self):
        if self.read_only:  # a full disk's error: the API answers 507
            raise sqlite3.OperationalError(f"database or disk is full: serving read-only until "
                                           f"there is room: {self.read_only}")

    def _write_one(self, sql, params=()):
        """A write that is one statement, committed alone (in turn, on SQLite)."""
        self._check_writable()
        conn = self._connection()
        with self._write_lock:
            return conn.execute(sql, params)

    @contextlib.contextmanager
    def _begin(self, conn, rows_only, durable=False):
        """Open a write transaction. BEGIN IMMEDIATE: a deferred BEGIN that reads
        and then writes fails at once under contention, whatever the busy timeout.
        (SQLite: `_durably` makes a `durable` one so, around the transaction.)"""
        self._check_writable()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            yield

    def _publish(self, conn, events):
        """Tell other processes of a transaction's events (SQLite: they notice
        the file's data_version change)."""

    # A job as its end reads it, with its build's fail_fast.
    _JOB_TO_END = ("SELECT j.build_id, j.number, j.status, j.lease, j.error, b.fail_fast "
                   "FROM jobs j JOIN builds b ON b.id = j.build_id WHERE j.id = $1")

    def _lock_build_of_job(self, tx, job_id):
        """Hold the row of a job's build (the build first, as every writer of
        its jobs does); the job (`_JOB_TO_END`), or None if there is none."""
        return tx.execute(self._JOB_TO_END, (job_id,)).fetchone()

    def _lock_build(self, tx, build_id):
        """Hold a build's row for the rest of the transaction (SQLite: every
        write already holds the whole file)."""

    def _query(self, sql, params=()):
        cursor = self._connection().execute(sql, params)
        rows = cursor.fetchall()
        if not rows:
            return []
        names = self._column_names(sql, cursor, rows[0])
        return [dict(zip(names, row)) for row in rows]

    def _query_one(self, sql, params=()):
        cursor = self._connection().execute(sql, params)
        row = cursor.fetchone()
        return dict(zip(self._column_names(sql, cursor, row), row)) if row is not None else None

    def _scalar(self, sql, params=()):
        row = self._connection().execute(sql, params).fetchone()
        return row[0] if row else None

    def _column_names(self, sql, cursor, row):
        """The column names of `sql`'s rows, learned once per statement (a lookup
        per name per row was a tenth of a small API request)."""
        names = self._columns.get(sql)
        if names is None or len(names) != len(row):  # a new statement, or the schema grew
            names = self._columns[sql] = tuple(column[0] for column in cursor.description)
        return names

    def _one(self, sql, params, missing):
        """The one row `sql` finds, or NotFound(`missing`)."""
        row = self._query_one(sql, params)
        if row is None:
            raise NotFound(missing)
        return row

    def _migrate(self, writable=False):
        conn = self._connect(writable)
        try:
            # auto_vacuum only takes effect before the first table exists, and
            # journal_mode=WAL cannot change inside a transaction.
            conn.execute(f"PRAGMA page_size = {PAGE_BYTES}")
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("PRAGMA journal_mode = WAL")
            self._apply_migrations(conn)
        finally:
            conn.close()

    def _apply_migrations(self, conn):
        version = self._version_of(conn)
        for number, migration in enumerate(_MIGRATIONS[version:], start=version + 1):
            with self._begin(conn, False, True):
                try:
                    # Read again inside the lock: another process may have migrated.
                    if self._version_of(conn) >= number:
                        conn.execute("ROLLBACK")
                        continue
                    if callable(migration):
                        migration(conn, self.sealer)
                    else:
                        # Statement by statement: executescript() would commit first.
                        for statement in migration.split(";"):
                            if statement.strip():
                                conn.execute(self._ddl(statement))
                    self._set_version(conn, number)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")

    @staticmethod
    def _version_of(conn):
        return conn.execute("PRAGMA user_version").fetchone()[0]

    @staticmethod
    def _set_version(conn, number):
        conn.execute(f"PRAGMA user_version = {int(number)}")

    _DIALECT = types.MappingProxyType({"row_id": "INTEGER PRIMARY KEY", "bytes": "BLOB",
                                       "without_rowid": "WITHOUT ROWID"})

    @classmethod
    def _ddl(cls, statement):
        """A migration's statement with this database's words (see _MIGRATIONS)."""
        return string.Template(statement).substitute(cls._DIALECT)

    def identity(self):
        """What names this store among others on this host (the file's path)."""
        return os.path.abspath(self.path)

    def socket_directories(self):
        """Folders of this store's unix sockets, which sandboxed steps must not
        reach (none for a file)."""
        return ()

    def schema_version(self):
        """The schema version this store is at (PRAGMA user_version)."""
        return self._version_of(self._connection())

    def close(self):
        """Close every connection of every thread."""
        self._closed = True
        with self._connections_lock:
            connections, self._connections = self._connections, []
            self._idle_connections = []
        with self._counter_lock:
            if self._counter is not None:
                connections.append(self._counter)
                self._counter = None
        for conn in connections:
            with contextlib.suppress(self.Error):
                conn.close()

    def checkpoint(self):
        """Checkpoint the WAL (PASSIVE: never waits for writers) and give back
        free pages, so neither the WAL nor the file grows without bound; keep
        the disk's reserve."""
        self.keep_reserve()
        conn = self._connection()
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        if conn.execute("PRAGMA freelist_count").fetchone()[0]:
            # execute() steps this pragma once, freeing one page; a script runs
            # it to the end. (No transaction is open here, so nothing commits.)
            with self._write_lock:
                conn.executescript("PRAGMA incremental_vacuum(1000);")

    def keep_reserve(self):
        """Hold RESERVE_BYTES of the data directory's disk in DATA/reserve
        while there is room for it and more: when the disk fills up,
        `release_reserve` gives it back, so that the ends of the jobs it
        failed can still be written."""
        path = os.path.join(self.data_dir or "", "reserve")
        if not self.data_dir or self.read_only or os.path.exists(path) or \
                shutil.disk_usage(self.data_dir).free < RESERVE_BYTES + 4 * MIN_FREE_BYTES:
            return
        try:
            with open(path + ".tmp", "wb") as handle:
                os.posix_fallocate(handle.fileno(), 0, RESERVE_BYTES)
            os.replace(path + ".tmp", path)
        except OSError:  # no room after all, or no fallocate here: none this time
            with contextlib.suppress(OSError):
                os.unlink(path + ".tmp")

    def release_reserve(self):
        """Give the disk its reserve back; True if there was one to give."""
        try:
            os.unlink(os.path.join(self.data_dir, "reserve"))
        except (OSError, TypeError):  # none, or a store without a data directory
            return False
        return True

    def wal_bytes(self):
        """How big the write-ahead log file is now (0 if there is none)."""
        try:
            return os.path.getsize(self.path + "-wal")
        except OSError:
            return 0

    def check(self):
        """Raise if the database cannot be read (for /healthz)."""
        self.data_version()

    def data_version(self):
        """A number that changes whenever another connection commits a change."""
        return self._scalar("PRAGMA data_version")

    def commit_counter(self):
        """A number that changes whenever anything is committed to the store,
        by any connection of any process (read on a connection of its own that
        never writes); None where the database keeps none (PostgreSQL)."""
        with self._counter_lock:
            if self._counter is None:
                self._counter = sqlite3.connect(self.path, isolation_level=None,
                                                check_same_thread=False)
            return self._counter.execute("PRAGMA data_version").fetchone()[0]

    # -- users and tokens ---------------------------------------------------

    def create_user(self, login, *, email="", admin=False):
        """Add a user; raises Conflict if the login exists."""
        _check_name(login, "login")
        try:
            with self._write() as tx:
                tx.execute("INSERT INTO users (login, email, admin, created_at) "
                           "VALUES ($1, $2, $3, $4)", (login, email, int(admin), _now()))
        except self.IntegrityError:
            raise Conflict(f"user {login} already exists") from None
        return self.get_user(login)

    def get_user(self, login):
        return self._one("SELECT * FROM users WHERE login = $1", (login,),
                         f"user {login} not found")

    def list_users(self):
        return self._query("SELECT * FROM users ORDER BY login")

    def user_count(self):
        return self._scalar("SELECT count(*) FROM users")

    def update_user(self, login, *, email=None, admin=None):
        """Change a user's email or admin flag (None: unchanged)."""
        with self._write() as tx:
            for column, value in (("email", email), ("admin", admin)):
                if value is not None and not tx.execute(
                        f"UPDATE users SET {column} = $1 WHERE login = $2",
                        (int(value) if column == "admin" else value, login)).rowcount:
                    raise NotFound(f"user {login} not found")
        return self.get_user(login)

    def delete_user(self, login):
        """Remove a user and every token of theirs."""
        with self._write() as tx:
            if not tx.execute("DELETE FROM users WHERE login = $1", (login,)).rowcount:
                raise NotFound(f"user {login} not found")

    def create_token(self, login, *, name="", scope="write"):
        """Make a token for `login`; returns (token row, secret). Only the
        SHA-256 of the secret is stored: the secret is shown this once."""
        if scope not in TOKEN_SCOPES:
            raise BadRequest(f"scope must be one of {', '.join(TOKEN_SCOPES)}")
        user = self.get_user(login)
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._write() as tx:
            token_id = tx.insert(
                "INSERT INTO tokens (user_id, name, hash, scope, created_at) "
                "VALUES ($1, $2, $3, $4, $5)",
                (user["id"], name, _token_hash(secret), scope, _now()))
        return self._query_one("SELECT * FROM tokens WHERE id = $1", (token_id,)), secret

    def list_tokens(self, login=None):
        """Tokens (never their secrets), with their user's login."""
        sql = ("SELECT t.id, t.name, t.scope, t.created_at, t.last_used_at, u.login "
               "FROM tokens t JOIN users u ON u.id = t.user_id")
        if login:
            self.get_user(login)
            return self._query(sql + " WHERE u.login = $1 ORDER BY t.id", (login,))
        return self._query(sql + " ORDER BY t.id")

    def user_for_token(self, token_id):
        """The user owning token `token_id` (with the token's scope), or None if revoked."""
        return self._query_one("SELECT u.*, t.id AS token_id, t.scope FROM tokens t "
                               "JOIN users u ON u.id = t.user_id WHERE t.id = $1", (token_id,))

    def revoke_token(self, token_id):
        with self._write() as tx:
            if not tx.execute("DELETE FROM tokens WHERE id = $1", (token_id,)).rowcount:
                raise NotFound(f"token {token_id} not found")

    def authenticate(self, secret):
        """The user a token secret belongs to (with its token's scope), or None."""
        digest = _token_hash(secret)
        row = self._query_one(
            "SELECT u.*, t.id AS token_id, t.scope, t.hash, t.last_used_at FROM tokens t "
            "JOIN users u ON u.id = t.user_id WHERE t.hash = $1", (digest,))
        # The lookup is by hash, so its timing says nothing about the secret;
        # the comparison is constant-time all the same.
        if row is None or not hmac.compare_digest(row.pop("hash"), digest):
            return None
        if row["last_used_at"] < _now() - 60:  # at most one write a minute per token
            self._stamp_token(row["token_id"])
        return row

    def _stamp_token(self, token_id):
        """Record a token's use, unless another writer holds the lock: the stamp
        is advisory, and no read should wait for a writer because of it."""
        if not self._write_lock.acquire(blocking=False):
            return
        conn = self._connection()
        try:
            conn.execute("PRAGMA busy_timeout = 0")
            with contextlib.suppress(self.OperationalError):
                conn.execute("UPDATE tokens SET last_used_at = $1 WHERE id = $2",
                             (_now(), token_id))
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            self._write_lock.release()

    # -- repositories --------------------------------------------------------

    def create_repo(self, owner, name, url, **fields):
        """Add a repository; raises Conflict if `owner/name` exists. A local
        path is made absolute (`normalize_repo_url`), and must exist. It is
        private (readable only by those with access) unless `private=False`."""
        _check_name(owner, "owner")
        _check_name(name, "repository name")
        if owner == "api":  # its pages, /api/NAME..., would be the API's routes
            raise BadRequest("the owner 'api' is taken by the API's own routes (/api/...): "
                             "choose another owner")
        fields.setdefault("private", True)
        url = normalize_repo_url(url)
        self.check_repo_url(url)
        values = {key: value for key, value in self._repo_values(fields).items()
                  if key not in _SEALED_REPO_FIELDS}
        values.update(owner=owner, name=name, url=url, created_at=_now())
        try:
            with self._write() as tx:
                repo_id = tx.insert(f"INSERT INTO repos ({', '.join(values)}) "
                                    f"VALUES ({_marks(len(values))})",
                                    tuple(values.values()))
                self._seal_repo_fields(tx, repo_id, fields)
        except self.IntegrityError:
            raise Conflict(f"repository {owner}/{name} already exists") from None
        return self.get_repo(owner, name)

    def get_repo(self, owner, name):
        """The repository `owner/name` as a dict; raises NotFound."""
        return self._one("SELECT * FROM repos WHERE owner = $1 AND name = $2", (owner, name),
                         f"repository {owner}/{name} not found")

    def get_repo_by_id(self, repo_id):
        return self._one("SELECT * FROM repos WHERE id = $1", (repo_id,),
                         f"repository {repo_id} not found")

    def list_repos(self):
        return self._query("SELECT * FROM repos ORDER BY owner, name")

    def update_repo(self, repo_id, **fields):
        """Change a repository's settings (names as in `_REPO_FIELDS`)."""
        unknown = set(fields) - set(_REPO_FIELDS)
        if unknown:
            raise BadRequest(f"unknown repository field {min(unknown)!r}")
        if "url" in fields:
            fields["url"] = normalize_repo_url(fields["url"])
            self.check_repo_url(fields["url"])
        values = {key: value for key, value in self._repo_values(fields).items()
                  if key not in _SEALED_REPO_FIELDS}
        with self._write() as tx:
            if values:
                tx.execute(f"UPDATE repos SET {_assignments(values)} WHERE id = ${len(values) + 1}",
                           (*values.values(), repo_id))
            self._seal_repo_fields(tx, repo_id, fields)
        return self.get_repo_by_id(repo_id)

    def check_repo_url(self, url):
        """A local repository must exist and lie outside the data directory
        (whose mirrors hold every user's code); BadRequest otherwise."""
        if is_remote_url(url):
            return
        path = _local_repo_path(url)
        data = os.path.realpath(self.data_dir)
        if path == data or path.startswith(data + os.sep):
            raise BadRequest(f"repository path {path} is inside the server's data directory")
        if not os.path.isdir(path):
            raise BadRequest(f"repository path {path} does not exist")

    @staticmethod
    def _repo_values(fields):
        return {key: fields[key] for key in _REPO_FIELDS if key in fields}

    def _seal_repo_fields(self, tx, repo_id, fields):
        """Store the webhook secret and forge token given in `fields`, sealed
        for this repository and field ("" clears one)."""
        for key in _SEALED_REPO_FIELDS:
            if key in fields:
                value = fields[key] and self.sealer.seal(fields[key], f"repo {repo_id} {key}")
                tx.execute(f"UPDATE repos SET {key} = $1 WHERE id = $2", (value, repo_id))

    def forge_token(self, repo):
        """The repository's forge API token, unsealed."""
        return self.sealer.unseal(repo["forge_token"], f"repo {repo['id']} forge_token")

    def webhook_secret(self, repo):
        """The secret the repository's webhooks are signed with, unsealed."""
        return self.sealer.unseal(repo["webhook_secret"], f"repo {repo['id']} webhook_secret")

    def delete_repo(self, repo_id):
        """Delete a repository with all its builds; Conflict while one is active."""
        with self._write() as tx:
            if tx.execute("SELECT 1 FROM builds WHERE repo_id = $1 AND status IN ($2, $3)",
                          (repo_id, PENDING, RUNNING)).fetchone():
                raise Conflict("the repository has pending or running builds")
            tx.execute("DELETE FROM repos WHERE id = $1", (repo_id,))

    # -- pipelines ------------------------------------------------------------

    def save_pipeline(self, filename, text, parsed=""):
        """Store a pipeline file (once, however many builds run it); returns its id."""
        digest = _pipeline_digest(filename, text)
        with self._write() as tx:
            tx.execute("INSERT INTO pipelines (digest, filename, text, parsed) "
                       "VALUES ($1, $2, $3, $4) ON CONFLICT (digest) DO NOTHING", (digest, filename, text, parsed))
            return tx.execute("SELECT id FROM pipelines WHERE digest = $1",
                              (digest,)).fetchone()[0]

    def find_pipeline(self, digest):
        """The stored pipeline with this digest, or None."""
        return self._query_one("SELECT * FROM pipelines WHERE digest = $1", (digest,))

    def get_pipeline(self, pipeline_id):
        """The pipeline row: filename, text, and its parsed form as JSON text."""
        return self._one("SELECT * FROM pipelines WHERE id = $1", (pipeline_id,),
                         f"pipeline {pipeline_id} not found")

    # -- builds -------------------------------------------------------------

    def create_build(self, repo_id, fields, environments, *, error="", blocked=""):
        """Insert a build numbered next for its repository, with one job per
        environment of `environments`. With `error`, the build is created
        finished with status error and no jobs; with `blocked` (the reason),
        it waits for approval and no job may be claimed. Returns the build dict."""
        now = _now()
        with self._write(durable=True) as tx:
            row = tx.execute("UPDATE repos SET last_number = last_number + 1 WHERE id = $1 "
                             "RETURNING last_number", (repo_id,)).fetchone()
            if row is None:
                raise NotFound(f"repository {repo_id} not found")
            values = self._stored_build_fields(fields)
            status = BLOCKED if blocked and not error else PENDING
            values.update(repo_id=repo_id, number=row[0], status=status, created_at=now,
                          enqueued_at=now)
            build_id = tx.insert(f"INSERT INTO builds ({', '.join(values)}) "
                                 f"VALUES ({_marks(len(values))})",
                                 tuple(values.values()))
            tx.locked_builds.add(build_id)  # its own new row: nobody else sees it yet
            self._record_status(tx, build_id, None, status,
                                f"waiting for approval: {blocked}" if status == BLOCKED
                                else "build created", now)
            self._insert_jobs(tx, build_id, environments, error, now, fields.get("labels"),
                              enqueue=status != BLOCKED)
        return self.get_build_by_id(build_id)

    def review_build(self, build_id, login, *, approve):
        """Approve a blocked build (its jobs may run from now on) or decline it
        (they never will: skipped, the build declined). Conflict unless blocked."""
        now = _now()
        with self._write(durable=True) as tx:
            self._lock_build(tx, build_id)
            row = tx.execute("SELECT status FROM builds WHERE id = $1", (build_id,)).fetchone()
            if row is None:
                raise NotFound(f"build {build_id} not found")
            if row[0] != BLOCKED:
                raise Conflict(f"the build is {row[0]}, not waiting for approval")
            status = PENDING if approve else DECLINED
            tx.execute("UPDATE builds SET status = $1, reviewed_by = $2, reviewed_at = $3, "
                       "finished_at = $4 WHERE id = $5",
                       (status, login, now, 0 if approve else now, build_id))
            self._record_status(tx, build_id, None, status,
                                f"{'approved' if approve else 'declined'} by {login}", now)
            jobs = [job[0] for job in tx.execute(
                "SELECT id FROM jobs WHERE build_id = $1 AND status = $2", (build_id, PENDING))]
            if approve:
                tx.notify("enqueued", jobs)
            else:
                for job_id in jobs:
                    tx.execute("UPDATE jobs SET status = $1, error = $2, finished_at = $3 "
                               "WHERE id = $4", (SKIPPED, f"declined by {login}", now, job_id))
                    self._record_status(tx, build_id, job_id, SKIPPED, f"declined by {login}",
                                        now)
        return self.get_build_by_id(build_id)

    def _insert_jobs(self, tx, build_id, environments, error, now, labels=None, *,
                     enqueue=True):
        if error:
            tx.execute("UPDATE builds SET status = $1, error = $2, started_at = $3, finished_at "
                       "= $4 "
                       "WHERE id = $5", (ERROR, error, now, now, build_id))
            self._record_status(tx, build_id, None, ERROR, error, now)
            return
        specs = [spec if isinstance(spec, JobSpec) else JobSpec(spec) for spec in environments]
        job_ids = [(tx.insert("INSERT INTO jobs (build_id, number, status, environment, "
                              "enqueued_at, labels, pipeline, depends_on, runs_on, waiting, "
                              "concurrency) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                              (build_id, number, PENDING, json.dumps(spec.environment), now,
                               spec.labels or labels or "{}", spec.pipeline,
                               json.dumps(list(spec.depends_on)) if spec.depends_on else "",
                               json.dumps(spec.runs_on) if spec.depends_on else "",
                               int(bool(spec.depends_on)), spec.concurrency)), spec.depends_on)
                   for number, spec in enumerate(specs, start=1)]
        if enqueue:
            tx.notify("enqueued", [job_id for job_id, needs in job_ids if not needs])
        self._jobs_added(tx, len(job_ids))

    def _jobs_added(self, tx, count):
        """After `count` jobs were added in `tx` (SQLite plans without statistics)."""

    def reset_build(self, build_id, fields, environments, *, error="", message="build restarted"):
        """Run a finished build again under the same number: its jobs, logs and
        job statuses are replaced. Raises Conflict while it is pending or running."""
        now = _now()
        with self._write(durable=True) as tx:
            self._lock_build(tx, build_id)
            row = tx.execute("SELECT status FROM builds WHERE id = $1", (build_id,)).fetchone()
            if row is None:
                raise NotFound(f"build {build_id} not found")
            if row[0] in ACTIVE_STATUSES or row[0] == BLOCKED:
                raise Conflict(f"the build is {row[0]}; wait for it to finish or cancel it")
            tx.execute("DELETE FROM statuses WHERE build_id = $1 AND job_id IS NOT NULL",
                       (build_id,))
            tx.execute("DELETE FROM jobs WHERE build_id = $1", (build_id,))
            values = self._stored_build_fields(fields)
            values.update(status=PENDING, error="", enqueued_at=now, started_at=0, finished_at=0)
            tx.execute(f"UPDATE builds SET {_assignments(values)} WHERE id = ${len(values) + 1}",
                       (*values.values(), build_id))
            self._record_status(tx, build_id, None, PENDING, message, now)
            self._insert_jobs(tx, build_id, environments, error, now, fields.get("labels"))
        return self.get_build_by_id(build_id)

    _COMMITS_AS_BYTES = True  # PostgreSQL's commit_sha is TEXT: ids stay hex there

    @classmethod
    def _stored_build_fields(cls, fields):
        """A build's fields as stored: as they were when it was made, its
        remote's credentials shown as ***, a full commit id as its bytes."""
        values = {key: fields[key] for key in _BUILD_FIELDS if key in fields}
        if isinstance(values.get("remote"), str):
            values["remote"] = _redact_url(values["remote"])
        commit = values.get("commit_sha")
        if cls._COMMITS_AS_BYTES and isinstance(commit, str) and re.fullmatch(
                r"[0-9a-f]{40}|[0-9a-f]{64}", commit):
            values["commit_sha"] = bytes.fromhex(commit)  # 20 bytes, not 40 characters
        return values

    @staticmethod
    def _complete_builds(rows):
        """Builds as read: a commit id stored as bytes shown in hex."""
        for row in rows:
            if row is not None and isinstance(row["commit_sha"], bytes):
                row["commit_sha"] = row["commit_sha"].hex()
        return rows

    def get_build_by_id(self, build_id):
        return self._complete_builds([self._one(
            "SELECT * FROM builds WHERE id = $1", (build_id,), f"build {build_id} not found")])[0]

    def get_build(self, repo_id, number):
        """Build `number` of a repository; raises NotFound."""
        return self._complete_builds([self._one(
            "SELECT * FROM builds WHERE repo_id = $1 AND number = $2", (repo_id, number),
            f"build {number} not found")])[0]

    def previous_build(self, build):
        """The newest finished build of the same repository and branch before `build`."""
        return self._complete_builds([self._query_one(
            "SELECT * FROM builds WHERE repo_id = $1 AND branch = $2 AND number < $3 "
            "AND status NOT IN ('pending', 'running') ORDER BY number DESC LIMIT 1",
            (build["repo_id"], build["branch"], build["number"]))])[0]

    def newest_builds(self, *, active=False, limit=50):
        """The newest builds of every repository, newest first (only pending
        and running ones with `active`), each with its repository's id."""
        where = "WHERE status IN ($1, $2) " if active else ""
        return self._complete_builds(self._query(
            f"SELECT * FROM builds {where}ORDER BY id DESC LIMIT {int(limit)}",
            (PENDING, RUNNING) if active else ()))

    def latest_build(self, repo_id, branch=None, event=None):
        """The newest build of a repository (on `branch`, of `event`); raises NotFound."""
        sql, params = "SELECT * FROM builds WHERE repo_id = $1", [repo_id]
        if branch:
            params.append(branch)
            sql += f" AND branch = ${len(params)}"
        if event:
            params.append(event)
            sql += f" AND event = ${len(params)}"
        return self._complete_builds([self._one(
            sql + " ORDER BY number DESC LIMIT 1", params,
            "no build yet" + (f" on branch {branch}" if branch else ""))])[0]

    def list_builds(self, repo_id, *, offset=0, limit=DEFAULT_PER_PAGE, branch=None,
                    status=None):
        """Builds of a repository, newest first."""
        if offset and not branch and not status:
            return self._complete_builds(self._query(
                "SELECT * FROM builds WHERE repo_id = $1 AND number <= $2 ORDER BY number DESC "
                "LIMIT $3", (repo_id, self._number_at_offset(repo_id, offset), limit)))
        where, params = self._build_filter(repo_id, branch, status)
        return self._complete_builds(self._query(
            f"SELECT * FROM builds WHERE {where} ORDER BY number DESC "
            f"LIMIT ${len(params) + 1} OFFSET ${len(params) + 2}",
            (*params, limit, offset)))

    def _number_at_offset(self, repo_id, offset):
        """A number with exactly `offset` existing builds above it (the builds
        at or below it are the page): the builds above `x` are the numbers
        above it less the deleted ones (those listed, and every number below
        the oldest build, which are not). A few steps of x = last - offset -
        deleted(x) find it near the top; a bisection anywhere else."""
        last = self._scalar("SELECT last_number FROM repos WHERE id = $1", (repo_id,)) or 0
        floor = (self._scalar("SELECT min(number) FROM builds WHERE repo_id = $1",
                              (repo_id,)) or last + 1) - 1  # every number up to it is deleted

        def above(number):  # the existing builds above `number`
            number = max(number, 0)
            return last - number - self._scalar(
                "SELECT count(*) FROM deleted_builds WHERE repo_id = $1 AND number > $2",
                (repo_id, max(number, floor))) - max(0, floor - number)

        number = last - offset
        for _ in range(4):
            if number <= floor:
                return number  # past the oldest build: an empty page
            missing = offset - above(number)
            if not missing:
                return number
            number -= missing
        low, high = 0, last  # above() only falls as the number grows
        while low < high:
            middle = (low + high) // 2
            if above(middle) <= offset:
                high = middle
            else:
                low = middle + 1
        return low if above(low) == offset else 0

    def count_builds(self, repo_id, *, branch=None, status=None):
        where, params = self._build_filter(repo_id, branch, status)
        return self._scalar(f"SELECT count(*) FROM builds WHERE {where}", params)

    @staticmethod
    def _build_filter(repo_id, branch, status):
        where, params = "repo_id = $1", [repo_id]
        if branch:
            params.append(branch)
            where += f" AND branch = ${len(params)}"
        if status:
            params.append(status)
            where += f" AND status = ${len(params)}"
        return where, params

    def update_build(self, build_id, *, description=None, tags=None, pinned=None):
        """Change a build's description, tags (a list) or pinned flag."""
        values = {key: value for key, value in (
            ("description", description), ("tags", None if tags is None else json.dumps(tags)),
            ("pinned", None if pinned is None else int(pinned))) if value is not None}
        if values:
            with self._write() as tx:
                tx.execute(f"UPDATE builds SET {_assignments(values)} WHERE id = "
                           f"${len(values) + 1}",
                           (*values.values(), build_id))
        return self.get_build_by_id(build_id)

    def prunable_builds(self, keep_builds, keep_days, *, now=None, limit=100):
        """Builds past retention, oldest first: beyond each repository's newest
        `keep_builds`, or older than `keep_days` (a repository's own settings
        win; 0 is no limit). Pinned builds and pending or running ones never
        are. [{id, owner, name, number, status, created_at, log_bytes}]."""
        now = time.time() if now is None else now
        found = []
        for repo in self._query("SELECT id, owner, name, keep_builds, keep_days FROM repos "
                                "ORDER BY id"):
            keep, days = repo["keep_builds"] or keep_builds, repo["keep_days"] or keep_days
            clauses, params = [], [repo["id"], PENDING, RUNNING]
            if keep:
                cutoff = self._query_one("SELECT number FROM builds WHERE repo_id = $1 "
                                         "ORDER BY number DESC LIMIT 1 OFFSET $2",
                                         (repo["id"], keep))
                if cutoff is not None:
                    params.append(cutoff["number"])
                    clauses.append(f"b.number <= ${len(params)}")
            if days:
                params.append(int(now - days * 86400))
                clauses.append(f"b.created_at < ${len(params)}")
            if not clauses or len(found) >= limit:
                continue
            found += [dict(row, owner=repo["owner"], name=repo["name"]) for row in self._query(
                "SELECT b.id, b.number, b.status, b.created_at, (SELECT COALESCE(SUM("
                "length(c.data)), 0) FROM log_chunks c JOIN jobs j ON j.id = c.job_id "
                "WHERE j.build_id = b.id) AS log_bytes FROM builds b WHERE b.repo_id = $1 "
                "AND b.pinned = 0 AND b.status NOT IN ($2, $3) "
                f"AND ({' OR '.join(clauses)}) ORDER BY b.number LIMIT ${len(params) + 1}",
                (*params, limit - len(found)))]
        return found

    def delete_builds(self, build_ids):
        """Delete finished builds (with their jobs, statuses and logs) in one
        transaction; active ones are left alone. Returns how many went."""
        with self._write() as tx:
            deleted = 0
            for build_id in build_ids:
                tx.execute("INSERT INTO deleted_builds (repo_id, number) SELECT repo_id, number "
                           "FROM builds WHERE id = $1 AND status NOT IN ($2, $3) "
                           "ON CONFLICT DO NOTHING", (build_id, PENDING, RUNNING))
                deleted += tx.execute("DELETE FROM builds WHERE id = $1 AND status NOT IN ($2, $3)",
                                      (build_id, PENDING, RUNNING)).rowcount
            # Every number below a repository's oldest build is a deleted one:
            # no row needs to say so (retention would add one per build forever).
            tx.execute("DELETE FROM deleted_builds WHERE number < (SELECT min(b.number) FROM "
                       "builds b WHERE b.repo_id = deleted_builds.repo_id)")
        return deleted

    def give_back_space(self, pages=VACUUM_BATCH_PAGES):
        """Return up to `pages` free pages to the file system (incremental
        vacuum, one short write); True while more are left."""
        conn = self._connection()
        if not conn.execute("PRAGMA freelist_count").fetchone()[0]:
            return False
        with self._write_lock:
            # execute() steps this pragma once; a script runs it to the end.
            conn.executescript(f"PRAGMA incremental_vacuum({int(pages)});")
        return bool(conn.execute("PRAGMA freelist_count").fetchone()[0])

    def delete_build(self, build_id):
        """Delete a finished build with its jobs, statuses and logs."""
        with self._write() as tx:
            row = tx.execute("SELECT status FROM builds WHERE id = $1", (build_id,)).fetchone()
            if row is None:
                raise NotFound(f"build {build_id} not found")
            if row[0] in ACTIVE_STATUSES:
                raise Conflict(f"the build is {row[0]}; cancel it first")
            tx.execute("INSERT INTO deleted_builds (repo_id, number) SELECT repo_id, number "
                       "FROM builds WHERE id = $1 ON CONFLICT DO NOTHING", (build_id,))
            tx.execute("DELETE FROM builds WHERE id = $1", (build_id,))

    # -- jobs ---------------------------------------------------------------

    def list_jobs(self, build_id):
        return self._query("SELECT * FROM jobs WHERE build_id = $1 ORDER BY number", (build_id,))

    def failed_pipelines(self, build_id):
        """The pipelines of a build's jobs that have ended failure, error or
        killed by now, in the jobs' order (Drone's DRONE_FAILED_STAGES)."""
        return [row["pipeline"] for row in self._query(
            "SELECT pipeline FROM jobs WHERE build_id = $1 AND status IN ($2, $3, $4) "
            "ORDER BY number", (build_id, FAILURE, ERROR, KILLED))]

    def get_job(self, build_id, number):
        return self._one("SELECT * FROM jobs WHERE build_id = $1 AND number = $2",
                         (build_id, number), f"job {number} not found")

    def get_job_by_id(self, job_id):
        return self._one("SELECT * FROM jobs WHERE id = $1", (job_id,), f"job {job_id} not found")

    def claim_next_job(self, runner_id, labels=None):
        """Atomically take the oldest runnable pending job for `runner_id`,
        whose `labels` ({name: value}) hold every label the job requires.

        Respects each build's ``max_parallel`` and each repository's
        ``max_builds``. Returns the job dict (now running), or None. Its
        ``lease`` is what the runner shows to write the job's log, steps and
        end (see `append_log`): a job ended elsewhere refuses them.
        """
        now = _now()
        accepted = _label_subsets(labels or {})
        query = ("SELECT j.id, j.build_id, b.status AS build_status, b.max_parallel, b.repo_id, "
                 "r.max_builds, j.pipeline, j.concurrency FROM jobs j "
                 "JOIN builds b ON b.id = j.build_id "
                 "JOIN repos r ON r.id = b.repo_id WHERE j.status = $1 AND b.status <> 'blocked' "
                 f"AND j.waiting = 0 AND j.labels IN ({_marks(len(accepted), 2)}) "
                 "ORDER BY j.id LIMIT 64")
        params = (PENDING, *accepted)
        with self._write(rows_only=True) as tx:
            candidates = tx.execute(query, params).fetchall()
            candidate = self._first_startable(tx, candidates)
            if candidate is None and candidates and self._wait_for_build(tx, candidates[0]):
                # Other claims had every build it could start a job of: now
                # that the oldest's is free, what is pending as they left it.
                candidate = self._first_startable(tx, tx.execute(query, params).fetchall())
            if candidate is None:
                return None
            job = dict(tx.execute(
                "UPDATE jobs SET status = $1, started_at = $2, claimed_by = $3, heartbeat_at = $4, "
                "lease = $5 WHERE id = $6 RETURNING *",
                (RUNNING, now, runner_id, now, secrets.token_hex(12), candidate["id"])).fetchone())
            self._record_status(tx, candidate["build_id"], candidate["id"], RUNNING,
                                f"started by runner {runner_id}", now)
            if candidate["build_status"] != RUNNING:
                # A running build with a job still pending stays running, as
                # it started: only a build's first claim changes it.
                self._roll_up(tx, candidate["build_id"], now)
            return job

    def _first_startable(self, tx, candidates):
        return next((row for row in candidates
                     if self._take(tx, row) and self._may_start(tx, row)), None)

    @staticmethod
    def _wait_for_build(tx, candidate):
        """Hold the first candidate's build, waiting for the claim that has it:
        True if it waited (SQLite: the claim holds the whole file already)."""
        return False

    @staticmethod
    def _take(tx, candidate):
        """Lock a candidate job for this claim; False if another claim has it."""
        return True

    @staticmethod
    def _may_start(tx, candidate):
        """Whether a pending job fits its build's max_parallel, its pipeline's
        concurrency and its repository's max_builds."""
        if candidate["max_parallel"] and tx.execute(
                "SELECT count(*) FROM jobs WHERE build_id = $1 AND status = $2",
                (candidate["build_id"], RUNNING)).fetchone()[0] >= candidate["max_parallel"]:
            return False
        if candidate["concurrency"] and tx.execute(
                "SELECT count(*) FROM jobs j JOIN builds b ON b.id = j.build_id "
                "WHERE b.repo_id = $1 AND j.pipeline = $2 AND j.status = $3",
                (candidate["repo_id"], candidate["pipeline"], RUNNING)
        ).fetchone()[0] >= candidate["concurrency"]:
            return False
        return not (candidate["max_builds"] and candidate["build_status"] == PENDING and tx.execute(
            "SELECT count(*) FROM builds WHERE repo_id = $1 AND status = $2",
            (candidate["repo_id"], RUNNING)).fetchone()[0] >= candidate["max_builds"])

    def finish_job(self, job_id, status, *, exit_code=0, error="", message="", lease=None):
        """Record a job's end, apply fail_fast and roll the build's status up.
        With the claim's `lease`: Conflict if the job was ended meanwhile."""
        now = _now()
        with self._write(rows_only=True, durable=True) as tx:
            job = self._lock_build_of_job(tx, job_id)
            if job is None:
                return  # deleted
            if lease is not None and job["lease"] != lease:
                raise Conflict(f"job {job_id} is not this runner's")
            if job["status"] in DONE_STATUSES:
                if lease is not None and job["status"] != status:
                    raise Conflict(f"job {job_id} ended {job['status']} meanwhile: "
                                   f"{job['error']}")
                return  # already finished, by recovery
            tx.execute("UPDATE jobs SET status = $1, exit_code = $2, error = $3, finished_at = $4, "
                       "heartbeat_at = 0 WHERE id = $5", (status, exit_code, error, now, job_id))
            self._record_status(tx, job["build_id"], job_id, status,
                                message or error or f"exit code {exit_code}", now)
            if job["fail_fast"] and status not in (SUCCESS, SKIPPED):
                self._cancel_jobs(tx, job["build_id"], None, SKIPPED,
                                  f"cancelled by fail_fast: job {job['number']} ended {status}",
                                  now)
            self._roll_up(tx, job["build_id"], now)
        self._wake_log_followers()  # live logs end now, not at their next poll

    def cancel_jobs(self, build_id, job_number=None, *, pending_status=KILLED,
                    message="cancelled"):
        """Stop a build's active jobs (or one job): pending ones get
        `pending_status` at once, running ones are asked to stop and end as
        killed. Raises Conflict if nothing is active. Returns the build."""
        now = _now()
        with self._write(durable=True) as tx:
            self._cancel_jobs(tx, build_id, job_number, pending_status, message, now,
                              require_active=True)
            self._roll_up(tx, build_id, now, cancelled=job_number is None)
        return self.get_build_by_id(build_id)

    def wait_until_done(self, build_id, timeout):
        """The build once none of its jobs runs (or as it is after `timeout` s)."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.log_events_seen()
            build = self.get_build_by_id(build_id)
            remaining = deadline - time.monotonic()
            if build["status"] not in ACTIVE_STATUSES or remaining <= 0:
                return build
            self.wait_for_log(min(0.2, remaining), seen)  # a job's end wakes it

    def _cancel_jobs(self, tx, build_id, job_number, pending_status, message, now,
                     require_active=False):
        self._lock_build(tx, build_id)
        sql = "SELECT id, number, status FROM jobs WHERE build_id = $1 AND status IN ($2, $3)"
        params = [build_id, PENDING, RUNNING]
        if job_number is not None:
            params.append(job_number)
            sql += f" AND number = ${len(params)}"
        jobs = tx.execute(sql, params).fetchall()
        if require_active and not jobs:
            if job_number is not None:
                if not tx.execute("SELECT 1 FROM jobs WHERE build_id = $1 AND number = $2",
                                  (build_id, job_number)).fetchone():
                    raise NotFound(f"job {job_number} not found")
                raise Conflict(f"job {job_number} is not pending or running")
            number = tx.execute("SELECT number FROM builds WHERE id = $1",
                                (build_id,)).fetchone()
            raise Conflict(f"build {number[0] if number else build_id} has no pending or "
                           "running jobs")
        running = []
        for job in jobs:
            if job["status"] == PENDING:
                tx.execute("UPDATE jobs SET status = $1, error = $2, finished_at = $3 "
                           "WHERE id = $4", (pending_status, message, now, job["id"]))
                self._record_status(tx, build_id, job["id"], pending_status, message, now)
            else:
                tx.execute("UPDATE jobs SET cancel_requested = 1, error = $1 WHERE id = $2",
                           (message, job["id"]))
                running.append(job["id"])
        tx.notify("cancel", running)

    def cancel_requested_jobs(self, runner_id):
        """Ids of `runner_id`'s running jobs that someone asked to stop."""
        return [row[0] for row in self._connection().execute(
            "SELECT id FROM jobs WHERE status = $1 AND claimed_by = $2 AND cancel_requested = 1",
            (RUNNING, runner_id))]

    # -- steps --------------------------------------------------------------

    def add_steps(self, job_id, steps, *, lease=None):
        """Record a job's steps, pending, in order: [(name, kind), ...]; returns
        their ids. With the claim's `lease`: Conflict if the job has ended."""
        with self._write(rows_only=True) as tx:
            if lease is not None:
                self._check_lease(tx, job_id, lease)
            tx.execute("DELETE FROM steps WHERE job_id = $1", (job_id,))
            return [tx.insert("INSERT INTO steps (job_id, number, name, kind) "
                              "VALUES ($1, $2, $3, $4)", (job_id, number, name, kind))
                    for number, (name, kind) in enumerate(steps, start=1)]

    _STEP_FIELDS = frozenset(("status", "exit_code", "started_at", "finished_at", "log_start",
                              "log_end"))

    def update_step(self, step_id, *, lease=None, **fields):
        """Change a step's status, exit_code, started_at, finished_at, log_start
        or log_end. With its job's `lease`: Conflict if the job has ended."""
        sql = f"UPDATE steps SET {self._step_assignments(fields)} WHERE id = ${len(fields) + 1}"
        if lease is None:
            self._write_one(sql, (*fields.values(), step_id))
        elif not self._write_one(sql + _LEASED.format(job="steps.job_id", lease=len(fields) + 2),
                                 (*fields.values(), step_id, lease)).rowcount:
            raise self._ended(self._scalar("SELECT job_id FROM steps WHERE id = $1",
                                           (step_id,)))

    def update_job_step(self, job_id, number, lease, **fields):
        """`update_step` by the step's number in its job (what an agent knows),
        in one statement: Conflict if the job has ended or has no such step."""
        count = len(fields)
        if not self._write_one(
                f"UPDATE steps SET {self._step_assignments(fields)} WHERE job_id = ${count + 1} "
                f"AND number = ${count + 2}" + _LEASED.format(job="steps.job_id", lease=count + 3),
                (*fields.values(), job_id, number, lease)).rowcount:
            raise self._ended(job_id)

    def _step_assignments(self, fields):
        """The SET list of an UPDATE of a step's `fields`; BadRequest for a
        field a step does not have."""
        unknown = set(fields) - self._STEP_FIELDS
        if unknown:
            raise BadRequest(f"unknown step field {min(unknown)!r}")
        return _assignments(fields)

    def _check_lease(self, tx, job_id, lease):
        if tx.execute("SELECT 1 FROM jobs WHERE id = $1" + _LEASED.format(job="$1", lease=2),
                      (job_id, lease)).fetchone() is None:
            raise self._ended(job_id)

    def _ended(self, job_id):
        """Conflict: the job is no longer running under this claim, and why."""
        job = self._query_one("SELECT status, error FROM jobs WHERE id = $1", (job_id,))
        if job is None:
            return Conflict(f"job {job_id} was deleted")
        return Conflict(f"job {job_id} has ended ({job['status']}"
                        + (f": {job['error']})" if job["error"] else ")"))

    def list_steps(self, job_ids):
        """{job id: [steps in order]} for the given jobs."""
        job_ids = list(job_ids)
        steps = {job_id: [] for job_id in job_ids}
        for start in range(0, len(job_ids), 500):
            batch = job_ids[start:start + 500]
            for row in self._query(f"SELECT * FROM steps WHERE job_id IN "
                                   f"({_marks(len(batch))}) ORDER BY job_id, number",
                                   batch):
                steps[row["job_id"]].append(row)
        return steps

    # -- status history and roll-up -----------------------------------------

    def _record_status(self, tx, build_id, job_id, status, message, now):
        self._lock_build(tx, build_id)  # statuses are numbered within their build
        usual = _DEFAULT_MESSAGES.get((job_id is None, status), "")
        if message == usual or usual.endswith("{}") and message.startswith(usual[:-2]):
            message = ""  # the usual words are not stored: they are shown when read
        tx.execute("INSERT INTO statuses (build_id, id, job_id, status, message, created_at) "
                   "VALUES ($1, (SELECT COALESCE(MAX(id), 0) + 1 FROM statuses WHERE "
                   "build_id = $1), $2, $3, $4, $5)", (build_id, job_id, status, message, now))
        if job_id is None:
            self._enqueue_report(tx, build_id, status)

    def _release_waiting(self, tx, build_id, now):
        """Jobs that wait for other pipelines of their build: once those have
        all ended, each may be claimed, or ends skipped where they did not
        end as it runs on (see `_runs_after`); a skip may end another's wait."""
        waiting = tx.execute("SELECT id, pipeline, depends_on, runs_on FROM jobs WHERE "
                             "build_id = $1 AND waiting = 1 AND status = $2",
                             (build_id, PENDING)).fetchall()
        if not waiting:
            return
        statuses = [(row["id"], row["pipeline"], row["status"]) for row in tx.execute(
            "SELECT id, pipeline, status FROM jobs WHERE build_id = $1", (build_id,))]
        released, progress = [], True
        while progress:
            progress = False
            for job in list(waiting):
                runs, why = _runs_after(job, statuses)
                if runs is None:
                    continue
                waiting.remove(job)
                progress = True
                if runs:
                    tx.execute("UPDATE jobs SET waiting = 0 WHERE id = $1", (job["id"],))
                    released.append(job["id"])
                    continue
                tx.execute("UPDATE jobs SET status = $1, error = $2, finished_at = $3, "
                           "waiting = 0 WHERE id = $4", (SKIPPED, why, now, job["id"]))
                self._record_status(tx, build_id, job["id"], SKIPPED, why, now)
                statuses = [(job_id, pipeline, SKIPPED if job_id == job["id"] else status)
                            for job_id, pipeline, status in statuses]
        if released:
            tx.notify("enqueued", released)

    def _roll_up(self, tx, build_id, now, *, cancelled=False):
        """Derive the build's status from its jobs (DESIGN.md section 3), with
        aggregates: a 256-job matrix costs one pass in SQLite, not 256 rows.
        A build `cancelled` before any job failed ends killed, not success."""
        self._lock_build(tx, build_id)
        totals = self._job_totals(tx, build_id)
        if totals[4]:  # jobs wait for other pipelines: some may start or skip now
            self._release_waiting(tx, build_id, now)
            totals = self._job_totals(tx, build_id)
        count, active, started_at, finished_at, _, build_status, *was = totals
        if build_status is None or not count:
            return
        if active:
            status = RUNNING if started_at or build_status == RUNNING else PENDING
            finished_at, message = 0, ""
        else:
            failed = tx.execute(
                "SELECT number, status FROM jobs WHERE build_id = $1 "
                "AND status NOT IN ('success', 'skipped') ORDER BY number LIMIT 1",
                (build_id,)).fetchone()
            status = failed["status"] if failed else KILLED if cancelled else SUCCESS
            message = (f"build finished: job {failed['number']} ended {status}" if failed
                       else "build finished: cancelled" if cancelled
                       else "build finished: every job succeeded")
        if [status, started_at or 0, finished_at] != [build_status, *was]:
            # (A job's end in a build with others still running changes nothing.)
            tx.execute("UPDATE builds SET status = $1, started_at = $2, finished_at = $3 "
                       "WHERE id = $4", (status, started_at or 0, finished_at, build_id))
        if status == RUNNING and build_status == PENDING:
            # Implied by the job's own "running" just before: reported, not stored.
            self._enqueue_report(tx, build_id, status)
        elif status != build_status:
            self._record_status(tx, build_id, None, status, message, now)

    @staticmethod
    def _job_totals(tx, build_id):
        """(jobs, active, first start, last end, waiting, the build's status,
        start and end) of a build, in one statement."""
        return tuple(tx.execute(
            "SELECT count(*), "
            "sum(CASE WHEN status IN ('pending', 'running') THEN 1 ELSE 0 END), "
            "min(CASE WHEN started_at > 0 THEN started_at END), max(finished_at), "
            "sum(CASE WHEN waiting = 1 AND status = 'pending' THEN 1 ELSE 0 END), "
            "(SELECT status FROM builds WHERE id = $1), "
            "(SELECT started_at FROM builds WHERE id = $1), "
            "(SELECT finished_at FROM builds WHERE id = $1) "
            "FROM jobs WHERE build_id = $1", (build_id,)).fetchone())

    def list_statuses(self, build_id, *, offset=0, limit=-1):
        """The build's status history, oldest first."""
        return [_with_message(row) for row in self._query(
            "SELECT s.*, j.number AS job_number, j.claimed_by FROM statuses s LEFT JOIN jobs j "
            "ON j.id = s.job_id WHERE s.build_id = $1 ORDER BY s.build_id, s.id LIMIT $2 OFFSET $3",
            (build_id, limit if limit >= 0 else 2 ** 62, offset))]

    def count_statuses(self, build_id):
        return self._scalar("SELECT count(*) FROM statuses WHERE build_id = $1", (build_id,))

    def get_status(self, build_id, status_id):
        return _with_message(self._one(
            "SELECT s.*, j.number AS job_number, j.claimed_by FROM statuses s LEFT JOIN jobs j "
            "ON j.id = s.job_id WHERE s.build_id = $1 AND s.id = $2", (build_id, status_id),
            f"status {status_id} not found"))

    # -- secrets ------------------------------------------------------------

    def set_secret(self, repo_id, name, value, events=None, images=None):
        """Add or replace a repository secret (stored sealed), given to the
        builds of `events` and, if `images` names any, only to the steps whose
        image matches one of them (see _image_allowed)."""
        if not isinstance(name, str) or not _ENV_NAME_PATTERN.match(name):
            raise BadRequest(f"invalid secret name {name!r}: use a variable name")
        if not isinstance(value, str) or not value or "\x00" in value:
            raise BadRequest("the secret value must be a non-empty string")
        events = list(dict.fromkeys(events)) if events else list(SECRET_EVENTS)
        if not all(event in EVENTS for event in events):
            raise BadRequest(f"events must be among {', '.join(EVENTS)}")
        images = [] if images is None or "*" in images else list(images)
        if len(images) > 100 or not all(
                isinstance(image, str) and 0 < len(image) <= 255 and image.isprintable()
                and " " not in image for image in images):
            raise BadRequest("images must be up to 100 image names or patterns, like "
                             "plugins/docker or plugins/*")
        with self._write() as tx:
            tx.execute("INSERT INTO secrets (repo_id, name, value, events, images) "
                       "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (repo_id, name) DO UPDATE SET "
                       "value = excluded.value, events = excluded.events, "
                       "images = excluded.images",
                       (repo_id, name, self.sealer.seal(value, f"repo {repo_id} secret {name}"),
                        json.dumps(events), json.dumps(images)))

    def list_secrets(self, repo_id):
        """Names, events and images of a repository's secrets (never the values)."""
        return [{"name": row["name"], "events": json.loads(row["events"]),
                 "images": json.loads(row["images"])}
                for row in self._query("SELECT name, events, images FROM secrets "
                                       "WHERE repo_id = $1 ORDER BY name", (repo_id,))]

    def secret_images(self, repo_id, *, job_id=None):
        """{name: [image patterns]} of the repository's secrets limited to
        images (`job_id`: the job that asks; an agent's store answers from it)."""
        return {row["name"]: json.loads(row["images"]) for row in self._query(
            "SELECT name, images FROM secrets WHERE repo_id = $1 AND images != '[]'",
            (repo_id,))}

    def delete_secret(self, repo_id, name):
        with self._write() as tx:
            if not tx.execute("DELETE FROM secrets WHERE repo_id = $1 AND name = $2",
                              (repo_id, name)).rowcount:
                raise NotFound(f"secret {name} not found")

    def secrets_for(self, repo_id, event, *, job_id=None):
        """{name: value} of the secrets a build of `event` may see (`job_id`:
        the job that asks; an agent's store answers from what came with it)."""
        return {row["name"]: self.sealer.unseal(row["value"],
                                                f"repo {repo_id} secret {row['name']}")
                for row in self._query("SELECT name, value, events FROM secrets "
                                       "WHERE repo_id = $1", (repo_id,))
                if event in json.loads(row["events"])}

    # -- cron schedules -----------------------------------------------------

    def add_cron(self, repo_id, name, expression, branch=""):
        """Add a schedule; its first time is computed now (UTC)."""
        _check_name(name, "cron name")
        next_at = _next_cron_time(expression, time.time())
        try:
            with self._write() as tx:
                tx.execute("INSERT INTO crons (repo_id, name, expression, branch, next_at, "
                           "created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                           (repo_id, name, expression, branch, next_at, _now()))
        except self.IntegrityError:
            raise Conflict(f"cron {name} already exists") from None
        return self._query_one("SELECT * FROM crons WHERE repo_id = $1 AND name = $2",
                               (repo_id, name))

    def list_crons(self, repo_id=None):
        sql = ("SELECT c.*, r.owner, r.name AS repo_name FROM crons c "
               "JOIN repos r ON r.id = c.repo_id")
        if repo_id is not None:
            return self._query(sql + " WHERE c.repo_id = $1 ORDER BY c.name", (repo_id,))
        return self._query(sql + " ORDER BY r.owner, r.name, c.name")

    def delete_cron(self, repo_id, name):
        with self._write() as tx:
            if not tx.execute("DELETE FROM crons WHERE repo_id = $1 AND name = $2",
                              (repo_id, name)).rowcount:
                raise NotFound(f"cron {name} not found")

    def take_due_crons(self, now=None):
        """The crons due now, each moved on to its next time after `now` in the
        same transaction: across processes each due time is taken once, and a
        schedule missed during downtime runs once, not once per missed slot."""
        now = time.time() if now is None else now
        with self._write() as tx:
            due = [dict(cron) for cron in tx.execute("SELECT * FROM crons WHERE next_at <= $1",
                                                     (now,)).fetchall()]
            for cron in due:
                tx.execute("UPDATE crons SET next_at = $1 WHERE id = $2",
                           (_next_cron_time(cron["expression"], now), cron["id"]))
        return due

    # -- commit status reports (outbox) --------------------------------------

    def _enqueue_report(self, tx, build_id, status):
        # One statement: only a repository with a forge has reports.
        if tx.execute("INSERT INTO reports (build_id, state, description, next_at) "
                      "SELECT b.id, $2, $3, $4 FROM builds b JOIN repos r ON r.id = b.repo_id "
                      "WHERE b.id = $1 AND r.forge <> ''",
                      (build_id, status, _REPORT_DESCRIPTIONS[status], time.time())).rowcount:
            tx.notify("report", [build_id])

    def claim_report(self, lease=60.0):
        """Take the oldest due report whose build has no older undelivered one
        (so a forge sees pending before success); None if there is none."""
        now = time.time()
        # A read first: an idle server should not take the write lock for nothing.
        if self._query_one("SELECT 1 FROM reports WHERE done = 0 AND next_at <= $1 "
                           "AND claimed_until < $2 LIMIT 1", (now, now)) is None:
            return None
        with self._write() as tx:
            row = tx.execute(
                "SELECT * FROM reports r WHERE done = 0 AND next_at <= $1 AND claimed_until < $2 "
                "AND NOT EXISTS (SELECT 1 FROM reports o WHERE o.build_id = r.build_id "
                "AND o.done = 0 AND o.id < r.id) ORDER BY id LIMIT 1", (now, now)).fetchone()
            if row is None:
                return None
            tx.execute("UPDATE reports SET claimed_until = $1 WHERE id = $2",
                       (now + lease, row["id"]))
            return dict(row)

    def next_report_due(self):
        """When (time.time()) the next undelivered report is due, or None."""
        return self._scalar("SELECT min(CASE WHEN next_at > claimed_until THEN next_at "
                            "ELSE claimed_until END) FROM reports WHERE done = 0")

    def finish_report(self, report_id, *, error="", retry_in=None):
        """Record a delivery: done, or (with `retry_in` seconds) tried again
        later; a final failure is shown on the build as report_error."""
        with self._write() as tx:
            report = tx.execute("SELECT build_id FROM reports WHERE id = $1",
                                (report_id,)).fetchone()
            if report is None:
                return
            if retry_in is not None:
                tx.execute("UPDATE reports SET attempts = attempts + 1, next_at = $1, "
                           "claimed_until = 0 WHERE id = $2", (time.time() + retry_in, report_id))
            else:
                tx.execute("UPDATE reports SET attempts = attempts + 1, done = 1 WHERE id = $1",
                           (report_id,))
            tx.execute("UPDATE builds SET report_error = $1 WHERE id = $2",
                       (error, report["build_id"]))

    # -- runners ------------------------------------------------------------

    def register_runner(self, runner_id, hostname, pid, workers=0, labels=None, *, agent="",
                        pid_start=None, url=""):
        """Record a runner: its host, its process by pid and start time (so
        that a restart knows at once whether that process still runs), how
        many jobs it runs at once, its labels, the agent it is (if it joined
        over HTTP: then `pid_start` is what the agent said), and the URL it
        answers at if it serves."""
        with self._write() as tx:
            now = self._clock(tx)
            tx.execute("INSERT INTO runners (id, hostname, pid, pid_start, workers, started_at, "
                       "heartbeat_at, labels, agent, url) "
                       "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
                       "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                       (runner_id, hostname, pid,
                        _process_start(pid) if pid_start is None else pid_start, workers, now,
                        now, json.dumps(labels or {}, sort_keys=True), agent, url))

    def serving_url(self):
        """The public URL of a live server on this store ("" if none serves)."""
        row = self._query_one("SELECT url FROM runners WHERE url != '' AND heartbeat_at >= $1 "
                              "ORDER BY heartbeat_at DESC LIMIT 1",
                              (self._clock() - RUNNER_LOST_SECONDS,))
        return row["url"] if row is not None else ""

    def get_runner(self, runner_id):
        return self._one("SELECT * FROM runners WHERE id = $1", (runner_id,),
                         f"runner {runner_id} not found")

    # -- agents -------------------------------------------------------------

    def create_agent(self, name, labels=None):
        """Make an agent's credential; returns (agent row, token). Only the
        token's SHA-256 is stored: the token is shown this once."""
        _check_name(name, "agent name")
        secret = AGENT_TOKEN_PREFIX + secrets.token_urlsafe(32)
        try:
            with self._write() as tx:
                tx.insert("INSERT INTO agents (name, hash, labels, created_at) "
                          "VALUES ($1, $2, $3, $4)",
                          (name, _token_hash(secret), json.dumps(labels or {}, sort_keys=True),
                           _now()))
        except self.IntegrityError:
            raise Conflict(f"agent {name} already exists") from None
        return self.get_agent(name), secret

    def get_agent(self, name):
        return self._one("SELECT id, name, labels, created_at, last_seen_at, version, address "
                         "FROM agents WHERE name = $1", (name,), f"agent {name} not found")

    def list_agents(self):
        """Agents (never their tokens), each with its live runners and running jobs."""
        agents = self._query("SELECT id, name, labels, created_at, last_seen_at, version, "
                             "address FROM agents ORDER BY name")
        runners = self._query("SELECT r.agent, r.id, r.workers, (SELECT count(*) FROM jobs j "
                              "WHERE j.claimed_by = r.id AND j.status = $1) AS running "
                              "FROM runners r WHERE r.agent <> ''", (RUNNING,))
        for agent in agents:
            mine = [runner for runner in runners if runner["agent"] == agent["name"]]
            agent["runners"] = [runner["id"] for runner in mine]
            agent["workers"] = sum(runner["workers"] for runner in mine)
            agent["running"] = sum(runner["running"] for runner in mine)
        return agents

    def delete_agent(self, name):
        """Revoke an agent at once: its token no longer works, its runners are
        gone and the jobs they ran end as error."""
        with self._write() as tx:
            if not tx.execute("DELETE FROM agents WHERE name = $1", (name,)).rowcount:
                raise NotFound(f"agent {name} not found")
            runners = [row[0] for row in tx.execute("SELECT id FROM runners WHERE agent = $1",
                                                    (name,))]
            tx.execute("DELETE FROM runners WHERE agent = $1", (name,))
            self._end_jobs_of(tx, runners, f"agent {name} was removed")

    def _end_jobs_of(self, tx, runner_ids, message):
        """End as error the running jobs of these runners; their ids."""
        now, ended = self._clock(tx), []
        for runner_id in runner_ids:
            for job in tx.execute("SELECT id, build_id FROM jobs WHERE status = $1 "
                                  "AND claimed_by = $2", (RUNNING, runner_id)).fetchall():
                self._lock_build(tx, job["build_id"])
                if tx.execute("UPDATE jobs SET status = $1, error = $2, finished_at = $3 "
                              "WHERE id = $4 AND status = $5",
                              (ERROR, message, now, job["id"], RUNNING)).rowcount:
                    self._record_status(tx, job["build_id"], job["id"], ERROR, message, now)
                    self._roll_up(tx, job["build_id"], now)
                    ended.append(job["id"])
        return ended

    def agent_for_token(self, secret):
        """The agent a token belongs to, or None (a constant-time comparison,
        as for users' tokens)."""
        digest = _token_hash(secret)
        row = self._query_one("SELECT id, name, labels, hash, last_seen_at FROM agents "
                              "WHERE hash = $1", (digest,))
        if row is None or not hmac.compare_digest(row.pop("hash"), digest):
            return None
        return row

    def agent_connected(self, name, runner_id, *, hostname, version, address, previous="",
                        max_age=RUNNER_LOST_SECONDS):
        """An agent's process connected as `runner_id`: note it, and end the
        jobs of its `previous` run on that host (a restart: what they ran is
        gone) and of the agent's silent runners there. Conflict if another
        process of the agent still runs there (one process per agent token).
        Returns the ids of the jobs ended."""
        with self._write() as tx:
            now = self._clock(tx)
            others = tx.execute("SELECT id, pid, heartbeat_at FROM runners WHERE agent = $1 "
                                "AND hostname = $2 AND id <> $3",
                                (name, hostname, runner_id)).fetchall()
            alive = [runner for runner in others if runner["id"] != previous
                     and runner["heartbeat_at"] >= now - max_age]
            if alive:
                raise Conflict(f"agent {name} already runs on {hostname} (pid "
                               f"{alive[0]['pid']}): one process per agent token; make "
                               "another agent for another process")
            tx.execute("UPDATE agents SET last_seen_at = $1, version = $2, address = $3 "
                       "WHERE name = $4", (_now(), version, address, name))
            earlier = [runner["id"] for runner in others]
            for runner in earlier:
                tx.execute("DELETE FROM runners WHERE id = $1", (runner,))
            return self._end_jobs_of(tx, earlier, _RUNNER_STOPPED)

    def running_jobs(self, runner_id):
        """The jobs `runner_id` runs: {id: None, or why someone asked to stop it}."""
        return {row[0]: (row[2] or "cancelled") if row[1] else None
                for row in self._connection().execute(
                    "SELECT id, cancel_requested, error FROM jobs WHERE status = $1 "
                    "AND claimed_by = $2", (RUNNING, runner_id))}

    def job_holder(self, job_id):
        """The agent whose runner holds job `job_id` ('' for a server's runner,
        None for a runner that is gone); NotFound if there is no such job."""
        row = self._one("SELECT r.agent FROM jobs j LEFT JOIN runners r ON r.id = j.claimed_by "
                        "WHERE j.id = $1", (job_id,), f"job {job_id} not found")
        return row["agent"]

    def agent_builds_in_repo(self, name, repo_id):
        """The builds of `repo_id` whose jobs agent `name` runs now."""
        return [self.get_build_by_id(row[0]) for row in self._connection().execute(
            "SELECT DISTINCT j.build_id FROM jobs j JOIN runners r ON r.id = j.claimed_by "
            "JOIN builds b ON b.id = j.build_id WHERE j.status = $1 AND r.agent = $2 "
            "AND b.repo_id = $3", (RUNNING, name, repo_id))]

    def agent_seen(self, agent):
        """Stamp an agent's last contact (`agent` as `agent_for_token` gives
        it): written at most once a minute, and not even tried while the row
        read says it is fresh, so that a busy agent's calls take no write lock."""
        name = agent["name"]
        if (agent.get("last_seen_at") or 0) >= _now() - 60:
            return
        with contextlib.suppress(self.OperationalError):
            self._write_one("UPDATE agents SET last_seen_at = $1 WHERE name = $2 "
                            "AND last_seen_at < $3", (_now(), name, _now() - 60))

    def unregister_runner(self, runner_id):
        with self._write() as tx:
            tx.execute("DELETE FROM runners WHERE id = $1", (runner_id,))

    def heartbeat(self, runner_id):
        """Stamp a runner and its running jobs as alive. False if the runner
        is not registered (any more: another process found it lost)."""
        with self._write(rows_only=True) as tx:
            now = self._clock(tx)
            known = tx.execute("UPDATE runners SET heartbeat_at = $1 WHERE id = $2",
                               (now, runner_id)).rowcount
            tx.execute(self._STAMP_JOBS, (now, RUNNING, runner_id))
        return bool(known)

    _STAMP_JOBS = "UPDATE jobs SET heartbeat_at = $1 WHERE status = $2 AND claimed_by = $3"

    def queue(self):
        """Every pending job, in the order runners take them, with why it
        waits; and the running jobs. ({"pending": [...], "running": [...],
        "workers": how many all live runners have, "busy": running jobs})."""
        now = _now()
        runners = self.active_runners()
        workers = sum(runner["workers"] for runner in runners)
        running = self._query(
            "SELECT j.id, j.number AS job, j.started_at, j.claimed_by, j.build_id, j.pipeline, "
            "b.number AS build, b.repo_id, r.owner, r.name FROM jobs j "
            "JOIN builds b ON b.id = j.build_id JOIN repos r ON r.id = b.repo_id WHERE j.status = $1 ORDER BY j.id", (RUNNING,))
        pending = self._query(
            "SELECT j.id, j.number AS job, j.enqueued_at, j.build_id, b.number AS build, j.labels, "
            "j.waiting, j.depends_on, b.status AS build_status, b.max_parallel, b.repo_id, r.owner, r.name, "
            "r.max_builds, j.pipeline, j.concurrency FROM jobs j JOIN builds b ON b.id = j.build_id "
            "JOIN repos r ON r.id = b.repo_id WHERE j.status = $1 ORDER BY j.id", (PENDING,))
        by_build = collections.Counter(job["build_id"] for job in running)
        by_pipeline = collections.Counter((job["repo_id"], job["pipeline"]) for job in running)
        running_builds = collections.Counter(
            row["repo_id"] for row in self._query("SELECT repo_id FROM builds WHERE status = $1",
                                                  (RUNNING,)))
        offered = [json.loads(runner["labels"]).items() for runner in runners]
        # A deep queue is mostly jobs alike: each labels text is read and
        # matched against the runners once, not once per job.
        placeable = {}
        queue = []
        for position, job in enumerate(pending, start=1):
            if job["labels"] not in placeable:
                required = json.loads(job["labels"]).items()
                placeable[job["labels"]] = (required, any(required <= labels
                                                          for labels in offered))
            required, fits = placeable[job["labels"]]
            if job["build_status"] == BLOCKED:
                reason = ("its build waits for approval by someone with write access "
                          f"(Approve on its page, or `cirunner approve {job['owner']}/"
                          f"{job['name']} {job['build']}`)")
            elif job["waiting"]:
                reason = ("it runs after pipeline(s) "
                          f"{', '.join(json.loads(job['depends_on'] or '[]'))} of its build")
            elif not runners:
                reason = "no runner is running: start `cirunner serve` (or `build --wait`)"
            elif not fits:
                reason = ("no runner has the labels it requires: "
                          + ",".join(f"{key}={value}" for key, value in sorted(required))
                          + " (start `cirunner agent --labels ...` on a machine that has them)")
            elif job["max_parallel"] and by_build[job["build_id"]] >= job["max_parallel"]:
                reason = (f"its build runs {job['max_parallel']} jobs at once (max_parallel) "
                          "and they are all running")
            elif job["concurrency"] and by_pipeline[job["repo_id"], job["pipeline"]] >= \
                    job["concurrency"]:
                reason = (f"pipeline {job['pipeline']!r} runs {job['concurrency']} at once in "
                          f"{job['owner']}/{job['name']} (concurrency) and that many are running")
            elif (job["max_builds"] and job["build_status"] == PENDING
                  and running_builds[job["repo_id"]] >= job["max_builds"]):
                reason = (f"{job['owner']}/{job['name']} runs {job['max_builds']} build(s) at "
                          "once (max_builds) and that many are running")
            elif len(running) >= workers:
                reason = f"every worker is busy ({len(running)} of {workers})"
            else:
                reason = "next: a worker takes it now"
            queue.append({"position": position, "repo": f"{job['owner']}/{job['name']}",
                          "build": job["build"], "job": job["job"],
                          "waiting_seconds": max(0, now - job["enqueued_at"]),
                          "reason": reason, "repo_id": job["repo_id"]})
        return {"pending": queue, "workers": workers, "busy": len(running), "running": [
            {"repo": f"{job['owner']}/{job['name']}", "build": job["build"], "job": job["job"],
             "runner": job["claimed_by"], "running_seconds": max(0, now - job["started_at"]),
             "job_id": job["id"], "repo_id": job["repo_id"]} for job in running]}

    def running_jobs_of(self, runner_id):
        return self._scalar("SELECT COUNT(*) FROM jobs WHERE status = $1 AND claimed_by = $2",
                            (RUNNING, runner_id))

    def count_by_status(self, table):
        """{status: how many} of the builds or jobs."""
        assert table in ("builds", "jobs")
        return {row["status"]: row["n"] for row in self._query(
            f"SELECT status, COUNT(*) AS n FROM {table} GROUP BY status")}

    def queue_summary(self):
        """(how many jobs wait for a runner, when the oldest of them was enqueued
        or 0); not those of builds that wait for approval."""
        row = self._query_one("SELECT COUNT(*) AS n, MIN(j.enqueued_at) AS oldest FROM jobs j "
                              "JOIN builds b ON b.id = j.build_id "
                              "WHERE j.status = $1 AND j.waiting = 0 AND b.status <> $2",
                              (PENDING, BLOCKED))
        return row["n"], row["oldest"] or 0

    def builds_queued_before(self, build_id):
        """Builds with pending jobs that were made before `build_id`: what a
        runner starting now takes first. [{owner, name, number, jobs}], oldest first."""
        return self._query("SELECT r.owner, r.name, b.number, COUNT(*) AS jobs FROM jobs j "
                           "JOIN builds b ON b.id = j.build_id JOIN repos r ON r.id = b.repo_id "
                           "WHERE j.status = $1 AND b.id < $2 "
                           "GROUP BY b.id, r.owner, r.name, b.number ORDER BY b.id",
                           (PENDING, build_id))

    def active_runners(self, max_age=RUNNER_LOST_SECONDS):
        return self._query("SELECT * FROM runners WHERE heartbeat_at >= $1",
                           (self._clock() - max_age,))

    def _clock(self, tx=None):
        """Now, for heartbeats and their ages (SQLite: this machine's one clock)."""
        return _now()

    def recover_lost_jobs(self, runner_id, hostname, pid, *, max_age=RUNNER_LOST_SECONDS,
                          here=None, listening_since=0):
        """Mark as error the running jobs of runners that are gone.

        A runner is gone when it is on this host and its process has ended
        (dead, a zombie, or its pid now another process's), or is this process
        under another runner id (as after a restart in a container), or when
        its heartbeat is older than `max_age` seconds. An HTTP agent stamps
        its heartbeat through a server: one that has listened only since
        `listening_since` (a restart) gives it `max_age` from then.
        Returns the ids of the jobs recovered; those whose runner was on this
        host (where what is left of them may still run) are added to `here`.
        """
        with self._write() as tx:
            now = self._clock(tx)
            runners = tx.execute("SELECT * FROM runners WHERE id != $1", (runner_id,)).fetchall()
            lost = {}  # runner id -> what its jobs say
            for runner in runners:
                if runner["hostname"] == hostname and (
                        runner["pid"] == pid or not _same_process(runner["pid"],
                                                                  runner["pid_start"])):
                    deleted = tx.execute("DELETE FROM runners WHERE id = $1", (runner["id"],))
                    message = _RUNNER_STOPPED
                else:
                    # Unless it stamped itself meanwhile (heartbeats do not wait
                    # for this transaction on PostgreSQL).
                    if runner["agent"] and now - listening_since < max_age:
                        continue  # it had no server to stamp through
                    deleted = tx.execute("DELETE FROM runners WHERE id = $1 AND heartbeat_at < $2",
                                         (runner["id"], now - max_age))
                    message = (f"agent lost: runner {runner['id']} sent no heartbeat for "
                               f"{now - runner['heartbeat_at']} s")
                if deleted.rowcount:
                    lost[runner["id"]] = message
            known = {runner["id"] for runner in runners} | {runner_id}
            jobs = [job for job in tx.execute(
                "SELECT id, build_id, claimed_by FROM jobs WHERE status = $1", (RUNNING,))
                if job["claimed_by"] in lost or job["claimed_by"] not in known]
            ended = []
            for job in jobs:
                message = lost.get(job["claimed_by"], _RUNNER_STOPPED)
                self._lock_build(tx, job["build_id"])
                # Still running, by the same runner: it may have ended meanwhile.
                if not tx.execute("UPDATE jobs SET status = $1, error = $2, exit_code = 0, "
                                  "finished_at = $3 WHERE id = $4 AND status = $5 "
                                  "AND claimed_by = $6",
                                  (ERROR, message, now, job["id"], RUNNING,
                                   job["claimed_by"])).rowcount:
                    continue
                self._record_status(tx, job["build_id"], job["id"], ERROR, message, now)
                ended.append(job)
            jobs = ended
            for build_id in {job["build_id"] for job in jobs}:
                self._roll_up(tx, build_id, now)
        hosts = {runner["id"]: runner["hostname"] for runner in runners}
        if here is not None:
            here += [job["id"] for job in jobs if hosts.get(job["claimed_by"], hostname) == hostname]
        return [job["id"] for job in jobs]

    # -- logs ---------------------------------------------------------------

    def append_log(self, job_id, seq, offset, data, *, lease=None):
        """Store one chunk of a job's log (seq and offset kept by the one writer),
        compressed (see _LogCodec); offsets count the log's own bytes.

        With the claim's `lease`, only while the job runs under that claim
        (Conflict otherwise: an ended job's log never grows); a chunk stored
        already (a retry whose first answer was lost) is not stored twice.
        """
        codec, stored = self.codec.encode(data)  # outside the lock: others write meanwhile
        values = (job_id, seq, offset, stored, codec, len(data))
        try:
            if lease is None:
                self._write_one(_INSERT_CHUNK + "VALUES ($1, $2, $3, $4, $5, $6)", values)
            elif not self._write_one(_INSERT_CHUNK + "SELECT $1, $2, $3, $4, $5, $6 WHERE TRUE"
                                     + _LEASED.format(job="$1", lease=7),
                                     (*values, lease)).rowcount:
                raise self._ended(job_id)
        except self.IntegrityError:
            if not self._has_chunk(job_id, seq, offset, len(data)):
                raise _ChunkMismatch(
                    f"log chunk {seq} of job {job_id} came again with other bytes ({len(data)} "
                    f"at byte {offset}) than the stored one: the log cannot hold both") from None
        self._wake_log_followers()

    def _has_chunk(self, job_id, seq, offset, size):
        return self._query_one(f"SELECT 1 FROM log_chunks WHERE job_id = $1 AND seq = $2 "
                               f"AND start = $3 AND {_CHUNK_SIZE} = $4",
                               (job_id, seq, offset, size)) is not None

    def log_size(self, job_id):
        """Bytes in a job's log so far."""
        return self._scalar(f"SELECT start + {_CHUNK_SIZE} FROM log_chunks WHERE job_id = $1 "
                            "ORDER BY seq DESC LIMIT 1", (job_id,)) or 0

    def read_log(self, job_id, offset=0):
        """Yield the job's log from byte `offset` on, chunk by chunk (never whole)."""
        seq = self._scalar("SELECT max(seq) FROM log_chunks WHERE job_id = $1 AND start <= $2",
                           (job_id, offset)) or 0
        while True:
            # A few chunks per query: memory stays flat however long the log,
            # and no statement stays open between yields.
            rows = self._connection().execute(
                f"SELECT seq, start, {_CHUNK_SIZE}, data, codec FROM log_chunks "
                "WHERE job_id = $1 AND seq >= $2 ORDER BY seq LIMIT 4", (job_id, seq)).fetchall()
            for row_seq, start, size, stored, codec in rows:
                seq = row_seq + 1
                if start + size > offset:
                    yield self.codec.decode(codec, stored)[max(0, offset - start):]
            if len(rows) < 4:
                return

    def _wake_log_followers(self):
        with self._log_changed:
            self._log_events += 1
            self._log_changed.notify_all()

    def log_events_seen(self):
        """A mark to pass to `wait_for_log`, taken before reading a job and
        its log, so that an append or end in between is not waited through."""
        return self._log_events

    def wait_for_log(self, timeout, seen):
        """Block until a log chunk is appended or a job ends in this process
        since `seen` (from `log_events_seen`), or `timeout` passes."""
        with self._log_changed:
            self._log_changed.wait_for(lambda: self._log_events != seen, timeout)

    def cut_log(self, job_id, start, end):
        """Remove bytes [start, end) from a finished job's log: the bytes after
        move up, and so do the ranges of its steps."""
        if end <= start:
            return
        with self._write() as tx:
            rows = tx.execute("SELECT seq, start, data, codec FROM log_chunks WHERE job_id = $1 "
                              f"AND start + {_CHUNK_SIZE} > $2 ORDER BY seq",
                              (job_id, start)).fetchall()
            if not rows:
                return
            first_seq, first_offset = rows[0][0], rows[0][1]
            tail = b"".join(self.codec.decode(row[3], row[2]) for row in rows)
            kept = tail[:start - first_offset] + tail[end - first_offset:]
            tx.execute("DELETE FROM log_chunks WHERE job_id = $1 AND seq >= $2",
                       (job_id, first_seq))
            for index in range(0, len(kept), LOG_CHUNK_BYTES):
                piece = kept[index:index + LOG_CHUNK_BYTES]
                codec, stored = self.codec.encode(piece)
                tx.execute("INSERT INTO log_chunks (job_id, seq, start, data, codec, size) "
                           "VALUES ($1, $2, $3, $4, $5, $6)",
                           (job_id, first_seq + index // LOG_CHUNK_BYTES, first_offset + index,
                            stored, codec, len(piece)))
            for column in ("log_start", "log_end"):
                tx.execute(f"UPDATE steps SET {column} = CASE WHEN {column} <= $1 THEN {column} "
                           f"WHEN {column} <= $2 THEN $3 ELSE {column} - $4 END WHERE job_id = $5",
                           (start, end, start, end - start, job_id))
        self._wake_log_followers()

    def log_chunk_at(self, job_id, offset, seq=None):
        """(seq, start offset, data) of the chunk holding byte `offset` (looked
        up by `seq` first when the caller can guess it), or None past the end."""
        query = (f"SELECT seq, start, {_CHUNK_SIZE}, data, codec FROM log_chunks "
                 "WHERE job_id = $1 AND ")
        row = None
        if seq is not None:
            row = self._connection().execute(query + "seq = $2", (job_id, seq)).fetchone()
            if row is not None and not row[1] <= offset < row[1] + row[2]:
                row = None
        if row is None:
            row = self._connection().execute(query + "start <= $2 ORDER BY seq DESC LIMIT 1",
                                             (job_id, offset)).fetchone()
        if row is None or offset >= row[1] + row[2]:
            return None
        return row[0], row[1], self.codec.decode(row[4], row[3])

    def open_log(self, job_id, offset=0, size=None):
        """The job's log from byte `offset` to `size` (default: its end now) as a
        read-only, seekable file: served without holding a thread per reader."""
        end = self.log_size(job_id) if size is None else size
        return _LogReader(self, job_id, min(offset, end), end)


_CHUNK_SIZE = "COALESCE(size, length(data))"  # bytes of log a chunk holds
_INSERT_CHUNK = "INSERT INTO log_chunks (job_id, seq, start, data, codec, size) "
# A write under a claim: only while the job runs with the lease it was given.
_LEASED = (" AND EXISTS (SELECT 1 FROM jobs WHERE jobs.id = {job} AND jobs.status = 'running' "
           "AND jobs.lease = ${lease})")


class _LogReader(io.RawIOBase):
    """A fixed byte range of a job's log, read from the store a chunk at a time."""

    def __init__(self, store, job_id, start, end):
        super().__init__()
        self._store = store
        self._job_id = job_id
        self._start, self._end = start, end
        self._position = start
        self._chunk = (None, 0, b"")  # seq, start offset, data

    @property
    def size(self):
        """How many bytes the file holds."""
        return self._end - self._start

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._position - self._start

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: self._start, io.SEEK_CUR: self._position,
                io.SEEK_END: self._end}[whence]
        self._position = min(max(base + offset, self._start), self._end)
        return self.tell()

    def read(self, size=-1):
        """Up to `size` bytes from the position (all that is left if `size` is
        negative); a positive `size` gets at most one stored chunk's slice,
        never a buffer of the size asked for."""
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(LOG_CHUNK_BYTES), b""))
        if self._position >= self._end or size == 0:
            return b""
        seq, start, data = self._chunk
        if not start <= self._position < start + len(data):
            found = self._store.log_chunk_at(self._job_id, self._position,
                                             None if seq is None else seq + 1)
            if found is None:
                return b""
            self._chunk = seq, start, data = found
        offset = self._position - start
        count = min(size, len(data) - offset, self._end - self._position)
        self._position += count
        return data[offset:offset + count]

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


# -- PostgreSQL ------------------------------------------------------------------

# One lock (pg_advisory_xact_lock) stands for SQLite's one writer: every write
# transaction that is not `rows_only` holds it; migrations hold another.
_PG_WRITE_LOCK = 0x63697275  # "ciru"
_PG_MIGRATE_LOCK = 0x63697276
_PG_CHANNEL = "cirunner"
_PG_ANALYZE_AFTER = 500  # jobs added at once that make the planner look again
# A process that stops (a paused VM, SIGSTOP, a network partition) in the
# middle of a transaction must not hold its locks for everyone else: the
# server ends such a session after a few idle seconds (no transaction here
# waits on anything between its statements; holding the one write lock
# longer would stall every writer past the agent timeout, and with it the
# very recovery that finds the stopped process lost), and a wait for a lock
# ends with an error (a retry later) rather than never. Keepalives find a
# vanished peer in ~1 min. The URL's own parameters win over these defaults.
_PG_SESSION = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30,
               "keepalives_interval": 10, "keepalives_count": 3,
               "options": "-c lock_timeout=30s -c idle_in_transaction_session_timeout=5s"}
# What synchronous_commit may be (the database's setting for acknowledged
# commits, Store._write's `durable`; the others do not wait for the WAL's
# flush, see _PgConnection).
_PG_SYNC_SETTINGS = ("on", "off", "local", "remote_write", "remote_apply")
# Log chunks and job ends: heard only by processes with followers of live logs.
_PG_LOG_CHANNEL = "cirunner_log"


def _pg_session(psycopg, url):
    """The session defaults the URL does not set itself (its own win)."""
    given = psycopg.conninfo.conninfo_to_dict(url)
    return {key: value for key, value in _PG_SESSION.items() if key not in given}


class _PgRow(tuple):
    """A row read by position or by name, as sqlite3.Row."""

    def __new__(cls, values, index):
        row = super().__new__(cls, values)
        row.index_of = index
        return row

    def __getitem__(self, key):
        return super().__getitem__(self.index_of[key] if isinstance(key, str) else key)

    def keys(self):
        return list(self.index_of)


def _pg_row_factory(cursor):
    # The names from libpq's result (`Cursor.pgresult`, public for such low
    # level reads), not `cursor.description`, which makes a Column object per
    # column of each result: 8 us for 40 columns against 73, on every query.
    result = cursor.pgresult
    index = {} if result is None else {result.fname(number).decode(): number
                                       for number in range(result.nfields)}
    return lambda values: _PgRow(values, index)


class _PgConnection:
    """A psycopg connection with the store's statements as they are written
    ($1 marks, sent as they are: a raw cursor), rows by name and position.

    Its commits do not wait for the WAL's flush (``synchronous_commit =
    off``), as SQLite's NORMAL: a claim, a step, a log chunk or a heartbeat
    may be lost if the database crashes in the next few hundred ms, never
    its consistency. A transaction that an answer acknowledges (a build made,
    a job's end: Store._write's `durable`) commits with the database's own
    setting, `acknowledged`, which also covers every commit before it."""

    generation = 0  # as a SQLite connection's (see Store._connection)

    def __init__(self, psycopg, url):
        self.psycopg = psycopg
        try:
            self.conn = psycopg.connect(url, autocommit=True, row_factory=_pg_row_factory,
                                        cursor_factory=psycopg.RawCursor,
                                        **_pg_session(psycopg, url))
        except psycopg.OperationalError as exc:
            raise psycopg.OperationalError(f"cannot reach PostgreSQL: {exc}") from exc
        # The session's own default: the server's, the database's, the URL's.
        self.acknowledged = self.conn.execute(
            "SELECT reset_val FROM pg_settings WHERE name = 'synchronous_commit'").fetchone()[0]
        if self.acknowledged not in _PG_SYNC_SETTINGS:
            self.acknowledged = "on"
        self.conn.execute("SET synchronous_commit = off")

    def run(self, script):
        """Constant statements, without parameters, in one round trip."""
        return self.conn.execute(script)

    def execute(self, sql, params=()):
        # The schema's flags are integers (0/1), as on SQLite.
        return self.conn.execute(sql, [int(value) if isinstance(value, bool) else value
                                       for value in params])

    @property
    def in_transaction(self):
        return self.conn.info.transaction_status != self.psycopg.pq.TransactionStatus.IDLE

    @property
    def broken(self):
        return self.conn.closed or self.conn.broken

    def close(self):
        self.conn.close()


class _PgTransaction(_Transaction):
    def __init__(self, conn):
        super().__init__(conn)
        self.locked_repos = set()  # repositories whose rows it holds (a claim's)
        self.busy = set()  # (table, id) of rows another transaction held when it asked

    def hold(self, table, row_id, *, skip_locked=False):
        """Hold a row of builds or repos for the rest of the transaction;
        waiting for it unless `skip_locked`, then False if another holds it
        (asked once). NO KEY: rows that refer to it can still be added."""
        held = self.locked_builds if table == "builds" else self.locked_repos
        if row_id in held:
            return True
        if skip_locked and (table, row_id) in self.busy:
            return False
        mode = " SKIP LOCKED" if skip_locked else ""
        if self.execute(f"SELECT 1 FROM {table} WHERE id = $1 FOR NO KEY UPDATE{mode}",
                        (row_id,)).fetchone() is None:
            self.busy.add((table, row_id))
            return False
        held.add(row_id)
        return True

    def insert(self, sql, params=()):
        return self.conn.execute(sql + " RETURNING id", params).fetchone()[0]


class PostgresStore(Store):
    """The store on PostgreSQL, shared by every `serve` and `agent` process on
    every machine (DESIGN.md section 8): the same schema, migrations and
    methods as the SQLite store.

    Writes run side by side where they only lock rows of their own (claims
    with ``FOR UPDATE SKIP LOCKED``, steps, heartbeats, log chunks); the
    others take one advisory lock, in turn, as on SQLite. Commits tell the
    other processes through ``LISTEN/NOTIFY`` (new jobs, cancels, reports,
    log chunks), which reach this store's listeners as local commits do.

    The key that seals secrets is the file ``DATA/secret.key``: every machine
    needs the same one (copied, mode 0600).
    """

    _transaction_class = _PgTransaction
    _COMMITS_AS_BYTES = False

    def __init__(self, url, *, data_dir):
        self.url = url
        self.path = None
        self._psycopg = _optional("psycopg", "a PostgreSQL store", "'psycopg[binary]'",
                                  "postgres")
        self.Error = self._psycopg.Error
        self.IntegrityError = self._psycopg.IntegrityError
        self.OperationalError = self._psycopg.OperationalError
        self._setup(data_dir)
        self._instance = uuid.uuid4().hex[:12]  # notifications of this store are not news to it
        self._log_note = json.dumps({"from": self._instance, "event": "log", "ids": []})
        self._version = 0                       # notifications from other processes so far
        self._listener = None
        self._listening = threading.Event()
        self._want_logs = threading.Event()  # a follower of live logs waits in this process
        self._logs_heard = threading.Event()
        self._migrate()

    @classmethod
    def open(cls, data_dir, url=None, **options):
        _make_data_dir(data_dir)
        return cls(url, data_dir=data_dir, **options)

    def identity(self):
        """The database's address, without its credentials."""
        return _redact_url(self.url)

    def socket_directories(self):
        """The folders where this database's unix sockets may be: any `host`
        given as a path in the URL, and libpq's default folders."""
        parts = urlsplit(self.url)
        hosts = [value for key, value in parse_qsl(parts.query) if key == "host"]
        hosts += [unquote(host) for host in parts.netloc.rpartition("@")[2].split(",")
                  if unquote(host).startswith("/")]
        return tuple(dict.fromkeys(
            path for host in hosts for path in host.split(",") if path.startswith("/")
        )) + ("/var/run/postgresql", "/run/postgresql")

    def _connect(self):
        return _PgConnection(self._psycopg, self.url)

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.broken:  # the server restarted, or the network went
            self._local.conn = None
            with self._connections_lock, contextlib.suppress(ValueError):
                self._connections.remove(conn)
        return super()._connection()

    @contextlib.contextmanager
    def _durably(self, conn, durable):
        yield  # see _begin and _PgConnection

    @contextlib.contextmanager
    def _begin(self, conn, rows_only, durable=False):
        script = ["BEGIN"]
        if durable:
            script.append(f"SET LOCAL synchronous_commit = {conn.acknowledged}")
        if not rows_only:
            script.append(f"SELECT pg_advisory_xact_lock({_PG_WRITE_LOCK})")
        conn.run("; ".join(script))
        yield

    def _publish(self, conn, events):
        for event, ids in events:
            for start in range(0, len(ids), 500):  # a notification holds < 8000 bytes
                conn.execute("SELECT pg_notify($1, $2)", (_PG_CHANNEL, json.dumps(
                    {"from": self._instance, "event": event, "ids": ids[start:start + 500]})))

    def _write_one(self, sql, params=()):
        return self._connection().execute(sql, params)

    def _clock(self, tx=None):
        # The database's clock: runners on machines whose clocks differ still
        # compare their heartbeats with one another's rightly.
        return (tx or self._connection()).execute(
            "SELECT CAST(extract(epoch FROM now()) AS BIGINT)").fetchone()[0]

    def _jobs_added(self, tx, count):
        # A claim takes the oldest pending jobs through the partial index of
        # them, if the planner knows there are many: statistics from before a
        # big matrix made it sort every pending job at each claim instead (8
        # ms each for 2,500) until autovacuum's next analyze. The manual's
        # advice after a bulk change, for the columns that plan depends on;
        # after the commit, as it takes 60-80 ms on 100,000 jobs and blocks
        # no writer of them (nor would the build's writes wait for it).
        if count >= _PG_ANALYZE_AFTER:
            tx.after.append(self._analyze_jobs)

    def _analyze_jobs(self):
        try:
            self._connection().execute("ANALYZE jobs (status, waiting, labels, build_id)")
        except self.Error as exc:  # the build is made: only a plan is at stake
            _log.warning("analyzing jobs after a big matrix: %s", exc)

    def _lock_build_of_job(self, tx, job_id):
        job = tx.execute(self._JOB_TO_END + " FOR NO KEY UPDATE OF b", (job_id,)).fetchone()
        if job is not None:
            tx.locked_builds.add(job["build_id"])
        return job

    def append_log(self, job_id, seq, offset, data, *, lease=None):
        # The chunk and the word to other processes' followers in one statement.
        codec, stored = self.codec.encode(data)
        values = (job_id, seq, offset, stored, codec, len(data), _PG_LOG_CHANNEL, self._log_note)
        source = "VALUES ($1, $2, $3, $4, $5, $6)"
        if lease is not None:
            source = "SELECT $1, $2, $3, $4, $5, $6 WHERE TRUE" + _LEASED.format(job="$1", lease=9)
            values += (lease,)
        try:
            row = self._connection().execute(
                f"WITH chunk AS ({_INSERT_CHUNK}{source} RETURNING job_id) "
                "SELECT pg_notify($7, $8) FROM chunk", values).fetchone()
        except self.IntegrityError:
            if not self._has_chunk(job_id, seq, offset, len(data)):
                raise _ChunkMismatch(
                    f"log chunk {seq} of job {job_id} came again with other bytes ({len(data)} "
                    f"at byte {offset}) than the stored one: the log cannot hold both") from None
            row = ()
        if row is None:
            raise self._ended(job_id)
        Store._wake_log_followers(self)

    def _lock_build(self, tx, build_id):
        # Every transaction that changes a build's jobs or statuses holds its
        # row first (jobs after builds: no two wait for each other); log
        # chunks and reports that refer to the build are still added.
        tx.hold("builds", build_id)

    # A job being finished is not stamped (nor waited for).
    _STAMP_JOBS = ("UPDATE jobs SET heartbeat_at = $1 WHERE id IN (SELECT id FROM jobs "
                   "WHERE status = $2 AND claimed_by = $3 FOR NO KEY UPDATE SKIP LOCKED)")

    def _stamp_token(self, token_id):
        # One row, in a statement of its own: nothing else waits for it.
        with contextlib.suppress(self.OperationalError):
            self._connection().execute("UPDATE tokens SET last_used_at = $1 WHERE id = $2",
                                       (_now(), token_id))

    # A claim holds the build's row first (its statuses are numbered in it),
    # then the repository's for max_builds or concurrency, then the job's. It
    # skips the rows other claims hold, so that claims of different builds
    # run side by side; but the builds of such a limited repository start in
    # order: none behind a held one. Only when every candidate was held does
    # it wait, for the oldest's rows, and only if it holds no other build (no
    # holder of a repository's row waits for a build): two claims never wait
    # for each other.

    def _wait_for_build(self, tx, candidate):
        if tx.locked_builds - {candidate["build_id"]}:
            return False  # it holds another build: it waits for none
        self._hold_build(tx, candidate, skip_locked=False)
        return True

    def _take(self, tx, candidate):
        return self._hold_build(tx, candidate, skip_locked=True) and tx.execute(
            "SELECT 1 FROM jobs WHERE id = $1 AND status = $2 FOR UPDATE SKIP LOCKED",
            (candidate["id"], PENDING)).fetchone() is not None

    @staticmethod
    def _hold_build(tx, candidate, *, skip_locked):
        limited = candidate["max_builds"] or candidate["concurrency"]
        repo = ("repos", candidate["repo_id"])
        if skip_locked and limited and repo in tx.busy:
            return False  # a newer build of a limited repository never overtakes an older
        if not tx.hold("builds", candidate["build_id"], skip_locked=skip_locked):
            if limited:
                tx.busy.add(repo)
            return False
        return not limited or tx.hold(*repo, skip_locked=skip_locked)

    # -- schema -------------------------------------------------------------

    def _migrate(self):
        conn = self._connect()
        try:
            conn.execute("BEGIN")
            conn.execute("SELECT pg_advisory_xact_lock($1)", (_PG_MIGRATE_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS cirunner_schema (version BIGINT NOT NULL, "
                         "key_check TEXT NOT NULL DEFAULT '')")
            conn.execute("INSERT INTO cirunner_schema (version) SELECT 0 WHERE NOT EXISTS "
                         "(SELECT 1 FROM cirunner_schema)")
            conn.execute("COMMIT")
            self._apply_migrations(conn)
            self._check_key(conn)
        finally:
            conn.close()

    def _check_key(self, conn):
        """Every process on the store seals with one key, the first one's: a
        machine without it, or with another, is stopped before it seals a
        secret nobody else can open (or fails every build that has one)."""
        known = conn.execute("SELECT key_check FROM cirunner_schema").fetchone()[0]
        where = (f"copy DATA/secret.key of the machine that first served this database to "
                 f"{self.sealer.key_path} (mode 0600; see the README, More than one machine)")
        if known and not os.path.exists(self.sealer.key_path):
            raise CIRunnerError(f"this machine has no key for the secrets of the store: {where}")
        check = self.sealer.derive("key check").hex()[:32]
        if not known:
            conn.execute("UPDATE cirunner_schema SET key_check = $1 WHERE key_check = ''",
                         (check,))
            known = conn.execute("SELECT key_check FROM cirunner_schema").fetchone()[0]
        if known != check:
            raise CIRunnerError(f"{self.sealer.key_path} is not the key the store's secrets "
                                f"are sealed with: {where}")

    @staticmethod
    def _version_of(conn):
        return conn.execute("SELECT version FROM cirunner_schema").fetchone()[0]

    @staticmethod
    def _set_version(conn, number):
        conn.execute("UPDATE cirunner_schema SET version = $1", (number,))

    _DIALECT = types.MappingProxyType({
        "row_id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "bytes": "BYTEA",
        "without_rowid": ""})

    # -- what SQLite needs and PostgreSQL does itself --------------------------

    def checkpoint(self):
        """Nothing to do: PostgreSQL checkpoints and vacuums by itself."""

    def wal_bytes(self):
        return 0

    def give_back_space(self, pages=VACUUM_BATCH_PAGES):
        return False  # autovacuum's work

    def close(self):
        super().close()
        listener = self._listener
        if listener is not None:
            listener.join(2.0)

    # -- other processes: LISTEN/NOTIFY ----------------------------------------

    def check(self):
        self._scalar("SELECT 1")

    def data_version(self):
        """How many commits of other processes this one has heard of."""
        self._start_listening()
        return self._version

    def commit_counter(self):
        """None: PostgreSQL keeps no counter of every commit."""
        return

    def add_listener(self, callback):
        self._start_listening()
        super().add_listener(callback)

    def log_events_seen(self):
        if not self._logs_heard.is_set():  # the first follower: hear log chunks from now on
            self._want_logs.set()
            self._start_listening()
            self._logs_heard.wait(2.0)
        return super().log_events_seen()

    def _wake_log_followers(self):
        super()._wake_log_followers()
        # Followers in other processes too (a job's end, a log cut).
        with contextlib.suppress(self.Error):
            self._connection().execute("SELECT pg_notify($1, $2)",
                                       (_PG_LOG_CHANNEL, self._log_note))

    def _start_listening(self):
        with self._connections_lock:
            if self._listener is None and not self._closed:
                self._listener = threading.Thread(target=self._listen, daemon=True,
                                                  name="cirunner-pg-listener")
                self._listener.start()
        self._listening.wait(10.0)

    def _listen(self):
        """Hear the other processes' commits until the store closes; after an
        outage, everything counts as changed (what was said meanwhile is lost)."""
        while not self._closed:
            try:
                with self._psycopg.connect(self.url, autocommit=True,
                                           **_pg_session(self._psycopg, self.url)) as conn:
                    conn.execute(f"LISTEN {_PG_CHANNEL}")
                    logs = False
                    self._heard("", "")  # listening (again): whatever happened before counts
                    self._listening.set()
                    while not self._closed:
                        if self._want_logs.is_set() and not logs:
                            conn.execute(f"LISTEN {_PG_LOG_CHANNEL}")
                            logs = True
                            self._logs_heard.set()
                        for note in conn.notifies(timeout=0.25):
                            self._heard(note.channel, note.payload)
            except Exception as exc:  # noqa: BLE001 - the listener outlives any one failure
                self._listening.set()  # no one waits for a listener that cannot listen
                self._logs_heard.set()
                _log.warning("listening for PostgreSQL notifications: %s; trying again", exc)
                time.sleep(1.0)

    def _heard(self, channel, payload):
        try:
            note = json.loads(payload) if payload else {"event": "", "ids": []}
        except ValueError:
            return
        if not isinstance(note, dict) or note.get("from") == self._instance:
            return  # not ours to read, or this process's own (heard at commit)
        event, ids = note.get("event"), note.get("ids")
        if event != "log":  # log chunks change nothing a runner or the queue looks at
            self._version += 1
        if event in ("enqueued", "cancel", "report") and isinstance(ids, list):
            self._notify(event, ids)
        Store._wake_log_followers(self)


###############################################################################
# Builds ######################################################################
###############################################################################


# A followed job's end event once the job is gone (its build ended, then was
# deleted, pruned or restarted in place before the follower looked again).
_GONE_JOB_END = {"status": None, "exit_code": None,
                 "error": "the job is gone: its build was deleted or restarted"}


def _follow_log(store, job_id, offset, *, heartbeat=SSE_HEARTBEAT_SECONDS, closing=None):
    """Yield (chunk, job) as a job's log grows from `offset`, (None, job) each
    `heartbeat` seconds of silence, and stop after the chunks that were there
    when the job ended (or when `closing` is set, or once the job is gone:
    its build ended and was deleted, pruned or restarted before a look)."""
    last_sent = time.monotonic()
    while closing is None or not closing.is_set():
        seen = store.log_events_seen()
        try:
            job = store.get_job_by_id(job_id)  # read before the log: nothing is missed
        except NotFound:
            return
        sent = False
        for chunk in store.read_log(job_id, offset):
            offset += len(chunk)
            sent = True
            yield chunk, job
        if job["status"] in DONE_STATUSES:
            return
        if sent:
            last_sent = time.monotonic()
        elif time.monotonic() - last_sent >= heartbeat:
            yield None, job
            last_sent = time.monotonic()
        else:
            store.wait_for_log(min(0.5, heartbeat), seen)


@dataclasses.dataclass
class _BuildRequest:
    """What a build is asked for, by the API, a webhook, cron, a restart or exec."""

    branch: str = ""
    commit: str = ""
    event: str = EVENT_MANUAL
    variables: dict = dataclasses.field(default_factory=dict)
    pull_ref: str = ""      # where a pull request's head is fetched from
    fields: dict = dataclasses.field(default_factory=dict)  # a forge's fields win over git's
    parent: int = 0         # a restart as a new build: the number it restarts
    replaces: dict = None   # a restart under the same number: the build it replaces
    gated: bool = False     # sent by a forge, not started by someone with write access


def _resolve_from_git(store, repo, request):
    """(branch, commit fields, (filename, text) or None) of the commit a build
    runs: `request.commit`, else the head of its branch, else of the default
    branch. Unknown commits and branches are BadRequest."""
    git, branch, commit = store.git, request.branch, request.commit
    where = f"{repo['owner']}/{repo['name']}"
    if commit:
        found = git.read_commit(repo, commit)  # commits never change: no fetch if present
        if found is None:
            git.fetch_commit(repo, commit, request.pull_ref)
            found = git.read_commit(repo, commit)
        if found is None:
            raise BadRequest(f"commit {commit} not found in {where}")
    else:
        heads = git.fetch(repo)
        if not any(ref.startswith("refs/heads/") for ref in heads):
            raise BadRequest(f"{where} has no commits yet: push a commit, then build")
    branch = branch or repo["default_branch"] or git.default_branch(repo)
    if not commit:
        head = heads.get(f"refs/heads/{branch}")
        found = git.read_commit(repo, head) if head else None
        if found is None:
            raise BadRequest(f"branch {branch!r} not found in {where}")
    return branch, found[0], found[1]


def _work_tree_git(directory, *args):
    """What `git ARGS` prints in `directory` (bytes), or None where it fails
    (no git work tree there, no git here): `exec` and `plan` read the
    caller's own checkout."""
    try:
        result = subprocess.run(["git", "-C", directory, *args], capture_output=True,
                                check=False)
    except OSError:
        return None
    return result.stdout if result.returncode == 0 else None


def _checked_out_branch(directory):
    """The branch checked out in `directory`'s git work tree, or ""."""
    out = _work_tree_git(directory, "symbolic-ref", "--quiet", "--short", "HEAD")
    return out.decode(errors="replace").strip() if out else ""


def _head_changed_files(directory):
    """The paths HEAD changes in `directory`'s git work tree (as a mirror's
    commit's, _GitMirrors.changed_files), or None outside one."""
    out = _work_tree_git(directory, *_COMMIT_FILES, "HEAD")
    return None if out is None else [
        name for name in out.decode(errors="replace").split("\0") if name][:MAX_CHANGED_FILES]


def _head_commit(directory):
    """The commit fields of HEAD in `directory`'s git work tree ({} if none)."""
    out = _work_tree_git(directory, "rev-parse", "--verify", "HEAD")
    sha = out.decode().strip() if out else ""
    raw = sha and _work_tree_git(directory, "cat-file", "commit", sha)
    return _commit_fields(sha, raw) if raw else {}


def _directory_resolver(directory, config_path=""):
    """A resolver for `exec`: the pipeline file of a working directory as it
    is (not as committed); the branch checked out there and its HEAD's
    commit fields, if it is a git work tree."""

    def resolve(store, repo, request):
        return (request.branch or _checked_out_branch(directory), _head_commit(directory),
                read_pipeline_file(directory, config_path))

    return resolve


def _parse_for_build(store, filename, text, max_jobs):
    """(pipeline id, Pipeline or None, error): the file stored once, parsed once."""
    digest = _pipeline_digest(filename, text)
    known = store.find_pipeline(digest)
    if known is not None and known["parsed"]:
        return known["id"], Pipeline.from_json(known["parsed"]), ""
    try:
        pipeline = parse_pipeline(text, filename, max_jobs=max_jobs)
    except ConfigError as exc:
        return store.save_pipeline(filename, text), None, exc.message
    return store.save_pipeline(filename, text, pipeline.to_json()), pipeline, ""



def _clip(text, limit):
    """`text`, or its first `limit` characters and a note that more was cut."""
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit} more cut)"


def _approval_reason(repo, request):
    """Why a build must wait for approval before anything is cloned or run
    (the repository's `approval`: never, forks, always), or ""."""
    fork = request.fields.get("fork")
    if request.gated and fork and repo["approval"] in ("forks", "always"):
        source = request.fields.get("source_repo") or "another repository"
        return f"a pull request from the fork {source}"
    if request.gated and repo["approval"] == "always":
        return f"every {request.event} build of {repo['owner']}/{repo['name']} needs approval"
    return ""


def _change_of(store, repo, request, fields, pipeline):
    """What `paths` and `cron` conditions look at: {files, message, cron}.
    The files are asked of git only where the file has a use for them (a
    `paths` condition; Woodpecker's CI_PIPELINE_FILES of a push or pull
    request), since a push's previous head or a pull request's target
    branch; a restart keeps what its build saw. None where not known."""
    default = repo["default_branch"] or store.git.remembered_default_branch(repo)
    change = {"files": None, "cron": request.fields.get("cron") or "",
              "action": request.fields.get("action") or "",
              "message": request.fields.get("message") or fields.get("message") or "",
              "variables": _condition_variables(
                  f"{repo['owner']}/{repo['name']}", default, request.event,
                  fields.get("branch") or "", request.fields.get("ref") or fields.get("ref"),
                  request.fields.get("deploy_to") or "")}
    change["variables"].update(CI_COMMIT_MESSAGE=change["message"],
                               CI_COMMIT_AUTHOR=request.fields.get("author")
                               or fields.get("author") or "")
    wanted = pipeline is not None and fields.get("commit_sha") and (
        pipeline.uses_paths() or pipeline.era == "woodpecker"
        and request.event in (EVENT_PUSH, EVENT_PULL_REQUEST))
    if request.fields.get("changed_files"):
        change["files"] = json.loads(request.fields["changed_files"])
    elif wanted:
        bases = [request.fields.get("before") or ""]
        if request.event == EVENT_PULL_REQUEST:
            bases.append(f"refs/heads/{fields['branch']}")
        change["files"] = store.git.changed_files(repo, fields["commit_sha"],
                                                  [_checked_base(base) for base in bases])
    return change


def _checked_base(base):
    """`base` if it is a commit id or a branch's ref, else "" (a payload's word)."""
    branch = base[len("refs/heads/"):] if base.startswith("refs/heads/") else None
    try:
        _check_branch(branch) if branch is not None else _check_commit(base)
    except BadRequest:
        return ""
    return base


def _job_specs(pipeline, **build):
    """The jobs a build of `pipeline` makes: each matrix entry of each
    pipeline that runs (see running_pipelines), in the file's order.
    NoBuild when none of a file's several pipelines runs."""
    running = running_pipelines(pipeline, **build)
    if not running:
        raise NoBuild(f"no pipeline's trigger matches this {build['event']} build of "
                      f"{build['ref'] or build['branch']!r}: no build was made")
    return [JobSpec(environment, one.name, tuple(running[one.name]), one.runs_on,
                    one.runner_labels(), one.concurrency)
            for one in pipeline.each() if one.name in running for environment in one.matrix]


def _make_build(store, repo, request, *, max_jobs=DEFAULT_MAX_JOBS, resolve=_resolve_from_git):
    """The one path that makes a build: resolve the commit and its pipeline
    file, parse the file once, and insert the build with one job per matrix
    entry. An unusable pipeline or an unreachable repository still makes the
    build, finished as `error` with the reason, so that the failure is seen.
    A build that needs approval (see `_approval_reason`) is made blocked."""
    fields = {"event": request.event, "branch": request.branch, "remote": repo["url"],
              "variables": json.dumps(request.variables), "parent": request.parent}
    environments, error = [], ""
    try:
        branch, commit_fields, pipeline_file = resolve(store, repo, request)
        fields.update(commit_fields, branch=branch,
                      ref=f"refs/heads/{branch}" if branch else "")
        if pipeline_file is None:
            names = (repo["config_path"],) if repo["config_path"] else PIPELINE_FILES
            error = (f"no pipeline file ({', '.join(names)}) at commit "
                     f"{fields['commit_sha'][:12]}")
        else:
            pipeline_id, pipeline, error = _parse_for_build(store, *pipeline_file, max_jobs)
            fields.update(pipeline_id=pipeline_id, pipeline_file=pipeline_file[0])
            if (pipeline is not None and request.event in _FILTERED_EVENTS
                    and not pipeline.builds_branch(fields["branch"])):
                raise NoBuild(f"the pipeline's branches filter excludes branch "
                              f"{fields['branch']!r}: no build was made")
            ref = request.fields.get("ref") or fields["ref"]
            change = _change_of(store, repo, request, fields, pipeline)
            if pipeline is not None and not pipeline.triggered(
                    event=request.event, ref=ref,
                    branch=pipeline.when_branch(request.event, fields["branch"], ref),
                    repo=f"{repo['owner']}/{repo['name']}",
                    deploy_to=request.fields.get("deploy_to") or "", **change):
                raise NoBuild(f"the pipeline's trigger excludes this {request.event} build of "
                              f"{ref or fields['branch']!r}: no build was made")
            if pipeline is not None:
                environments = _job_specs(pipeline, event=request.event,
                                          branch=fields["branch"], ref=ref,
                                          repo=f"{repo['owner']}/{repo['name']}",
                                          deploy_to=request.fields.get("deploy_to") or "",
                                          **change)
                fields["changed_files"] = ("" if change["files"] is None
                                           else json.dumps(change["files"]))
                fields.update(fail_fast=int(pipeline.fail_fast),
                              max_parallel=pipeline.max_parallel,
                              labels=pipeline.runner_labels(),
                              warnings=json.dumps(pipeline.warnings))
    except _GitError as exc:
        error = f"cannot fetch {_redact_url(repo['url'])}: {exc.message}"
    fields.update({key: value for key, value in request.fields.items()
                   if key in _BUILD_FIELDS and value not in (None, "")})
    for key in ("message", "author", "author_email", "author_avatar", "link_url", "remote"):
        if isinstance(fields.get(key), str):  # from git or a forge: kept at a bounded size
            fields[key] = _clip(fields[key], MAX_MESSAGE if key == "message" else MAX_FIELD)
    fields["fork"] = int(bool(fields.get("fork")))
    if request.replaces:
        return store.reset_build(request.replaces["id"], fields, environments, error=error,
                                 message=f"build {request.replaces['number']} restarted")
    return store.create_build(repo["id"], fields, environments, error=error,
                              blocked=_approval_reason(repo, request))


def create_build(store, repo, *, branch="", commit="", variables=None, event=EVENT_MANUAL,
                 max_jobs=DEFAULT_MAX_JOBS, pull_ref="", gated=False, **fields):
    """Start a build of `repo` (a dict from the store) and return it.

    The commit is `commit`, else the head of `branch`, else of the default
    branch. `variables` reach every job's environment and ``${VAR}``. Extra
    `fields` (message, author, link_url, ref, fork, source_repo...) override
    what git says. A `gated` build (a forge's webhook, not a user with write
    access) waits for approval as the repository's `approval` says.
    Raises BadRequest for bad input or an unknown branch or commit.
    """
    if event not in EVENTS:
        raise BadRequest(f"unknown event {event!r}")
    request = _BuildRequest(branch=_check_branch(branch) if branch else "",
                            commit=_check_commit(commit) if commit else "", event=event,
                            variables=_check_variables(variables or {}), pull_ref=pull_ref,
                            fields=fields, gated=gated)
    return _make_build(store, repo, request, max_jobs=max_jobs)


def restart_build(store, repo, number, *, fork=False, variables=None, max_jobs=DEFAULT_MAX_JOBS,
                  event=None, deploy_to=""):
    """Run build `number` again: under the same number, or with `fork` as a
    new build whose ``parent`` is `number` (and, given, of another `event`,
    such as a deployment to `deploy_to`). Conflict while it is active. The
    build's variables are kept; `variables` adds or changes some, and a
    None value drops one."""
    if event is not None and (event not in EVENTS or not fork):
        raise BadRequest(f"event must be one of {', '.join(EVENTS)}, with fork=true")
    if deploy_to and event != EVENT_DEPLOYMENT:
        raise BadRequest("deploy_to goes with event=deployment")
    build = store.get_build(repo["id"], number)
    if build["status"] in ACTIVE_STATUSES or build["status"] == BLOCKED:
        raise Conflict(f"build {number} is {build['status']}; "
                       + ("approve or decline it first" if build["status"] == BLOCKED
                          else "wait for it or cancel it first"))
    variables = dict(variables or {})
    merged = json.loads(build["variables"] or "{}")
    for removed in [name for name, value in variables.items() if value is None]:
        merged.pop(_check_variable_name(removed), None)  # null: the build's is dropped
        del variables[removed]
    merged.update(_check_variables(variables))
    kept = {key: build[key] for key in ("link_url", "message", "author", "author_email",
                                        "author_avatar", "ref", "fork", "source_repo",
                                        "changed_files", "cron", "action")}
    if deploy_to:
        kept["deploy_to"] = deploy_to
    request = _BuildRequest(branch=build["branch"], commit=build["commit_sha"],
                            event=event or build["event"], variables=merged,
                            pull_ref=_pull_ref(build["ref"]), fields=kept,
                            parent=number if fork else build["parent"],
                            replaces=None if fork else build)
    return _make_build(store, repo, request, max_jobs=max_jobs)

###############################################################################
# Processes and isolation #####################################################
###############################################################################

# Every Linux-specific call lives in this section.
#
# The boundary: no value a pipeline controls reaches a host process. bwrap,
# podman, docker, slirp4netns and git start with an environment built here from
# an allow-list of the server's own settings; a step's variables go in *inside*
# the boundary (bwrap's --setenv through --args FD, an engine's env file through
# a file descriptor), never on a command line and never in a host process's
# environment. Engine arguments are validated, and `--` precedes the image.

_PR_SET_CHILD_SUBREAPER = 36
_NS_GET_USERNS = 0xB701  # ioctl: the user namespace that owns a namespace
_JOB_TOKEN_NAME = "CIRUNNER_JOB_TOKEN"

_ENGINE_KEEPS = _HOST_KEEPS + (
    "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "DBUS_SESSION_BUS_ADDRESS",
    "CONTAINERS_CONF", "CONTAINERS_REGISTRIES_CONF", "CONTAINERS_STORAGE_CONF",
    "REGISTRY_AUTH_FILE", "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_CERT_PATH",
    "DOCKER_TLS_VERIFY", "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
    "NO_PROXY")
# What a step on the host starts from, before Drone's variables and its own.
_STEP_KEEPS = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "HOME", "USER",
               "LOGNAME")


def _become_subreaper():
    """Adopt orphaned descendants (Linux), so a step's `setsid` grandchild
    cannot escape the sweep. Returns True when it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _signal_group(pgid, signum):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _adopted_pids():
    """Pids of the children of this process's main thread, which is where the
    kernel re-parents orphans adopted by a subreaper (empty where unavailable).
    Our own subprocesses are children of the threads that started them."""
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return {int(child) for child in handle.read().split()}
    except OSError:
        return set()


def _all_pids():
    with contextlib.suppress(OSError):
        return {int(name) for name in os.listdir("/proc") if name.isdigit()}
    return set()


def _environment_of(pid):
    """The NUL-separated environment entries of `pid`, or [] if unreadable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return handle.read().split(b"\x00")
    except OSError:
        return []


def _proc_stat(pid):
    """The fields of /proc/PID/stat after the command name, or None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_name(pid):
    """The command name of `pid` (as /proc/PID/stat gives it), or ""."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(" (", 1)[1].rsplit(")", 1)[0]
    except (OSError, IndexError):
        return ""


def _process_state(pid):
    """(state letter, process group) of `pid` from /proc, or (None, None)."""
    fields = _proc_stat(pid)
    return (fields[0], int(fields[2])) if fields else (None, None)


def _process_start(pid):
    """When process `pid` started (clock ticks since boot): with the pid, who
    it is. 0 for a process that is gone or a zombie (it has stopped, whoever
    has yet to reap it)."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and fields[0] not in "ZX" else 0


def _same_process(pid, start):
    """Whether `pid` is still the process that started at `start` (0: not known,
    as for runners recorded before start times were kept)."""
    if not os.path.exists("/proc/self/stat"):  # no /proc: all that can be asked
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    now = _process_start(pid)
    return bool(now) and (not start or now == start)


def _group_members(pgid):
    """Pids of the processes in process group `pgid` (from /proc)."""
    members = []
    for pid in _all_pids():
        _, group = _process_state(pid)
        if group == pgid:
            members.append(pid)
    return members


def _memory_file(name, data):
    """A file descriptor of an unnamed in-memory file holding `data`, at its
    start: handed to a child, it is on no disk and in no command line."""
    fd = os.memfd_create(name, 0)  # not close-on-exec: made to be inherited
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd


def _close_quietly(*fds):
    for fd in fds:
        if fd is not None and fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclasses.dataclass(frozen=True)
class _StepUser:
    """Who a step on the host runs as: the server's own user, or (for a server
    run as root) an unprivileged one, so that no step is ever uid 0."""

    uid: int
    gid: int
    name: str

    @classmethod
    def for_server(cls, name=""):
        """The server's user, unless it is root: then `name` (default nobody)."""
        if os.geteuid() != 0:
            return cls(os.geteuid(), os.getegid(), getpass.getuser())
        try:
            entry = pwd.getpwnam(name or "nobody")
        except KeyError:
            raise CIRunnerError(f"--sandbox-user {name or 'nobody'}: no such user") from None
        if entry.pw_uid == 0:
            raise CIRunnerError(f"--sandbox-user {entry.pw_name} is uid 0: steps never run "
                                "as root; name an unprivileged user")
        return cls(entry.pw_uid, entry.pw_gid, entry.pw_name)

    @property
    def other(self):
        """Whether steps run as another user than the server (it is root)."""
        return self.uid != os.geteuid()

    def switched(self, argv):
        """(argv, Popen's options) that start `argv` as this user: through
        setpriv where it is installed (Python switches users itself only in a
        full fork, without vfork, which costs a big server milliseconds per
        step), else by Popen's own user, group and extra_groups."""
        if not self.other:
            return argv, {}
        setpriv = _setpriv()
        if setpriv:
            return [setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                    "--", *argv], {}
        return argv, {"user": self.uid, "group": self.gid, "extra_groups": []}

    def give(self, path):
        """Hand a job's workspace to this user (the server, as root, made it)."""
        if not self.other:
            return
        os.chown(path, self.uid, self.gid)
        for root, folders, files in os.walk(path):
            for name in folders + files:
                os.chown(os.path.join(root, name), self.uid, self.gid, follow_symlinks=False)

    def unreachable(self, path):
        """The first folder above `path` that this user may not pass through
        (when it is another user than the server), or ""."""
        if not self.other:
            return ""
        folder = os.path.dirname(os.path.abspath(path))
        while True:
            info = os.stat(folder)
            if not (info.st_mode & 0o001 or info.st_gid == self.gid and info.st_mode & 0o010):
                return folder
            if os.path.dirname(folder) == folder:
                return ""
            folder = os.path.dirname(folder)

    def open_path(self, top, path):
        """Let this user's group pass through (not list) the folders from `top`
        down to `path`, when it is another user than the server: its steps
        reach their workspace and their mirror's objects, and nothing else of
        the data directory (whose files stay the server's alone)."""
        if not self.other:
            return
        top, folder = os.path.abspath(top), os.path.abspath(path)
        while True:
            info = os.stat(folder)
            if info.st_gid != self.gid or not info.st_mode & 0o010:
                os.chown(folder, -1, self.gid)
                os.chmod(folder, (info.st_mode & 0o7777) | 0o010)
            if folder == top or os.path.dirname(folder) == folder:
                return
            folder = os.path.dirname(folder)


def _step_directory(step, workspace):
    """Where `step` runs: its Woodpecker `directory` in `workspace` (or, in a
    container, the absolute path it names), else the workspace itself."""
    return posixpath.join(workspace, step.directory) if step.directory else workspace


def _host_step_directory(step, workspace):
    """`_step_directory` for a step on the host, which must be a folder of
    its workspace (an engine makes a missing one; the host does not)."""
    path = _step_directory(step, workspace)
    if step.directory and not os.path.isdir(path):
        raise _JobError(f"{step.kind} {step.name!r}: directory {step.directory!r} is no "
                        "folder of the workspace")
    return path


class _StepStartError(_JobError):
    """The sandbox or engine could not start a step: the runner's fault (error),
    never the step's; tried once more."""


@dataclasses.dataclass
class _StepProcess:
    """A running step: the leader of its own process group, and its output pipe.
    `status` is bwrap's status pipe (it tells whether the step ever ran),
    `network` the user-mode network stack of its namespace, `container` the
    engine's name for it."""

    popen: subprocess.Popen
    status: int = -1
    network: object = None
    container: str = ""
    image: str = ""           # a container's image
    ended_cleanly: bool = True
    started: bool = True      # False: the sandbox or engine never ran the step
    start_error: str = ""     # then: why

    @property
    def pid(self):
        return self.popen.pid

    @property
    def output(self):
        """The file descriptor that carries the step's stdout and stderr."""
        return self.popen.stdout.fileno()


@functools.lru_cache(maxsize=1)
def _setpriv():
    """Where util-linux's setpriv is, or None."""
    return shutil.which("setpriv")


def _start_process(argv, *, env, cwd=None, pass_fds=(), user=None):
    """Start a step's leader in a new session, as `user` if given, stdin from
    /dev/null, stdout and stderr in one pipe. Raises _StepStartError when it
    cannot be started."""
    argv, options = user.switched(argv) if user else (argv, {})
    try:
        popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True, close_fds=True, pass_fds=pass_fds,
                                 **options)
    except (OSError, subprocess.SubprocessError) as exc:
        raise _StepStartError(f"cannot start {os.path.basename(argv[0])}: {exc}") from None
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(popen.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    return popen


class _HostBackend:
    """Runs steps as processes on the host, with no isolation (``--sandbox none``).

    The interface every backend keeps (the job run never asks which one it
    holds): `check` once, whether it works here (`problem` says why not);
    `check_step` before a job runs, whether it can run a step; `environment`,
    `workspace` and `marks` of a job's steps; `prepare` once per job, before
    its first step here; `start` a step (a `_StepProcess`, whose `output`
    streams); `signal` its processes (the job run stops a step with SIGTERM,
    the grace period, then SIGKILL); `finish` it once its leader is done (its
    exit code); `sweep` what the job left at its end; `recover` what the jobs
    of a dead runner left; `reap` now and then.

    Each step is ``/bin/sh -e -c SCRIPT`` in a new session, as the step user,
    stdin from /dev/null, stdout and stderr in one pipe. Every process of a
    job carries the job's token in its environment; at the end of the job,
    whatever still carries it is killed. The runner is a child subreaper, so
    a process that detached (setsid, double fork) is adopted and reaped here.
    """

    def __init__(self, name="none", *, user=None, environ=None, data_dir=None, store_key="",
                 **_):
        self.name = name
        self.user = user or _StepUser.for_server()
        self.environ = os.environ if environ is None else environ
        self.data_dir = os.path.realpath(data_dir) if data_dir else None
        self.store_key = store_key
        self.subreaper = False
        self.problem = None
        self._leaders = set()
        self._lock = threading.Lock()

    def check(self):
        """Check once that steps can run here; `problem` then says why not ("")."""
        self.subreaper = _become_subreaper()
        if self.problem is None:
            self.problem = self.user_problem(self.data_dir) if self.data_dir else ""

    def user_problem(self, data_dir):
        """Why the step user cannot reach the workspaces in `data_dir`, or ""."""
        folder = self.user.unreachable(data_dir)
        if not folder:
            return ""
        return (f"steps run as {self.user.name} (serve runs as root), who may not pass "
                f"through {folder}: keep the data directory where others may pass (e.g. "
                f"--data /var/lib/cirunner), or run serve as another user")

    def describe(self):
        """How steps run, in a few words (the log header, /healthz)."""
        return f"none (unsandboxed, as {self.user.name})"

    def check_step(self, step):
        """Raise _JobError, naming the fix, if this backend cannot run `step`."""
        if posixpath.isabs(step.directory):
            raise _JobError(f"{step.kind} {step.name!r}: directory {step.directory!r} is a "
                            "path in a container; a step on the host runs in its workspace: "
                            "give a path relative to it")
        if step.temp_volumes:
            raise _JobError(f"{step.kind} {step.name!r}: a temp volume is a container's: "
                            "give the step an image")

    def environment(self, job):
        """What a step's environment starts from: the server's locale, PATH and home."""
        environment = _host_environment(self.environ, _STEP_KEEPS)
        if self.user.other:
            environment.update(USER=self.user.name, LOGNAME=self.user.name)
        return environment

    def workspace(self, job):
        """Where a step finds the job's checkout."""
        return job.workspace

    def marks(self, job):
        """What a step's environment ends with, whatever it set: the job's
        token, by which every process of the job is found at its end."""
        return {_JOB_TOKEN_NAME: job.token}

    def prepare(self, job):
        """When steps run as another user than the server: hand it the job's
        workspace, and the way to it and to its mirror's objects."""
        if not self.user.other or job.executor.workspace == job.workspace:
            return
        self.user.open_path(job.store.data_dir, os.path.dirname(job.workspace))
        self.user.give(job.workspace)
        for path in job.readable_paths():
            self.user.open_path(job.store.data_dir, os.path.dirname(path))

    def start(self, step, *, env, job):
        """Start a step; returns a `_StepProcess`. Raises _StepStartError if it cannot."""
        with self._lock:
            popen = _start_process(["/bin/sh", "-e", "-c", step.script()], env=env,
                                   cwd=_host_step_directory(step, job.workspace),
                                   user=self.user)
            self._leaders.add(popen.pid)
        return _StepProcess(popen)

    def signal(self, process, signum):
        """Send `signum` to every process of the step's group."""
        _signal_group(process.pid, signum)

    def finish(self, process):
        """Kill what is left of the step's group, collect its exit code (128 +
        signal when a signal ended it) and reap its members."""
        _signal_group(process.pid, signal.SIGKILL)
        process.popen.wait()
        process.popen.stdout.close()
        with self._lock:
            self._leaders.discard(process.pid)
        self._await_group_exit(process.pid)
        code = process.popen.returncode
        return 128 - code if code < 0 else code

    def _await_group_exit(self, pgid, timeout=2.0):
        """Wait until no process of the group is left, not even a zombie: its
        members may have been adopted by us and need reaping."""
        deadline, pause = time.monotonic() + timeout, 0.0005
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            self.reap()
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def sweep(self, job, grace=0):
        """Kill every process that still carries the job's token, however it
        detached (setsid, double fork), and reap those that were adopted."""
        marker = f"{_JOB_TOKEN_NAME}={job.token}".encode()
        for _ in range(20):
            candidates = _adopted_pids() if self.subreaper else _all_pids()
            with self._lock:
                candidates -= self._leaders
            found = [pid for pid in candidates
                     if pid != os.getpid() and marker in _environment_of(pid)]
            if not found:
                break
            for pid in found:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            for pid in found:
                if self.subreaper:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)
            time.sleep(0.01)  # let their own children be re-parented to us
        self.reap()

    def recover(self, job_ids):
        """Kill processes of jobs whose runner died, found by their token: after
        a crash, nothing of a lost job keeps running."""
        prefixes = tuple(f"{_JOB_TOKEN_NAME}={self.store_key}-{job_id}-".encode()
                         for job_id in job_ids)
        for pid in _all_pids():
            if any(entry.startswith(prefixes) for entry in _environment_of(pid)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def reap(self):
        """Reap adopted orphans that exited on their own. Only zombies outside
        our own process group: our direct subprocesses (git) stay in it, and
        step leaders are waited for by their own thread."""
        if not self.subreaper:
            return
        own_group = os.getpgrp()
        with self._lock:
            for pid in _adopted_pids() - self._leaders:
                state, group = _process_state(pid)
                if state == "Z" and group != own_group:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)


class _UnavailableBackend(_HostBackend):
    """Stands in for isolation that cannot work here (`--sandbox auto` without
    a working bubblewrap, `--engine auto` without a working engine): every
    step it would run is refused, naming the fix. Isolation fails closed;
    only an explicit `none` runs steps with nothing in between."""

    def __init__(self, problem, refusal, **options):
        super().__init__("unavailable", **options)
        self.problem = problem
        self.refusal = refusal  # what a refused step says: format(step=..., problem=...)

    def check(self):
        self.subreaper = _become_subreaper()

    def describe(self):
        return f"unavailable ({self.problem})"

    def check_step(self, step):
        raise _JobError(self.refusal.format(step=step, problem=self.problem))

    def start(self, step, *, env, job):
        self.check_step(step)


_BWRAP_ENDED = "bwrap ended while it made the sandbox: what it said is in the step's log"


def _await_loopback(pid, timeout=10.0):
    """Wait until the new network namespace of `pid` has its loopback up, as
    bwrap sets it up: slirp4netns also raises it, and if it came first, the
    kernel's own 127.0.0.1 would make bwrap's request for it fail."""
    deadline, pause = time.monotonic() + timeout, 0.0002
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/net/fib_trie") as handle:
                if "127.255.255.255" in handle.read():  # lo is up, its address set
                    return
        except OSError:
            return  # gone: bwrap failed, and says why
        time.sleep(pause)
        pause = min(pause * 1.5, 0.001)  # it comes within milliseconds: look often


class _UserNetwork:
    """A step's own network namespace's way out: slirp4netns, a user-mode
    network stack, joined to the namespace of the sandbox's first process.
    Outbound connections work; the host's loopback (127.0.0.1, where the
    API, PostgreSQL or a local admin panel may listen) is not reachable."""

    ADDRESS = "10.0.2.100"      # the step's address, slirp4netns's default
    DNS = "10.0.2.3"            # its DNS forwarder to the host's resolver

    def __init__(self, slirp, child_pid, env):
        # The namespace, and the user namespace that owns it, as bwrap made them
        # at the sandbox's start (bwrap nests another user namespace later).
        try:
            netns = os.open(f"/proc/{child_pid}/ns/net", os.O_RDONLY)
        except OSError as exc:
            raise _StepStartError(f"the sandbox's network namespace is gone: {exc}") from None
        try:
            owner = fcntl.ioctl(netns, _NS_GET_USERNS)
        except OSError as exc:
            os.close(netns)
            raise _StepStartError(f"cannot find who owns the sandbox's network: {exc}") from None
        ready_read, ready_write = os.pipe()
        self._exit_read, self._exit_write = os.pipe()
        self._errors = tempfile.TemporaryFile(prefix="cirunner-slirp-")  # noqa: SIM115 - closed in close
        try:
            self.process = subprocess.Popen(
                [slirp, "--configure", "--mtu=65520", "--disable-host-loopback",
                 "--ready-fd", str(ready_write), "--exit-fd", str(self._exit_read),
                 "--netns-type=path", f"--userns-path=/proc/self/fd/{owner}",
                 f"/proc/self/fd/{netns}", "tap0"],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=self._errors, pass_fds=(ready_write, self._exit_read, netns, owner),
                close_fds=True)
        except OSError as exc:
            _close_quietly(ready_read, ready_write, self._exit_read, self._exit_write)
            self._errors.close()
            raise _StepStartError(f"cannot start slirp4netns: {exc}") from None
        finally:
            _close_quietly(netns, owner)
        _close_quietly(ready_write, self._exit_read)
        try:
            ready = os.read(ready_read, 1)
        finally:
            os.close(ready_read)
        if ready != b"1":
            error = self.error
            self.close()
            raise _StepStartError(f"slirp4netns could not set up the step's network: "
                                  f"{error or 'exit ' + str(self.process.returncode)}")

    @property
    def error(self):
        self._errors.seek(0)
        return self._errors.read(4096).decode(errors="replace").strip()

    def stop(self):
        """End the network stack (its namespace is gone, or going): it holds
        nothing to keep. Returns at once; `ended` tells when it is gone (its
        exit tears the network device down, which takes the kernel tens of ms)."""
        _close_quietly(self._exit_write)
        self._exit_write = -1
        self.process.kill()

    def ended(self):
        """Whether the stopped stack has exited (and is reaped)."""
        if self.process.poll() is None:
            return False
        self._errors.close()
        return True

    def close(self):
        """Stop it and wait until it has exited."""
        self.stop()
        self.process.wait()
        self.ended()


class _BwrapBackend(_HostBackend):
    """Runs each step in a bubblewrap sandbox on the host.

    The step sees a read-only root; its workspace is the only writable place
    besides a private /tmp, /dev/shm and HOME; the data directory (store, WAL,
    key file, mirrors, other workspaces) is hidden, except the objects of the
    job's own repository's mirror, which its checkout borrows, read-only; so
    are /run and /var/run (the host's unix sockets: PostgreSQL, docker,
    podman, dbus) and `hidden` paths (a store's socket directory). It runs in
    new PID, IPC and network namespaces, with no capabilities and no
    environment but its own, as the step user (never root), and dies with the
    server. With `network` "private" (the default) a user-mode network stack
    gives it outbound access but not the host's loopback; "none" leaves it
    only its own loopback; "host" shares the host's network. The host's
    kernel is shared.
    """

    def __init__(self, name="bwrap", *, bwrap="bwrap", home=None, network="private",
                 slirp=None, hidden=(), **options):
        super().__init__(name, **options)
        self.bwrap = bwrap
        self.home = home if home is not None else os.path.expanduser("~")
        self.network = network
        self.slirp = slirp
        self.hidden = tuple(os.path.abspath(path) for path in hidden)
        self.resolv_conf = b""
        self._networks = []  # stopped network stacks not reaped yet

    def reap(self):
        super().reap()
        self.reap_networks()

    def reap_networks(self):
        """Reap the network stacks of ended steps that have exited."""
        with self._lock:
            self._networks = [network for network in self._networks if not network.ended()]

    def check(self):
        """Check once that a sandbox works here, made as a step's is (three
        tries: under load, bwrap's own set-up of the loopback now and then fails
        once, which a step's start survives by its retry)."""
        _HostBackend.check(self)
        for _ in range(3 if not self.problem else 0):
            self.problem = self.probe()
            if not self.problem:
                break

    def describe(self):
        network = {"private": "own network, outbound through slirp4netns",
                   "none": "own network, no outbound", "host": "host network"}[self.network]
        return f"bwrap ({network}, as {self.user.name})"

    def probe(self):
        """"" if a sandbox as steps get it can be made here, else why not."""
        if self.network == "private" and not self.slirp:
            return ("slirp4netns is not installed (apt-get install slirp4netns), which gives "
                    "sandboxed steps their own network; or choose --sandbox-network host")
        try:
            process = self._launch(["/bin/true"], env={}, binds=[])
        except CIRunnerError as exc:
            return exc.message
        output = process.popen.stdout.read()
        process.popen.stdout.close()
        process.popen.wait()
        network = process.network
        self._finish(process)
        # Leave no zombie behind (a server checks once; an embedder may check
        # often): the network stack it stopped, bwrap's own child it adopted.
        if network is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                network.process.wait(10)
            self.reap_networks()
        self.reap()
        if not process.started:
            return output.decode(errors="replace").strip() or process.start_error
        return ""

    def environment(self, job):
        environment = super().environment(job)
        environment.setdefault("HOME", self.home or "/tmp")
        return environment

    def start(self, step, *, env, job):
        workspace = os.path.abspath(job.workspace)
        binds = [(workspace, True)] + [(path, False) for path in job.readable_paths()]
        return self._launch(["/bin/sh", "-e", "-c", step.script()], env=env, binds=binds,
                            chdir=_host_step_directory(step, workspace), leader=True)

    def _hidden_paths(self):
        """What the sandbox covers with an empty tmpfs: the data directory, the
        host's /tmp, /dev/shm and HOME, its unix sockets' folders (/run,
        /var/run, a store's socket directory)."""
        # The data directory and HOME must be there (empty), whatever covers
        # them; a socket folder covered by another's tmpfs is hidden already.
        kept = {self.data_dir}
        if self.home and self.home != "/" and os.path.isdir(self.home):
            kept.add(os.path.realpath(self.home))
        paths = sorted(kept | {os.path.realpath(path) for path in (
            "/tmp", "/dev/shm", "/run", "/var/run", *self.hidden) if os.path.isdir(path)})
        return [path for path in paths if path in kept or not any(
            path.startswith(other.rstrip("/") + "/") for other in paths if other != path)]

    def _mounts(self, binds, fds):
        """bwrap's mount options: the hidden places, then `binds` ([(path,
        writable)], each at its own path), ordered so that a parent directory
        is set up before what is bound inside it; `fds` gets the descriptors
        the options name."""
        mounts = [(path, ["--tmpfs", path]) for path in self._hidden_paths()]
        mounts += [(path, ["--bind" if writable else "--ro-bind", path, path])
                   for path, writable in binds]
        mounts.sort(key=lambda mount: mount[0].rstrip("/").count("/"))
        options = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        for _, mount in mounts:
            options += mount
        options += self._resolver_options(fds)
        # The data directory's stand-in only holds the mount points of what
        # was bound inside it: read-only, so nothing can be written there.
        if os.path.isdir(self.data_dir):
            options += ["--remount-ro", self.data_dir]
        return options

    def _launch(self, command, *, env, binds, chdir="/", leader=False):
        """Start bwrap with the sandbox's mounts and `binds`, `env` set inside
        and nothing else, and `command`: every option from an in-memory file
        (--args), none on its command line; as the step user. A `leader` (a
        step's) is known as one before `reap` can see it; its network is
        joined outside the lock, so that two workers start steps side by side."""
        fds, kept = [], []
        try:
            options = self._mounts(binds, fds)
            status_read, status_write = os.pipe()
            fds.append(status_write)
            kept.append(status_read)
            options += ["--unshare-pid", "--unshare-ipc", "--die-with-parent", "--cap-drop", "ALL",
                        "--json-status-fd", str(status_write)]
            if self.network != "host":
                options.append("--unshare-net")
            block = -1
            if self.network == "private":
                block_read, block = os.pipe()
                fds.append(block_read)
                kept.append(block)
                options += ["--block-fd", str(block_read)]
            options += ["--clearenv", "--chdir", chdir]
            for variable, value in env.items():
                options += ["--setenv", variable, value]
            fds.append(_memory_file("bwrap-args", b"\0".join(
                option.encode("utf-8", "surrogateescape") for option in options) + b"\0"))
            # Options only come from --args; the command (no secret in it) follows.
            with self._lock:
                popen = _start_process([self.bwrap, "--args", str(fds[-1]), "--", *command],
                                       env=_host_environment(self.environ, _HOST_KEEPS),
                                       cwd="/", pass_fds=tuple(fds), user=self.user)
                if leader:
                    self._leaders.add(popen.pid)
        except (ValueError, UnicodeEncodeError) as exc:  # a NUL or a lone surrogate
            _close_quietly(*fds, *kept)
            raise _JobError(f"cannot start the step: {exc}") from None
        except OSError as exc:
            _close_quietly(*fds, *kept)
            raise _StepStartError(f"cannot start bwrap: {exc}") from None
        except CIRunnerError:
            _close_quietly(*fds, *kept)
            raise
        _close_quietly(*fds)
        process = _StepProcess(popen, status=status_read)
        if block >= 0:
            self._connect(process, block)
        return process

    def _connect(self, process, block):
        """Give the sandbox its way out, then let its command start. When that
        fails, the sandbox is ended: its step never started (see `_finish`)."""
        child = None
        try:
            line = b""
            while not line.endswith(b"\n"):
                data = os.read(process.status, 4096)
                if not data:
                    break
                line += data
            try:
                child = json.loads(line.split(b"\n", 1)[0])["child-pid"]
            except (ValueError, KeyError, TypeError):
                return  # bwrap ended before making it: `_finish` says so
            _await_loopback(child)
            process.network = _UserNetwork(self.slirp, child,
                                           _host_environment(self.environ, _HOST_KEEPS))
            os.write(block, b"1")
        except (OSError, _StepStartError) as exc:
            _signal_group(process.pid, signal.SIGKILL)
            if isinstance(exc, BrokenPipeError) or child is not None and not os.path.exists(
                    f"/proc/{child}/ns/net"):  # bwrap failed and said why, on the step's output
                process.start_error = _BWRAP_ENDED
            else:
                process.start_error = getattr(exc, "message", None) or (
                    f"the sandbox could not start the step ({exc})")
        finally:
            os.close(block)

    def _resolver_options(self, fds):
        """DNS inside: through the user-mode stack's forwarder when the step has
        its own network; the host's resolver file when it shares the host's and
        that file lives under /run, which the sandbox hides."""
        resolv = os.path.realpath("/etc/resolv.conf")
        if self.network == "host":
            hidden = resolv.startswith(("/run/", "/var/run/"))
            return ["--ro-bind", resolv, resolv] if hidden and os.path.isfile(resolv) else []
        if self.network == "none" or not os.path.isfile(resolv):
            return []
        if not self.resolv_conf:
            with contextlib.suppress(OSError), open(resolv, "rb") as handle:
                kept = [line for line in handle.read().splitlines()
                        if line.split()[:1] in ([b"search"], [b"domain"], [b"options"])]
                self.resolv_conf = b"\n".join(
                    kept + [f"nameserver {_UserNetwork.DNS}".encode()]) + b"\n"
        fds.append(_memory_file("resolv.conf", self.resolv_conf))
        return ["--ro-bind-data", str(fds[-1]), resolv]

    def signal(self, process, signum):
        """SIGTERM reaches the step's processes, not bwrap itself, which would
        end the sandbox at once; SIGKILL ends the sandbox and all in it. A
        sandbox whose step has not started yet (only bwrap's own processes in
        it: the namespace's first process ignores SIGTERM) is ended at once
        too: no process of the step could have heard the SIGTERM."""
        inside = [pid for pid in _group_members(process.pid) if pid != process.pid]
        if signum == signal.SIGKILL or all(_process_name(pid) == "bwrap" for pid in inside):
            _signal_group(process.pid, signum)
            return
        for pid in inside:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    def finish(self, process):
        """The step's exit code; `process.started` says whether the sandbox
        ever ran it (bwrap reports an exit code only for a command it started)."""
        code = super().finish(process)
        self._finish(process)
        return code

    def _finish(self, process):
        if process.network is not None:
            process.network.stop()
            with self._lock:
                self._networks.append(process.network)
            process.network = None
        self.reap_networks()
        status = b""
        if process.status >= 0:
            with contextlib.suppress(OSError):
                while True:
                    data = os.read(process.status, 4096)
                    if not data:
                        break
                    status += data
            os.close(process.status)
            process.status = -1
        if b'"exit-code"' not in status:
            process.popen.wait()
            process.started = False
            code = process.popen.returncode
            # Exited on its own before the step began (a failed bind, seen after
            # the sandbox's start went on): it said why on the step's output.
            process.start_error = process.start_error or (
                _BWRAP_ENDED if code > 0 else
                f"the sandbox could not start the step (bwrap exit {code})")


# -- containers -----------------------------------------------------------------
# The Docker reference grammar (distribution/reference): an image name can never
# be read as an option, and nothing but a name is taken as one.
_IMAGE_REFERENCE = re.compile(
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[\w][\w.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?")
_VOLUME_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_CONTAINER_PATH = r"/[^,:\x00-\x1f]*"
_VOLUME_SPEC = re.compile(rf"(?:{_CONTAINER_PATH}|{_VOLUME_NAME}):{_CONTAINER_PATH}"
                          r"(?::(?:ro|rw|z|Z|O|U|shared|slave|private|rshared|rslave|rprivate|"
                          r"nocopy|noexec|exec|nodev|dev|nosuid|suid)(?:,[a-zA-Z]+)*)?")
_DEVICE_SPEC = re.compile(rf"/dev/[^,:\x00-\x1f]+(?::{_CONTAINER_PATH})?(?::[rwm]{{1,3}})?")
_NETWORK_MODE = re.compile(r"(?:host|none|bridge|default|container:[A-Za-z0-9][\w.-]*|"
                           r"[A-Za-z0-9][\w.-]*)")
_SHM_SIZE = re.compile(r"[0-9]+[bkmgBKMG]?")
_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")


def _is_image_reference(text):
    """Whether `text` is an image reference as docker reads one: its first part
    is a registry only with a dot, a port or as localhost; else it is a path,
    in lower case."""
    if len(text) > 255 or not _IMAGE_REFERENCE.fullmatch(text):
        return False
    first, slash, _ = text.partition("/")
    registry = slash and ("." in first or ":" in first or first == "localhost")
    return bool(registry) or first == first.lower()


def _is_ip(text):
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _container_problems(step):
    """Why `step` (with its variables substituted) cannot be handed to an
    engine: each value that would become an engine argument is checked, so
    that none can be read as an option or reach further than it says."""
    problems = []

    def check(key, values, valid):
        for value in values:
            if not isinstance(value, str) or not valid(value):
                problems.append(f"{key} {value!r} is not valid")

    check("image", [step.image], _is_image_reference)
    check("volume", step.volumes, lambda value: bool(_VOLUME_SPEC.fullmatch(value)))
    check("temp volume", step.temp_volumes,
          lambda value: bool(re.fullmatch(rf"{_VOLUME_NAME}:{_CONTAINER_PATH}", value)))
    check("device", step.devices, lambda value: bool(_DEVICE_SPEC.fullmatch(value)))
    check("network_mode", [step.network_mode] if step.network_mode else [],
          lambda value: bool(_NETWORK_MODE.fullmatch(value)))
    check("dns", step.dns, _is_ip)
    check("dns_search", step.dns_search, lambda value: bool(_HOST_NAME.fullmatch(value)))
    check("extra_hosts", step.extra_hosts, lambda value: ":" in value and bool(
        _HOST_NAME.fullmatch(value.split(":", 1)[0])) and _is_ip(value.split(":", 1)[1]))
    check("shm_size", [step.shm_size] if step.shm_size else [],
          lambda value: bool(_SHM_SIZE.fullmatch(value)))
    check("working_dir", [step.working_dir] if step.working_dir else [],
          lambda value: value.startswith("/") and "\x00" not in value)
    # cirunner's own labels mark its containers for the sweep after a crash: a
    # step that set them would escape it.
    check("label", list(step.labels), lambda value: bool(_LABEL_KEY.fullmatch(value))
          and not value.lower().startswith("cirunner."))
    check("entrypoint or command", [*step.entrypoint, *step.command, *step.labels.values()],
          lambda value: "\x00" not in value)
    return problems


def _env_file(environment, *, multiline_allowed):
    """(the lines of an engine's env file, {name: value} of values an env file
    cannot carry: those with a line break). Raises _JobError for a name an env
    file cannot hold."""
    lines, multiline = [], {}
    for name, value in environment.items():
        if not name or "=" in name or name[0] == "#" or any(
                char.isspace() or char == "\x00" for char in name):
            raise _JobError(f"the variable name {name!r} cannot be passed to a container")
        if "\x00" in value:
            raise _JobError(f"the value of {name} holds a NUL byte, which no process can take")
        if "\n" in value or "\r" in value:
            if not multiline_allowed:
                raise _JobError(f"the value of {name} spans several lines, which docker's env "
                                "file cannot carry: use podman (--engine podman)")
            multiline[name] = value
        else:
            lines.append(f"{name}={value}")
    return "\n".join(lines) + "\n", multiline


class _EngineBackend:
    """Runs steps, plugins and services that name an image in that image,
    through the podman or docker command line (the subset both share).

    Each job gets a network of its own (services are reached by their names)
    and, when the pipeline's workspace base differs from its path, a volume
    at the base that its steps share. The checkout is mounted at the Drone
    workspace path, the working directory. A step's variables reach its
    container through an env file the engine reads from a file descriptor
    (on no disk, in no command line, never in the engine's own environment);
    a value with line breaks, which env files cannot carry, through a podman
    secret of the job. Every container, network, volume and secret carries
    labels naming the store, the job and the runner, and goes at the end of
    its job; what a dead runner left goes at the next start.
    """

    def __init__(self, name, *, path=None, store_key, runner_id, environ=None, **_):
        self.name = name
        self.path = path or shutil.which(name) or name
        self.store_key = store_key
        self.runner_id = runner_id
        self.problem = None
        self.host_environment = _host_environment(
            os.environ if environ is None else environ, _ENGINE_KEEPS)

    def check(self):
        """Check once that the engine runs a container here (docker: that its
        daemon answers): a podman that cannot is reported at start."""
        if self.problem is not None:
            return
        if self.name != "podman":
            result = self._run(["version"], timeout=60)
            self.problem = "" if result.returncode == 0 else (
                result.stderr.strip() or f"`{self.name} version` failed")
            return
        with tempfile.TemporaryDirectory(prefix="cirunner-probe-") as root:
            # An empty root and a command that is not there: the runtime makes
            # the whole container (namespaces, mounts, limits), then cannot exec.
            result = self._run(["run", "--rm", "--network=none", "--rootfs", "--", root,
                                "/cirunner-probe"], timeout=120)
        found = result.returncode == 127 and "/cirunner-probe" in result.stderr
        self.problem = "" if found else (result.stderr.strip().splitlines() or [
            f"exit {result.returncode}"])[-1]

    def describe(self):
        return self.name

    def check_step(self, step):
        """Refuse a step whose engine arguments would not be what they say."""
        problems = _container_problems(step)
        if problems:
            raise _JobError(f"{step.kind} {step.name!r}: {'; '.join(problems)}")

    def environment(self, job):
        """Nothing of the host's: a container starts from its image's."""
        return {}

    def workspace(self, job):
        return job.container_workspace[1]

    def marks(self, job):
        return {}

    def reap(self):
        """Nothing to reap: the engine's processes are waited for by their step."""

    def _run(self, args, *, timeout=120, stdin=None):
        try:
            return subprocess.run([self.path, *args], capture_output=True, text=True,
                                  timeout=timeout, check=False, env=self.host_environment,
                                  input=stdin)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return subprocess.CompletedProcess(args, 255, "", str(exc))

    def labels(self, job):
        return [f"--label=cirunner.store={self.store_key}",
                f"--label=cirunner.job={self.store_key}-{job.job['id']}",
                f"--label=cirunner.runner={self.runner_id}"]

    def prefix(self, job):
        """The name every container, network and volume of `job` starts with."""
        return f"cirunner-{self.store_key}-{job.job['id']}-{job.token[-6:]}"

    def prepare(self, job):
        """The job's network (when it has services or detached steps, which
        later steps reach by name), and its shared workspace volume when it
        needs one."""
        prefix = self.prefix(job)
        if job.services or any(step.detach and step.image for step in job.steps):
            result = self._run(["network", "create", *self.labels(job), "--", prefix])
            if result.returncode != 0:
                raise _JobError(f"{self.name} could not make the job's network: "
                                f"{result.stderr.strip()}")
            job.network = prefix
        base, path = job.container_workspace
        if base != path:
            result = self._run(["volume", "create", *self.labels(job), "--", prefix])
            if result.returncode != 0:
                raise _JobError(f"{self.name} could not make the job's volume: "
                                f"{result.stderr.strip()}")
            job.volume = prefix
        for name in sorted({spec.split(":", 1)[0] for step in job.steps + job.services
                            for spec in step.temp_volumes}):  # Drone 1.x's temp: {}
            result = self._run(["volume", "create", *self.labels(job), "--",
                                f"{prefix}-{name}"])
            if result.returncode != 0:
                raise _JobError(f"{self.name} could not make the temp volume {name!r}: "
                                f"{result.stderr.strip()}")
            job.temp_volumes[name] = f"{prefix}-{name}"

    def command(self, step, job, *, name, env_file, secrets=()):
        """The engine's argv that runs `step` (its variables from `env_file`)."""
        base, path = job.container_workspace
        argv = [self.path, "run", "--rm", f"--name={name}", *self.labels(job),
                f"--workdir={step.working_dir or _step_directory(step, path)}"]
        if step.network_mode or job.network:
            argv.append(f"--network={step.network_mode or job.network}")
        if job.network and not step.network_mode and _HOST_NAME.fullmatch(step.name):
            argv.append(f"--network-alias={step.name}")
        if job.volume:
            argv.append(f"--volume={job.volume}:{base}")
        argv.append(f"--volume={os.path.abspath(job.workspace)}:{path}")
        for spec in step.temp_volumes:
            name, _, target = spec.partition(":")
            argv.append(f"--volume={job.temp_volumes[name]}:{target}")
        for readable in job.readable_paths():
            argv.append(f"--volume={readable}:{readable}:ro")
        argv.append("--pull=always" if step.pull else "--pull=missing")
        argv += self._options(step)
        argv.append(f"--env-file={env_file}")
        for secret, variable in secrets:
            argv.append(f"--secret={secret},type=env,target={variable}")
        if step.kind == "step" or step.commands:  # a service's commands are its script too
            return argv + ["--entrypoint=/bin/sh", "--", step.image, "-e", "-c", step.script()]
        if step.entrypoint:
            argv.append(f"--entrypoint={step.entrypoint[0]}")
        return argv + ["--", step.image, *step.entrypoint[1:], *step.command]

    @staticmethod
    def _options(step):
        options = []
        if step.privileged:
            options.append("--privileged")
        for flag, values in (("--volume", step.volumes), ("--device", step.devices),
                             ("--dns", step.dns), ("--dns-search", step.dns_search),
                             ("--add-host", step.extra_hosts)):
            options += [f"{flag}={value}" for value in values]
        if step.shm_size:
            options.append(f"--shm-size={step.shm_size}")
        options += [f"--label={key}={value}" for key, value in step.labels.items()]
        return options

    def start(self, step, *, env, job):
        """Start a container for `step`; its output comes from the returned process."""
        self.check_step(step)
        # By its number in the job: its record's id is no number on an agent.
        name = f"{self.prefix(job)}-{job.step_numbers[id(step)]}"
        text, multiline = _env_file(env, multiline_allowed=self.name == "podman")
        secrets = [(self._secret(job, name, index, value), variable)
                   for index, (variable, value) in enumerate(multiline.items())]
        env_fd = _memory_file("env-file", text.encode("utf-8", "surrogateescape"))
        try:
            popen = _start_process(
                self.command(step, job, name=name, env_file=f"/dev/fd/{env_fd}",
                             secrets=secrets),
                env=self.host_environment, pass_fds=(env_fd,))
        except ValueError as exc:  # a NUL in an argument
            raise _JobError(f"{step.kind} {step.name!r}: {exc}") from None
        finally:
            os.close(env_fd)
        return _StepProcess(popen, container=name, image=step.image)

    def _secret(self, job, name, index, value):
        """A podman secret holding one multi-line value of a step, removed with the job."""
        secret = f"{name}-env-{index}"
        job.engine_secrets.append(secret)  # before it may exist: the sweep looks for it
        result = self._run(["secret", "create", *self.labels(job), "--", secret, "-"],
                           stdin=value)
        if result.returncode != 0:
            raise _StepStartError(f"podman could not hold a multi-line value: "
                                  f"{result.stderr.strip()}")
        return secret

    def signal(self, process, signum):
        """SIGTERM and SIGKILL to the container, which the engine delivers."""
        sig = "KILL" if signum == signal.SIGKILL else "TERM"
        self._run(["kill", f"--signal={sig}", "--", process.container], timeout=30)

    def finish(self, process):
        """The container's exit code, once it and the engine's process are gone.
        Exit code 125 is the engine's own: it could not start the container
        (`process.started` is then False)."""
        try:
            process.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.ended_cleanly = False
            self._run(["rm", "--force", "--", process.container], timeout=60)
            process.popen.kill()
            process.popen.wait()
        process.popen.stdout.close()
        code = process.popen.returncode
        if code == 125:
            process.started = False
            process.start_error = f"{self.name} could not start the container (exit 125)"
            if process.image and self._run(["image", "inspect", "--format", "{{.Id}}", "--",
                                            process.image], timeout=60).returncode != 0:
                process.start_error = (f"could not pull {process.image}: it is not among "
                                       f"{self.name}'s images and {self.name} could not fetch "
                                       "it (its words are in the log)")
        return 128 - code if code < 0 else code

    def stop_containers(self, job, grace):
        """Stop (engine stop, grace, then kill) and remove every container of `job`."""
        names = self._job_objects(["ps", "--all", "--quiet"], job)
        if names:
            self._run(["stop", f"--time={int(max(0, grace))}", "--", *names],
                      timeout=grace + 60)
            self._run(["rm", "--force", "--", *names], timeout=120)

    def sweep(self, job, grace=0):
        """Remove what the job left: containers, then its volume, network and
        secrets. (Each container removes itself when it ends; only a job that
        ended abnormally can leave one, and only then are they listed.)"""
        if job.background or not job.ended_cleanly:
            self.stop_containers(job, grace)
        for volume in [job.volume, *job.temp_volumes.values()]:
            if volume:
                self._run(["volume", "rm", "--force", "--", volume])
        if job.network:
            self._run(["network", "rm", "--force", "--", job.network])
        if job.engine_secrets:  # else no `secret ls` (a round trip to podman)
            self._remove_secrets([job.job["id"]])

    def _remove_secrets(self, job_ids):
        """Remove the podman secrets of these jobs (found by name: podman's
        `secret ls` cannot filter by label)."""
        if self.name != "podman":
            return
        result = self._run(["secret", "ls", "--format={{.Name}}"])
        prefixes = tuple(f"cirunner-{self.store_key}-{job_id}-" for job_id in job_ids)
        found = [name for name in result.stdout.split() if name.startswith(prefixes)] \
            if result.returncode == 0 else []
        if found:
            self._run(["secret", "rm", "--", *found])

    def _job_objects(self, listing, job):
        result = self._run([*listing, "--filter",
                            f"label=cirunner.job={self.store_key}-{job.job['id']}"])
        return result.stdout.split() if result.returncode == 0 else []

    def recover(self, job_ids):
        """Remove containers, networks, volumes and secrets of jobs whose runner died."""
        listings = [(["ps", "--all", "--quiet"], ["rm", "--force"]),
                    (["network", "ls", "--quiet"], ["network", "rm", "--force"]),
                    (["volume", "ls", "--quiet"], ["volume", "rm", "--force"])]
        self._remove_secrets(job_ids)
        for job_id in job_ids:
            label = f"label=cirunner.job={self.store_key}-{job_id}"
            for listing, remove in listings:
                result = self._run([*listing, "--filter", label])
                found = result.stdout.split() if result.returncode == 0 else []
                if found:
                    self._run([*remove, "--", *found])


# The backends by name, as bottle picks a server adapter by its name.
_BACKENDS = {"none": _HostBackend, "bwrap": _BwrapBackend, "podman": _EngineBackend,
             "docker": _EngineBackend}

_NO_SANDBOX = ("steps on the host run only in a sandbox, and {problem}; fix that and restart "
               "serve, or accept the risk with --sandbox none")
_NO_ENGINE = ("{step.kind} {step.name!r} runs in an image ({step.image}) and needs a container "
              "engine, which this server has not ({problem}): install podman (apt-get install "
              "podman) and restart serve")


def _make_backend(name, **settings):
    """The backend called `name` (see _BACKENDS), made with the settings it takes."""
    return _BACKENDS[name](name, **settings)


def _host_backend(sandbox, *, network="private", **settings):
    """The backend of steps on the host for `sandbox` ("auto", "bwrap" or
    "none"). `auto` without bubblewrap refuses host steps, naming the fix."""
    if sandbox not in SANDBOXES:
        raise BadRequest(f"sandbox must be one of {', '.join(SANDBOXES)}, not {sandbox!r}")
    if network not in SANDBOX_NETWORKS:
        raise BadRequest(f"sandbox network must be one of {', '.join(SANDBOX_NETWORKS)}, "
                         f"not {network!r}")
    if sandbox == "none":
        return _make_backend("none", **settings)
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        if sandbox == "bwrap":
            raise CIRunnerError("--sandbox bwrap needs bubblewrap: apt-get install bubblewrap")
        return _UnavailableBackend("bubblewrap is not installed (apt-get install bubblewrap)",
                                   _NO_SANDBOX, **settings)
    return _make_backend("bwrap", bwrap=bwrap, network=network,
                         slirp=shutil.which("slirp4netns"), **settings)


def _image_backend(engine, **settings):
    """The backend of steps with an image for `engine` ("auto", "podman",
    "docker" or "none": None, and such steps run on the host). With `auto`
    and no engine, steps with an image are refused, naming the fix."""
    if engine not in ENGINES:
        raise BadRequest(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "none":
        return None
    for name in ("podman", "docker") if engine == "auto" else (engine,):
        if shutil.which(name):
            return _make_backend(name, **settings)
    if engine != "auto":
        raise CIRunnerError(f"--engine {engine} needs {engine}: apt-get install {engine}")
    return _UnavailableBackend("no container engine (podman or docker) is installed",
                               _NO_ENGINE, **settings)


###############################################################################
# Jobs ########################################################################
###############################################################################


class _LogWriter:
    """Buffers a job's output briefly and appends it to the store in chunks.

    Memory stays bounded (one chunk) whatever the log size; no byte waits in
    memory longer than `flush_seconds`, so the log is readable live. Secret
    values are masked before anything reaches the store, also when a value
    arrives split across two reads.

    With a `cap` (bytes), a log that passes it keeps its start (up to the cap
    less LOG_TAIL_BYTES) and, once the job ends, one marker line saying how
    much was dropped and the last LOG_TAIL_BYTES (held in memory meanwhile).
    """

    def __init__(self, store, job_id, flush_seconds=LOG_FLUSH_SECONDS, *, cap=0, lease=None,
                 wait_out=None, refused=None):
        self.store = store
        self.job_id = job_id
        # The claim's lease; `wait_out(error)` says whether to try a store
        # that cannot be reached again (after waiting); `refused(message)` is
        # told once if the store refuses (the job was ended elsewhere).
        self.lease = lease
        self.wait_out = wait_out or _BriefRetries()
        self.refused = refused
        self.refusal = ""
        self.flush_seconds = flush_seconds
        self.seq = 0
        self.offset = 0
        self.buffer = bytearray()
        self.settled = 0  # the buffer's first bytes, masked already: nothing spans past them
        self.first_at = None
        self.masked = []
        self.cap = cap
        self.head_limit = max(0, cap - LOG_TAIL_BYTES) if cap else 0
        self.tail = collections.deque()  # chunks past the head, at most LOG_TAIL_BYTES
        self.tail_bytes = 0
        self.dropped = 0
        self.written = 0                 # every byte the job printed (for metrics)

    def mask(self, values):
        """Replace these secret values (and each line of a multi-line one) by
        ``********`` before anything reaches the store."""
        texts = set()
        for value in values:
            texts.update(line for line in [value, *value.splitlines()]
                         if len(line.strip()) >= MIN_MASKED_LENGTH)
        self.masked = sorted((text.encode() for text in texts), key=len, reverse=True)

    def position(self):
        """Where the next byte will be in the stored log (a step's section
        starts or ends here): what is buffered counts as masked, and is
        settled, so no later masking moves it; all but a tail that could be
        a secret's start, which the next output may complete (masked then,
        across the boundary: the secret before the exact place)."""
        if self.masked and len(self.buffer) > self.settled:
            self._mask_unsettled()
            self.settled = len(self.buffer) - self._held_back()
        else:
            self.settled = len(self.buffer)
        return self.offset + len(self.buffer)

    def _mask_unsettled(self):
        rest = bytes(self.buffer[self.settled:])
        for secret in self.masked:
            if secret in rest:
                rest = rest.replace(secret, MASK.encode())
        del self.buffer[self.settled:]
        self.buffer += rest

    def _held_back(self):
        """Bytes at the buffer's end that could be the start of a secret whose
        rest has not been read yet: kept until the next read or the end."""
        held = 0
        for secret in self.masked:
            for length in range(min(len(secret) - 1, len(self.buffer) - self.settled), held, -1):
                if self.buffer.endswith(secret[:length]):
                    held = length
                    break
        return held

    def write(self, data):
        if isinstance(data, str):
            data = data.encode()
        if not data:
            return
        if not self.buffer and not self.masked and len(data) == LOG_CHUNK_BYTES:
            self._store_chunk(data)  # a fast writer's full read, stored as it came: no copies
            return
        if self.first_at is None:
            self.first_at = time.monotonic()
        self.buffer += data
        if len(self.buffer) >= LOG_CHUNK_BYTES:
            self.flush(final=False)

    def flush_due_in(self):
        """Seconds until the buffer must be flushed, or None if it is empty."""
        if self.first_at is None:
            return None
        return max(0.0, self.first_at + self.flush_seconds - time.monotonic())

    def flush_if_due(self):
        if self.first_at is not None and self.flush_due_in() == 0.0:
            self.flush(final=False)

    def flush(self, final=True):
        """Store the buffer; with `final` False, keep back a possible secret's start."""
        held = b""
        if self.masked:
            self._mask_unsettled()
            keep = 0 if final else self._held_back()
            if keep:
                held = bytes(self.buffer[-keep:])
                del self.buffer[-keep:]
        while self.buffer:
            chunk = bytes(self.buffer[:LOG_CHUNK_BYTES])
            self._store_chunk(chunk)
            del self.buffer[:len(chunk)]
        self.buffer += held
        self.settled = 0
        self.first_at = None
        if final and (self.tail or self.dropped):
            self._store_tail()

    def _store_chunk(self, chunk):
        self.written += len(chunk)
        if self.cap and self.offset + len(chunk) > self.head_limit:
            room = max(0, self.head_limit - self.offset)
            if room:
                self._append(chunk[:room])
            self.tail.append(chunk[room:])
            self.tail_bytes += len(chunk) - room
            while self.tail_bytes - len(self.tail[0]) >= LOG_TAIL_BYTES:
                first = self.tail.popleft()  # older than the last LOG_TAIL_BYTES
                self.tail_bytes -= len(first)
                self.dropped += len(first)
            return
        self._append(chunk)

    def _store_tail(self):
        """The end of a capped log: the marker, then the last bytes kept."""
        tail = b"".join(self.tail)
        cut = max(0, len(tail) - LOG_TAIL_BYTES)
        dropped, tail = self.dropped + cut, tail[cut:]
        self.tail.clear()
        self.tail_bytes = self.dropped = 0
        marker = (f"\n[cirunner: {dropped} bytes of output dropped here: the log passed its cap "
                  f"of {self.cap} bytes; its last {len(tail)} bytes follow]\n").encode()
        self._append(marker)
        for start in range(0, len(tail), LOG_CHUNK_BYTES):
            self._append(tail[start:start + LOG_CHUNK_BYTES])

    def _append(self, chunk):
        while not self.refusal:
            try:
                self.store.append_log(self.job_id, self.seq, self.offset, chunk,
                                      lease=self.lease)
                break
            except Conflict as exc:  # the job was ended elsewhere: its log stays as it is
                self.refusal = exc.message
                if self.refused is not None:
                    self.refused(exc.message)
                return
            except self.store.OperationalError as exc:
                # Busy beyond the busy timeout, or the database is away: retry
                # rather than lose output (the step waits on its pipe meanwhile).
                if _is_disk_full(exc) or not self.wait_out(exc):
                    raise
        self.seq += 1
        self.offset += len(chunk)


class _BriefRetries:
    """A store that cannot be reached is tried four times more, 0.2 to 0.8 s apart."""

    def __init__(self):
        self.tries = 0

    def __call__(self, _error):
        self.tries += 1
        if self.tries > 4:
            return False
        time.sleep(0.2 * self.tries)
        return True


# Container keys that reach the host (its devices, files, network): only a
# trusted repository's own pipelines may use the first four; a pipeline a
# fork wrote may use none of them (Drone 0.8's linter lists them all).
_TRUSTED_KEYS = ("privileged", "volumes", "devices", "network_mode", "dns", "dns_search",
                 "extra_hosts", "shm_size")
_TRUSTED_ONLY_KEYS = _TRUSTED_KEYS[:4]  # 0.5's; Drone 0.8's linter refuses them all untrusted


def _url_host(url):
    """The host of a clone URL (https://HOST/..., ssh://..., git@HOST:...), or ""."""
    match = re.match(r"^[a-z][a-z0-9+.-]*://(?:[^@/]*@)?([^/:]+)", url) or re.match(
        r"^[\w.-]+@([\w.-]+):", url)
    return match.group(1) if match else ""


def _drone_environment(repo, build, job, previous, *, link, workspace, host):
    """The variables every step gets: Drone 0.5's (its agent's `toEnv`), Drone
    0.4's ``CI_*`` set, and cirunner's own ``CI_x``/``DRONE_x`` pairs."""
    full_name = f"{repo['owner']}/{repo['name']}"
    build_link = f"{link}/{full_name}/{build['number']}" if link else ""
    ci = {
        "REPO": full_name, "REPO_OWNER": repo["owner"], "REPO_NAME": repo["name"],
        "REMOTE_URL": _redact_url(build["remote"]), "BUILD_NUMBER": str(build["number"]),
        "PARENT_BUILD_NUMBER": str(build["parent"]), "BUILD_EVENT": build["event"],
        "BUILD_CREATED": str(build["created_at"]), "BUILD_LINK": build_link,
        "JOB_NUMBER": str(job["number"]), "COMMIT": build["commit_sha"],
        "COMMIT_SHA": build["commit_sha"], "COMMIT_BRANCH": build["branch"],
        "BRANCH": build["branch"], "COMMIT_REF": build["ref"],
        "COMMIT_MESSAGE": build["message"], "COMMIT_AUTHOR": build["author"],
        "COMMIT_AUTHOR_EMAIL": build["author_email"], "WORKSPACE": workspace,
    }
    environment = {"CI": "true", "DRONE": "true"}
    for name, value in ci.items():
        environment["CI_" + name] = environment["DRONE_" + name] = value
    pull = re.search(r"\d+", build["ref"]) if build["event"] == EVENT_PULL_REQUEST else None
    environment.update({
        "DRONE_ARCH": f"linux/{_machine()}", "DRONE_REPO_SCM": "git",
        "DRONE_REPO_LINK": f"https://{host}/{full_name}" if host else "",
        "DRONE_REPO_AVATAR": "", "DRONE_REPO_BRANCH": repo["default_branch"],
        "DRONE_REPO_PRIVATE": str(bool(repo["private"])).lower(),
        "DRONE_REPO_TRUSTED": str(bool(repo["trusted"])).lower(),
        "DRONE_COMMIT_REFSPEC": "", "DRONE_COMMIT_LINK": build["link_url"],
        "DRONE_COMMIT_AUTHOR_AVATAR": build["author_avatar"],
        "DRONE_BUILD_STATUS": SUCCESS, "DRONE_BUILD_STARTED": str(build["started_at"]),
        "DRONE_BUILD_FINISHED": "0", "DRONE_JOB_STATUS": RUNNING, "DRONE_JOB_ERROR": "",
        "DRONE_JOB_EXIT_CODE": "0", "DRONE_JOB_STARTED": str(job["started_at"]),
        "DRONE_JOB_FINISHED": "0", "DRONE_YAML_VERIFIED": "false", "DRONE_YAML_SIGNED": "false",
        "DRONE_VERSION": __version__, "DRONE_DIR": workspace, "CI_NAME": "drone",
        "CI_BUILD_DIR": workspace, "CI_BUILD_URL": build_link,
        "CI_PULL_REQUEST": pull.group(0) if pull else "",
    })
    if build["ref"].startswith("refs/tags/"):
        environment["CI_TAG"] = environment["DRONE_TAG"] = build["ref"][len("refs/tags/"):]
    if pull:
        environment["DRONE_PULL_REQUEST"] = pull.group(0)
    if build["event"] == EVENT_DEPLOYMENT:
        environment["DRONE_DEPLOY_TO"] = build["deploy_to"]
    if previous is not None:
        environment.update(DRONE_PREV_BUILD_STATUS=previous["status"],
                           DRONE_PREV_BUILD_NUMBER=str(previous["number"]),
                           DRONE_PREV_COMMIT_SHA=previous["commit_sha"])
    return environment


def _machine():
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


class _Spool:
    """Output set aside (a step run beside another, a service, a detached
    step) and added to the job's log as one piece later: a temporary file,
    so memory stays bounded."""

    def __init__(self):
        self.file = tempfile.TemporaryFile(prefix="cirunner-spool-")  # noqa: SIM115 - closed in copy_to

    def write(self, data):
        self.file.write(data.encode() if isinstance(data, str) else data)

    def flush_due_in(self):
        return None

    def flush_if_due(self):
        pass

    def copy_to(self, log):
        self.file.seek(0)
        while True:
            block = self.file.read(LOG_CHUNK_BYTES)
            if not block:
                break
            log.write(block)
        self.file.close()


@dataclasses.dataclass
class _Running:
    """A step started in the background: a detached step or a service."""

    step: Step
    process: object
    backend: object
    spool: _Spool
    thread: threading.Thread
    record: int
    stopped: str = ""  # why it was stopped ("the job ended"), or "" if it ended by itself



def _image_name(image):
    """An image reference without its tag or digest, and without Docker Hub's
    implied docker.io/ and library/ (so that golang and docker.io/library/golang:1 agree)."""
    image = image.split("@", 1)[0]
    head, slash, last = image.rpartition("/")
    image = head + slash + last.split(":", 1)[0]
    for prefix in ("docker.io/", "index.docker.io/", "library/"):
        image = image.removeprefix(prefix)
    return image


_SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
                     r"(?:-([0-9A-Za-z.-]+))?(?:\+([0-9A-Za-z.-]+))?")


def _semver_variables(tag):
    """DRONE_SEMVER_* of a tag, as runner-go's environ/semver.go gives them
    (a leading v dropped); DRONE_SEMVER_ERROR for a tag that is none."""
    version = tag.removeprefix("v")
    match = _SEMVER.fullmatch(version)
    if match is None:
        return {"DRONE_SEMVER_ERROR": f"{version} is not a semantic version (MAJOR.MINOR.PATCH)"}
    major, minor, patch, pre, build = match.groups()
    short = f"{major}.{minor}.{patch}"
    variables = {"DRONE_SEMVER": short + (f"-{pre}" if pre else "") + (f"+{build}" if build
                                                                      else ""),
                 "DRONE_SEMVER_MAJOR": major, "DRONE_SEMVER_MINOR": minor,
                 "DRONE_SEMVER_PATCH": patch, "DRONE_SEMVER_SHORT": short}
    if pre:
        variables["DRONE_SEMVER_PRERELEASE"] = pre
    if build:
        variables["DRONE_SEMVER_BUILD"] = build
    return variables


def _levels(needs):
    """Woodpecker's reading of a step graph (`needs[i]`: the positions the
    i-th step depends on; no cycle): its levels run one after another
    (compiler/dag.go convertDAGToStages), so a step waits for every step of
    the levels before its own, and a failure there skips it unless its
    `when` runs on failure."""
    level = {}

    def depth(index):
        if index not in level:
            level[index] = 1 + max((depth(other) for other in needs[index]), default=-1)
        return level[index]

    depths = [depth(index) for index in range(len(needs))]
    return [[index for index, other in enumerate(depths) if other < mine] for mine in depths]


class _JobRun:
    """One claimed job, run to its end in named steps: `prepare` (build, repo,
    secrets, the plan of steps, the workspace), `check_out`, `start_services`,
    `run_steps`, `finish`."""

    def __init__(self, executor, job):
        self.executor = executor
        self.store = executor.store
        self.runner = executor.runner
        self.engine = executor.engine
        self.job = job
        self.token = f"{executor.store_key}-{job['id']}-{secrets.token_hex(6)}"
        self.lease = job.get("lease")
        self.log = self._log_writer(executor.max_log_bytes)
        self.stop_requested = threading.Event()
        self.stop_requested_at = None  # time.monotonic() of the first request
        self.reason = ""
        self.workspace = None
        self.repo = self.build = self.pipeline = None
        self.secrets = {}
        self.records = {}           # id(step) -> its row in the store's steps
        self.step_numbers = {}      # id(step) -> its number in the job
        self.background = []        # _Running: services and detached steps
        self.network = self.volume = None
        self.temp_volumes = {}  # a temp volume's name: the engine's volume
        self.engine_secrets = []    # podman secrets made for its multi-line values
        self.container_workspace = ("", "")
        self.prepared = []          # the backends prepared for this job, in order
        self.prepare_lock = threading.Lock()
        self.background_done = threading.Event()
        self.ended_cleanly = True   # every container's engine process ended by itself
        self.status = SUCCESS       # the status so far, as DRONE_BUILD_STATUS tells steps
        self.failed_steps = []      # the names of its steps that failed (not ignored), so far
        self.failed_pipelines = []  # Drone 1.x: its build's that failed before it began
        self.activity = "preparing"  # what it does now, for the queue
        self.services = self.steps = []
        self.ended_elsewhere = ""   # why the store refused this claim's writes, if it did
        self.store_away = False     # the store could not be reached at the last write

    def readable_paths(self):
        """What a step may read beyond its workspace: the objects of its own
        repository's mirror, which a checkout borrows."""
        if self.repo is None or not self.pipeline.clone or self.executor.workspace is not None:
            return []
        objects = os.path.abspath(os.path.join(self.store.git.path(self.repo), "objects"))
        return [objects] if os.path.isdir(objects) else []

    @property
    def activity(self):
        """What the job does now (for the queue and the watchdog)."""
        return self._activity

    @activity.setter
    def activity(self, text):
        self._activity, self.activity_since = text, time.monotonic()

    def stuck_for(self, now, bound, grace):
        """Seconds this job has made no progress of cirunner's own past
        `bound`, or 0: outside its steps (a step's silence is the pipeline's,
        and its timeout's), or asked to stop and not stopped after `grace`."""
        late = 0.0
        if not self.activity.startswith("step "):
            late = now - self.activity_since - bound
        if self.stop_requested_at is not None:
            late = max(late, now - self.stop_requested_at - grace - bound)
        return now - self.activity_since if late > 0 else 0.0

    def request_stop(self, reason):
        """Ask the job to stop (cancel, shutdown): SIGTERM, grace, SIGKILL."""
        if not self.stop_requested.is_set():
            self.reason = reason
            self.stop_requested_at = time.monotonic()
            self.stop_requested.set()

    # -- what it records -----------------------------------------------------------

    def _log_writer(self, cap):
        return _LogWriter(self.store, self.job["id"], cap=cap, lease=self.lease,
                          wait_out=self._wait_out, refused=self._refused)

    def _refused(self, message):
        """The store refused a write under this job's claim: the job was ended
        elsewhere (found lost, its build deleted). Stop what is left of it."""
        self.ended_elsewhere = message
        self.request_stop(message)

    def _wait_out(self, error):
        """Wait a moment for a store that cannot be reached (a restart, a
        network blip): True to try again, False once the executor stops."""
        if not self.store_away:
            _log.warning("job %s: the store cannot be reached (%s); holding its output "
                         "until it can", self.job["id"], error)
        self.store_away = True
        return not self.executor.wait_stopping(0.5)

    def _through_outage(self, call, *args, **fields):
        """`call` under the job's claim, tried again through a store outage;
        None (and the job asked to stop) once the store refuses."""
        while not self.ended_elsewhere:
            try:
                result = call(*args, **fields)
                self.store_away = False
                return result
            except Conflict as exc:
                self._refused(exc.message)
            except self.store.OperationalError as exc:
                if _is_disk_full(exc) or not self._wait_out(exc):
                    raise
        return None

    def _through_outage_of_git(self, call):
        """`call` (a checkout), tried again while the server it fetches from
        (an agent's) cannot be reached: a restart or a network blip fails no
        job in its checkout either."""
        while True:
            try:
                return call()
            except _GitError as exc:
                away = getattr(self.store, "unreachable", None)
                if (away is None or not away(exc.message) or self.stop_requested.is_set()
                        or not self._wait_out(exc.message)):
                    raise

    def _step(self, record, **fields):
        """Record a step's progress."""
        self._through_outage(self.store.update_step, record, lease=self.lease, **fields)

    def run(self):
        """Run the job and record its result; never raises."""
        self.began = time.monotonic()
        status, exit_code, error = ERROR, 0, ""
        try:
            self.prepare()
            self.check_out()
            self.start_services()
            status, exit_code, error = self.run_steps()
        except CIRunnerError as exc:
            status, error = ERROR, exc.message
            self.log.write(f"cirunner: {exc.message}\n")
        except Exception as exc:  # noqa: BLE001 - any runner fault ends the job as error
            if _is_disk_full(exc):
                _log.warning("job %s: %s", self.job["id"], exc)
                status, error = ERROR, _disk_full_message(exc)
            else:
                _log.exception("job %s failed inside the runner", self.job["id"])
                status, error = ERROR, f"runner error: {exc}"
                self.log.write(f"cirunner: runner error: {exc}\n")
        finally:
            self.finish(status, exit_code, error)

    # -- prepare ----------------------------------------------------------------

    def prepare(self):
        """Read what the job needs, plan its steps and make its workspace."""
        self.build = self.store.get_build_by_id(self.job["build_id"])
        self.repo = self.store.get_repo_by_id(self.build["repo_id"])
        if self.repo["max_log_bytes"]:
            self.log = self._log_writer(self.repo["max_log_bytes"])
        # A pipeline a fork wrote gets only the secrets marked for pull
        # requests, whatever event it runs as (a restart may change it).
        self.secrets = self.store.secrets_for(
            self.repo["id"], EVENT_PULL_REQUEST if self.build["fork"] else self.build["event"],
            job_id=self.job["id"])
        self.secret_images = self.store.secret_images(self.repo["id"], job_id=self.job["id"])
        self.log.mask(self.secrets.values())
        self.pipeline = self._pipeline().named(self.job.get("pipeline") or "")
        self.workspace = self.executor.workspace_for(self.repo, self.build, self.job)
        self.container_workspace = self._container_workspace()
        self.matrix = json.loads(self.job["environment"] or "{}")
        self.variables = json.loads(self.build["variables"] or "{}")
        previous = self.store.previous_build(self.build)
        self.drone = _drone_environment(
            self.repo, self.build, self.job, previous, link=self.executor.public_url,
            workspace=self.workspace, host=_url_host(self.repo["url"]))
        self.drone["DRONE_REPO_BRANCH"] = (self.repo["default_branch"]
                                           or self.store.git.remembered_default_branch(self.repo))
        self.previous_status = previous["status"] if previous else None
        if _is_drone_file(self.pipeline.filename) and self.pipeline.era != "1":
            self.drone["CI"] = "drone"  # as Drone 0.5 and 0.8 set it (drone-runner: true)
        if self.pipeline.era == "woodpecker":  # the CI_* its documentation calls stable
            self.drone.update(self._woodpecker_environment())
        elif self.pipeline.era == "1":  # drone-runner-docker's stage variables
            self.drone.update(self._stage_environment())
            if "DRONE_TAG" in self.drone:
                self.drone.update(_semver_variables(self.drone["DRONE_TAG"]))
            self.failed_pipelines = self.store.failed_pipelines(self.build["id"])
        if self.pipeline.era in ("0.8", "1"):  # 0.8's metadata.go, runner-go's legacy ones:
            drone = self.drone                 # CI_REPO_NAME is OWNER/NAME
            drone.update(CI_REPO_NAME=drone["DRONE_REPO"], CI_REPO_LINK=drone["DRONE_REPO_LINK"],
                         CI_REPO_REMOTE=drone["DRONE_REMOTE_URL"],
                         CI_REPO_PRIVATE=drone["DRONE_REPO_PRIVATE"])
        services = [self._substituted(step) for step in self.pipeline.services]
        # Drone 0.8 starts a service only where its `when` matches.
        self.services = [service for service in services
                         if self.pipeline.era not in _RULES_08 or self._applies(service, planning=True)]
        self.steps = [self._substituted(step) for step in self.pipeline.steps]
        self._check_plan()
        self.log.write(f"cirunner: {self._isolation()}\n")
        ids = self._through_outage(self.store.add_steps, self.job["id"], [
            (step.name, step.kind) for step in services + self.steps], lease=self.lease)
        if ids is None:
            raise _JobError(self.reason)
        self.records = {id(step): record for step, record in zip(services + self.steps, ids)}
        self.step_numbers = {id(step): number for number, step in
                             enumerate(services + self.steps, start=1)}
        for service in services:
            if not any(service is started for started in self.services):
                self._step(self.records[id(service)], status=SKIPPED)

    def _stage_environment(self):
        """DRONE_STAGE_*: the pipeline a Drone 1.x job runs, as drone-runner-docker
        tells its steps."""
        pipeline = self.pipeline
        return {"DRONE_STAGE_KIND": "pipeline", "DRONE_STAGE_NAME": pipeline.name,
                "DRONE_STAGE_TYPE": "docker" if any(step.image for step in pipeline.steps)
                else "exec", "DRONE_STAGE_NUMBER": str(self.job["number"]),
                "DRONE_STAGE_MACHINE": socket.gethostname(),
                "DRONE_STAGE_OS": (pipeline.platform or "linux/").split("/")[0],
                "DRONE_STAGE_ARCH": (pipeline.platform or "/amd64").split("/")[-1],
                "DRONE_STAGE_DEPENDS_ON": ",".join(json.loads(self.job.get("depends_on")
                                                              or "[]")),
                "DRONE_STAGE_STATUS": SUCCESS, "DRONE_STAGE_STARTED":
                str(self.job.get("started_at") or 0)}

    def _failure_environment(self):
        """What has failed as a step of a Drone 1.x job starts, as
        drone-runner tells it (runner-go's environ.Build and environ.Stage):
        the build fails once another of its pipelines failed before this job
        began (DRONE_FAILED_STAGES) or one of this job's steps did
        (DRONE_FAILED_STEPS, not one whose failure is ignored)."""
        environment = {}
        if self.failed_steps:
            environment.update(DRONE_STAGE_STATUS=FAILURE,
                               DRONE_FAILED_STEPS=",".join(self.failed_steps))
        if self.failed_pipelines:
            environment.update(DRONE_BUILD_STATUS=FAILURE,
                               DRONE_FAILED_STAGES=",".join(self.failed_pipelines))
        return environment

    def _changed_files_variable(self):
        """Woodpecker's CI_PIPELINE_FILES: the changed files as JSON ("[]" for
        other events than push and pull request; unset past 500 files)."""
        files = json.loads(self.build.get("changed_files") or "[]")
        if self.build["event"] not in (EVENT_PUSH, EVENT_PULL_REQUEST):
            files = []
        return {"CI_PIPELINE_FILES": json.dumps(files)} if len(files) <= 500 else {}

    def _woodpecker_environment(self):
        build, drone = self.build, self.drone
        tag = build["ref"][len("refs/tags/"):] if build["ref"].startswith("refs/tags/") else ""
        return {"CI": "woodpecker", "CI_PIPELINE_NUMBER": str(build["number"]),
                "CI_PIPELINE_EVENT": build["event"], "CI_PIPELINE_URL": drone["CI_BUILD_LINK"],
                "CI_COMMIT_TAG": tag, "CI_REPO_URL": drone["DRONE_REPO_LINK"],
                "CI_REPO_CLONE_URL": drone["CI_REMOTE_URL"],
                **self._changed_files_variable(),
                "CI_REPO_DEFAULT_BRANCH": drone["DRONE_REPO_BRANCH"],
                "CI_WORKFLOW_NAME": self.pipeline.name,
                "CI_WORKFLOW_NUMBER": str(self.job["number"]),
                "CI_PREV_PIPELINE_STATUS": drone.get("DRONE_PREV_BUILD_STATUS", ""),
                **_woodpecker_build_variables(build["event"], build["branch"], build["ref"],
                                              build["deploy_to"])}

    def _pipeline(self):
        pipeline_id = self.build["pipeline_id"]
        if not pipeline_id:
            raise _JobError("the build has no pipeline")
        pipeline = self.executor.pipelines.get(pipeline_id)  # a pipeline file never changes
        if pipeline is None:
            row = self.store.get_pipeline(pipeline_id)
            pipeline = (Pipeline.from_json(row["parsed"]) if row["parsed"] else
                        parse_pipeline(row["text"], row["filename"],
                                       max_jobs=self.executor.max_jobs))
            self.executor.pipelines.put(pipeline_id, pipeline)
        return pipeline

    def _container_workspace(self):
        """(base, path) of the workspace inside containers, as Drone lays it out:
        /drone/src/HOST/OWNER/NAME unless the file's `workspace` says otherwise."""
        settings = self.pipeline.workspace
        base = settings.get("base") or "/drone"
        host = _url_host(self.repo["url"])
        default = "/".join(part for part in ("src", host, self.repo["owner"], self.repo["name"])
                           if part)
        path = settings.get("path") or self.pipeline.clone_settings.get("path") or default
        if self.pipeline.clone_settings.get("path") and not settings.get("path"):
            path = "src/" + self.pipeline.clone_settings["path"]  # Drone 0.4: under /drone/src
        return base, path if path.startswith("/") else f"{base.rstrip('/')}/{path}"

    def _step_secrets(self, step, image):
        """The secrets a step gets: of those its event allows and whose images
        (if limited) match its image, the ones it names (Drone 0.8's
        `secrets:`, matched without case, the target upper case); with no
        `secrets:`, none in a 0.8 file and all in older ones (0.5's rule)."""
        allowed = {name: value for name, value in self.secrets.items()
                   if _image_allowed(image, self.secret_images.get(name))}
        if step.secrets is None:
            return {} if self.pipeline.era in _RULES_08 else allowed
        by_name = {name.lower(): value for name, value in allowed.items()}
        return {target.upper(): by_name[source.lower()] for source, target in step.secrets
                if source.lower() in by_name}

    def _setting_secrets(self, step, image):
        """{name in lower case: value} of the secrets a Woodpecker plugin's
        settings name inside their maps and lists, of those its event allows
        and its image may have (None in other eras: Drone passes such a map
        as it is written)."""
        if self.pipeline.era != "woodpecker":
            return None
        wanted = {name.lower() for name in step.setting_secrets()}
        return {name.lower(): value for name, value in self.secrets.items()
                if name.lower() in wanted and _image_allowed(image, self.secret_images.get(name))}

    def _check_secrets_found(self, step, found, image):
        """Woodpecker fails a workflow whose step (one its `when` lets run)
        names a secret it cannot have: the repository lacks it, or this
        event or image may not have it (a fork's pull request gets none)."""
        missing = [source for source, target in step.secrets or ()
                   if target.upper() not in found]
        if self.pipeline.era == "woodpecker":
            nested = self._setting_secrets(step, image)
            missing += [name for name in step.setting_secrets() if name.lower() not in nested]
        if missing and self.pipeline.era == "woodpecker" and self._applies(step, planning=True):
            raise _JobError(f"{step.kind} {step.name!r}: secret {missing[0]!r} not found (or "
                            f"not for this event or image): `cirunner secret add`")

    def _substituted(self, step):
        variables = {**self.variables, **self.matrix, **self.drone,
                     **self._workspace_variables(self._backend_for(step))}
        image = step.image
        if self.secret_images and "$" in image:  # the image a secret's images must match
            image = step.with_variables(variables, self.matrix if self.pipeline.drone04 else
                                        None, dollars=self.pipeline.dollars()).image
        secrets_of_step = self._step_secrets(step, image)
        self._check_secrets_found(step, secrets_of_step, image)
        step = step.with_variables({**variables, **secrets_of_step},
                                   self.matrix if self.pipeline.drone04 else None,
                                   shell_variables=variables, dollars=self.pipeline.dollars())
        return self.pipeline.status_resolved(step, self.previous_status)

    def _check_plan(self):
        """Refuse what this repository, this build or this server cannot run,
        naming why: trusted keys on an untrusted repository or in a pipeline
        a fork wrote, engine arguments that are not what they say, a step
        that needs isolation this server cannot give."""
        if self.pipeline.trusted_volumes and (self.build["fork"] or not self.repo["trusted"]):
            raise _JobError(f"the pipeline's volumes {', '.join(self.pipeline.trusted_volumes)} "
                            "(a host path, or memory) are for a trusted repository's own "
                            "pipelines only, as in Drone")
        for step in self.services + self.steps:
            where = f"{step.kind} {step.name!r}"
            used = [key for key in _TRUSTED_KEYS if getattr(step, key)]
            if used and self.build["fork"]:
                raise _JobError(f"{where} uses {', '.join(repr(key) for key in used)}, which a "
                                "pipeline from a fork may never use, even on a trusted "
                                "repository")
            used = [key for key in used if key in (
                _TRUSTED_KEYS if self.pipeline.era in _RULES_08 else _TRUSTED_ONLY_KEYS)]
            if used and not self.repo["trusted"]:
                raise _JobError(f"{where} uses {', '.join(repr(key) for key in used)}, which "
                                "only trusted repositories may use: an admin marks this one "
                                "with `cirunner repo update "
                                f"{self.repo['owner']}/{self.repo['name']} --trusted true`")
            if step.kind != "step" and self.engine is None:
                raise _JobError(_NO_ENGINE.format(step=step, problem="--engine none"))
            self._backend_for(step).check_step(step)
        if self.engine is None:
            for step in self.steps:
                if step.image:
                    self.log.write(f"cirunner: image {step.image} not used for step "
                                   f"{step.name!r}: {self.executor.engine_problem}; it runs on "
                                   "the host\n")

    def _isolation(self):
        """How this job's steps are isolated, for the head of its log."""
        places = []
        if any(self._backend_for(step) is self.runner for step in self.steps):
            places.append(f"steps on the host run in {self.runner.describe()}")
        if self.engine is not None and any(step.image for step in self.services + self.steps):
            places.append(f"steps with an image run in {self.engine.describe()}")
        return "; ".join(places) or "no steps to run"

    # -- check out -------------------------------------------------------------

    def check_out(self):
        """Check the build's commit out into the workspace (unless `clone: false`)."""
        if not self.pipeline.clone or self.executor.workspace is not None:
            return
        commit = self.build["commit_sha"]
        self.activity = "checking out the commit"
        self.log.write(f"+ git checkout {commit}\n")
        try:
            user = self.runner.user
            self._through_outage_of_git(lambda: self.store.git.check_out(
                self.repo, commit, self.workspace, _pull_ref(self.build["ref"]),
                group=user.gid if user.other else None))
            if self.pipeline.clone_settings.get("recursive"):
                self.log.write("+ git submodule update --init --recursive\n")
                _update_submodules(self.store.git, self.workspace,
                                   self.pipeline.clone_settings.get("submodule_override", {}))
        except (_GitError, OSError) as exc:
            message = str(getattr(exc, "message", exc))
            self.log.write(f"{message}\n")
            first = (message.strip().splitlines() or [""])[0]
            raise _JobError(f"checkout of {commit[:12]} failed: {_clip(first, 300)}") from None

    # -- services and steps ------------------------------------------------------------

    def _workspace_variables(self, backend):
        """The variables that name the workspace, where `backend`'s steps see it
        (a container's own path: the server's folders are not a step's to know)."""
        return dict.fromkeys(("DRONE_WORKSPACE", "CI_WORKSPACE", "DRONE_DIR", "CI_BUILD_DIR"),
                             backend.workspace(self))

    def _backend_for(self, step):
        """The backend that runs `step`: its image's engine, else the host's
        (with --engine none, an image is not used)."""
        return self.engine if step.image and self.engine is not None else self.runner

    def _environment(self, step, backend):
        """A step's environment: what its backend starts from (on the host the
        server's locale, PATH and home, nothing else of the server's); then
        build variables, the step's own, the matrix and Drone's (which win, as
        in Drone, with the workspace where the step sees it; in a Woodpecker
        file the step's own win over them, as in Woodpecker), its secrets, a
        plugin's settings, and the backend's marks. It reaches the step inside
        its sandbox or container only, never a host process."""
        environment = backend.environment(self)
        environment.update(self.variables)
        environment.update(step.environment)
        environment.update(self.matrix)
        environment.update(self.drone)
        environment.update(self._workspace_variables(backend))
        if self.pipeline.era == "woodpecker":  # a step's own win there (compiler/convert.go)
            environment.update(step.environment)
        environment.update(self._step_secrets(step, step.image))
        environment.update(step.plugin_environment(self._setting_secrets(step, step.image)))
        environment["DRONE_BUILD_STATUS"] = self.status
        if self.pipeline.era == "1":
            environment.update(self._failure_environment())
        elif self.pipeline.era == "woodpecker":  # its status so far, as each step starts
            environment["CI_PIPELINE_STATUS"] = self.status
        if self.pipeline.era in ("1", "woodpecker"):  # the step's own name and number
            prefix = "DRONE" if self.pipeline.era == "1" else "CI"
            environment[f"{prefix}_STEP_NAME"] = step.name
            environment[f"{prefix}_STEP_NUMBER"] = str(self.step_numbers.get(id(step), 0))
        environment.update(backend.marks(self))
        return environment

    def _spawn(self, step):
        """Start `step` on its backend, prepared for this job first; (the
        running step, its backend)."""
        backend = self._backend_for(step)
        with self.prepare_lock:  # the steps of a group start at once
            if backend not in self.prepared:
                backend.prepare(self)
                self.prepared.append(backend)
        return backend.start(step, env=self._environment(step, backend), job=self), backend

    def start_services(self):
        """Start every service (and detached step later) in the background."""
        if self.services:
            self.activity = "starting services"
        for service in self.services:
            self._start_background(service)

    def _start_background(self, step):
        spool = _Spool()
        process, backend = self._spawn(step)
        running = _Running(step, process, backend, spool, None, self.records[id(step)])
        self._step(running.record, status=RUNNING, started_at=_now())

        def pump():
            running.stopped = self._pump(process, backend, spool, None)

        running.thread = threading.Thread(target=pump, name=f"cirunner-{step.kind}-{step.name}",
                                          daemon=True)
        running.thread.start()
        self.background.append(running)

    def run_steps(self):
        """Run the steps that apply, as a graph; (status, exit code, error).
        Steps without depends_on make one too: each unit (a step, or Drone
        0.8's consecutive steps of one group, see step_units) after every
        step of the unit before it."""
        minutes = self.pipeline.timeout or self.repo["timeout"] or DEFAULT_TIMEOUT_MINUTES
        deadline = time.monotonic() + minutes * 60
        # As Drone plans a job: the steps whose `when` cannot match (the status
        # aside) are left out before the groups are formed.
        planned = [step for step in self.steps if self._applies(step, planning=True)]
        for step in self.steps:
            if not any(step is kept for kept in planned):
                self._step(self.records[id(step)], status=SKIPPED)
        if self.pipeline.step_graph:
            position = {step.name: index for index, step in enumerate(planned)}
            needs = [[position[name] for name in step.depends_on if name in position]
                     for step in planned]
            if self.pipeline.era == "woodpecker":
                needs = _levels(needs)
        else:  # by position: Drone 0.8 ran two steps of one name (see _YamlReader)
            needs, before = [], []
            for unit in step_units(planned):
                needs += [before] * len(unit)
                before = list(range(len(needs) - len(unit), len(needs)))
        return self._run_graph(planned, needs, deadline, minutes)

    def _early_exit(self, code):
        """Whether a step's exit `code` ends a Drone 1.x job early, passing:
        78 (drone-runner skips the steps that have not started)."""
        return code == 78 and self.pipeline.era == "1"

    def _step_ended(self, step, code, exit_code, error):
        """Note a step's exit `code`: a failure it may ignore is said in the
        log; the first other failure makes the job's status failure. The
        job's (exit code, error) so far."""
        if code != 0 and step.ignore_failure:
            self.log.write(f"cirunner: step {step.name!r} failed with exit code {code} "
                           "(failure: ignore)\n")
        elif code != 0:
            self.failed_steps.append(step.name)
            if self.status == SUCCESS:
                self.status = FAILURE
                return code, f"step {step.name!r} failed with exit code {code}"
        return exit_code, error

    def _run_graph(self, planned, needs, deadline, minutes):
        """Steps that form a graph (`needs[i]`: the positions in `planned` of
        the steps the i-th waits for): each starts as soon as those it needs
        have ended (a step left out when planned counts as ended), if its
        `when` matches the status so far, at most STEP_GRAPH_PARALLEL at
        once. A step started while no other runs writes into the log as it
        prints; one started beside others into a spool, added to the log
        once it has ended and the log is free. (status, exit code, error), as
        run_steps; what a step's thread raised is raised here once the steps
        running beside it have ended."""
        waiting, running, spooled = list(range(len(planned))), {}, []
        finished = queue.SimpleQueue()
        exit_code, error, ended_by = 0, "", None  # ended_by: (status, why) of a stop or fault
        ended, raised, early = set(), None, False
        while waiting or running:
            if not (ended_by or raised or early or self.stop_requested.is_set()):
                self._start_ready(planned, waiting, running, ended, needs,
                                  lambda index, sink: threading.Thread(
                                      target=self._graph_step, daemon=True, args=(
                                          index, planned[index], sink, deadline, minutes,
                                          finished)).start())
            if not running:
                break  # nothing left to start: stopped, or every step has ended
            index, (code, stopped, fault), exception = finished.get()
            step, sink = running.pop(index)
            ended.add(index)
            raised = raised or exception
            if sink is not self.log:
                spooled.append((step, sink))
            if not any(sink is self.log for _, sink in running.values()):
                self._add_spooled(spooled)  # the log is free: what ended beside, in order
                spooled = []
            if fault or stopped:
                ended_by = ended_by or ((ERROR, fault) if fault else (KILLED, stopped))
                exit_code = exit_code or code
            elif self._early_exit(code):  # passed: what has not started is skipped
                early = True
                self.log.write(f"cirunner: step {step.name!r} exited 78: the steps that have "
                               "not started are skipped, as Drone skips them\n")
            else:
                exit_code, error = self._step_ended(step, code, exit_code, error)
        if raised:
            raise raised
        if ended_by:
            return ended_by[0], exit_code, ended_by[1]
        if self.stop_requested.is_set():
            return KILLED, exit_code, self.reason
        return self.status, exit_code, error

    def _start_ready(self, planned, waiting, running, ended, needs, start):
        """Start (with `start(index, sink)`) each waiting step whose dependencies
        have ended, while fewer than STEP_GRAPH_PARALLEL run; skip one whose
        `when` no longer matches; a detached one goes on in the background."""
        for index in list(waiting):
            step = planned[index]
            if len(running) >= STEP_GRAPH_PARALLEL or not ended.issuperset(needs[index]):
                continue
            waiting.remove(index)
            applies = self._applies(step)
            if step.detach and applies:
                self._start_background(step)
            elif not applies:
                self._step(self.records[id(step)], status=SKIPPED)
            else:
                sink = _Spool() if running else self.log  # live when it runs alone
                running[index] = (step, sink)
                start(index, sink)
                continue
            ended.add(index)

    def _add_spooled(self, spooled):
        """Add the output of steps that ended beside another to the log, each
        as its step's section."""
        for step, spool in spooled:
            start = self.log.position()
            spool.copy_to(self.log)
            self._step(self.records[id(step)], log_start=start, log_end=self.log.position())

    def _graph_step(self, index, step, sink, deadline, minutes, finished):
        """Run one step of a graph; tell `finished` (its position, its result,
        what it raised: the job's thread raises it)."""
        results, raised = [(255, "", f"step {step.name!r}: the runner failed to run it")], None
        try:
            self._run_into(step, sink, deadline, minutes, results, 0)
        except Exception as exc:  # noqa: BLE001 - handed to the job's own thread
            raised = exc
        finally:
            self.store.release_connection()  # this thread ends: the next one takes it
            finished.put((index, results[0], raised))

    def _applies(self, step, *, planning=False):
        """Whether `step`'s `when` lets it run now (when planning: at all, the
        status aside, which only the run will tell)."""
        build = self.build
        return step.applies(branch=self.pipeline.when_branch(build["event"], build["branch"],
                                                             build["ref"]),
                            event=build["event"],
                            environment=self.matrix,
                            job_status=None if planning else self.status,
                            deploy_to=build["deploy_to"], platform=self.drone["DRONE_ARCH"],
                            ref=build["ref"], repo=self.drone["DRONE_REPO"],
                            instance=self.executor.hostname,
                            local=self.executor.workspace is not None,
                            **self._change)

    @functools.cached_property
    def _change(self):
        """What `paths`, `cron`, `action` and ``${VAR}`` of a `when` look at,
        read once for the job (see Step.applies)."""
        build = self.build
        return {"files": json.loads(build.get("changed_files") or "null"),
                "message": build["message"], "cron": build.get("cron") or "",
                "action": build.get("action") or "",
                "variables": {**self.drone, "CI_REPO_DEFAULT_BRANCH":
                              self.drone["DRONE_REPO_BRANCH"], **self.matrix}}

    def _run_into(self, step, sink, deadline, minutes, results, index):
        """Run one step with its output into `sink`; its result in `results`."""
        record = self.records[id(step)]
        self.activity = f"step {step.name}" + (f" in {step.image}" if step.image else "")
        start = self.log.position() if sink is self.log else 0
        self._step(record, status=RUNNING, started_at=_now(), log_start=start)
        code, stopped, fault = 0, "", ""
        try:
            code, stopped = self._run_step(step, sink, (deadline, minutes))
        except CIRunnerError as exc:  # the runner's fault, not the step's: the job is error
            sink.write(f"cirunner: {exc.message}\n")
            code, fault = 255, f"step {step.name!r}: {exc.message}"
        results[index] = (code, stopped, fault)
        status = KILLED if stopped else ERROR if fault else SUCCESS if (
            code == 0 or self._early_exit(code)) else FAILURE
        fields = {"status": status, "exit_code": code, "finished_at": _now()}
        if sink is self.log:
            fields["log_end"] = self.log.position()
        self._step(record, **fields)

    def _run_step(self, step, sink, limits):
        """(exit code, why it was stopped or "") of a step run to its end. A
        sandbox or engine that could not start it (a mount gone while bwrap
        built its view, an engine failure) is tried once more, then raised."""
        for attempt in (1, 2):
            process, backend = self._spawn(step)
            stopped = ""
            try:
                stopped = self._pump(process, backend, sink, limits)
            finally:
                code = backend.finish(process)
                if stopped or not process.ended_cleanly:
                    self.ended_cleanly = False
            if stopped or process.started:
                return code, stopped
            if attempt == 1:
                sink.write(f"cirunner: {process.start_error}; trying once more\n")
        raise _StepStartError(process.start_error)

    def _pump(self, process, backend, sink, limits):
        """Copy a process's output into `sink` until it ends; stop it when asked
        or at the deadline (SIGTERM, grace, SIGKILL). `limits` is (deadline,
        minutes), or None for a background step, which runs until the job ends."""
        poller = select.poll()
        poller.register(process.output, select.POLLIN | select.POLLHUP | select.POLLERR)
        # A service or detached step is done with at its job's end: as Drone
        # removes their containers, it gets a moment, not the whole grace.
        grace = self.executor.grace if limits is not None else min(
            self.executor.grace, BACKGROUND_GRACE_SECONDS)
        term_at = killed_at = exited_at = None
        stopped = ""
        while True:
            now = time.monotonic()
            if term_at is None:
                stopped = self._stop_reason(now, limits)
                if stopped:
                    if limits is not None:
                        sink.write(f"\ncirunner: {stopped}: stopping the job\n")
                    backend.signal(process, signal.SIGTERM)
                    term_at = now
            elif killed_at is None and now - term_at >= grace:
                backend.signal(process, signal.SIGKILL)
                killed_at = now
            if exited_at is None and process.popen.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at >= STRAGGLER_SECONDS:
                break  # a detached grandchild holds the pipe open: stop reading
            due = sink.flush_due_in()
            wait = 0.1 if due is None else min(due, 0.1)
            if exited_at is not None:
                wait = min(wait, 0.02)
            if poller.poll(int(wait * 1000) + 1):
                data = os.read(process.output, LOG_CHUNK_BYTES)
                if not data:
                    break
                sink.write(data)
            sink.flush_if_due()
        return stopped

    def _stop_reason(self, now, limits):
        if self.stop_requested.is_set():
            return self.reason or "cancelled"
        if limits is None:
            return "the job ended" if self.background_done.is_set() else ""
        deadline, minutes = limits
        if now >= deadline:
            return f"timed out after {minutes} minutes"
        return ""

    # -- finish -----------------------------------------------------------------------

    def finish(self, status, exit_code, error):
        """Stop what runs in the background, store the end of the log, kill what
        the job left, record the result, then remove the workspace."""
        self.activity = "finishing"
        try:
            self._finish(status, exit_code, error)
        finally:
            self.executor.forget(self)  # until here the watchdog sees it

    def _finish(self, status, exit_code, error):
        self._stop_background()
        try:
            self.log.flush()
        except Exception as exc:  # noqa: BLE001 - the job must still be finished
            if not _is_disk_full(exc):
                _log.exception("could not store the end of job %s's log", self.job["id"])
            elif status != ERROR:  # its log lacks its end: say why
                status, error = ERROR, _disk_full_message(exc)
        for backend in self.prepared:  # before the job is finished: nothing of it runs on
            backend.sweep(self, grace=self.executor.grace)
        self._close_records(status)
        self._record_end(status, exit_code, error)
        if self.executor.metrics is not None:
            self.executor.metrics.job_done(status, time.monotonic() - self.began, self.log.written)
        self.executor.remove_workspace(self.workspace)

    def _record_end(self, status, exit_code, error):
        """Finish the job in the store; on a full disk, or while the database
        cannot be reached or stays locked, try again each second (until the
        executor stops, and a restart recovers it)."""
        while not self.ended_elsewhere:
            try:
                self.store.finish_job(self.job["id"], status, exit_code=exit_code, error=error,
                                      lease=self.lease)
                return
            except Conflict as exc:  # ended elsewhere meanwhile: that end stands
                _log.warning("job %s: %s", self.job["id"], exc.message)
                return
            except (self.store.OperationalError, OSError) as exc:
                if not (_is_disk_full(exc) or isinstance(exc, self.store.OperationalError)) or (
                        self.executor.stopping()):
                    raise
                if _is_disk_full(exc) and self.store.release_reserve():
                    _log.warning("job %s: the disk is full: its reserve (%d bytes) given "
                                 "back to record the job's end", self.job["id"], RESERVE_BYTES)
                    continue
                _log.warning("job %s: cannot record its end yet: %s", self.job["id"], exc)
                self.executor.wait_stopping(1.0)

    def _stop_background(self):
        """End services and detached steps (the engine stops their containers),
        and add what they printed to the log, each under its name."""
        self.background_done.set()
        for running in self.background:
            running.thread.join(self.executor.grace + 5)
            code = running.backend.finish(running.process)
            start = self.log.position()
            self.log.write(f"--- {running.step.kind} {running.step.name} ---\n")
            running.spool.copy_to(self.log)
            status = SUCCESS if code == 0 else FAILURE
            if running.stopped:  # it ran until the job was done with it
                self.log.write(f"cirunner: {running.step.kind} {running.step.name} stopped: "
                               f"{running.stopped}\n")
                status = KILLED if self.stop_requested.is_set() else SUCCESS
                code = code if self.stop_requested.is_set() else 0
            self._step(running.record, status=status, exit_code=code, finished_at=_now(),
                       log_start=start, log_end=self.log.position())

    def _close_records(self, status):
        """Steps never reached: skipped, or killed with the job."""
        with contextlib.suppress(CIRunnerError, self.store.Error):
            for row in self.store.list_steps([self.job["id"]])[self.job["id"]]:
                if row["status"] in ACTIVE_STATUSES:
                    self._step(row["id"], status=KILLED if (
                        row["status"] == RUNNING) else SKIPPED, finished_at=_now())


def _image_reference(image):
    """An image reference with Docker Hub's implied parts (docker.io/,
    library/) left out and ``:latest`` made explicit: comparable as text."""
    name = _image_name(image)
    rest = image[len(image.split("@", 1)[0].rpartition("/")[0]):]
    tag = "@" + image.split("@", 1)[1] if "@" in image else (
        ":" + rest.split(":", 1)[1] if ":" in rest else ":latest")
    return name + tag


def _secrets_steps_may_get(pipeline, secrets, images):
    """The names of `secrets` that a step or service of `pipeline` may get
    (the rule of _JobRun._step_secrets): one limited to images only where a
    step's image matches (an image made of ${...} may be any), in a 0.8 file
    only where a step names it."""
    names = set()
    for step in pipeline.steps + pipeline.services:
        allowed = {name for name in secrets
                   if "$" in step.image or _image_allowed(step.image, images.get(name))}
        wanted = {source.lower() for source, _ in step.secrets or ()}
        if pipeline.era == "woodpecker":  # and those its settings name inside maps and lists
            wanted |= {name.lower() for name in step.setting_secrets()}
        if step.secrets is not None or wanted:
            names |= {name for name in allowed if name.lower() in wanted}
        elif pipeline.era not in _RULES_08:
            names |= allowed
    return names


def _image_allowed(image, patterns):
    """True if a step in `image` may get a secret limited to `patterns` (none:
    every step): a glob matches the whole image; a name without a tag or
    digest also matches that image with any tag (Drone 0.8 compared names
    without tags), one with a tag or digest only that exact image; a step on
    the host (no image) matches only none."""
    if not patterns:
        return True
    if not image:
        return False
    name = _image_name(image)

    def allows(pattern):
        if _path_match(pattern, image):
            return True
        if _image_name(pattern) != name:
            return False
        pinned = "@" in pattern or ":" in pattern.rpartition("/")[2]
        return not pinned or _image_reference(pattern) == _image_reference(image)

    return any(allows(pattern) for pattern in patterns)


###############################################################################
# Executor ####################################################################
###############################################################################


_GITHUB_STATES = {PENDING: "pending", RUNNING: "pending", SUCCESS: "success",
                  FAILURE: "failure", KILLED: "error", ERROR: "error", SKIPPED: "success",
                  BLOCKED: "pending", DECLINED: "error"}
_GITLAB_STATES = {PENDING: "pending", RUNNING: "running", SUCCESS: "success",
                  FAILURE: "failed", KILLED: "canceled", ERROR: "failed", SKIPPED: "success",
                  BLOCKED: "pending", DECLINED: "canceled"}


def _forge_status_request(repo, build, state, description, target_url, token):
    """The HTTP request that sets a commit's status on the repository's forge:
    GitHub's statuses API (Gitea and Forgejo take the same), or GitLab's."""
    import urllib.request

    project = repo["forge_project"] or f"{repo['owner']}/{repo['name']}"
    base = repo["forge_url"].rstrip("/")
    commit = build["commit_sha"]
    if repo["forge"] == "gitlab":
        query = "&".join(f"{key}={quote(value, safe='')}" for key, value in (
            ("state", _GITLAB_STATES[state]), ("name", REPORT_CONTEXT),
            ("target_url", target_url), ("description", description)) if value)
        return urllib.request.Request(
            f"{base}/projects/{quote(project, safe='')}/statuses/{commit}?{query}", data=b"",
            method="POST", headers={"PRIVATE-TOKEN": token, "User-Agent": "cirunner"})
    body = {"state": _GITHUB_STATES[state], "target_url": target_url,
            "description": description, "context": REPORT_CONTEXT}
    return urllib.request.Request(
        f"{base}/repos/{project}/statuses/{commit}", data=json.dumps(body).encode(),
        method="POST", headers={"Authorization": f"token {token}",
                                "Accept": "application/vnd.github+json",
                                "Content-Type": "application/json", "User-Agent": "cirunner"})


@dataclasses.dataclass
class _Task:
    """A maintenance task: run every `every` seconds, or sooner when `urgent()`."""

    name: str
    every: float
    run: object
    urgent: object = None
    last: float = 0.0

    def due(self, now):
        return now - self.last >= self.every or bool(self.urgent and self.urgent())


def _special_files(folder, names):
    """What a copy of a working directory leaves out: sockets, pipes and
    devices (opening a pipe to copy it would wait forever)."""
    return [name for name in names if not stat.S_ISREG(mode := os.lstat(
        os.path.join(folder, name)).st_mode) and not stat.S_ISDIR(mode) and
        not stat.S_ISLNK(mode)]


def _workspace_path(data_dir, repo, build_number, job_number):
    """Where a job runs: ``DATA/workspaces/OWNER/NAME/BUILD-JOB``, one folder
    per job and none per build, so that removing it leaves nothing behind."""
    return os.path.join(os.path.abspath(data_dir), "workspaces", repo["owner"], repo["name"],
                        f"{build_number}-{job_number}")


def _remove_tree(path):
    """Remove a folder and all in it, whatever modes a step left there (a
    `chmod 000` folder, a read-only tree): its folders are opened first."""
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    pending = [path]
    while pending:
        folder = pending.pop()
        with contextlib.suppress(OSError):
            os.chmod(folder, 0o700)
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            pending += [entry.path for entry in entries if entry.is_dir(follow_symlinks=False)]
    shutil.rmtree(path, ignore_errors=True)


def _remove_build_workspaces(data_dir, repo, build_number):
    """What --keep-workspaces left of a build's jobs."""
    folder = os.path.dirname(_workspace_path(data_dir, repo, build_number, 0))
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.name.startswith(f"{build_number}-"):
                _remove_tree(entry.path)


def prune(store, *, keep_builds=DEFAULT_KEEP_BUILDS, keep_days=DEFAULT_KEEP_DAYS,
          dry_run=False, seconds=None):
    """Delete the builds past retention (see `Store.prunable_builds`) in short
    transactions, each at most PRUNE_BATCH_BUILDS builds or about
    PRUNE_BATCH_LOG_BYTES of log, and give the freed pages back to the file
    system between them; for at most `seconds` if given. Returns (the builds
    pruned, or that would be with `dry_run`; each transaction's seconds)."""
    if dry_run:
        return store.prunable_builds(keep_builds, keep_days, limit=10 ** 9), []
    started, pruned, times = time.monotonic(), [], []
    while seconds is None or time.monotonic() - started < seconds:
        candidates = store.prunable_builds(keep_builds, keep_days, limit=PRUNE_BATCH_BUILDS)
        if not candidates:
            break
        batch, size = [], 0
        for build in candidates:
            if batch and size + build["log_bytes"] > PRUNE_BATCH_LOG_BYTES:
                break
            batch.append(build)
            size += build["log_bytes"]
        clock = time.perf_counter()
        store.delete_builds([build["id"] for build in batch])
        times.append(time.perf_counter() - clock)
        pruned += batch
        for build in batch:
            _remove_build_workspaces(store.data_dir, build, build["number"])
        more = True
        while more:
            clock = time.perf_counter()
            more = store.give_back_space()
            times.append(time.perf_counter() - clock)
    return pruned, times


class Executor:
    """Worker threads that take jobs from the store's queue and run them.

    `workers` threads (default: the number of CPUs) each claim a job
    atomically, run its steps with `runner` (default: plain host processes),
    stream the output into the store and record the result. Several
    executors, in this or other processes, can share one store.

    Parameters: `grace` seconds between SIGTERM and SIGKILL; `workspace`, a
    fixed directory to run every job in without checkout (``cirunner exec``),
    or with `copy_workspace` a copy of it for each job (jobs side by side);
    `keep_workspaces` to leave job directories behind for inspection;
    `public_url`, this server's address for links in commit statuses;
    `report_backoff`, seconds before the first retry of a failed status post;
    `keep_builds`, `keep_days`: retention (see `prune`), `max_log_bytes`: a
    job's log cap (a repository's own settings win; 0: none).

    A started executor also runs maintenance tasks (noticing work from other
    processes, heartbeats, recovering jobs of dead runners, WAL checkpoints,
    reaping orphans, cron schedules) and posts commit statuses to forges.

    What it changes of the process (and nothing else): on Linux, the first
    `start` or `run_until_idle` makes it a child subreaper (PR_SET_CHILD_SUBREAPER),
    so that what a step detached is adopted and reaped here.
    """

    def __init__(self, store, *, workers=None, grace=DEFAULT_GRACE_SECONDS, workspace=None,
                 keep_workspaces=False, poll_interval=0.25, runner_id=None,
                 max_jobs=DEFAULT_MAX_JOBS, public_url="", report_backoff=2.0,
                 sandbox="auto", engine="auto", runner=None, keep_builds=DEFAULT_KEEP_BUILDS,
                 keep_days=DEFAULT_KEEP_DAYS, max_log_bytes=DEFAULT_MAX_LOG_BYTES,
                 prune_every=PRUNE_SECONDS, labels=None, agent_timeout=RUNNER_LOST_SECONDS,
                 watchdog=WATCHDOG_SECONDS,
                 serving=True, sandbox_network="private", sandbox_user="",
                 copy_workspace=False):
        self.store = store
        # An agent (not `serving`) only runs jobs: crons, commit statuses and
        # pruning are the servers' (each done once, whichever server takes it).
        self.serving = serving
        # What this runner offers the jobs that require labels: its platform,
        # and any the operator gives (`--labels`).
        self.labels = {"platform": f"linux/{_machine()}", **(labels or {})}
        if len(self.labels) > MAX_RUNNER_LABELS:
            raise BadRequest(f"a runner has at most {MAX_RUNNER_LABELS} labels, its platform "
                             "included")
        self.agent_timeout = agent_timeout
        self.watchdog = watchdog
        self._reported_stuck = set()
        self._pruning_behind = False
        self._ended_since_prune = 0  # jobs ended here since the last pruning
        self._pruned_at = 0.0
        self.started_at = _now()
        self.keep_builds, self.keep_days = keep_builds, keep_days
        self.max_log_bytes = max_log_bytes
        self.metrics = None  # a _Metrics, when a server with metrics runs this executor
        # 0: none (a server whose jobs all run on agents still does the upkeep)
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        self.grace = grace
        self.workspace = workspace
        self.copy_workspace = copy_workspace
        self.keep_workspaces = keep_workspaces
        self.poll_interval = poll_interval
        self.max_jobs = max_jobs
        self.public_url = public_url.rstrip("/")
        self.report_backoff = report_backoff
        self.sandbox = sandbox
        self.pipelines = _LRU(64)  # parsed pipelines by id, shared by the jobs of a build
        self.hostname = socket.gethostname()
        self.runner_id = runner_id or f"{self.hostname}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # Job tokens start with this, so that a restart finds what a dead runner left.
        self.store_key = hashlib.sha1(store.identity().encode()).hexdigest()[:10]
        # The two backends: steps on the host (`runner`), steps with an image
        # (`engine`; None with --engine none: they run on the host).
        settings = {"data_dir": store.data_dir, "store_key": self.store_key,
                    "runner_id": self.runner_id, "user": _StepUser.for_server(sandbox_user)}
        self.runner = runner or _host_backend(sandbox, network=sandbox_network,
                                              hidden=store.socket_directories(), **settings)
        self.engine_choice = engine
        self.engine = _image_backend(engine, **settings)
        self.engine_problem = ""  # why steps with an image cannot run in one, if they cannot
        self.isolation = self.runner.name  # "bwrap", "none" or "unavailable", once started
        self.isolation_problem = ""        # why steps run without a sandbox, if they do
        self._runner_started = False
        self._registered = False
        self._stopping = threading.Event()
        self._drain = threading.Event()
        self._wakeup = threading.Condition()
        self._wakes = 0  # wake-ups not yet taken by a worker
        self._report_wakeup = threading.Event()
        self._running = {}
        self._running_lock = threading.Lock()
        self._threads = []
        self._tasks = self._maintenance_tasks(prune_every)
        self._last_version = None
        self._on_waiting = []  # callables told of jobs another process queued

    def _maintenance_tasks(self, prune_every):
        """What the maintenance thread does, and how often."""
        tasks = [
            _Task("notice changes", 0.0, self._notice_changes),
            _Task("heartbeat", min(HEARTBEAT_SECONDS, self.agent_timeout / 4), self._heartbeat),
            # Often enough that a lost runner's jobs end within its timeout plus
            # a few seconds (one query, cheap).
            _Task("recover lost jobs", min(self.agent_timeout / 2, RECOVER_SECONDS), self._recover),
            _Task("reap orphans", 1.0, self.runner.reap),
            _Task("watchdog", min(30.0, max(0.5, self.watchdog / 4)), self._watch),
        ]
        if self.serving:  # an agent only runs jobs: these are the servers' (done once, by any)
            tasks += [
                # Also as soon as the WAL is big: a writer that reaches the
                # backstop checkpoints in line and stalls whoever logs fast.
                _Task("checkpoint", CHECKPOINT_SECONDS, self.store.checkpoint,
                      urgent=lambda: self.store.wal_bytes() >= WAL_CHECKPOINT_BYTES),
                _Task("fire crons", 1.0, self._fire_crons),
                # Briefly, in batches: the maintenance thread also keeps the
                # heartbeat. Sooner as jobs end, and while behind at the loop's
                # next turn: the work follows the builds, however fast they come.
                _Task("prune", prune_every, self._prune, urgent=self._prune_due),
            ]
        return tasks

    # -- lifecycle ----------------------------------------------------------

    def start(self):
        """Register with the store, recover lost jobs, start the worker threads."""
        self._register()
        for index in range(self.workers):
            self._spawn_thread(self._worker_loop, f"cirunner-worker-{index + 1}")
        self._spawn_thread(self._maintenance_loop, "cirunner-maintenance")
        if self.serving:
            self._spawn_thread(self._report_loop, "cirunner-reporter")

    def _spawn_thread(self, target, name):
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def check(self):
        """Check (once) that the sandbox and the engine work here, as `start`
        does first: CIRunnerError if what was asked for cannot."""
        self._start_runner()

    def _start_runner(self):
        """Start the process runner once. A sandbox that cannot work here is an
        error if it was asked for by name; with `auto`, steps on the host are
        refused (each such job ends error, naming the fix): isolation fails
        closed, and only `--sandbox none` runs steps bare."""
        if self._runner_started:
            return
        self.runner.check()
        problem = self.runner.problem
        if problem and self.runner.name == "none":
            raise CIRunnerError(f"--sandbox none: {problem}")
        if problem and self.runner.name == "bwrap":
            if self.sandbox == "bwrap":
                raise CIRunnerError(f"bubblewrap cannot make a sandbox here: {problem}")
            self.runner = _UnavailableBackend(f"no sandbox can be made here: {problem}",
                                              _NO_SANDBOX, user=self.runner.user,
                                              environ=self.runner.environ)
            self.runner.check()
        if self.runner.name == "none":
            self.isolation_problem = "--sandbox none"
        elif self.runner.name == "unavailable":
            self.isolation_problem = self.runner.problem
        self.isolation = self.runner.name
        self._start_engine()
        self._runner_started = True

    def _start_engine(self):
        """Check the container engine. One that cannot run containers here is
        an error if it was asked for by name; with `auto`, steps with an image
        are refused (each such job ends error, naming the fix)."""
        engine = self.engine
        if engine is None:
            self.engine_problem = "--engine none"
            return
        engine.check()
        if engine.problem and engine.name != "unavailable":
            if self.engine_choice != "auto":
                raise CIRunnerError(f"{engine.name} does not work here: {engine.problem}")
            self.engine = _UnavailableBackend(f"{engine.name} does not work here: "
                                              f"{engine.problem}", _NO_ENGINE)
        self.engine_problem = self.engine.problem

    def _register(self):
        if self._registered:
            return
        self._start_runner()
        self.store.register_runner(self.runner_id, self.hostname, os.getpid(), self.workers,
                                   self.labels, **self._serving_url())
        self._recover()
        self.store.add_listener(self._on_store_event)
        self._registered = True

    def _serving_url(self):
        """Where this server answers, for the command line on its store (an
        agent serves nothing, and its store does not take it)."""
        return {"url": self.public_url} if self.serving and self.public_url else {}

    def _heartbeat(self):
        if self.store.heartbeat(self.runner_id):
            # Cancels are also heard at once; this catches one whose word was lost.
            self._stop_jobs(self.store.cancel_requested_jobs(self.runner_id))
            return
        # Another process found this runner lost (no heartbeat for the agent
        # timeout: a network or database outage) and ended its jobs: stop
        # what is left of them here, and come back as a runner.
        with self._running_lock:
            running = list(self._running.values())
        for run in running:
            with contextlib.suppress(NotFound):
                job = self.store.get_job_by_id(run.job["id"])
                if job["status"] != RUNNING or job["claimed_by"] != self.runner_id:
                    run.request_stop(job["error"] or "agent lost")
        _log.warning("this runner was found lost (no heartbeat for %g s); its jobs were "
                     "ended elsewhere; registering again", self.agent_timeout)
        self.store.register_runner(self.runner_id, self.hostname, os.getpid(), self.workers,
                                   self.labels, **self._serving_url())

    def _recover(self):
        here = []  # a lost runner on another machine cleans up when it comes back
        recovered = self.store.recover_lost_jobs(
            self.runner_id, self.hostname, os.getpid(), max_age=self.agent_timeout, here=here,
            listening_since=self.started_at if self.serving else 0)
        if recovered:
            _log.warning("marked %d job(s) of stopped or lost runners as error", len(recovered))
        if here:
            for backend in (self.runner, self.engine):
                if backend is not None:
                    backend.recover(here)

    def stop(self, reason="server shut down", timeout=None):
        """Stop taking jobs, kill running ones (recorded as killed with
        `reason`), and wait for the threads to end."""
        self._stopping.set()
        self._report_wakeup.set()
        with self._running_lock:
            running = list(self._running.values())
        for run in running:
            run.request_stop(reason)
        self._wake()
        deadline = time.monotonic() + (timeout if timeout is not None else self.grace + 10)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [thread for thread in self._threads if thread.is_alive()]
        if self._registered:
            self.store.remove_listener(self._on_store_event)
            with contextlib.suppress(self.store.Error, CIRunnerError):
                self.store.unregister_runner(self.runner_id)
            self._registered = False

    def engine_description(self):
        """Where steps with an image run, as the start line says it: the
        engine, or none or unavailable with the reason."""
        return f"none ({self.engine_problem})" if self.engine is None else self.engine.describe()

    def isolation_summary(self):
        """How steps are isolated: steps on the host ("bwrap", "none" or
        "unavailable"), their network, the user they run as, and the engine
        of steps with an image ("none" without one)."""
        return {"steps": self.isolation, "network": getattr(self.runner, "network", "host"),
                "user": self.runner.user.name,
                "images": self.engine.name if self.engine is not None else "none"}

    def run_until_idle(self):
        """Run queued jobs in the calling thread until none is left (for
        tests and scripts: no threads, no sleeps). Returns how many ran."""
        self._register()
        count = 0
        while True:
            job = self.store.claim_next_job(self.runner_id, self.labels)
            if job is None:
                return count
            self.run_job(job)
            count += 1

    def activity(self, job_id):
        """What a job this executor runs is doing now, or ""."""
        with self._running_lock:
            run = self._running.get(job_id)
        return run.activity if run is not None else ""

    def stuck(self):
        """The jobs whose workers have made no progress of cirunner's own
        for longer than the watchdog allows: [{job, doing, seconds, stopping}]."""
        if self.watchdog <= 0:  # --watchdog 0: off
            return []
        now = time.monotonic()
        with self._running_lock:
            running = list(self._running.items())
        found = []
        for job_id, run in running:
            seconds = run.stuck_for(now, self.watchdog, self.grace)
            if seconds:
                found.append({"job": job_id, "doing": run.activity, "seconds": int(seconds),
                              "stopping": run.stop_requested.is_set()})
        return found

    def _watch(self):
        """Report (once per job and activity) a worker that stopped making progress."""
        stuck = self.stuck()
        for item in stuck:
            if (item["job"], item["doing"], item["stopping"]) not in self._reported_stuck:
                _log.warning("watchdog: job %s has been %s for %d s%s; its worker makes no "
                             "progress", item["job"], item["doing"], item["seconds"],
                             " after it was asked to stop" if item["stopping"] else "")
        self._reported_stuck = {(item["job"], item["doing"], item["stopping"])
                                for item in stuck}

    def draining(self):
        return self._drain.is_set()

    def drain(self):
        """Take no new jobs; the running ones go on. Returns at once."""
        self._drain.set()
        self._wake()

    def busy_workers(self):
        with self._running_lock:
            return len(self._running)

    def stopping(self):
        return self._stopping.is_set()

    def wait_stopping(self, seconds):
        return self._stopping.wait(seconds)

    def run_job(self, job):
        """Run one claimed job to its end and record the result."""
        run = _JobRun(self, job)
        with self._running_lock:
            self._running[job["id"]] = run
        run.run()

    def forget(self, run):
        """A job's processes are gone: cancels no longer reach it."""
        with self._running_lock:
            self._running.pop(run.job["id"], None)
            self._ended_since_prune += 1

    # -- workspaces -----------------------------------------------------------

    def workspace_for(self, repo, build, job):
        """A new, empty directory for the job (or the fixed `workspace`, or,
        with `copy_workspace`, a copy of it of the job's own)."""
        if self.workspace is not None and not self.copy_workspace:
            return self.workspace
        path = _workspace_path(self.store.data_dir, repo, build["number"], job["number"])
        try:
            if os.path.exists(path):
                _remove_tree(path)
            if self.workspace is not None:
                shutil.copytree(self.workspace, path, symlinks=True, ignore=_special_files)
            else:
                os.makedirs(path)
        except (OSError, shutil.Error) as exc:
            raise _JobError(f"cannot make the workspace {path}: {exc}") from None
        return path

    def remove_workspace(self, path):
        """Remove a job's workspace: nothing of a finished build stays on disk
        (unless --keep-workspaces)."""
        if not path or path == self.workspace or self.keep_workspaces:
            return
        try:
            os.rmdir(path)  # the usual case with `clone: false`: an empty folder
        except OSError:
            _remove_tree(path)

    # -- wake-ups -----------------------------------------------------------

    def _wake(self, jobs=None):
        """Wake as many idle workers as there are new jobs (all of them when
        the count is not known): no herd queueing for the write lock."""
        jobs = self.workers if jobs is None else min(jobs, self.workers)
        with self._wakeup:
            self._wakes = min(self._wakes + jobs, self.workers)
            self._wakeup.notify(jobs)

    def on_waiting_jobs(self, callback):
        """Call `callback()` (from the maintenance thread) whenever jobs are
        found waiting after another process changed the store: the agents'
        long polls of this server wake for them (on SQLite, another process's
        commit sends no event)."""
        self._on_waiting.append(callback)

    def _on_store_event(self, event, ids):
        if event == "enqueued":
            self._wake(len(ids))
        elif event == "report":
            self._report_wakeup.set()
        elif event == "cancel":
            self._stop_jobs(ids)

    def _stop_jobs(self, job_ids):
        for job_id in job_ids:
            with self._running_lock:
                run = self._running.get(job_id)
            if run is not None:
                with contextlib.suppress(NotFound):
                    run.request_stop(self.store.get_job_by_id(job_id)["error"] or "cancelled")

    def _worker_loop(self):
        while not self._stopping.is_set():
            if self._drain.is_set():
                self._stopping.wait(0.5)
                continue
            try:
                job = self.store.claim_next_job(self.runner_id, self.labels)
            except Exception as exc:  # noqa: BLE001 - the worker logs and keeps running
                if _is_disk_full(exc):
                    _log.warning("claiming a job: %s; trying again", exc)
                else:
                    _log.exception("claiming a job failed")
                job = None
                self._stopping.wait(1.0)
            if job is not None:
                try:
                    self.run_job(job)
                except Exception:  # noqa: BLE001 - a worker outlives any one job
                    _log.exception("job %s ended badly", job["id"])
                continue
            self.store.release_connection()  # idle workers share one
            with self._wakeup:
                if not self._wakes and not self._stopping.is_set():
                    self._wakeup.wait(5.0)
                if self._wakes:
                    self._wakes -= 1  # this worker answers one wake-up

    # -- maintenance ----------------------------------------------------------

    def _maintenance_loop(self):
        """Run each maintenance task when due; a failing task is logged and tried
        again at its next turn."""
        while not self._stopping.wait(self.poll_interval):
            for task in self._tasks:
                now = time.monotonic()
                if not task.due(now):
                    continue
                task.last = now
                try:
                    task.run()
                except Exception as exc:  # noqa: BLE001 - the loop logs and keeps running
                    if _is_disk_full(exc):  # the store says it once a job ends
                        _log.warning("executor task %r: %s; trying again", task.name, exc)
                    else:
                        _log.exception("executor task %r failed; continuing", task.name)

    def _notice_changes(self):
        """New jobs and cancels made by other processes: any commit by another
        connection changes the store's data version."""
        version = self.store.data_version()
        if version != self._last_version:
            self._last_version = version
            waiting = self.store.queue_summary()[0]
            if waiting:
                self._wake(waiting)
                for callback in self._on_waiting:
                    callback()
            self._report_wakeup.set()
            self._stop_jobs(self.store.cancel_requested_jobs(self.runner_id))

    def _prune_due(self):
        """Prune before the interval: while behind, or (at most once a second)
        once a twentieth of the builds a repository keeps have ended since
        (about 5% over the limit)."""
        keep = self.keep_builds or 0
        return self._pruning_behind or bool(keep) and self._ended_since_prune >= max(
            1, keep // 20) and time.monotonic() - self._pruned_at >= 1.0

    def _prune(self):
        """Delete builds past retention for about a second; note whether more
        are left (then the next turn of the maintenance loop goes on; not
        after a failure, which waits for its next turn)."""
        self._ended_since_prune, self._pruning_behind = 0, False
        self._pruned_at = time.monotonic()
        pruned, _ = prune(self.store, keep_builds=self.keep_builds, keep_days=self.keep_days,
                          seconds=1.0)
        self._pruning_behind = bool(pruned) and bool(self.store.prunable_builds(
            self.keep_builds, self.keep_days, limit=1))

    def _fire_crons(self):
        """Start a build for each due schedule (taken atomically in the store)."""
        for cron in self.store.take_due_crons():
            try:
                repo = self.store.get_repo_by_id(cron["repo_id"])
                if EVENT_CRON in json.loads(repo["events"]):
                    create_build(self.store, repo, branch=cron["branch"], event=EVENT_CRON,
                                 max_jobs=self.max_jobs, cron=cron["name"])
            except Exception:  # noqa: BLE001 - one bad schedule must not stop the others
                _log.exception("cron %s could not start a build", cron["name"])

    # -- commit statuses ----------------------------------------------------

    def _report_loop(self):
        while not self._stopping.is_set():
            try:
                report = self.store.claim_report()
            except Exception:  # noqa: BLE001 - the loop logs and keeps running
                _log.exception("claiming a commit status report failed")
                report = None
            if report is None:
                self._report_wakeup.wait(self._until_next_report())
                self._report_wakeup.clear()
                continue
            self._deliver_report(report)

    def _until_next_report(self, longest=5.0):
        """Seconds until the next report is due (a retry's backoff), at most
        `longest`: new reports of this process wake the reporter at once, and
        those of other processes are noticed within `longest`."""
        try:
            due = self.store.next_report_due()
        except self.store.Error:
            due = None
        self.store.release_connection()
        return longest if due is None else min(longest, max(0.0, due - time.time()))

    def _deliver_report(self, report):
        """Post one commit status; retry with exponential backoff, and after the
        last attempt show the failure on the build. Never fails the build."""
        import urllib.request  # here, not at the top: with ssl it costs megabytes

        try:
            build = self.store.get_build_by_id(report["build_id"])
            repo = self.store.get_repo_by_id(build["repo_id"])
            request = _forge_status_request(repo, build, report["state"], report["description"],
                                            self._build_link(repo, build),
                                            self.store.forge_token(repo))
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except NotFound:
            self.store.finish_report(report["id"])
            return
        except (OSError, ValueError, CIRunnerError) as exc:
            attempt = report["attempts"] + 1
            message = f"commit status {report['state']!r} not posted (attempt {attempt}): {exc}"
            _log.warning("%s", message)
            retry_in = (self.report_backoff * 2 ** report["attempts"]
                        if attempt < REPORT_ATTEMPTS else None)
            self.store.finish_report(report["id"], error=message, retry_in=retry_in)
            return
        self.store.finish_report(report["id"])

    def _build_link(self, repo, build):
        if not self.public_url:
            return ""
        return f"{self.public_url}/api/repos/{repo['owner']}/{repo['name']}/builds/{build['number']}"

###############################################################################
# Access ######################################################################
###############################################################################

SESSION_COOKIE = "cirunner_session"
CSRF_COOKIE = "cirunner_csrf"


def _parse_authorization(header):
    """The token of an ``Authorization: Token T`` or ``Bearer T`` header.

    Raises Unauthorized for a scheme alone, another scheme, or a token with
    spaces in it.
    """
    parts = header.strip().split(" ")
    if len(parts) == 1:
        raise Unauthorized("no credentials: send 'Authorization: Token <token>'")
    if parts[0].lower() not in ("token", "bearer"):
        raise Unauthorized(f"unsupported authorization scheme {parts[0]!r}: use Token or Bearer")
    if len(parts) != 2 or not parts[1]:
        raise Unauthorized("malformed token: a token has no spaces")
    return parts[1]


def _guest_not_found(owner, name):
    """What a guest hears of a repository it may not read, private or missing
    alike (so that a private repository's existence is not revealed): 401."""
    return Unauthorized(f"repository {owner}/{name} is not public or does not exist: "
                        "send a token, or sign in")


class _Access:
    """Who is calling and what they may do, decided in one place for the API,
    the pages, badges and webhooks.

    A caller is a guest (None) or a user dict carrying its token's scope. Reads
    of a public repository are open; a private one is readable by its owner and
    admins only, and looks missing to everyone else (401 for a guest, who
    should sign in; 404 for a signed-in user). Writes need a write-scope token
    of the owner or of an admin; a browser session never writes through the API.
    """

    def __init__(self, store):
        self.store = store
        self.sessions = _Signer(store.sealer.derive("web session"))

    def user(self, request):
        """The caller of `request` (a Bottle request), or None for a guest.
        Bad, unknown or revoked credentials are 401 wherever they appear."""
        environ = request.environ
        if "cirunner.user" not in environ:
            environ["cirunner.user"] = self._authenticate(request)
        return environ["cirunner.user"]

    def _authenticate(self, request):
        header = request.get_header("Authorization")
        secret = _parse_authorization(header) if header is not None else (
            request.query.get("access_token") or None)
        if secret is not None:
            user = self.store.authenticate(secret)
            if user is None and secret.startswith(AGENT_TOKEN_PREFIX) and \
                    self.store.agent_for_token(secret) is not None:
                raise Forbidden("an agent's token works on the agent routes only "
                                "(/api/agent/...)")
            if user is None:
                raise Unauthorized("invalid or revoked token")
            return user
        session = self.sessions.verify(request.get_cookie(SESSION_COOKIE))
        if session is None:
            return None
        # A signed-in browser: its session names a token, which must still exist.
        token_id, _, _ = session.partition(":")
        user = self.store.user_for_token(int(token_id)) if token_id.isdigit() else None
        if user is not None:
            user["via_cookie"] = True
        return user

    def session_cookie(self, user):
        """The signed cookie value that signs a browser in as `user`'s token."""
        return self.sessions.sign(f"{user['token_id']}:{user['login']}", SESSION_SECONDS)

    @staticmethod
    def may_read(user, repo):
        return not repo["private"] or (user is not None and (
            bool(user["admin"]) or user["login"] == repo["owner"]))

    @staticmethod
    def may_write(user, owner):
        """Whether `user` may change `owner`'s repositories (any channel)."""
        return bool(user and user["scope"] == "write" and (user["admin"]
                                                           or user["login"] == owner))

    @staticmethod
    def require_write(user, owner):
        """Unless `user` may change `owner`'s repositories: 401 for a guest,
        403 for a read-only token or another user."""
        if user is None:
            raise Unauthorized("this action needs a token")
        if user["scope"] != "write":
            raise Forbidden("this token is read-only")
        if not _Access.may_write(user, owner):
            raise Forbidden(f"only {owner} or an admin may change this")

###############################################################################
# Resources ###################################################################
###############################################################################

# The shape of each resource is declared once: the JSON the API answers, its
# OpenAPI schema, and the fields a PATCH (and the CLI) may change.

_TIME_SCHEMA = {"type": "integer", "description": "Unix seconds; 0 when unset"}
_STRING = {"type": "string"}
_INTEGER = {"type": "integer"}
_BOOLEAN = {"type": "boolean"}
_STRING_LIST = {"type": "array", "items": _STRING}
_STRING_MAP = {"type": "object", "additionalProperties": _STRING}
_STATUS_SCHEMA = {"type": "string", "enum": list(STATUSES)}
_BUILD_STATUS_SCHEMA = {"type": "string", "enum": list(BUILD_STATUSES)}


@dataclasses.dataclass
class _Field:
    """One field of a resource: how it is shown, and how a write parses it.

    `show(row)` gives the JSON value (None: never shown, e.g. a secret);
    `parse(value)` checks a written value and gives the column value (None:
    read-only); `column` is where it is stored; `aliases` are other names a
    request or CLI flag may use; `required` fields appear in every answer.
    """

    name: str
    schema: dict
    show: object = None
    parse: object = None
    column: str = ""
    aliases: tuple = ()
    required: bool = False
    help: str = ""
    flag: str = ""          # its command-line flag, if not --NAME

    @property
    def option(self):
        return self.flag or "--" + self.name.replace("_", "-")


class _Resource:
    """A resource's fields: its JSON, its schema, and parsing of writes."""

    def __init__(self, name, fields):
        self.name = name
        self.fields = fields
        self._shown = [field for field in fields if field.show is not None]
        self._writable = {alias: field for field in fields if field.parse is not None
                          for alias in (field.name, *field.aliases)}

    def to_json(self, row):
        return {field.name: field.show(row) for field in self._shown}

    def schema(self):
        """The OpenAPI schema of the resource as answered."""
        return {"type": "object",
                "required": [field.name for field in self._shown if field.required],
                "properties": {field.name: field.schema for field in self._shown}}

    def write_schema(self):
        """The OpenAPI schema of a write (the writable fields)."""
        return {"type": "object", "properties": {
            field.name: field.schema for field in self.fields if field.parse is not None}}

    def writable(self):
        """The writable fields (for a command line's flags)."""
        return [field for field in self.fields if field.parse is not None]

    def parse(self, params, *, ignore=()):
        """{column: value} from a write's `params`; BadRequest names any field
        that is unknown, read-only or of the wrong shape."""
        values = {}
        for key, value in params.items():
            if key in ignore:
                continue
            field = self._writable.get(key)
            if field is None:
                if any(key == shown.name for shown in self._shown):
                    raise BadRequest(f"field {key!r} is read-only")
                raise BadRequest(f"unknown {self.name} field {key!r}")
            values[field.column or field.name] = field.parse(value)
        return values


def _shown(column, convert=None):
    """A `show` function reading `column`, converted."""
    if convert is None:
        return lambda row: row[column]
    return lambda row: convert(row[column])


def _parse_text(name, maximum):
    def parse(value):
        if not isinstance(value, str) or len(value) > maximum:
            raise BadRequest(f"{name} must be a string of at most {maximum} characters")
        return value
    return parse


def _parse_events(value):
    events = value.split(",") if isinstance(value, str) else value
    if not isinstance(events, list) or not all(event in EVENTS for event in events):
        raise BadRequest(f"events must be a list of {', '.join(EVENTS)}")
    return json.dumps(list(dict.fromkeys(events)))


def _parse_config_path(value):
    if not isinstance(value, str) or value.startswith("/") or ".." in value.split("/"):
        raise BadRequest("config_path must be a path inside the repository")
    return value


def _parse_forge(value):
    if value not in FORGES + ("",):
        raise BadRequest(f"forge must be one of {', '.join(FORGES)} (or empty)")
    return value


def _parse_forge_url(value):
    if not isinstance(value, str) or (value and not value.startswith(("http://", "https://"))):
        raise BadRequest("forge_url must be an http(s) URL of the forge's API")
    return value


def _parse_approval(value):
    if value not in APPROVALS:
        raise BadRequest(f"approval must be one of {', '.join(APPROVALS)}")
    return value


_REPO = _Resource("repository", [
    _Field("id", _INTEGER, _shown("id"), required=True),
    _Field("owner", _STRING, _shown("owner"), required=True),
    _Field("name", _STRING, _shown("name"), required=True),
    _Field("full_name", _STRING, lambda row: f"{row['owner']}/{row['name']}", required=True),
    _Field("url", _STRING, None, normalize_repo_url, aliases=("clone_url",),
           help="clone URL or local path"),
    _Field("clone_url", _STRING, _shown("url", _redact_url)),
    _Field("scm", {"type": "string", "enum": ["git"]}, lambda row: "git", required=True),
    _Field("default_branch", _STRING, _shown("default_branch"),
           lambda value: _check_branch(value) if value else "", aliases=("branch",),
           help="default branch (default: the remote's HEAD)", flag="--branch"),
    _Field("config_path", _STRING, _shown("config_path"), _parse_config_path,
           aliases=("config",), help="pipeline file path (default .cirunner.yml, .drone.yml, .woodpecker.yml)",
           flag="--config"),
    _Field("private", _BOOLEAN, _shown("private", bool),
           lambda value: int(_check_bool(value, "private")), help="hide from guests"),
    _Field("timeout", {"type": "integer", "minimum": 1, "maximum": 7 * 24 * 60},
           _shown("timeout"),
           lambda value: _check_int(value, "timeout", default=DEFAULT_TIMEOUT_MINUTES,
                                    minimum=1, maximum=7 * 24 * 60),
           help="job timeout in minutes"),
    _Field("max_builds", {"type": "integer", "minimum": 0, "maximum": 1000},
           _shown("max_builds"),
           lambda value: _check_int(value, "max_builds", default=0, minimum=0, maximum=1000),
           help="most builds running at once (0: no limit)"),
    _Field("keep_builds", {"type": "integer", "minimum": 0, "maximum": 10 ** 6},
           _shown("keep_builds"),
           lambda value: _check_int(value, "keep_builds", default=0, minimum=0, maximum=10 ** 6),
           help="builds to keep (older ones are pruned; 0: the server's --keep-builds)"),
    _Field("keep_days", {"type": "integer", "minimum": 0, "maximum": 36500},
           _shown("keep_days"),
           lambda value: _check_int(value, "keep_days", default=0, minimum=0, maximum=36500),
           help="days to keep a build (0: the server's --keep-days)"),
    _Field("max_log_bytes", {"type": "integer", "minimum": 0, "maximum": 2 ** 40},
           _shown("max_log_bytes"),
           lambda value: _check_int(value, "max_log_bytes", default=0, minimum=0,
                                    maximum=2 ** 40),
           help="a job's log cap in bytes (0: the server's --max-log-bytes)"),
    _Field("last_build_number", _INTEGER, _shown("last_number")),
    _Field("events", {"type": "array", "items": {"type": "string", "enum": list(EVENTS)}},
           _shown("events", json.loads), _parse_events,
           help=f"comma-separated events to build ({','.join(EVENTS)})"),
    _Field("webhook_secret", {"type": "string", "maxLength": 256, "writeOnly": True}, None,
           _parse_text("webhook_secret", 256), help="the secret forges sign webhooks with"),
    _Field("webhook_secret_set", _BOOLEAN, _shown("webhook_secret", bool)),
    _Field("forge", {"type": "string", "enum": [*FORGES, ""]}, _shown("forge"), _parse_forge,
           help="post commit statuses to this kind of forge"),
    _Field("forge_url", _STRING, _shown("forge_url"), _parse_forge_url,
           help="the forge's API base, e.g. https://api.github.com"),
    _Field("forge_project", _STRING, _shown("forge_project"),
           _parse_text("forge_project", 1024), help="OWNER/NAME at the forge if it differs"),
    _Field("forge_token", {"type": "string", "writeOnly": True}, None,
           _parse_text("forge_token", 1024), help="an API token of the forge"),
    _Field("forge_token_set", _BOOLEAN, _shown("forge_token", bool)),
    _Field("trusted", _BOOLEAN, _shown("trusted", bool),
           lambda value: int(_check_bool(value, "trusted")),
           help="may use privileged container keys (admins only)"),
    _Field("approval", {"type": "string", "enum": list(APPROVALS)}, _shown("approval"),
           _parse_approval,
           help="which webhook builds wait for approval: never, forks (pull requests from "
                "forks, the default) or always"),
    _Field("created_at", _TIME_SCHEMA, _shown("created_at")),
])


def _parse_tags(value):
    if not isinstance(value, list) or not all(isinstance(tag, str) and tag for tag in value):
        raise BadRequest("tags must be a list of non-empty strings")
    return list(dict.fromkeys(value))


def _parse_description(value):
    if not isinstance(value, str):
        raise BadRequest("description must be a string")
    if len(value) > MAX_DESCRIPTION:
        raise BadRequest(f"description is longer than {MAX_DESCRIPTION} characters")
    return value


def _parse_flag_value(name):
    def parse(value):
        if not isinstance(value, bool):
            raise BadRequest(f"{name} must be true or false")
        return value
    return parse


_JOB = _Resource("job", [
    _Field("id", _INTEGER, _shown("id"), required=True),
    _Field("build_id", _INTEGER, _shown("build_id")),
    _Field("number", _INTEGER, _shown("number"), required=True),
    _Field("status", _STATUS_SCHEMA, _shown("status"), required=True),
    _Field("error", _STRING, _shown("error")),
    _Field("exit_code", _INTEGER, _shown("exit_code"), required=True),
    _Field("enqueued_at", _TIME_SCHEMA, _shown("enqueued_at"), required=True),
    _Field("started_at", _TIME_SCHEMA, _shown("started_at"), required=True),
    _Field("finished_at", _TIME_SCHEMA, _shown("finished_at"), required=True),
    _Field("environment", _STRING_MAP, _shown("environment", json.loads), required=True),
    _Field("pipeline", _STRING, _shown("pipeline")),
    _Field("depends_on", _STRING_LIST, _job_needs),
])

_STEP = _Resource("step", [
    _Field("id", _INTEGER, _shown("id"), required=True),
    _Field("number", _INTEGER, _shown("number"), required=True),
    _Field("name", _STRING, _shown("name"), required=True),
    _Field("kind", {"type": "string", "enum": ["step", "plugin", "service"]}, _shown("kind"),
           required=True),
    _Field("status", _STATUS_SCHEMA, _shown("status"), required=True),
    _Field("exit_code", _INTEGER, _shown("exit_code"), required=True),
    _Field("started_at", _TIME_SCHEMA, _shown("started_at"), required=True),
    _Field("finished_at", _TIME_SCHEMA, _shown("finished_at"), required=True),
    _Field("log_start", {"type": "integer", "description": "where its output begins in the "
                                                           "job's log (a byte offset)"},
           _shown("log_start"), required=True),
    _Field("log_end", {"type": "integer", "description": "where its output ends"},
           _shown("log_end"), required=True),
])

_BUILD = _Resource("build", [
    _Field("id", _INTEGER, _shown("id"), required=True),
    _Field("number", _INTEGER, _shown("number"), required=True),
    _Field("parent", _INTEGER, _shown("parent")),
    _Field("event", _STRING, _shown("event"), required=True),
    _Field("status", _BUILD_STATUS_SCHEMA, _shown("status"), required=True),
    _Field("error", _STRING, _shown("error")),
    *(_Field(name, _TIME_SCHEMA, _shown(name), required=True)
      for name in ("created_at", "enqueued_at", "started_at", "finished_at")),
    _Field("fork", _BOOLEAN, _shown("fork", bool)),
    _Field("source_repo", _STRING, _shown("source_repo")),
    _Field("reviewed_by", _STRING, _shown("reviewed_by")),
    _Field("reviewed_at", _TIME_SCHEMA, _shown("reviewed_at")),
    _Field("commit", _STRING, _shown("commit_sha"), required=True),
    *(_Field(name, _STRING, _shown(name), required=True)
      for name in ("branch", "ref", "message")),
    _Field("remote", _STRING, _shown("remote", _redact_url), required=True),
    _Field("timestamp", _INTEGER, _shown("timestamp"), required=True),
    *(_Field(name, _STRING, _shown(name), required=True)
      for name in ("author", "author_avatar", "author_email", "link_url")),
    _Field("deploy_to", _STRING, _shown("deploy_to")),
    _Field("cron", {"type": "string", "description": "the schedule that started it"},
           _shown("cron")),
    _Field("action", {"type": "string", "description": (
        "a pull request's action (opened, synchronized, reopened), a tag's (created)")},
           _shown("action")),
    _Field("changed_files", {"type": ["array", "null"], "items": _STRING, "description": (
        "the files the build changes, as `when.paths` saw them; null where its pipeline "
        "file does not ask")}, _shown("changed_files", lambda text: json.loads(text or "null"))),
    _Field("description", {"type": "string", "maxLength": MAX_DESCRIPTION},
           _shown("description"), _parse_description),
    _Field("tags", {"type": "array", "items": {"type": "string", "minLength": 1}},
           _shown("tags", json.loads), _parse_tags),
    _Field("merge", _BOOLEAN, None, _parse_flag_value("merge"),
           help="with tags: add them to the build's tags instead of replacing them"),
    _Field("pinned", _BOOLEAN, _shown("pinned", bool), _parse_flag_value("pinned")),
    _Field("variables", _STRING_MAP, _shown("variables", json.loads)),
    _Field("report_error", _STRING, _shown("report_error")),
    _Field("warnings", {"type": "array", "items": _STRING, "description": (
        "what the pipeline file did that Drone accepted and cirunner does as Drone did, "
        "each with its file and line")}, _shown("warnings", json.loads)),
])

_STATUS = _Resource("status", [
    _Field("id", _INTEGER, _shown("id"), required=True),
    _Field("status", _BUILD_STATUS_SCHEMA, _shown("status"), required=True),
    _Field("message", _STRING, _shown("message"), required=True),
    _Field("created_at", _TIME_SCHEMA, _shown("created_at"), required=True),
    _Field("job", {"type": ["integer", "null"]}, _shown("job_number"), required=True),
])

_SECRET = _Resource("secret", [
    _Field("name", _STRING, _shown("name"), lambda value: value, required=True),
    _Field("value", _STRING, None, lambda value: value),
    _Field("events", {"type": "array", "items": {"type": "string", "enum": list(EVENTS)}},
           _shown("events"), lambda value: value.split(",") if isinstance(value, str) else value,
           required=True, aliases=("event",)),  # Drone 0.5's `drone secret add` says event
    _Field("images", {"type": "array", "items": _STRING, "description": (
        "the step images that get it (Drone's `image` list: names or globs; empty for "
        "every image)")}, _shown("images"),
        lambda value: value.split(",") if isinstance(value, str) else value,
        required=True, aliases=("image",)),  # as Drone 0.5's `drone secret add` sends it
    # Drone 0.5's names, for its `drone secret ls` (which reads these and filters on them)
    _Field("event", {"type": "array", "items": _STRING}, _shown("events"), required=True),
    _Field("image", {"type": "array", "items": _STRING}, _shown("images"), required=True),
    # Drone 0.5's flags: every value is masked (conceal), and no build here is
    # "unverified" (no file signatures: forks wait for approval instead), so
    # skip_verify changes nothing. Both are accepted and shown as they act.
    _Field("skip_verify", _BOOLEAN, lambda row: False, lambda value: None, required=True),
    _Field("conceal", _BOOLEAN, lambda row: True, lambda value: None, required=True),
])


_CRON = _Resource("cron", [
    _Field("name", _STRING, _shown("name"), lambda value: value, required=True),
    _Field("expression", _STRING, _shown("expression"), lambda value: value, required=True,
           help='five-field cron syntax, UTC, e.g. "0 3 * * *"'),
    _Field("branch", _STRING, _shown("branch"),
           lambda value: _check_branch(value) if value else "", required=True,
           help="branch to build (default: the repository's)"),
    _Field("next_at", _TIME_SCHEMA, _shown("next_at", int), required=True),
])

_USER = _Resource("user", [
    _Field("login", _STRING, _shown("login"), required=True),
    _Field("email", _STRING, _shown("email"), required=True),
    _Field("admin", _BOOLEAN, _shown("admin", bool), required=True),
    _Field("scope", {"type": "string", "enum": list(TOKEN_SCOPES)}, _shown("scope"),
           required=True),
])

_ACCOUNT = _Resource("account", [
    _Field("login", _STRING, _shown("login"), required=True),
    _Field("email", _STRING, _shown("email"), required=True),
    _Field("admin", _BOOLEAN, _shown("admin", bool), required=True),
    _Field("created_at", _TIME_SCHEMA, _shown("created_at")),
])

_TOKEN = _Resource("token", [
    _Field("id", _INTEGER, _shown("id"), required=True),
    _Field("login", _STRING, _shown("login"), required=True),
    _Field("name", _STRING, _shown("name"), required=True),
    _Field("scope", {"type": "string", "enum": list(TOKEN_SCOPES)}, _shown("scope"),
           required=True),
    _Field("created_at", _TIME_SCHEMA, _shown("created_at"), required=True),
    _Field("last_used_at", _TIME_SCHEMA, _shown("last_used_at"), required=True),
])


def _build_json(build, jobs=None, steps=None, *, listed=False):
    """A build in the Drone dialect's shape, with its jobs (and their steps)
    when given. In a list (`listed`) a build leaves out its variables (up to
    64 KiB each): a page of 100 stays small, and one build shows them all."""
    data = _BUILD.to_json(build)
    if listed:
        data.pop("variables", None)
    if jobs is not None:
        data["jobs"] = [_JOB.to_json(job) for job in jobs]
        for job, shown in zip(jobs, data["jobs"]):
            shown["steps"] = [_STEP.to_json(step) for step in (steps or {}).get(job["id"], [])]
    return data


def _full_build_json(store, build):
    """A build's JSON with its jobs and their steps, read from `store`."""
    jobs = store.list_jobs(build["id"])
    return _build_json(build, jobs, store.list_steps([job["id"] for job in jobs]))


def _schemas():
    """The OpenAPI component schemas, from the declarations above."""
    build = _BUILD.schema()
    build["properties"]["jobs"] = {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}
    job = _JOB.schema()
    job["properties"]["steps"] = {"type": "array", "description": "the job's steps, in order "
                                  "(an addition to Drone's shape)",
                                  "items": {"$ref": "#/components/schemas/Step"}}
    paginated = {"type": "object", "required": ["count", "next", "previous", "results"],
                 "properties": {"count": _INTEGER, "next": {"type": ["string", "null"]},
                                "previous": {"type": ["string", "null"]}}}

    def page_of(name):
        return {**paginated, "properties": {**paginated["properties"], "results": {
            "type": "array", "items": {"$ref": f"#/components/schemas/{name}"}}}}

    return {
        "Error": {"type": "object", "required": ["error", "message", "status"], "properties": {
            "error": _STRING, "message": _STRING, "status": _INTEGER}},
        "Repo": _REPO.schema(), "Job": job, "Step": _STEP.schema(), "Build": build,
        "Status": _STATUS.schema(), "Secret": _SECRET.schema(), "Cron": _CRON.schema(),
        "User": _USER.schema(), "Account": _ACCOUNT.schema(), "Token": _TOKEN.schema(),
        "BuildPage": page_of("Build"), "StatusPage": page_of("Status"),
    }

###############################################################################
# Operations ##################################################################
###############################################################################


def _agent_json(agent):
    """An agent as the API shows it (no token, labels as an object)."""
    labels = agent["labels"]
    return {**{key: agent[key] for key in ("name", "created_at", "last_seen_at", "version",
                                          "address") if key in agent},
            "labels": json.loads(labels) if isinstance(labels, str) else labels,
            "workers": agent.get("workers", 0), "running": agent.get("running", 0),
            "runners": agent.get("runners", [])}


def _feed_json(repo, build):
    """A build as an item of Drone 0.5's feed (its `model.Feed`)."""
    owner, name = repo["owner"], repo["name"]
    return {"owner": owner, "name": name, "full_name": f"{owner}/{name}",
            "number": build["number"], "event": build["event"], "status": build["status"],
            "created_at": build["created_at"], "started_at": build["started_at"],
            "finished_at": build["finished_at"], "commit": build["commit_sha"],
            "branch": build["branch"], "ref": build["ref"], "refspec": "",
            "remote": _redact_url(build["remote"]), "title": "", "message": build["message"],
            "author": build["author"], "author_avatar": build["author_avatar"],
            "author_email": build["author_email"]}


def local_admin():
    """The caller the command line on the machine itself acts as: an admin
    (who can read the data directory can do anything anyway)."""
    return {"id": 0, "login": f"{getpass.getuser()} (command line)", "admin": 1,
            "scope": "write", "email": ""}


class Operations:
    """Every operation on the store, written once: each checks its input and
    the caller's access, changes the store, and returns what the API answers
    (the resource as JSON). The HTTP API, the pages and the command line on
    the store all call these; the command line on a server calls them through
    the API's routes (`_OPERATIONS` names the route of each). Embedders call
    them too::

        ops = cirunner.Operations(store)
        ops.add_repo(cirunner.local_admin(), "alice", "hello", {"url": "~/src/hello"})

    A caller is a user from the store (what `Store.authenticate` gives, with
    its token's scope) or None for a guest. A repository the caller may not
    read answers as a missing one: 401 to a guest (who should sign in), 404
    to anyone else. `params` is a dict of the operation's input, as the API
    takes it (JSON body and query together).
    """

    def __init__(self, store, executor=None, *, max_jobs=DEFAULT_MAX_JOBS, public_url="",
                 cancel_wait=0.0):
        self.store = store
        self.executor = executor
        self.max_jobs = max_jobs
        self.public_url = public_url.rstrip("/")
        self.cancel_wait = cancel_wait

    # -- access ---------------------------------------------------------------

    def find_repo(self, caller, owner, name, *, write=False):
        """The repository `owner/name` if `caller` may read it (or write to it)."""
        _check_name(owner, "owner")
        _check_name(name, "repository name")
        try:
            repo = self.store.get_repo(owner, name)
        except NotFound:
            if caller is None:
                raise _guest_not_found(owner, name) from None
            raise
        if not _Access.may_read(caller, repo):
            if caller is None:
                raise _guest_not_found(owner, name)
            raise NotFound(f"repository {owner}/{name} not found")
        if write:
            _Access.require_write(caller, owner)
        return repo

    def find_build(self, repo, number, branch=None):
        """Build `number`, or for "latest" as Drone answers it: the newest build
        of any event on `branch`, else the newest push of the default branch."""
        if number == "latest":
            if branch:
                return self.store.latest_build(repo["id"], branch)
            default = repo["default_branch"] or self.store.git.remembered_default_branch(repo)
            return self.store.latest_build(repo["id"], default or None, EVENT_PUSH)
        return self.store.get_build(repo["id"], _check_positive(number, "build number"))

    def _build(self, caller, owner, name, number, *, write=False):
        repo = self.find_repo(caller, owner, name, write=write)
        return repo, self.find_build(repo, number)

    @staticmethod
    def _admin_only(caller, fields):
        """Trusting a repository, or pointing it at the server's own files, is
        for admins."""
        if caller["admin"]:
            return
        if "trusted" in fields:
            raise Forbidden("only an admin may mark a repository trusted")
        if "url" in fields and not is_remote_url(fields["url"]):
            raise Forbidden("only an admin may point a repository at a local path or a "
                            "file:// URL; use https://, http://, ssh://, git:// or git@host:path")

    @staticmethod
    def _require_admin(caller, what, *, write=False):
        """An admin, with a write token for a change (a read-only token of an
        admin only reads)."""
        if caller is None:
            raise Unauthorized(f"{what} is for admins: send an admin's token")
        if not caller["admin"]:
            raise Forbidden(f"{what} is for admins")
        if write and caller["scope"] != "write":
            raise Forbidden(f"{what} needs a write token; this one is read-only")

    def build_json(self, build):
        return _full_build_json(self.store, build)

    # -- repositories -------------------------------------------------------------

    def list_repos(self, caller):
        return [_REPO.to_json(repo) for repo in self.store.list_repos()
                if _Access.may_read(caller, repo)]

    def add_repo(self, caller, owner, name, params, *, base_url=""):
        """Add a repository; the answer shows its webhook secret this once."""
        _check_name(owner, "owner")
        _check_name(name, "repository name")
        _Access.require_write(caller, owner)
        fields = _REPO.parse(params, ignore=_RESERVED_PARAMS)
        self._admin_only(caller, fields)
        if "url" not in fields:
            raise BadRequest("url is required: a clone URL or a local path (cirunner has no forge "
                             "account to look the repository up by its name)")
        fields.setdefault("webhook_secret", secrets.token_urlsafe(24))
        repo = _REPO.to_json(self.store.create_repo(owner, name, fields.pop("url"), **fields))
        return dict(repo, webhook_secret=fields["webhook_secret"],
                    webhook_url=f"{(base_url or self.public_url).rstrip('/')}/hook")

    def get_repo(self, caller, owner, name):
        return _REPO.to_json(self.find_repo(caller, owner, name))

    def update_repo(self, caller, owner, name, params):
        repo = self.find_repo(caller, owner, name, write=True)
        fields = _REPO.parse(params, ignore=_RESERVED_PARAMS)
        self._admin_only(caller, fields)
        return _REPO.to_json(self.store.update_repo(repo["id"], **fields))

    def delete_repo(self, caller, owner, name):
        repo = self.find_repo(caller, owner, name, write=True)
        self.store.delete_repo(repo["id"])
        self.store.git.remove(repo)
        _remove_tree(os.path.join(self.store.data_dir, "workspaces", repo["owner"],
                                  repo["name"]))
        return {"deleted": f"{repo['owner']}/{repo['name']}"}

    # -- builds ---------------------------------------------------------------------

    @staticmethod
    def build_filters(params):
        status = params.get("status") or None
        if status is not None and status not in BUILD_STATUSES:
            raise BadRequest(f"status must be one of {', '.join(BUILD_STATUSES)}")
        return {"branch": params.get("branch") or None, "status": status}

    def list_builds(self, caller, owner, name, params):
        """Builds, newest first: `page` (from 1) of `per_page`, on `branch`, of `status`."""
        repo = self.find_repo(caller, owner, name)
        per_page = _check_int(params.get("per_page"), "per_page", default=DEFAULT_PER_PAGE,
                              minimum=1, maximum=MAX_PER_PAGE)
        page = _check_int(params.get("page"), "page", default=1, minimum=1, maximum=10 ** 9)
        builds = self.store.list_builds(repo["id"], offset=(page - 1) * per_page,
                                        limit=per_page, **self.build_filters(params))
        return [_build_json(build, listed=True) for build in builds]

    def start_build(self, caller, owner, name, params):
        """Start a build: `branch`, `commit`, `event`, `deploy_to`, `variables`
        (and, as Drone takes them, any other parameter as a variable)."""
        repo = self.find_repo(caller, owner, name, write=True)
        params = dict(params)
        variables = params.pop("variables", None) or {}
        if not isinstance(variables, dict):
            raise BadRequest("variables must be an object of NAME: value")
        branch = params.pop("branch", "") or ""
        commit = params.pop("commit", "") or ""
        event = params.pop("event", EVENT_MANUAL) or EVENT_MANUAL
        deploy_to = params.pop("deploy_to", "") or ""
        variables = {**params, **variables}  # any other key is a variable, as in Drone
        build = create_build(self.store, repo, branch=branch, commit=commit,
                             variables=variables, event=event, max_jobs=self.max_jobs,
                             deploy_to=_check_text(deploy_to, "deploy_to", 255))
        return self.build_json(build)

    def get_build(self, caller, owner, name, number, params=None):
        repo = self.find_repo(caller, owner, name)
        return self.build_json(self.find_build(repo, number, (params or {}).get("branch")))

    def restart_build(self, caller, owner, name, number, params):
        """Run a finished build again: under its number, or with `fork` as a new
        one (`event=deployment&deploy_to=T` makes it a deployment, what `drone
        deploy` sends); any other parameter is a variable."""
        repo, build = self._build(caller, owner, name, number, write=True)
        params = dict(params)
        fork = _check_bool(params.pop("fork", "false"), "fork")
        event = params.pop("event", "") or None
        deploy_to = params.pop("deploy_to", "") or ""
        variables = params.pop("variables", None) or {}
        if not isinstance(variables, dict):
            raise BadRequest("variables must be an object of NAME: value")
        build = restart_build(self.store, repo, build["number"], fork=fork,
                              variables={**params, **variables}, max_jobs=self.max_jobs,
                              event=event, deploy_to=deploy_to)
        return self.build_json(build)

    def cancel_build(self, caller, owner, name, number, *, wait=True):
        """Cancel a build: pending jobs are skipped, running ones killed; the
        answer is the build once they have stopped (or the grace period ran
        out), or at once without `wait`."""
        _, build = self._build(caller, owner, name, number, write=True)
        build = self.store.cancel_jobs(build["id"], pending_status=SKIPPED,
                                       message=f"cancelled by {caller['login']}")
        if wait:
            build = self.store.wait_until_done(build["id"], self.cancel_wait)
        return self.build_json(build)

    def cancel_job(self, caller, owner, name, number, job):
        _, build = self._build(caller, owner, name, number, write=True)
        job = self.store.get_job(build["id"], _check_positive(job, "job number"))
        return self.build_json(self.store.cancel_jobs(
            build["id"], job["number"], message=f"cancelled by {caller['login']}"))

    def approve_build(self, caller, owner, name, number):
        """Let a build that waits for approval (a fork's pull request) run."""
        _, build = self._build(caller, owner, name, number, write=True)
        return self.build_json(self.store.review_build(build["id"], caller["login"],
                                                       approve=True))

    def decline_build(self, caller, owner, name, number):
        """Decline a build that waits for approval: it never runs."""
        _, build = self._build(caller, owner, name, number, write=True)
        return self.build_json(self.store.review_build(build["id"], caller["login"],
                                                       approve=False))

    def _build_by_id(self, caller, owner, name, build_id, *, write=False):
        """(repository, build) of a build named by its id (the project API's way)."""
        repo = self.find_repo(caller, owner, name, write=write)
        build = self.store.get_build_by_id(_check_positive(build_id, "build id"))
        if build["repo_id"] != repo["id"]:
            raise NotFound(f"build {build_id} not found")
        return repo, build

    def update_build(self, caller, owner, name, build_id, params):
        """Change a build's description, tags (with `merge`, added to its own)
        or pinned."""
        _, build = self._build_by_id(caller, owner, name, build_id, write=True)
        fields = _BUILD.parse(params)
        if "tags" in fields and fields.pop("merge", False):
            fields["tags"] = list(dict.fromkeys(json.loads(build["tags"] or "[]")
                                                + fields["tags"]))
        fields.pop("merge", None)
        return self.build_json(self.store.update_build(build["id"], **fields))

    def delete_build(self, caller, owner, name, build_id):
        """Delete a finished build, its logs and what is left of its workspaces."""
        repo, build = self._build_by_id(caller, owner, name, build_id, write=True)
        self.store.delete_build(build["id"])
        _remove_build_workspaces(self.store.data_dir, repo, build["number"])
        return {"id": build["id"], "number": build["number"], "deleted": True}

    def stop_build(self, caller, owner, name, build_id):
        """Stop a build named by its id, as cancel_build does (without waiting)."""
        _, build = self._build_by_id(caller, owner, name, build_id, write=True)
        if build["status"] not in ACTIVE_STATUSES:
            raise Conflict(f"build {build['number']} has already finished ({build['status']})")
        return self.build_json(self.store.cancel_jobs(
            build["id"], pending_status=SKIPPED, message=f"stopped by {caller['login']}"))

    def delete_step_log(self, caller, owner, name, number, job, step):
        """Delete a step's output from its job's log (Drone 1.x's deleteLogs),
        once the job has finished."""
        _, build = self._build(caller, owner, name, number, write=True)
        job = self.store.get_job(build["id"], _check_positive(job, "job number"))
        step = _check_positive(step, "step number")
        found = next((row for row in self.store.list_steps([job["id"]])[job["id"]]
                      if row["number"] == step), None)
        if found is None:
            raise NotFound(f"step {step} not found")
        if job["status"] in ACTIVE_STATUSES:
            raise Conflict(f"job {job['number']} is {job['status']}; its log can change only "
                           "once it has finished")
        self.store.cut_log(job["id"], found["log_start"], found["log_end"])

    # -- secrets and schedules ----------------------------------------------------

    def list_secrets(self, caller, owner, name):
        """Secret names and events, never values (for those who may write)."""
        repo = self.find_repo(caller, owner, name, write=True)
        return [_SECRET.to_json(secret) for secret in self.store.list_secrets(repo["id"])]

    def add_secret(self, caller, owner, name, params):
        """Add or replace a secret: `name`, `value`, `events` and `images` (each
        a list, or one comma-separated text)."""
        repo = self.find_repo(caller, owner, name, write=True)
        fields = {key: value for key, value in _SECRET.parse(params).items()
                  if value is not None}
        for key in ("events", "images"):
            if fields.get(key) is not None and not isinstance(fields[key], list):
                raise BadRequest(f"{key} must be a list")
        self.store.set_secret(repo["id"], fields.get("name"), fields.get("value"),
                              fields.get("events"), fields.get("images"))
        return next(_SECRET.to_json(item) for item in self.store.list_secrets(repo["id"])
                    if item["name"] == fields["name"])

    def delete_secret(self, caller, owner, name, secret):
        repo = self.find_repo(caller, owner, name, write=True)
        self.store.delete_secret(repo["id"], secret)
        return {"deleted": secret}

    def list_crons(self, caller, owner, name):
        repo = self.find_repo(caller, owner, name)
        return [_CRON.to_json(cron) for cron in self.store.list_crons(repo["id"])]

    def add_cron(self, caller, owner, name, params):
        """Add a build schedule: `name`, `expression` (five fields, UTC), `branch`."""
        repo = self.find_repo(caller, owner, name, write=True)
        fields = _CRON.parse(params)
        for field in ("name", "expression"):
            if not isinstance(fields.get(field), str) or not fields[field]:
                raise BadRequest(f"{field} is required")
        cron = self.store.add_cron(repo["id"], fields["name"], fields["expression"],
                                   fields.get("branch", ""))
        return _CRON.to_json(cron)

    def delete_cron(self, caller, owner, name, cron):
        repo = self.find_repo(caller, owner, name, write=True)
        self.store.delete_cron(repo["id"], cron)
        return {"deleted": cron}

    # -- the queue, users and tokens ------------------------------------------------

    def queue(self, caller):
        """Each pending job with its position and why it waits, and what the
        running ones do (as far as the caller may read them)."""
        repos = {repo["id"]: repo for repo in self.store.list_repos()}
        queue = self.store.queue()
        for key in ("pending", "running"):
            queue[key] = [item for item in queue[key]
                          if _Access.may_read(caller, repos[item.pop("repo_id")])]
        executor = self.executor
        for item in queue["running"]:
            job_id = item.pop("job_id")
            item["activity"] = executor.activity(job_id) if executor is not None else ""
        queue["draining"] = bool(executor is not None and executor.draining())
        return queue

    def feed(self, caller):
        """The newest builds of the repositories the caller may read, in Drone
        0.5's feed shape (`drone build queue` and the user's feed)."""
        return self._feed(caller, active=False)

    def build_queue(self, caller):
        """The pending and running builds the caller may read, in Drone 0.5's
        feed shape (`drone build queue`)."""
        return self._feed(caller, active=True)

    def _feed(self, caller, *, active):
        repos = {repo["id"]: repo for repo in self.store.list_repos()
                 if _Access.may_read(caller, repo)}
        return [_feed_json(repos[build["repo_id"]], build)
                for build in self.store.newest_builds(active=active, limit=50 if not active
                                                      else 1000)
                if build["repo_id"] in repos]

    def current_user(self, caller):
        """The caller (401 for a guest): what `cirunner login` checks a token with."""
        if caller is None:
            raise Unauthorized("no credentials: send 'Authorization: Token <token>'")
        return _USER.to_json(caller)

    def list_users(self, caller):
        self._require_admin(caller, "the list of users")
        return [_ACCOUNT.to_json(user) for user in self.store.list_users()]

    def get_user(self, caller, login):
        """One user (admins; anyone may read their own)."""
        if caller is None or caller["login"] != login:
            self._require_admin(caller, "another user")
        return _ACCOUNT.to_json(self.store.get_user(login))

    def add_user(self, caller, params):
        """Add a user (admins): `login`, `email`, `admin`."""
        self._require_admin(caller, "adding a user", write=True)
        login = params.get("login")
        if not isinstance(login, str):
            raise BadRequest("login is required")
        user = self.store.create_user(
            login, email=_check_text(params.get("email") or "", "email", 254),
            admin=_check_bool(params.get("admin", False), "admin"))
        return _ACCOUNT.to_json(user)

    def update_user(self, caller, login, params):
        """Change a user's `email` or `admin` flag (admins). An admin cannot
        take their own admin flag away (someone must be left to give it back)."""
        self._require_admin(caller, "changing a user", write=True)
        unknown = set(params) - {"email", "admin", *_RESERVED_PARAMS}
        if unknown:
            raise BadRequest(f"unknown user field {min(unknown)!r}")
        admin = _check_bool(params["admin"], "admin") if "admin" in params else None
        if admin is False and login == caller["login"]:
            raise Conflict("you cannot take your own admin rights away: ask another admin")
        email = params.get("email")
        user = self.store.update_user(
            login, email=None if email is None else _check_text(email, "email", 254),
            admin=admin)
        return _ACCOUNT.to_json(user)

    def delete_user(self, caller, login):
        self._require_admin(caller, "removing a user", write=True)
        self.store.delete_user(login)
        return {"deleted": login}

    def list_agents(self, caller):
        """Agents (never their tokens): labels, version, address, last seen,
        workers and running jobs (admins)."""
        self._require_admin(caller, "the list of agents")
        return [_agent_json(agent) for agent in self.store.list_agents()]

    def add_agent(self, caller, params):
        """Make an agent's credential (admins): `name`, `labels` ({name: value},
        or "k=v,..."); the answer shows its token this once."""
        self._require_admin(caller, "adding an agent", write=True)
        labels = params.get("labels") or {}
        if isinstance(labels, str):
            labels = _parse_labels(labels)
        agent, token = self.store.create_agent(
            _check_name(params.get("name"), "agent name"), _check_labels(labels))
        return dict(_agent_json(agent), token=token)

    def remove_agent(self, caller, agent):
        """Revoke an agent at once (admins): its token stops working, its jobs end error."""
        self._require_admin(caller, "removing an agent", write=True)
        self.store.delete_agent(agent)
        return {"deleted": agent}

    def _token_owner(self, caller, login):
        """Whose tokens the caller acts on: their own; anyone's for an admin."""
        if caller is None:
            raise Unauthorized("no credentials: send 'Authorization: Token <token>'")
        login = _check_name(login, "login") if login else caller["login"]
        if login != caller["login"]:
            self._require_admin(caller, "another user's tokens")
        return login

    def list_tokens(self, caller, params=None):
        """Tokens (never their secrets): the caller's, or `login`'s or everyone's
        for an admin (`login` empty with `all`)."""
        params = params or {}
        if params.get("all") and caller is not None and caller["admin"]:
            rows = self.store.list_tokens()
        else:
            rows = self.store.list_tokens(self._token_owner(caller, params.get("login")))
        return [_TOKEN.to_json(row) for row in rows]

    def create_token(self, caller, params):
        """Make a token (`name`, `scope`) for the caller, or for `login` (admins);
        the answer shows its secret this once. A read-only token makes none."""
        login = self._token_owner(caller, params.get("login"))
        if caller["scope"] != "write":
            raise Forbidden("a read-only token cannot make tokens")
        token, secret = self.store.create_token(
            login, name=_check_text(params.get("name") or "", "name", 100),
            scope=params.get("scope") or "write")
        return dict(_TOKEN.to_json({**token, "login": login}), token=secret)

    def revoke_token(self, caller, token_id):
        token_id = _check_positive(token_id, "token id")
        owner = self.store.user_for_token(token_id)
        if owner is None or (owner["login"] != self._token_owner(caller, None)
                             and not caller["admin"]):
            raise NotFound(f"token {token_id} not found")
        if owner["login"] != caller["login"]:
            self._require_admin(caller, "revoking another user's token", write=True)
        self.store.revoke_token(token_id)
        return {"deleted": token_id}

###############################################################################
# HTTP API ####################################################################
###############################################################################

_RESERVED_PARAMS = ("access_token",)
_JSON = "application/json"


@dataclasses.dataclass
class _Reply:
    """What a handler answers: a body (JSON unless `content_type` says otherwise)."""

    body: object
    status: int = 200
    content_type: str = _JSON
    headers: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Route:
    """One HTTP operation, declared once: the Bottle route and its OpenAPI entry.

    `handler(api, **path params)` answers it; `access` says who may call it and
    what the wrapper resolves first: "public" (anyone), "user" (any valid or
    no credentials), "read"/"write" (the repository `<owner>/<name>`, passed as
    `repo`), "owner" (a write token of `<owner>`), "signed" (verified by the
    handler itself, as webhooks are). `replies` maps status codes to
    (description, schema); `media` lists the content types of a success.
    """

    method: str
    path: str
    handler: object
    access: str
    summary: str
    replies: dict
    query: tuple = ()       # (name, schema, description)
    body: dict = None       # the request body's schema (JSON, or a form)
    media: tuple = (_JSON,)
    errors: tuple = ()


_ACCESS_ERRORS = {"public": (), "user": (401,), "read": (400, 401, 404),
                  "write": (400, 401, 403, 404, 409, 413, 507),
                  "owner": (400, 401, 403, 409, 413, 507), "signed": (400, 403, 404, 413, 507)}
_ERROR_DESCRIPTIONS = {400: "bad input", 401: "no or bad credentials", 403: "not allowed",
                       404: "unknown", 409: "conflict with the current state",
                       413: "body too large", 503: "too many live streams",
                       507: "no space left in the data directory"}
_NAME_SCHEMA = {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,100}$"}
_POSITIVE = {"type": "integer", "minimum": 1}
_PATH_PARAMETERS = {
    "owner": (_NAME_SCHEMA, ""), "name": (_NAME_SCHEMA, ""),
    "number": ({"oneOf": [_POSITIVE, {"type": "string", "enum": ["latest"]}]},
               "build number or 'latest'"),
    "job": (_POSITIVE, "job number"),
    "build_id": (_POSITIVE, "the build's global id"), "status_id": (_POSITIVE, "status id"),
    "secret": (_STRING, "secret name"), "step": (_POSITIVE, "step number, in its job"),
    "cron": (_NAME_SCHEMA, "schedule name"), "token_id": (_POSITIVE, "token id"),
    "login": (_NAME_SCHEMA, "a user's login"), "agent": (_NAME_SCHEMA, "an agent's name"),
}


def _ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def _openapi_document(routes):
    """The OpenAPI 3.1 description of `routes` (served at /api/openapi.json)."""
    paths = {}
    for route in routes:
        path = re.sub(r"<([^>]+)>", r"{\1}", route.path)
        names = re.findall(r"<([^>]+)>", route.path)
        item = paths.setdefault(path, {"parameters": [
            {"name": name, "in": "path", "required": True,
             "description": _PATH_PARAMETERS[name][1], "schema": _PATH_PARAMETERS[name][0]}
            for name in names]})
        item[route.method.lower()] = _openapi_operation(route)
    for item in paths.values():
        if not item["parameters"]:
            del item["parameters"]
    return {
        "openapi": "3.1.0",
        "info": {"title": "cirunner", "version": __version__,
                 "description": "Drone-style and project-style build APIs. Times are Unix "
                                "seconds in both dialects."},
        "paths": paths,
        "components": {"schemas": _schemas(), "securitySchemes": {
            "token": {"type": "apiKey", "in": "header", "name": "Authorization",
                      "description": "'Token <token>' or 'Bearer <token>'"},
            "access_token": {"type": "apiKey", "in": "query", "name": "access_token"}}},
        "security": [{}, {"token": []}, {"access_token": []}],
    }


def _openapi_operation(route):
    responses = {}
    for code, (description, schema) in route.replies.items():
        responses[str(code)] = {"description": description}
        if isinstance(route.media, dict) and code < 300:  # a schema per content type
            responses[str(code)]["content"] = {media: {"schema": media_schema}
                                               for media, media_schema in route.media.items()}
        elif schema is not None:
            responses[str(code)]["content"] = {media: {"schema": schema}
                                               for media in route.media}
    for code in sorted(set(_ACCESS_ERRORS[route.access]) | set(route.errors)):
        responses[str(code)] = {"description": _ERROR_DESCRIPTIONS[code], "content": {
            _JSON: {"schema": _ref("Error")}}}
    operation = {"summary": route.summary, "responses": responses}
    if route.access in ("public", "signed"):
        operation["security"] = []
    if route.query:
        operation["parameters"] = [
            {"name": name, "in": "query", "required": False, "description": description,
             "schema": schema} for name, schema, description in route.query]
    if route.body is not None:
        operation["requestBody"] = {"required": False, "content": {
            _JSON: {"schema": route.body},
            "application/x-www-form-urlencoded": {"schema": route.body}}}
    return operation


def _error_reply(error):
    """Every API error leaves as this JSON body: {error, message, status}."""
    headers = {"Content-Type": _JSON, "Cache-Control": "no-store"}
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Token realm="cirunner"'
    if isinstance(error, Unavailable):
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return bottle.HTTPResponse(json.dumps(error.to_json()), status=error.status, headers=headers)


def _send(reply):
    """Put a handler's reply on Bottle's response and give the body to send."""
    if not isinstance(reply, _Reply):
        reply = _Reply(reply)
    response = bottle.response
    response.status = reply.status
    response.content_type = reply.content_type
    for name, value in reply.headers.items():
        response.set_header(name, value)
    if reply.body is None:
        return ""
    return json.dumps(reply.body) if reply.content_type == _JSON else reply.body


def _paginated(results, count, offset, limit):
    """A list in the project dialect's shape: {count, next, previous, results}."""
    url = bottle.request.url.split("?")[0]
    query = {key: value for key, value in bottle.request.query.decode().items()
             if key not in ("offset", "limit")}

    def link(new_offset):
        params = dict(query, limit=str(limit), offset=str(new_offset))
        return url + "?" + "&".join(f"{key}={quote(value, safe='')}"
                                    for key, value in params.items())

    return {"count": count,
            "next": link(offset + limit) if offset + limit < count else None,
            "previous": link(max(0, offset - limit)) if offset > 0 else None,
            "results": results}


# Badge colours and words per build status (None: no build yet).
_BADGES = {SUCCESS: ("#4c1", "passing"), FAILURE: ("#e05d44", "failing"),
           RUNNING: ("#dfb317", "running"), PENDING: ("#dfb317", "pending"),
           ERROR: ("#9f9f9f", "error"), KILLED: ("#9f9f9f", "killed"),
           SKIPPED: ("#9f9f9f", "skipped"), None: ("#9f9f9f", "none")}
_CC_STATUS = {SUCCESS: "Success", FAILURE: "Failure", ERROR: "Exception", KILLED: "Exception",
              SKIPPED: "Success"}
_BADGE_TEMPLATE = """<svg xmlns="http://www.w3.org/2000/svg" width="{{width}}" height="20" \
role="img" aria-label="build: {{word}}"><title>build: {{word}}</title>\
<linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" stop-opacity=".1"/>\
<stop offset="1" stop-opacity=".1"/></linearGradient>\
<clipPath id="r"><rect width="{{width}}" height="20" rx="3" fill="#fff"/></clipPath>\
<g clip-path="url(#r)"><rect width="{{left}}" height="20" fill="#555"/>\
<rect x="{{left}}" width="{{right}}" height="20" fill="{{colour}}"/>\
<rect width="{{width}}" height="20" fill="url(#s)"/></g>\
<g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" \
font-size="11"><text x="{{left / 2}}" y="14">build</text>\
<text x="{{left + right / 2}}" y="14">{{word}}</text></g></svg>"""


_ANSI_COLOUR = re.compile(r"\x1b\[([0-9;]*)m")
_ANSI_OTHER = re.compile(r"\x1b\[[0-9;?]*[A-Za-ln-z]")
_STEP_SUMMARY_TEMPLATE = ('<span class="status s-{{status}}">{{status}}</span> <b>{{name}}</b> '
                          '<span class=muted>{{detail}}</span>')

_LOG_ROWS_TEMPLATE = """\
% for number, line in rows:
<div id='L{{number}}'><a href='#L{{number}}'>{{number}}</a><span>{{!line}}</span></div>
% end
"""


class _StreamSlots:
    """How many live streams (logs, live pages) may be open at once: each
    holds a server thread, so there are fewer slots than threads (503 beyond)."""

    def __init__(self, limit):
        self.limit = limit
        self._open = 0
        self._lock = threading.Lock()

    def take(self, events, *, prelude=b"retry: 2000\n\n"):
        """`events` as a response body that holds a slot until it is closed,
        after `prelude` (Server-Sent Events' reconnection delay)."""
        with self._lock:
            if self._open >= self.limit:
                raise Unavailable("too many open live streams; try again later")
            self._open += 1
        return _Stream(events, self._give_back, prelude)

    def _give_back(self):
        with self._lock:
            self._open -= 1


def _sse_reply(body):
    return _Reply(body, content_type="text/event-stream; charset=utf-8",
                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Stream:
    """A streamed body that gives its slot back exactly once, when the server
    closes it (after the last event, or when the client went away)."""

    def __init__(self, events, release, prelude):
        self._events = events
        self._release = release
        self._prelude = prelude
        self._open = True

    def __iter__(self):
        if self._prelude:
            yield self._prelude
        yield from self._events

    def close(self):
        if self._open:
            self._open = False
            self._events.close()
            self._release()


def _section_starts(steps):
    """Where each section of a job's log begins, [(offset, number)] in order:
    section 0 is what comes before the first step (the checkout), then each
    step that has started. A section ends where the next one begins."""
    started = [(step["log_start"], step["number"]) for step in steps
               if step["started_at"] or step["log_end"]]
    return [(0, 0), *sorted(started)]


def _split_by_section(starts, offset, data):
    """[(section number, bytes)] of `data`, which lies at `offset` of the log."""
    pieces, end = [], offset + len(data)
    for index, (start, number) in enumerate(starts):
        stop = starts[index + 1][0] if index + 1 < len(starts) else end
        low, high = max(start, offset), min(stop, end)
        if low < high:
            pieces.append((number, data[low - offset:high - offset]))
    return pieces or [(starts[-1][1], data)]


_FAILED_STATUSES = (FAILURE, ERROR, KILLED)


class _LogHtml:
    """The one renderer of log text as HTML (pages and live pages alike):
    numbered rows with anchors, text escaped, ANSI colours as spans; and the
    summaries of a job's sections (its steps)."""

    def __init__(self):
        self._rows = bottle.SimpleTemplate(_LOG_ROWS_TEMPLATE)
        self._summary = bottle.SimpleTemplate(_STEP_SUMMARY_TEMPLATE)

    def sections(self, job, steps):
        """[{number, summary, failing}] for section 0 (the checkout) and each
        step, the services last: status, name, kind, duration; `failing`
        marks the section the job failed in (the first failed step, else a
        failed service, else the checkout). A service the job's end stopped
        shows as "stopped"."""
        job_failed = job["status"] in _FAILED_STATUSES
        failed = sorted((step for step in steps if step["status"] in _FAILED_STATUSES
                         and (step["kind"] != "service" or job_failed)),
                        key=lambda step: step["kind"] == "service")  # a step's failure first
        failing = failed[0]["number"] if failed else 0 if job_failed else None
        clone_status = (job["status"] if failing == 0 else SUCCESS if steps and any(
            step["started_at"] for step in steps) else job["status"])
        sections = [{"number": 0, "failing": failing == 0, "summary": self._summary.render(
            status=clone_status, name="clone", detail="")}]
        services = []
        for step in steps:
            detail = [] if step["kind"] == "step" else [step["kind"]]
            if step["started_at"]:
                detail.append(_duration(step["started_at"], step["finished_at"]))
            status = step["status"]
            if step["kind"] == "service" and failing != step["number"] and \
                    status in DONE_STATUSES and status != SKIPPED:
                status = "stopped"  # the job's end stopped it: its exit is that stop's
            elif step["exit_code"]:
                detail.append(f"exit {step['exit_code']}")
            (services if step["kind"] == "service" else sections).append({
                "number": step["number"], "failing": failing == step["number"],
                "summary": self._summary.render(status=status, name=step["name"],
                                                detail=", ".join(detail))})
        return sections + services

    @staticmethod
    def line(text):
        """One line: escaped, its colour codes turned into spans, others dropped."""
        text = _ANSI_OTHER.sub("", bottle.html_escape(text))
        opened = 0

        def span(match):
            nonlocal opened
            out = "</span>" * opened
            opened = 0
            for code in (match.group(1) or "0").split(";"):
                number = int(code) if code.isdigit() else 0
                if 90 <= number <= 97:
                    number -= 60  # bright colours shown as the plain ones
                if number == 1 or 30 <= number <= 37:
                    out += f'<span class="a{number}">'
                    opened += 1
            return out

        return _ANSI_COLOUR.sub(span, text) + "</span>" * opened

    def rows(self, text, first_line):
        """(HTML rows of the lines of `text`, how many) numbered from `first_line`."""
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        numbered = [(first_line + index, self.line(line)) for index, line in enumerate(lines)]
        return self._rows.render(rows=numbered), len(lines)


def _url(path):
    """The address of `path` of this app as the browser must ask for it: under
    the prefix the app is mounted at (SCRIPT_NAME), if any. Every link, form
    and redirect of the pages goes through here."""
    return bottle.request.script_name.rstrip("/") + path


def _base_url():
    """This app's address as the browser reached it (scheme, host, prefix)."""
    parts = bottle.request.urlparts
    return f"{parts.scheme}://{parts.netloc}{_url('')}"


class _Api:
    """The API's adapters from requests to operations, and the views that are
    HTTP's own (both dialects' shapes, logs and live streams, badges, metrics).

    An operation's route answers with `Operations` (see `operation`); a view
    takes the request's path parameters (with `repo` resolved by the route's
    access rule) and returns a value to send as JSON, or a `_Reply`. Errors
    are raised as CIRunnerError and answered in one place.
    """

    def __init__(self, store, access, ops, *, closing, max_body=DEFAULT_MAX_BODY,
                 max_webhook_body=MAX_WEBHOOK_BODY, max_streams=DEFAULT_HTTP_THREADS - 4,
                 heartbeat=SSE_HEARTBEAT_SECONDS, metrics_from=()):
        self.store = store
        self.access = access
        self.ops = ops
        self.executor = ops.executor
        self.closing = closing
        self.max_body = max_body
        self.max_webhook_body = max_webhook_body
        self.streams = _StreamSlots(max_streams)
        self.heartbeat = heartbeat
        self.metrics_from = frozenset(metrics_from)
        self._badge = bottle.SimpleTemplate(_BADGE_TEMPLATE)
        self.log_html = _LogHtml()
        self.openapi_document = None  # set by make_app, from the routes it serves
        self.metrics = None  # made at the first scrape
        self._metrics_lock = threading.Lock()

    def operation(self, route, name, path):
        """Answer `route` with operation `name`: the caller, the path's
        parameters, the request's parameters (query and body together) when
        the operation takes them, and the status code the route declares. A
        browser's session cookie never changes anything through the API (no
        cross-site forgery): that takes a token."""
        caller = self.caller(route)
        function = getattr(self.ops, name)
        arguments = inspect.signature(function).parameters
        if "params" in arguments:
            path["params"] = self.params()
        if "base_url" in arguments:
            path["base_url"] = _base_url()
        return _Reply(function(caller, **path), next(iter(route.replies)))

    # -- request input ------------------------------------------------------

    @property
    def request(self):
        return bottle.request

    def user(self):
        return self.access.user(bottle.request)

    def caller(self, route):
        """Who calls `route`: a browser's session cookie reads the API but
        never changes anything through it (no cross-site forgery): that takes
        a token."""
        caller = self.user()
        if (route.method not in ("GET", "HEAD") or route.access == "write") and caller \
                and caller.get("via_cookie"):
            raise Unauthorized("this action needs a token")
        return caller

    def read_body(self):
        """The raw request body, at most `body_limit()` bytes (413 beyond)."""
        environ = bottle.request.environ
        stream = environ.get("wsgi.input")
        length = int(environ.get("CONTENT_LENGTH") or 0)
        limit = self.body_limit()
        raw = stream.read(min(length, limit + 1)) if stream is not None and length else b""
        if len(raw) > limit:
            raise TooLarge(f"request body larger than {limit} bytes")
        return raw

    def body_limit(self):
        """The largest body of this request: a webhook's, an agent's, or an API call's."""
        path = bottle.request.environ.get("PATH_INFO", "")
        if path.startswith("/api/agent/"):
            return AGENT_MAX_BODY
        return self.max_webhook_body if path in _WEBHOOK_PATHS else self.max_body

    def body(self):
        """The request body as a dict: JSON, or a form (Drone's clients send forms)."""
        raw = self.read_body()
        if not raw.strip():
            return {}
        content_type = (bottle.request.content_type or "").split(";")[0].strip().lower()
        if content_type == "application/x-www-form-urlencoded":
            return dict(parse_qsl(raw.decode("utf-8", errors="replace"), keep_blank_values=True))
        data = _parse_json(raw, "body")
        if not isinstance(data, dict):
            raise BadRequest("the JSON body must be an object")
        return data

    def query(self):
        params = dict(bottle.request.query.decode().items())
        for key in _RESERVED_PARAMS:
            params.pop(key, None)
        return params

    def params(self):
        """Query and body parameters together (the body wins)."""
        params = self.query()
        params.update(self.body())
        return params

    # -- finding things -------------------------------------------------------

    def find_job(self, repo, number, job):
        build = self.ops.find_build(repo, number, self.query().get("branch"))
        return build, self.store.get_job(build["id"], _check_positive(job, "job number"))

    def build_reply(self, build, status=200):
        return _Reply(_full_build_json(self.store, build), status)

    def find_build_by_id(self, repo, build_id):
        build = self.store.get_build_by_id(_check_positive(build_id, "build id"))
        if build["repo_id"] != repo["id"]:
            raise NotFound(f"build {build_id} not found")
        return build

    # -- meta ---------------------------------------------------------------

    def version(self):
        return {"version": __version__}

    def health(self):
        """The store answers; how this server's steps are isolated (and, for an
        admin, why a part of it cannot work)."""
        self.store.check()
        executor = self.executor
        answer = {"status": "draining" if executor is not None and executor.draining()
                  else "ok"}
        if self.store.read_only:  # up, for reads: a full disk refuses every write
            answer.update(status="read-only", problem=self.store.read_only)
        if executor is not None:
            answer["isolation"] = executor.isolation_summary()
            stuck = executor.stuck()
            if stuck:  # up, but a worker makes no progress: what a probe should alert on
                answer["status"] = "degraded"
                answer["stuck_workers"] = len(stuck)
            user = self.user()
            if user and user["admin"]:
                answer["problems"] = {"steps": executor.isolation_problem,
                                      "images": executor.engine_problem, "stuck": stuck}
        return answer

    def openapi(self):
        return self.openapi_document

    # -- badges -------------------------------------------------------------

    def _latest_or_none(self, repo):
        with contextlib.suppress(NotFound):
            return self.store.latest_build(repo["id"], self.query().get("branch")
                                           or repo["default_branch"] or None)
        return None

    def badge(self, repo):
        """The latest build's status of a branch (default: the repo's) as an SVG badge."""
        build = self._latest_or_none(repo)
        colour, word = _BADGES[build["status"] if build else None]
        left, right = 37, 8 + 6 * len(word)
        svg = self._badge.render(width=left + right, left=left, right=right, colour=colour,
                                 word=word)
        return _Reply(svg, content_type="image/svg+xml",
                      headers={"Cache-Control": "no-cache, max-age=0"})

    def cc_xml(self, repo):
        """The CCMenu / CCTray feed of the repository's latest build."""
        build = self._latest_or_none(repo)
        attributes = {"name": f"{repo['owner']}/{repo['name']}", "activity": "Sleeping",
                      "lastBuildStatus": "Unknown", "lastBuildLabel": "", "lastBuildTime": "",
                      "webUrl": f"{_base_url()}/api/repos/{repo['owner']}/{repo['name']}/builds"}
        if build:
            stamp = build["finished_at"] or build["started_at"] or build["created_at"]
            attributes.update(
                activity="Building" if build["status"] in ACTIVE_STATUSES else "Sleeping",
                lastBuildStatus=_CC_STATUS.get(build["status"], "Unknown"),
                lastBuildLabel=str(build["number"]),
                lastBuildTime=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp)),
                webUrl=attributes["webUrl"] + f"/{build['number']}")
        from xml.sax.saxutils import quoteattr  # here: this feed alone needs it
        project = " ".join(f"{key}={quoteattr(value)}" for key, value in attributes.items())
        feed = f'<?xml version="1.0" encoding="UTF-8"?>\n<Projects><Project {project}/></Projects>\n'
        return _Reply(feed, content_type="application/xml",
                      headers={"Cache-Control": "no-cache, max-age=0"})

    # -- metrics --------------------------------------------------------------

    def metrics_page(self):
        """Prometheus metrics: for admin tokens, and the addresses of --metrics-from.
        They are made at the first scrape (prometheus_client is 14 MiB of
        memory a server that is never scraped does without): counters count
        from there."""
        if bottle.request.environ.get("REMOTE_ADDR") not in self.metrics_from:
            user = self.user()
            if user is None:
                raise Unauthorized("the metrics are for admin tokens (or --metrics-from)")
            if not user["admin"]:
                raise Forbidden("the metrics are for admins")
        with self._metrics_lock:
            if self.metrics is None:
                try:
                    self.metrics = _Metrics(self.store, self.executor)
                except CIRunnerError as error:
                    raise NotFound(error.message) from None
                if self.executor is not None:
                    self.executor.metrics = self.metrics
        return _Reply(self.metrics.render().decode(),
                      content_type="text/plain; version=0.0.4; charset=utf-8")

    # -- logs ---------------------------------------------------------------

    def get_log(self, repo, number, job):
        """A job's log as text from `offset` (sent without holding a thread), or
        followed live as Server-Sent Events (with `format=html`, as rendered rows)."""
        _, job = self.find_job(repo, number, job)
        params = self.query()
        offset = _check_int(params.get("offset"), "offset", default=0)
        follow = params.get("follow", "").lower() in _TRUE_WORDS
        accept = bottle.request.get_header("Accept", "")
        # Drone 0.5's client sends no Accept and reads a JSON array of lines.
        if not follow and (not accept.strip() or "application/json" in accept
                           and "text/" not in accept):
            return _Reply(self.streams.take(self._drone_05_lines(job), prelude=b""),
                          content_type="application/json; charset=utf-8")
        if not follow and "text/event-stream" not in accept:
            log = self.store.open_log(job["id"], offset)
            return _Reply(log, content_type="text/plain; charset=utf-8",
                          headers={"Content-Length": str(log.size)})
        line = None
        if params.get("format", "text") == "html":
            line = _check_int(params.get("line"), "line", default=1, minimum=1)
        elif params.get("format", "text") != "text":
            raise BadRequest("format must be text or html")
        last_id = bottle.request.get_header("Last-Event-ID", "")
        if last_id and not re.fullmatch(r"[0-9]{1,15}(:[0-9]{1,15})?", last_id):
            raise BadRequest("Last-Event-ID must be an id this stream sent: OFFSET or "
                             "OFFSET:LINE")
        if last_id:
            offset, _, resumed_line = last_id.partition(":")
            offset = int(offset)
            line = int(resumed_line) if line is not None and resumed_line else line
        events = (self._log_events(job["id"], offset) if line is None
                  else self._html_events(job["id"], offset, line))
        return _sse_reply(self.streams.take(events))

    def _log_parts(self, job):
        """(name, start, end, step) covering a job's log: each step's bytes under
        its name; what came before the first step under "clone"."""
        steps = sorted((step for step in self.store.list_steps([job["id"]])[job["id"]]
                        if step["log_end"] > step["log_start"]), key=lambda step: step["log_start"])
        size, cursor, parts = self.store.log_size(job["id"]), 0, []
        for step in steps:
            if step["log_start"] > cursor:
                parts.append(("clone" if cursor == 0 else "cirunner", cursor,
                              step["log_start"], None))
            parts.append((step["name"], step["log_start"], step["log_end"], step))
            cursor = max(cursor, step["log_end"])
        if cursor < size:
            parts.append(("clone" if cursor == 0 else "cirunner", cursor, size, None))
        return parts

    def _lines(self, job_id, start, end, *, cut=False):
        """The lines of a byte range of a job's log, read a chunk at a time
        (with `cut`, a line longer than a chunk in pieces of a chunk)."""
        pending = bytearray()  # grown in place: a long line costs its length, not its square
        for chunk in iter(functools.partial(self.store.open_log(job_id, start, end).read,
                                            LOG_CHUNK_BYTES), b""):
            pending += chunk
            if b"\n" not in chunk:
                if cut and len(pending) >= LOG_CHUNK_BYTES:
                    yield pending.decode("utf-8", "replace")
                    pending = bytearray()
                continue
            lines = pending.split(b"\n")
            pending = bytearray(lines.pop())
            for line in lines:
                yield line.decode("utf-8", "replace")
        if pending:
            yield pending.decode("utf-8", "replace")

    def _drone_05_lines(self, job):
        """The log as Drone 0.5 answers it: a JSON array of {proc, time, type,
        pos, out}, `proc` the step; after each step its exit code (type 2).
        (No time is kept per line: `time` is 0, and the step's duration at its
        exit code.)"""
        pieces, size, first = [b"["], 1, True
        for name, start, end, step in self._log_parts(job):
            number = -1
            for number, line in enumerate(self._lines(job["id"], start, end, cut=True)):
                pieces.append((b"" if first else b",") + json.dumps(
                    {"proc": name, "time": 0, "type": 0, "pos": number, "out": line}).encode())
                first, size = False, size + len(pieces[-1])
                if size >= LOG_CHUNK_BYTES:  # sent a chunk at a time, not a line at a time
                    yield b"".join(pieces)
                    pieces, size = [], 0
            if step is not None and step["status"] in DONE_STATUSES:
                duration = max(0, step["finished_at"] - step["started_at"])
                pieces.append((b"" if first else b",") + json.dumps(
                    {"proc": name, "time": duration, "type": 2, "pos": number + 1,
                     "out": str(step["exit_code"])}).encode())
                first = False
        yield b"".join(pieces) + b"]"

    def _find_step(self, repo, number, job, step):
        _, job = self.find_job(repo, number, job)
        number = _check_positive(step, "step number")
        for row in self.store.list_steps([job["id"]])[job["id"]]:
            if row["number"] == number:
                return job, row
        raise NotFound(f"step {number} not found")

    def step_log(self, repo, number, job, step):
        """A step's log as Drone 1.x answers it: [{pos, out, time}]."""
        job, step = self._find_step(repo, number, job, step)
        return [{"pos": position, "out": line + "\n", "time": 0} for position, line in
                enumerate(self._lines(job["id"], step["log_start"], step["log_end"]))]

    def _follow(self, job_id, offset):
        return _follow_log(self.store, job_id, offset, heartbeat=self.heartbeat,
                           closing=self.closing)

    def _job_now(self, job_id):
        """A followed job as it is now, or None once it is gone."""
        try:
            return self.store.get_job_by_id(job_id)
        except NotFound:
            return None

    @staticmethod
    def _end_event(job):
        """The `end` event of a followed job (None: it is gone)."""
        end = _GONE_JOB_END if job is None else {
            "status": job["status"], "exit_code": job["exit_code"], "error": job["error"]}
        return f"event: end\ndata: {json.dumps(end)}\n\n".encode()

    def _log_events(self, job_id, offset):
        """Server-Sent Events: each chunk as a JSON string with its end offset
        as the event id (so EventSource resumes where it stopped), a comment
        line as heartbeat, and an `end` event when the job finishes."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        for chunk, _ in self._follow(job_id, offset):
            if chunk is None:
                yield b": heartbeat\n\n"
                continue
            offset += len(chunk)
            text = decoder.decode(chunk)
            if text:
                yield f"id: {offset}\ndata: {json.dumps(text)}\n\n".encode()
        if not self.closing.is_set():
            yield self._end_event(self._job_now(job_id))

    def _html_events(self, job_id, offset, line):
        """The same stream for a web page: complete lines as rendered rows,
        `{"line", "html", "step"}` (the section of the job's log they are in:
        0 before the first step), with ``OFFSET:LINE`` as the event id; a
        `steps` event with every step's summary whenever one changes."""
        pending, shown = b"", None
        for chunk, job in self._follow(job_id, offset):
            steps = self.store.list_steps([job_id])[job_id]
            shown, event = self._steps_event(job, steps, shown)
            if event:
                yield event
            if chunk is None:
                yield b": heartbeat\n\n"
                continue
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            if not cut and len(pending) > LOG_PAGE_BYTES:
                cut = len(pending)  # a line too long to wait for: shown in parts
            if cut:
                for number, piece in _split_by_section(_section_starts(steps), offset,
                                                       pending[:cut]):
                    html, count = self.log_html.rows(piece.decode("utf-8", "replace"), line)
                    offset, line = offset + len(piece), line + count
                    data = json.dumps({"line": line - count, "html": html, "step": number})
                    yield f"id: {offset}:{line}\ndata: {data}\n\n".encode()
                pending = pending[cut:]
        if self.closing.is_set():
            return
        job = self._job_now(job_id)
        if job is None:
            yield self._end_event(None)
            return
        steps = self.store.list_steps([job_id])[job_id]
        if pending:
            number = _split_by_section(_section_starts(steps), offset, pending)[-1][0]
            html, _ = self.log_html.rows(pending.decode("utf-8", "replace"), line)
            yield (f"data: {json.dumps({'line': line, 'html': html, 'step': number})}"
                   "\n\n").encode()
        _, event = self._steps_event(job, steps, shown)
        if event:
            yield event
        yield self._end_event(job)

    def _steps_event(self, job, steps, shown):
        """(what the page now shows, a `steps` event if that changed)."""
        summaries = self.log_html.sections(job, steps)
        if summaries == shown:
            return shown, b""
        return summaries, f"event: steps\ndata: {json.dumps(summaries)}\n\n".encode()

    # -- project dialect (/api/v1) ------------------------------------------

    def page_params(self):
        params = self.query()
        return (_check_int(params.get("offset"), "offset", default=0, maximum=10 ** 12),
                _check_int(params.get("limit"), "limit", default=V1_PAGE_SIZE, minimum=1,
                           maximum=MAX_PER_PAGE))

    def v1_list_builds(self, repo):
        offset, limit = self.page_params()
        filters = self.ops.build_filters(self.query())
        builds = self.store.list_builds(repo["id"], offset=offset, limit=limit, **filters)
        return _paginated([_build_json(build, listed=True) for build in builds],
                          self.store.count_builds(repo["id"], **filters), offset, limit)

    def v1_get_build(self, repo, build_id):
        return self.build_reply(self.find_build_by_id(repo, build_id))

    def v1_statuses(self, repo, build_id):
        build = self.find_build_by_id(repo, build_id)
        offset, limit = self.page_params()
        rows = self.store.list_statuses(build["id"], offset=offset, limit=limit)
        return _paginated([_STATUS.to_json(row) for row in rows],
                          self.store.count_statuses(build["id"]), offset, limit)

    def v1_status(self, repo, build_id, status_id):
        build = self.find_build_by_id(repo, build_id)
        return _STATUS.to_json(self.store.get_status(
            build["id"], _check_positive(status_id, "status id")))

    def v1_logs(self, repo, build_id):
        build = self.find_build_by_id(repo, build_id)
        jobs = self.store.list_jobs(build["id"])

        def all_logs():
            for job in jobs:
                axis = _axis_text(json.loads(job["environment"] or "{}"))
                yield (f"=== job {job['number']}{' (' + axis + ')' if axis else ''}: "
                       f"{job['status']} ===\n").encode()
                yield from self.store.read_log(job["id"])
                yield b"\n"

        return _Reply(all_logs(), content_type="text/plain; charset=utf-8")


def _object(**properties):
    return {"type": "object", "properties": properties}


_OK = "success"
_BUILD_REPLY = {200: (_OK, _ref("Build"))}
_READ_QUERY = (("branch", _STRING, ""), ("status", _BUILD_STATUS_SCHEMA, ""))
_API_ROUTES = [
    _Route("GET", "/api/version", _Api.version, "public", "server version",
           {200: (_OK, _object(version=_STRING))}),
    _Route("GET", "/healthz", _Api.health, "public", "health check, and how steps are isolated",
           {200: (_OK, _object(status=_STRING, isolation=_object(
               steps=_STRING, network=_STRING, user=_STRING, images=_STRING),
               problems=_object(steps=_STRING, images=_STRING)))}),
    _Route("GET", "/api/openapi.json", _Api.openapi, "public", "this document",
           {200: (_OK, {"type": "object"})}),
    _Route("GET", "/api/repos", "list_repos", "user", "repositories the caller may read",
           {200: (_OK, {"type": "array", "items": _ref("Repo")})}),
    _Route("GET", "/api/user/repos", "list_repos", "user", "repositories the caller may "
           "read (Drone 0.5's path)", {200: (_OK, {"type": "array", "items": _ref("Repo")})}),
    _Route("POST", "/api/repos/<owner>/<name>", "add_repo", "owner",
           "add a repository (the webhook secret is shown this once)",
           {201: (_OK, {"allOf": [_ref("Repo"), _object(webhook_secret=_STRING,
                                                        webhook_url=_STRING)]})},
           body={**_REPO.write_schema(), "required": ["url"]}),
    _Route("GET", "/api/repos/<owner>/<name>", "get_repo", "read", "a repository",
           {200: (_OK, _ref("Repo"))}),
    _Route("PATCH", "/api/repos/<owner>/<name>", "update_repo", "write",
           "change repository settings", {200: (_OK, _ref("Repo"))}, body=_REPO.write_schema()),
    _Route("DELETE", "/api/repos/<owner>/<name>", "delete_repo", "write",
           "remove a repository and its builds", {200: (_OK, {"type": "object"})}),
    _Route("GET", "/api/repos/<owner>/<name>/builds", "list_builds", "read",
           "builds, newest first", {200: (_OK, {"type": "array", "items": _ref("Build")})},
           query=(("page", _POSITIVE, ""),
                  ("per_page", {"type": "integer", "minimum": 1, "maximum": MAX_PER_PAGE}, ""),
                  *_READ_QUERY)),
    _Route("POST", "/api/repos/<owner>/<name>/builds", "start_build", "write", "start a build",
           {201: (_OK, _ref("Build"))},
           body=_object(branch=_STRING, commit=_STRING, event=_STRING, deploy_to=_STRING,
                        variables=_STRING_MAP)),
    _Route("GET", "/api/repos/<owner>/<name>/builds/<number>", "get_build", "read",
           "a build with its jobs", _BUILD_REPLY, query=(("branch", _STRING, "with 'latest'"),)),
    _Route("POST", "/api/repos/<owner>/<name>/builds/<number>", "restart_build", "write",
           "restart a finished build", {202: (_OK, _ref("Build"))},
           query=(("fork", _BOOLEAN, "as a new build number"),
                  ("event", {"type": "string", "enum": list(EVENTS)},
                   "with fork: the new build's event (deployment, as `drone deploy` sends)"),
                  ("deploy_to", _STRING, "with event=deployment: the deploy target"))),
    _Route("DELETE", "/api/repos/<owner>/<name>/builds/<number>", "cancel_build", "write",
           "cancel the build's active jobs", _BUILD_REPLY),
    _Route("POST", "/api/repos/<owner>/<name>/builds/<number>/approve", "approve_build",
           "write", "approve a build that waits for approval (blocked): its jobs may run",
           _BUILD_REPLY),
    _Route("POST", "/api/repos/<owner>/<name>/builds/<number>/decline", "decline_build",
           "write", "decline a build that waits for approval: it never runs", _BUILD_REPLY),
    _Route("DELETE", "/api/repos/<owner>/<name>/builds/<number>/<job>", "cancel_job", "write",
           "cancel one job", _BUILD_REPLY),
    _Route("GET", "/api/repos/<owner>/<name>/logs/<number>/<job>", _Api.get_log, "read",
           "a job's log (text; Server-Sent Events with follow)",
           {200: ("the log", {"type": "string"})},
           query=(("offset", {"type": "integer", "minimum": 0}, ""),
                  ("follow", _BOOLEAN, "follow live as Server-Sent Events"),
                  ("format", {"type": "string", "enum": ["text", "html"]},
                   "with follow: html sends complete lines as rendered rows"),
                  ("line", _POSITIVE, "with format=html: the number of the line at offset")),
           media={"text/plain": {"type": "string"}, "text/event-stream": {"type": "string"},
                  "application/json": {"type": "array", "description": "Drone 0.5's lines",
                                       "items": _object(proc=_STRING, time=_INTEGER,
                                                        type=_INTEGER, pos=_INTEGER,
                                                        out=_STRING)}},
           errors=(503,)),
    _Route("DELETE", "/api/repos/<owner>/<name>/logs/<number>/<job>", "cancel_job", "write",
           "cancel one job", _BUILD_REPLY),
    _Route("GET", "/api/repos/<owner>/<name>/builds/<number>/logs/<job>/<step>", _Api.step_log,
           "read", "a step's log, as Drone 1.x's lines (job = Drone's stage)",
           {200: (_OK, {"type": "array", "items": _object(pos=_INTEGER, out=_STRING,
                                                          time=_INTEGER)})}),
    _Route("DELETE", "/api/repos/<owner>/<name>/builds/<number>/logs/<job>/<step>",
           "delete_step_log", "write", "delete a step's output from its job's log",
           {204: ("deleted", None)}),
    _Route("GET", "/api/repos/<owner>/<name>/secrets", "list_secrets", "write",
           "secret names and events (never values)",
           {200: (_OK, {"type": "array", "items": _ref("Secret")})}),
    _Route("POST", "/api/repos/<owner>/<name>/secrets", "add_secret", "write",
           "add or replace a secret", {201: (_OK, _ref("Secret"))},
           body={**_SECRET.write_schema(), "required": ["name", "value"]}),
    _Route("DELETE", "/api/repos/<owner>/<name>/secrets/<secret>", "delete_secret", "write",
           "remove a secret", {200: (_OK, {"type": "object"})}),
    _Route("GET", "/api/repos/<owner>/<name>/crons", "list_crons", "read",
           "the repository's build schedules",
           {200: (_OK, {"type": "array", "items": _ref("Cron")})}),
    _Route("POST", "/api/repos/<owner>/<name>/crons", "add_cron", "write",
           "add a build schedule (UTC)", {201: (_OK, _ref("Cron"))},
           body={**_CRON.write_schema(), "required": ["name", "expression"]}),
    _Route("DELETE", "/api/repos/<owner>/<name>/crons/<cron>", "delete_cron", "write",
           "remove a build schedule", {200: (_OK, {"type": "object"})}),
    _Route("GET", "/api/user", "current_user", "user", "the caller: login, admin, "
           "token scope", {200: (_OK, _ref("User"))}),
    _Route("GET", "/api/user/tokens", "list_tokens", "user",
           "the caller's tokens (an admin's: `login`'s, or with `all` everyone's), never "
           "their secrets", {200: (_OK, {"type": "array", "items": _ref("Token")})},
           query=(("login", _STRING, "another user's (admins)"),
                  ("all", _BOOLEAN, "every user's (admins)")), errors=(400, 403, 404)),
    _Route("POST", "/api/user/tokens", "create_token", "user",
           "make a token for the caller (or, for an admin, for `login`); its secret is "
           "shown this once", {201: (_OK, {"allOf": [_ref("Token"), _object(token=_STRING)]})},
           body=_object(name=_STRING, scope={"type": "string", "enum": list(TOKEN_SCOPES)},
                        login=_STRING), errors=(400, 403, 404, 413, 507)),
    _Route("DELETE", "/api/user/tokens/<token_id>", "revoke_token", "user",
           "revoke a token of the caller's (an admin's: anyone's)",
           {200: (_OK, {"type": "object"})}, errors=(400, 403, 404, 507)),
    _Route("GET", "/api/users", "list_users", "user", "every user (admins)",
           {200: (_OK, {"type": "array", "items": _ref("Account")})}, errors=(403,)),
    _Route("POST", "/api/users", "add_user", "user", "add a user (admins)",
           {201: (_OK, _ref("Account"))},
           body={**_object(login=_NAME_SCHEMA, email=_STRING, admin=_BOOLEAN),
                 "required": ["login"]}, errors=(400, 403, 409, 413, 507)),
    _Route("GET", "/api/users/<login>", "get_user", "user", "one user (admins; or yourself)",
           {200: (_OK, _ref("Account"))}, errors=(400, 403, 404)),
    _Route("PATCH", "/api/users/<login>", "update_user", "user",
           "change a user's email or admin flag (admins)", {200: (_OK, _ref("Account"))},
           body=_object(email=_STRING, admin=_BOOLEAN), errors=(400, 403, 404, 409, 413, 507)),
    _Route("DELETE", "/api/users/<login>", "delete_user", "user",
           "remove a user and their tokens (admins)", {200: (_OK, {"type": "object"})},
           errors=(400, 403, 404, 507)),
    _Route("GET", "/api/agents", "list_agents", "user", "every agent (admins)",
           {200: (_OK, {"type": "array", "items": {"type": "object"}})}, errors=(403,)),
    _Route("POST", "/api/agents", "add_agent", "user",
           "make an agent's credential (admins); its token is shown this once",
           {201: (_OK, {"type": "object"})},
           body={**_object(name=_NAME_SCHEMA, labels={"type": "object"}), "required": ["name"]},
           errors=(400, 403, 409, 413, 507)),
    _Route("DELETE", "/api/agents/<agent>", "remove_agent", "user",
           "revoke an agent at once; its running jobs end error (admins)",
           {200: (_OK, {"type": "object"})}, errors=(400, 403, 404, 507)),
    _Route("GET", "/api/queue", "queue", "user", "the pending jobs in order, each with why "
           "it waits, and the running ones", {200: (_OK, {"type": "object"})}),
    # Drone 0.5's client: `drone build queue`, `drone repo ls`, the user's feed.
    _Route("GET", "/api/builds", "build_queue", "user", "the pending and running builds "
           "the caller may read, as Drone 0.5's feed items",
           {200: (_OK, {"type": "array", "items": {"type": "object"}})}),
    _Route("GET", "/api/user/feed", "feed", "user", "the newest builds (50) of the "
           "repositories the caller may read, as Drone 0.5's feed items",
           {200: (_OK, {"type": "array", "items": {"type": "object"}})}),
    _Route("GET", "/metrics", _Api.metrics_page, "user", "Prometheus metrics (admins, or "
           "--metrics-from addresses; needs the metrics extra)",
           {200: ("the metrics", _STRING)}, media=("text/plain",), errors=(403, 404)),
    _Route("GET", "/api/badges/<owner>/<name>/status.svg", _Api.badge, "read",
           "the latest build's status as an SVG badge", {200: ("the badge", _STRING)},
           query=(("branch", _STRING, ""),), media=("image/svg+xml",)),
    _Route("GET", "/api/badges/<owner>/<name>/cc.xml", _Api.cc_xml, "read",
           "CCMenu feed of the latest build", {200: ("the feed", _STRING)},
           query=(("branch", _STRING, ""),), media=("application/xml",)),
    _Route("GET", "/api/v1/<owner>/<name>/builds", _Api.v1_list_builds, "read",
           "builds, newest first, paginated", {200: (_OK, _ref("BuildPage"))},
           query=(("offset", {"type": "integer", "minimum": 0}, ""),
                  ("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PER_PAGE}, ""),
                  *_READ_QUERY)),
    _Route("GET", "/api/v1/<owner>/<name>/builds/<build_id>", _Api.v1_get_build, "read", "a build",
           _BUILD_REPLY),
    _Route("PATCH", "/api/v1/<owner>/<name>/builds/<build_id>", "update_build", "write",
           "change description, tags or pinned", _BUILD_REPLY,
           body={**_BUILD.write_schema(), "additionalProperties": False}),
    _Route("DELETE", "/api/v1/<owner>/<name>/builds/<build_id>", "delete_build", "write",
           "delete a finished build",
           {200: (_OK, _object(id=_INTEGER, number=_INTEGER, deleted=_BOOLEAN))}),
    _Route("POST", "/api/v1/<owner>/<name>/builds/<build_id>", "stop_build", "write",
           "stop the build", _BUILD_REPLY),
    _Route("POST", "/api/v1/<owner>/<name>/builds/<build_id>/stop", "stop_build", "write",
           "stop the build", _BUILD_REPLY),
    _Route("GET", "/api/v1/<owner>/<name>/builds/<build_id>/statuses", _Api.v1_statuses, "read",
           "status history, oldest first", {200: (_OK, _ref("StatusPage"))},
           query=(("offset", {"type": "integer", "minimum": 0}, ""),
                  ("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PER_PAGE}, ""))),
    _Route("GET", "/api/v1/<owner>/<name>/builds/<build_id>/statuses/<status_id>",
           _Api.v1_status, "read", "one status entry", {200: (_OK, _ref("Status"))}),
    _Route("GET", "/api/v1/<owner>/<name>/builds/<build_id>/logs", _Api.v1_logs, "read",
           "every job's log under a header", {200: ("text", {"type": "string"})},
           media=("text/plain",)),
]

# The route of each operation (the first that answers with it): what the
# command line on a server calls.
_OPERATIONS = {route.handler: route for route in reversed(_API_ROUTES)
               if isinstance(route.handler, str)}

###############################################################################
# Webhooks ####################################################################
###############################################################################

# A commit that asks not to be built (Woodpecker's skip.go; Drone 1.x's also
# ***NO_CI***): heeded for pushes and pull requests, never for a tag (a
# release commit says [skip ci] so that its branch push builds nothing).
_SKIP_PATTERN = re.compile(r"\[(ci *skip|skip *ci)\]|\*\*\*no_ci\*\*\*", re.IGNORECASE)


def _webhook_forge(headers):
    """(forge, event) from a webhook's headers, or (None, None)."""
    for name, forge in (("X-Forgejo-Event", "gitea"), ("X-Gitea-Event", "gitea"),
                        ("X-Gitlab-Event", "gitlab"), ("X-GitHub-Event", "github")):
        if headers.get(name):
            return forge, headers.get(name)
    return None, None


def _webhook_repo_name(forge, payload):
    if forge == "gitlab":
        return _dig(payload, "project", "path_with_namespace")
    return _dig(payload, "repository", "full_name")


def _dig(data, *keys):
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _require(payload, *keys, kind=str):
    value = _dig(payload, *keys)
    if value is None or value == "" or not isinstance(value, kind) or isinstance(value, bool):
        raise BadRequest(f"the payload has no valid {'.'.join(keys)}: not this forge's "
                         "webhook shape")
    return value


def _text(value):
    return value if isinstance(value, str) else ""


def _iso_time(text):
    """Seconds since the epoch of a payload's timestamp: a number or ISO 8601
    text; 0 for text that is not a time, 400 for a number outside years 1970-9999."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not 0 <= text <= _LAST_TIMESTAMP:
            raise BadRequest(f"the payload's timestamp {text!r} is not a time")
        return int(text)
    try:
        return int(datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp())
    except (ValueError, OverflowError):
        return 0


def _webhook_refused():
    """One answer for an unknown repository, one without a secret and a bad
    signature: a sender without the secret learns nothing of which it was."""
    return Forbidden("webhook refused: the repository is unknown, has no webhook secret, or "
                     "the signature does not match (the server's log says which)")


def _verify_webhook(forge, headers, body, secret):
    """Check a webhook against the repository's secret: HMAC-SHA256 of the body
    (GitHub, Gitea, Forgejo) or GitLab's shared token, in constant time."""
    if not secret:
        raise Forbidden("the repository has no webhook secret; set one to accept webhooks")
    if forge == "gitlab":
        given = headers.get("X-Gitlab-Token") or ""
        if not hmac.compare_digest(given.encode(), secret.encode()):
            raise Forbidden("bad or missing X-Gitlab-Token")
        return
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if forge == "github":
        given = headers.get("X-Hub-Signature-256") or ""
        expected = "sha256=" + expected
    else:
        given = (headers.get("X-Forgejo-Signature") or headers.get("X-Gitea-Signature")
                 or "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Forbidden("bad or missing webhook signature")


# A forge's pull request actions that start a build, in Drone's words (go-scm's).
_PULL_REQUEST_ACTIONS = {"opened": "opened", "synchronize": "synchronized",
                         "synchronized": "synchronized", "reopened": "reopened",
                         "open": "opened", "update": "synchronized", "reopen": "reopened"}


def _parse_webhook(forge, event, payload):
    """Turn a verified payload into build fields, or None for an event that
    starts no build. Raises BadRequest for a payload of the wrong shape."""
    if forge == "gitlab":
        return _parse_gitlab_hook(event, payload)
    if event == "push":
        ref = _require(payload, "ref")
        after = _require(payload, "after")
        if _zero_sha(after) or payload.get("deleted"):
            return None  # a branch or tag deletion
        commits = payload.get("commits") if isinstance(payload.get("commits"), list) else []
        head = payload.get("head_commit") or (commits[-1] if commits else {})
        head = head if isinstance(head, dict) else {}
        is_tag = ref.startswith("refs/tags/")
        return {
            "event": EVENT_TAG if is_tag else EVENT_PUSH, "commit": after, "ref": ref,
            "action": "created" if is_tag else "",
            "branch": "" if is_tag else ref[len("refs/heads/"):],
            "message": head.get("message", ""), "timestamp": _iso_time(head.get("timestamp", 0)),
            "author": _dig(head, "author", "username") or _dig(head, "author", "name") or "",
            "author_email": _dig(head, "author", "email") or "",
            "author_avatar": _dig(payload, "sender", "avatar_url") or "",
            "link_url": payload.get("compare") or payload.get("compare_url") or "",
            "remote": _dig(payload, "repository", "clone_url") or "",
            "before": payload.get("before") or "",
        }
    if event == "pull_request":
        action = _require(payload, "action")
        if action not in _PULL_REQUEST_ACTIONS:
            return None
        number = _require(payload, "pull_request", "number", kind=int)
        head = _dig(payload, "pull_request", "head", "repo", "full_name")
        base = (_dig(payload, "pull_request", "base", "repo", "full_name")
                or _dig(payload, "repository", "full_name"))
        return {
            "event": EVENT_PULL_REQUEST, "commit": _require(payload, "pull_request", "head", "sha"),
            "action": _PULL_REQUEST_ACTIONS[action],
            "ref": f"refs/pull/{number}/head",
            "branch": _require(payload, "pull_request", "base", "ref"),
            "message": _dig(payload, "pull_request", "title") or "",
            "author": _dig(payload, "pull_request", "user", "login") or "",
            "author_avatar": _dig(payload, "pull_request", "user", "avatar_url") or "",
            "link_url": _dig(payload, "pull_request", "html_url") or "",
            "remote": _dig(payload, "pull_request", "head", "repo", "clone_url") or "",
            # A fork's pipeline file is its author's: approval, no trusted keys.
            # A head repository that is gone (a deleted fork) counts as a fork.
            "fork": not head or head != base, "source_repo": head or "",
            "before": _dig(payload, "pull_request", "base", "sha") or "",
        }
    return None


def _parse_gitlab_hook(event, payload):
    kind = payload.get("object_kind")
    if event in ("Push Hook", "Tag Push Hook") and kind in ("push", "tag_push"):
        ref = _require(payload, "ref")
        after = _require(payload, "after")
        if _zero_sha(after):
            return None
        commits = [c for c in payload.get("commits") or [] if isinstance(c, dict)] \
            if isinstance(payload.get("commits"), list) else []
        head = next((c for c in commits if c.get("id") == after), commits[-1] if commits else {})
        is_tag = kind == "tag_push"
        return {
            "event": EVENT_TAG if is_tag else EVENT_PUSH, "action": "created" if is_tag else "",
            "commit": payload.get("checkout_sha") or after, "ref": ref,
            "branch": "" if is_tag else ref[len("refs/heads/"):],
            "message": head.get("message", ""), "timestamp": _iso_time(head.get("timestamp", 0)),
            "author": _dig(head, "author", "name") or payload.get("user_name", ""),
            "author_email": _dig(head, "author", "email") or payload.get("user_email", ""),
            "author_avatar": payload.get("user_avatar") or "",
            "link_url": head.get("url", ""),
            "remote": _dig(payload, "project", "git_http_url") or "",
            "before": payload.get("before") or "",
        }
    if event == "Merge Request Hook" and kind == "merge_request":
        attributes = _require(payload, "object_attributes", kind=dict)
        if attributes.get("action") not in _PULL_REQUEST_ACTIONS:
            return None
        number = _require(payload, "object_attributes", "iid", kind=int)
        last = attributes.get("last_commit") if isinstance(attributes.get("last_commit"),
                                                             dict) else {}
        return {
            "event": EVENT_PULL_REQUEST, "action": _PULL_REQUEST_ACTIONS[attributes["action"]],
            "commit": _require(payload, "object_attributes", "last_commit", "id"),
            "ref": f"refs/merge-requests/{number}/head",
            "branch": _require(payload, "object_attributes", "target_branch"),
            "message": attributes.get("title") or last.get("message", ""),
            "timestamp": _iso_time(last.get("timestamp", 0)),
            "author": _dig(payload, "user", "username") or "",
            "author_email": _dig(last, "author", "email") or "",
            "author_avatar": _dig(payload, "user", "avatar_url") or "",
            "link_url": attributes.get("url", ""),
            "remote": _dig(payload, "object_attributes", "source", "git_http_url") or "",
            "before": _dig(attributes, "diff_refs", "base_sha") or "",
            "fork": attributes.get("source_project_id") != attributes.get("target_project_id"),
            "source_repo": _dig(payload, "object_attributes", "source",
                                "path_with_namespace") or "",
        }
    if kind is None and event not in ("Push Hook", "Tag Push Hook", "Merge Request Hook"):
        return None
    raise BadRequest(f"the payload is not a GitLab {event!r} of a known shape")


def _webhook_repo(api, forge, payload):
    """The repository a webhook is for: ?repo=OWNER/NAME, else the payload's name."""
    full_name = api.query().get("repo")
    if not full_name:
        full_name = _webhook_repo_name(forge, payload) if isinstance(payload, dict) else None
        if not full_name:
            raise BadRequest("the payload names no repository (or pass ?repo=OWNER/NAME)")
    owner, _, name = str(full_name).partition("/")
    try:
        return api.store.get_repo(_check_name(owner, "owner"), _check_name(name, "name"))
    except (BadRequest, NotFound):
        _log.info("webhook refused: no repository %r", str(full_name)[:200])
        raise _webhook_refused() from None


def _receive_webhook(api):
    """A forge's push, tag or pull request: verified, then built (or 204)."""
    forge, event = _webhook_forge(bottle.request.headers)
    if forge is None:
        raise BadRequest("not a webhook: no X-GitHub-Event, X-Gitea-Event, "
                         "X-Forgejo-Event or X-Gitlab-Event header")
    body = api.read_body()
    # Read once: before the signature is checked only when it must name the repository.
    payload = None if api.query().get("repo") else _parse_json(body, "webhook body")
    repo = _webhook_repo(api, forge, payload)
    try:
        _verify_webhook(forge, bottle.request.headers, body, api.store.webhook_secret(repo))
    except Forbidden as refusal:  # the reason goes to the log, not to the sender
        _log.info("webhook for %s/%s refused: %s", repo["owner"], repo["name"], refusal.message)
        raise _webhook_refused() from None
    if payload is None:
        payload = _parse_json(body, "webhook body")
    if not isinstance(payload, dict):
        raise BadRequest("the webhook body must be a JSON object")
    if event == "ping" or forge == "gitlab" and event == "System Hook":
        return {"ping": "ok", "repo": f"{repo['owner']}/{repo['name']}"}
    fields = _parse_webhook(forge, event, payload)
    if fields is None:
        return _Reply(None, 204)
    fields = {key: value if key in ("timestamp", "fork") else _text(value)
              for key, value in fields.items()}
    if fields["event"] in (EVENT_PUSH, EVENT_PULL_REQUEST) and _SKIP_PATTERN.search(
            fields["message"] or ""):
        return _Reply(None, 204)
    if fields["event"] not in json.loads(repo["events"]):
        return _Reply(None, 204)
    commit = _check_commit(fields.pop("commit"))
    branch = fields.pop("branch")
    event_name = fields.pop("event")
    try:
        build = create_build(
            api.store, repo, branch=branch, commit=commit, event=event_name,
            max_jobs=api.ops.max_jobs, pull_ref=fields["ref"] if event_name == EVENT_PULL_REQUEST
            else "", gated=True, **fields)
    except NoBuild:
        return _Reply(None, 204)  # the pipeline's branches filter: Drone answers the same
    return api.build_reply(build)


_WEBHOOK_PATHS = ("/hook", "/api/hook")
_WEBHOOK_REPLIES = {200: (_OK, {"oneOf": [_ref("Build"), {"type": "object"}]}),
                    204: ("no build for this event", None)}
_WEBHOOK_ROUTES = [
    _Route("POST", path, _receive_webhook, "signed",
           "a forge webhook (GitHub, Gitea, Forgejo, GitLab)", _WEBHOOK_REPLIES,
           query=(("repo", _STRING, "OWNER/NAME, if the payload's name differs"),))
    for path in _WEBHOOK_PATHS
]

###############################################################################
# Pages #######################################################################
###############################################################################

# Bottle's SimpleTemplate escapes every {{value}}; {{!value}} marks markup
# that a template or the log renderer made.

_PAGE_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:.6em 1.2em;display:flex;gap:1em;align-items:center;flex-wrap:wrap}
header a{color:#fff;text-decoration:none;font-weight:600}header .account{margin-left:auto}
main{max-width:1100px;margin:1.2em auto;padding:0 1em}
table{border-collapse:collapse;width:100%;background:#fff}th,td{text-align:left;padding:.35em .6em;border-bottom:1px solid #d0d7de}
th{background:#eaeef2}.status{display:inline-block;padding:0 .5em;border-radius:1em;color:#fff;font-weight:600;font-size:12px}
.s-success{background:#1a7f37}.s-failure{background:#cf222e}.s-running,.s-pending{background:#9a6700}
.s-error,.s-killed,.s-declined{background:#6e7781}.s-skipped{background:#57606a}.s-none{background:#424a53}
.s-blocked{background:#8250df}.s-stopped{background:#57606a}.blocked{background:#fbefff;border:1px solid #8250df;padding:.6em}
.log{background:#0d1117;color:#e6edf3;font:12px/1.5 ui-monospace,Menlo,Consolas,monospace;padding:.2em 0;overflow-x:auto}
.rows div{white-space:pre-wrap;word-break:break-all;padding:0 .8em 0 4.5em;text-indent:-3.7em}
.rows a{color:#8b949e;display:inline-block;width:3.2em;text-align:right;margin-right:.5em;text-indent:0;text-decoration:none}
.rows div:target{background:#264f78}.muted{color:#57606a}form.inline{display:inline}button{cursor:pointer}
.log summary{cursor:pointer;padding:.25em .8em;background:#161b22;border-top:1px solid #30363d;font-family:system-ui,sans-serif}
.log summary .muted{color:#8b949e}.failed{color:#cf222e;font-weight:600}
.wide{overflow-x:auto}.warnings{background:#fff8c5;border:1px solid #9a6700;padding:.2em .6em;margin:.6em 0}.made{background:#dafbe1;border:1px solid #1a7f37;padding:.6em}.id{word-break:break-all}pre.message{white-space:pre-wrap;word-break:break-word;margin:0}input{max-width:100%;box-sizing:border-box}input[type=password]{width:22em}
button,input,select,textarea{font:inherit;color:#1f2328;border:1px solid #8c959f;border-radius:6px;padding:.3em .6em;background:#fff}
button{background:#f6f8fa;font-weight:600}button:hover{background:#eaeef2}
button.primary{background:#1a7f37;border-color:#1a7f37;color:#fff}button.primary:hover{background:#116329}
button.danger{color:#a40e26}button.danger:hover{background:#ffebe9}
header button{background:#24292f;color:#fff;border-color:#57606a}
:focus-visible{outline:3px solid #0969da;outline-offset:2px}a{color:#0969da}
input[type=checkbox]{width:auto}textarea{width:100%;min-height:4em;box-sizing:border-box}
.card{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:.6em 1em;margin:1em 0}
.field{margin:.6em 0}.field>label,.field>legend{display:block;font-weight:600}
.field input:not([type=checkbox]),.field select{width:30em}.help{color:#57606a;font-size:13px;overflow-wrap:anywhere}
fieldset{border:1px solid #d0d7de;border-radius:6px;min-width:0}fieldset label{margin-right:1em;white-space:nowrap}
.error{background:#ffebe9;border:1px solid #cf222e;color:#82071e;padding:.6em}
.tabs{display:flex;gap:1em;flex-wrap:wrap;margin:.4em 0}.tabs a[aria-current]{font-weight:700;color:#1f2328}
.row{display:flex;gap:.6em;flex-wrap:wrap;align-items:end;margin:.3em 0}.row label{display:flex;gap:.4em;align-items:center}.row input{width:14em}
.secret{background:#fff8c5;padding:.1em .3em;word-break:break-all}
@media (max-width:640px){main{padding:0 .5em}.field input:not([type=checkbox]),.field select{width:100%}
.row label{flex:1 1 100%}.row input{flex:1;min-width:0;width:auto}}
.a1{font-weight:700}.a30{color:#8b949e}.a31{color:#ff7b72}.a32{color:#3fb950}.a33{color:#d29922}
.a34{color:#58a6ff}.a35{color:#bc8cff}.a36{color:#39c5cf}.a37{color:#e6edf3}
"""

_LIVE_LOG_SCRIPT = """
(function(){
  var log=document.getElementById('log'), state=document.getElementById('job-status');
  function focus(){var failing=document.querySelector('.step[data-failing]');
    if(!failing)return;
    document.querySelectorAll('.step').forEach(function(s){s.open=(s===failing);});
    failing.scrollIntoView();}
  focus();
  if(!log||!window.EventSource||log.dataset.done==='1')return;
  function section(number){var s=document.getElementById('step-'+number);
    if(!s){s=document.createElement('details');s.className='step';s.id='step-'+number;s.open=true;
      s.innerHTML='<summary></summary><div class=rows></div>';log.appendChild(s);}
    return s;}
  var source=new EventSource(log.dataset.stream);
  source.onmessage=function(e){var d=JSON.parse(e.data);
    section(d.step).querySelector('.rows').insertAdjacentHTML('beforeend',d.html);
    if(document.getElementById('follow').checked)window.scrollTo(0,document.body.scrollHeight);};
  source.addEventListener('steps',function(e){JSON.parse(e.data).forEach(function(d){
    var s=section(d.number);s.querySelector('summary').innerHTML=d.summary;
    if(d.failing)s.dataset.failing='1';});});
  source.addEventListener('end',function(e){var end=JSON.parse(e.data);source.close();
    state.textContent=end.status||end.error;state.className='status s-'+(end.status||'error');
    focus();});
})();
"""

# A page whose live part (#live) follows its server-sent `update` events.
_LIVE_PAGE_SCRIPT = """
(function(){
  var live=document.getElementById('live');
  if(!live||!window.EventSource||live.dataset.done==='1')return;
  var source=new EventSource(live.dataset.stream);
  source.addEventListener('update',function(e){live.innerHTML=JSON.parse(e.data).html;});
  source.addEventListener('end',function(){source.close();});
})();
"""

_TEMPLATES = {
    "layout": """<!doctype html><html lang=en><head><meta charset=utf-8>
<meta name=viewport content='width=device-width,initial-scale=1'>
<title>{{title}} - cirunner</title><link rel=icon href='{{url("/favicon.ico")}}'><style>{{!style}}</style></head>
<body><header><a href='{{url("/")}}'>cirunner</a> <a href='{{url("/queue")}}'>queue</a>
% if user:
<a href='{{url("/new")}}'>add repository</a> <a href='{{url("/tokens")}}'>tokens</a>
% end
% if user and user['admin']:
<a href='{{url("/users")}}'>users</a> <a href='{{url("/agents")}}'>agents</a>
% end
% if user:
<form class=account method="post" action="{{url('/logout')}}"><span>{{user['login']}}</span> \
<input type="hidden" name="csrf" value="{{csrf}}"><button>Sign out</button></form>
% else:
<span class=account><a href="{{url('/login')}}?next={{quote(path)}}">Sign in</a></span>
% end
</header><main>{{!body}}</main>{{!script}}</body></html>""",

    "status": """<span class="status s-{{status}}"\\\\
% if ident:
 id="{{ident}}"\\\\
% end
>{{status}}</span>""",

    "time": """% if not stamp:
<span class="muted">-</span>\\\\
% else:
<time datetime="{{exact}}" title="{{exact}}">{{ago}}</time>\\\\
% end
""",

    "home": """<h1>Repositories</h1><div class=wide><table><tr><th>repository</th>\
<th>latest build</th><th>#</th><th>branch</th><th>commit</th><th>when</th></tr>
% for repo, build in rows:
<tr><td><a href='{{url(f"/{repo['owner']}/{repo['name']}")}}'>{{repo['owner']}}/{{repo['name']}}</a>\
{{' (private)' if repo['private'] else ''}}</td>
<td>{{!label(build['status'] if build else None)}}</td>\\\\
% if build:
<td><a href='{{url(f"/{repo['owner']}/{repo['name']}/{build['number']}")}}'>#{{build['number']}}</a>\
</td><td>{{build['branch']}}</td><td><code>{{build['commit_sha'][:8]}}</code> \
{{(build['message'].splitlines() or [''])[0][:60]}}</td><td>{{!ago(build['created_at'])}}</td></tr>
% else:
<td></td><td></td><td></td><td></td></tr>
% end
% end
</table></div>
% if not rows:
<p class=muted>No repositories you may see.</p>
% end
""",

    "login": """<h1>Sign in</h1><form method=post action='{{url("/login")}}'>
<input type=hidden name=csrf value='{{csrf}}'><input type=hidden name=next value='{{next_path}}'>
<p><label>API token<br><input name=token type=password autocomplete=current-password \
autofocus></label> \
<button>Sign in</button></p></form>
<p class=muted>Make one with <code>cirunner token create LOGIN</code>.</p>""",

    "message": """<h1>{{heading}}</h1><p>{{text}}</p>
% if link:
<p><a href="{{link}}">{{link_text}}</a></p>
% end
""",

    "repo": """<h1>{{repo['owner']}}/{{repo['name']}}</h1>{{!tabs}}{{!start}}
<form method=get class=row><label>branch <input name=branch value='{{branch}}'></label> \
<label>status <select name=status>
% for choice in ("",) + statuses:
<option{{' selected' if choice == status else ''}}>{{choice}}</option>
% end
</select></label> <button>Filter</button></form>
<div id=live data-stream='{{stream}}'>{{!live}}</div>""",

    "repo_builds": """<div class=wide><table><tr><th>#</th><th>status</th><th>event</th>\
<th>branch</th><th>commit</th><th>author</th><th>started</th><th>duration</th></tr>
% for build in builds:
<tr><td><a href='{{base}}/{{build['number']}}'>#{{build['number']}}</a></td>\
<td>{{!label(build['status'])}}</td><td>{{build['event']}}</td><td>{{build['branch']}}</td>\
<td><code>{{build['commit_sha'][:8]}}</code> {{(build['message'].splitlines() or [''])[0][:100]}}</td>\
<td>{{build['author']}}</td><td>{{!ago(build['started_at'])}}</td>\
<td>{{duration(build['started_at'], build['finished_at'])}}</td></tr>
% end
</table></div><p>
% if newer:
<a href='{{newer}}'>newer</a>
% end
% if older:
<a href='{{older}}'>older</a>
% end
</p>""",

    "build": """<div id=live data-stream='{{stream}}' data-done='{{done}}'>{{!live}}</div>""",

    "build_live": """<h1><a href='{{repo_url}}'>{{repo['owner']}}/{{repo['name']}}</a> \
#{{build['number']}} {{!label(build['status'], 'build-status')}}</h1>
% if build['status'] == 'blocked':
<div class=blocked id=blocked><p>This build waits for approval: {{blocked}}. \
Opened by <b>{{build['author'] or 'someone unknown'}}</b>\
{{f" from {build['source_repo']}" if build['source_repo'] and build['source_repo'] not in blocked else ''}}. \
Read its pipeline file (<code>{{build['pipeline_file']}}</code>) before you approve it: \
it runs as written.</p>
% if would_run:
<details><summary>What it would run</summary><pre class=message id=would-run>{{would_run}}</pre>\
</details>
% end
</div>
% end
<p>
% for action in actions:
<form class=inline method=post action='{{base}}/{{action}}'>\
<input type=hidden name=csrf value='{{csrf}}'><button id={{action}}\
{{!' class=primary' if action == 'approve' else ' class=danger' if action in ('cancel', 'decline') else ''}}>\
{{action.title()}}</button></form>
% end
</p>
% if 'restart' in actions:
<details class=card><summary>Restart with changed variables</summary>
<form method=post action='{{base}}/restart' id=restart-with><input type=hidden name=csrf \
value='{{csrf}}'><p class=help>The build's variables are kept, but those you tick; a row \
here adds one or changes its value.</p>
% if kept:
<fieldset><legend>Drop</legend>
% for key, value in kept.items():
<label><input type=checkbox name=drop value='{{key}}'> <code>{{key}}={{value}}</code></label>
% end
</fieldset>
% end
{{!variables}}<p><button class=primary>Restart</button></p></form></details>
% end
<table>
<tr><th>commit</th><td><code class=id>{{build['commit_sha']}}</code></td></tr>
<tr><th>message</th><td><pre class=message>{{build['message']}}</pre></td></tr>
<tr><th>branch</th><td>{{build['branch']}}</td></tr>
<tr><th>event</th><td>{{build['event']}}</td></tr>
<tr><th>author</th><td>{{build['author']}} &lt;{{build['author_email']}}&gt;</td></tr>
<tr><th>created</th><td>{{!ago(build['created_at'])}}</td></tr>
<tr><th>duration</th><td>{{duration(build['started_at'], build['finished_at'])}}</td></tr>
% if build['error']:
<tr><th>error</th><td>{{build['error']}}</td></tr>
% end
</table>
% if warnings:
<div class=warnings id=warnings><b>The pipeline file did what Drone accepted:</b><ul>
% for warning in warnings:
<li>{{warning}}</li>
% end
</ul></div>
% end
<h2>Jobs</h2><div class=wide><table><tr><th>job</th>{{!'<th>pipeline</th>' if several else ''}}\
<th>matrix</th><th>status</th>\
<th>steps</th><th>exit</th><th>duration</th><th>error</th></tr>
% for job in jobs:
<tr><td><a href='{{base}}/{{job['number']}}' id='job-{{job['number']}}'>job {{job['number']}}</a>\
</td>{{!pipeline_cell(job) if several else ''}}<td>{{axis(job) or '-'}}</td><td>{{!label(job['status'])}}</td>\
<td>{{steps(job)}}</td><td>{{job['exit_code']}}</td>\
<td>{{duration(job['started_at'], job['finished_at'])}}</td><td>{{runner(job['error']) if job['error'] else ''}}</td></tr>
% end
</table></div><h2>History</h2><div class=wide><table id=history><tr><th>when</th>\
<th>status</th><th>message</th></tr>
% for row in history:
% if row['job_number'] is None:
<tr><td>{{!ago(row['created_at'])}}</td><td>{{!label(row['status'])}}</td>\
<td>{{row['message']}}</td></tr>
% end
% end
</table></div>
<details><summary>Every job's changes</summary><div class=wide><table id=job-history><tr>\
<th>when</th><th>job</th><th>status</th><th>message</th></tr>
% for row in history:
% if row['job_number'] is not None:
<tr><td>{{!ago(row['created_at'])}}</td><td>{{row['job_number']}}</td>\
<td>{{!label(row['status'])}}</td><td>{{runner(row['message'])}}</td></tr>
% end
% end
</table></div></details>""",

    "agents": """<h1>Agents</h1>
% if made:
<p class=made>Agent <b>{{made['name']}}</b> is made. Its token, shown this once: \
<code class=id id=agent-token>{{made['token']}}</code><br>Run on the build machine: \
<code>CIRUNNER_TOKEN=&lt;the token&gt; cirunner agent --server {{server}}</code></p>
% end
<div class=wide><table><tr><th>agent</th><th>labels</th><th>version</th><th>address</th>\
<th>last seen</th><th>workers</th><th>running jobs</th><th></th></tr>
% for agent in agents:
<tr><td>{{agent['name']}}</td>\
<td>{{', '.join(f'{key}={value}' for key, value in agent['labels'].items()) or '-'}}</td>\
<td>{{agent['version'] or '-'}}</td><td>{{agent['address'] or '-'}}</td>\
<td>{{!ago(agent['last_seen_at']) if agent['last_seen_at'] else 'never'}}</td>\
<td>{{agent['workers']}}</td><td>{{agent['running']}}</td><td><form class=inline method=post \
id='revoke-{{agent['name']}}' action='{{url(f"/agents/{agent['name']}/revoke")}}' \
onsubmit="return confirm('Revoke {{agent['name']}}? Its token stops working and its running \
jobs end as error.')"><input type=hidden name=csrf value='{{csrf}}'><button>Revoke</button>\
</form></td></tr>
% end
</table></div>
% if not agents:
<p class=muted>No agents yet: add one, then start <code>cirunner agent</code> with its token \
on the build machine.</p>
% end
<h2>Add an agent</h2><form method=post id=add-agent action='{{url("/agents")}}'>\
<input type=hidden name=csrf value='{{csrf}}'><label>name <input name=name required></label> \
<label>labels <input name=labels placeholder='arch=arm64,disk=ssd'></label> \
<button>Add</button></form>""",

    "problem": """% if error:
<p class=error role=alert id=form-error>{{error}}</p>
% end
""",

    "repo_tabs": """<nav class=tabs aria-label='{{owner}}/{{name}}'>
% for path, text in links:
<a href='{{url(f"/{owner}/{name}{path}")}}'{{!' aria-current=page' if path == here else ''}}>\
{{text}}</a>
% end
</nav>""",

    "variables": """<fieldset class=vars><legend>Variables</legend>
% for key, value in rows:
<div class=row><label>name <input name=var_name value='{{key}}' autocomplete=off \
spellcheck=false></label><label>value <input name=var_value value='{{value}}' \
autocomplete=off spellcheck=false></label></div>
% end
<button type=button class=add-row hidden>Add a variable</button></fieldset>""",

    "start_build": """<details class=card id=start{{!' open' if error else ''}}>\
<summary>Start a build</summary>{{!problem}}
<form method=post action='{{url(f"/{owner}/{name}/builds")}}' id=start-build>
<input type=hidden name=csrf value='{{csrf}}'>
<div class=field><label for=branch>Branch</label><input id=branch name=branch list=branches \
value='{{form.get("branch", "")}}' placeholder='{{default_branch or "the default branch"}}' \
aria-describedby=branch-help><datalist id=branches>
% for branch in branches:
<option value='{{branch}}'>
% end
</datalist><div class=help id=branch-help>Empty: the default branch.</div></div>
<div class=field><label for=commit>Commit</label><input id=commit name=commit \
value='{{form.get("commit", "")}}' aria-describedby=commit-help spellcheck=false>\
<div class=help id=commit-help>Empty: the branch's newest commit.</div></div>
{{!variables}}
<p><button class=primary>Start build</button></p></form></details>""",

    "new_repo": """<h1>Add a repository</h1>{{!problem}}
<form method=post class=card action='{{url("/new")}}' id=add-repo>
<input type=hidden name=csrf value='{{csrf}}'>
<div class=field><label for=owner>Owner</label><input id=owner name=owner required \
value='{{form.get("owner", login)}}' aria-describedby=owner-help>\
<div class=help id=owner-help>Yours ({{login}}){{', or anyone\\'s: you are an admin' if admin else ''}}.\
</div></div>
<div class=field><label for=name>Name</label><input id=name name=name required \
value='{{form.get("name", "")}}'></div>
<div class=field><label for=url>Clone URL</label><input id=url name=url required \
value='{{form.get("url", "")}}' placeholder='https://example.com/you/project.git' \
aria-describedby=url-help spellcheck=false><div class=help id=url-help>https://, ssh://, \
git:// or git@host:path{{'; admins may also give a path on this machine' if admin else ''}}.\
</div></div>
<div class=field><input type=hidden name=private value=false><label><input type=checkbox \
name=private value=true{{' checked' if form.get("private", "true") == "true" else ''}}> \
Private: only you and admins see it</label></div>
<p><button class=primary>Add repository</button></p></form>""",

    "settings": """<h1>{{owner}}/{{name}}: settings</h1>{{!tabs}}{{!problem}}
% if saved:
<p class=made role=status id=saved>Saved.</p>
% end
<form method=post class=card action='{{url(f"/{owner}/{name}/settings")}}' id=settings>
<input type=hidden name=csrf value='{{csrf}}'>
% for field in fields:
% ident = 'f-' + field['name']
% if field['kind'] == 'checkbox':
<div class=field><input type=hidden name='{{field['name']}}' value=false><label>\
<input type=checkbox name='{{field['name']}}' value=true aria-describedby='{{ident}}-help'\
{{' checked' if field['value'] else ''}}> {{field['label']}}</label>
% elif field['kind'] == 'events':
<fieldset class=field><legend>{{field['label']}}</legend>\
<input type=hidden name=events_shown value=1>
% for event in field['options']:
<label><input type=checkbox name=events value='{{event}}'\
{{' checked' if event in field['value'] else ''}}> {{event}}</label>
% end
% elif field['kind'] == 'select':
<div class=field><label for='{{ident}}'>{{field['label']}}</label><select id='{{ident}}' \
name='{{field['name']}}' aria-describedby='{{ident}}-help'>
% for option in field['options']:
<option{{' selected' if option == field['value'] else ''}}>{{option}}</option>
% end
</select>
% else:
<div class=field><label for='{{ident}}'>{{field['label']}}</label><input id='{{ident}}' \
name='{{field['name']}}' type='{{field['kind']}}' value='{{field['value']}}' \
aria-describedby='{{ident}}-help' spellcheck=false \
autocomplete='{{'new-password' if field['kind'] == 'password' else 'off'}}'>
% end
<div class=help id='{{ident}}-help'>{{field['help']}}</div>{{!'</fieldset>' if field['kind'] == 'events' else '</div>'}}
% end
<p><button class=primary>Save settings</button></p></form>
<h2 id=webhook>Webhook</h2><div class=card>
<p>Payload URL: <code class=id id=webhook-url>{{webhook_url}}</code></p>
% if secret:
<p>Secret: <code class=secret id=webhook-secret>{{secret}}</code> \
<button type=button class=copy data-copy=webhook-secret hidden>Copy</button></p>
% end
<form method=post class=inline id=webhook-form \
action='{{url(f"/{owner}/{name}/settings/webhook")}}'>\
<input type=hidden name=csrf value='{{csrf}}'><button name=do value=show id=show-secret>\
Show the secret</button> <button name=do value=rotate class=danger id=rotate-secret \
onclick="return confirm('Make a new webhook secret? The forge\\'s webhook fails until you paste it there.')">\
Make a new secret (the old one stops working)</button></form>
<details><summary>GitHub</summary><ol><li>In the repository: Settings, Webhooks, Add webhook.\
</li><li>Payload URL: the URL above; Content type: <code>application/json</code>; Secret: the \
secret.</li><li>Events: "Let me select individual events": Pushes, Pull requests, and \
Branch or tag creation.</li></ol></details>
<details><summary>Gitea and Forgejo</summary><ol><li>In the repository: Settings, Webhooks, \
Add webhook, Gitea (or Forgejo).</li><li>Target URL: the URL above; HTTP method POST; POST \
content type <code>application/json</code>; Secret: the secret.</li><li>Trigger on: Push \
events, Create (tags) and Pull request events.</li></ol></details>
<details><summary>GitLab</summary><ol><li>In the project: Settings, Webhooks, Add new webhook.\
</li><li>URL: the URL above; Secret token: the secret.</li><li>Trigger: Push events, Tag \
push events and Merge request events.</li></ol></details></div>
<h2>Delete</h2><form method=post class=card id=delete-repo \
action='{{url(f"/{owner}/{name}/settings/delete")}}' \
onsubmit="return confirm('Delete {{owner}}/{{name}}, every build and log of it? This cannot be undone.')">\
<input type=hidden name=csrf value='{{csrf}}'><p>Deletes the repository with every build, \
log, secret and schedule of it. This cannot be undone.</p>\
<button class=danger>Delete {{owner}}/{{name}}</button></form>""",

    "secrets": """<h1>{{owner}}/{{name}}: secrets</h1>{{!tabs}}{{!problem}}
<p class=muted>Values are never shown again: a step gets a secret as a variable, and its \
value is masked in logs.</p>
<div class=wide><table><tr><th>name</th><th>events</th><th>pull requests</th><th>images</th>\
<th></th></tr>
% for secret in secrets:
<tr><td><code>{{secret['name']}}</code></td><td>{{', '.join(secret['events'])}}</td>\
<td>{{'yes' if 'pull_request' in secret['events'] else 'no'}}</td>\
<td>{{', '.join(secret['images']) or 'any'}}</td><td>\
<a href='?name={{secret['name']}}#add-secret'>Replace</a> <form class=inline method=post \
onsubmit="return confirm('Delete secret {{secret['name']}}?')" \
action='{{url(f"/{owner}/{name}/secrets/{secret['name']}/delete")}}'>\
<input type=hidden name=csrf value='{{csrf}}'><button class=danger \
aria-label='Delete {{secret['name']}}'>Delete</button></form></td></tr>
% end
</table></div>
% if not secrets:
<p class=muted>No secrets yet.</p>
% end
<h2>Add or replace a secret</h2>
<form method=post class=card action='{{url(f"/{owner}/{name}/secrets")}}' id=add-secret>
<input type=hidden name=csrf value='{{csrf}}'>
<div class=field><label for=secret-name>Name</label><input id=secret-name name=name required \
value='{{form.get("name", "")}}' spellcheck=false aria-describedby=secret-name-help>\
<div class=help id=secret-name-help>A variable name, e.g. DOCKER_PASSWORD. A name that \
exists is replaced.</div></div>
<div class=field><label for=secret-value>Value</label><textarea id=secret-value name=value \
required autocomplete=off spellcheck=false></textarea></div>
<fieldset class=field><legend>Events</legend>
% for event in events:
<label><input type=checkbox name=events value='{{event}}'\
{{' checked' if event in chosen else ''}}> {{event}}</label>
% end
<div class=help>A pull request may come from a fork: give it a secret only if you trust every \
fork's author.</div></fieldset>
<div class=field><label for=secret-images>Images</label><input id=secret-images name=images \
value='{{form.get("images", "")}}' placeholder='plugins/docker, plugins/*' \
aria-describedby=secret-images-help spellcheck=false><div class=help id=secret-images-help>\
Only steps with these images get it (comma-separated); empty: every step's image.</div></div>
<p><button class=primary>Save secret</button></p></form>""",

    "schedules": """<h1>{{owner}}/{{name}}: schedules</h1>{{!tabs}}{{!problem}}
<div class=wide><table><tr><th>name</th><th>when (UTC)</th><th>branch</th>\
<th>next runs</th><th></th></tr>
% for cron in crons:
<tr><td>{{cron['name']}}</td><td><code>{{cron['expression']}}</code><br>{{cron['words']}}</td>\
<td>{{cron['branch'] or default_branch or 'default'}}</td><td>{{!'<br>'.join(cron['next'])}}</td>\
<td>
% if may_write:
<form class=inline method=post onsubmit="return confirm('Remove schedule {{cron['name']}}?')" \
action='{{url(f"/{owner}/{name}/schedules/{cron['name']}/delete")}}'>\
<input type=hidden name=csrf value='{{csrf}}'><button class=danger \
aria-label='Remove {{cron['name']}}'>Remove</button></form>
% end
</td></tr>
% end
</table></div>
% if not crons:
<p class=muted>No schedules.</p>
% end
% if may_write:
<h2>Add a schedule</h2>
<form method=post class=card action='{{url(f"/{owner}/{name}/schedules")}}' id=add-schedule>
<input type=hidden name=csrf value='{{csrf}}'>
<div class=field><label for=cron-name>Name</label><input id=cron-name name=name required \
value='{{form.get("name", "")}}'></div>
<div class=field><label for=cron-expression>Cron expression</label><input id=cron-expression \
name=expression required value='{{form.get("expression", "")}}' placeholder='0 3 * * *' \
aria-describedby=cron-help spellcheck=false><div class=help id=cron-help>Five fields, in UTC: \
minute, hour, day of month, month, day of week. <code>0 3 * * 1-5</code> is 03:00 on weekdays.\
</div></div>
<div class=field><label for=cron-branch>Branch</label><input id=cron-branch name=branch \
value='{{form.get("branch", "")}}' placeholder='{{default_branch or "the default branch"}}'>\
</div>
% if preview:
<p class=made role=status id=preview>{{preview['words']}}. Next runs: \
{{!', '.join(preview['next'])}}.</p>
% end
<p><button name=check value=1 id=check-schedule>Check</button> \
<button class=primary>Add schedule</button></p></form>
% end""",

    "tokens": """<h1>Your tokens</h1>{{!problem}}
% if made:
<p class=made role=status>Token <b>{{made['name'] or made['id']}}</b> is made. Copy it now: \
it is shown this once.<br><code class=secret id=new-token>{{made['token']}}</code> \
<button type=button class=copy data-copy=new-token hidden>Copy</button></p>
% end
<div class=wide><table><tr><th>name</th><th>scope</th><th>made</th><th>last used</th><th></th>\
</tr>
% for token in tokens:
<tr><td>{{token['name'] or '-'}}{{' (this session)' if token['id'] == current else ''}}</td>\
<td>{{token['scope']}}</td><td>{{!ago(token['created_at'])}}</td>\
<td>{{!ago(token['last_used_at'])}}</td><td><form class=inline method=post \
onsubmit="return confirm('Revoke this token? What uses it stops working.')" \
action='{{url(f"/tokens/{token['id']}/revoke")}}'><input type=hidden name=csrf \
value='{{csrf}}'><button class=danger id='revoke-{{token['id']}}' \
aria-label='Revoke {{token['name'] or token['id']}}'>Revoke</button></form></td></tr>
% end
</table></div>
<h2>Make a token</h2>
<form method=post class=card action='{{url("/tokens")}}' id=make-token>
<input type=hidden name=csrf value='{{csrf}}'>
<div class=field><label for=token-name>Name</label><input id=token-name name=name \
value='{{form.get("name", "")}}' placeholder='laptop, ci-script' maxlength=100></div>
<div class=field><label for=token-scope>Scope</label><select id=token-scope name=scope>\
<option value=write>write: everything you may do</option>\
<option value=read>read: see builds and logs only</option></select></div>
<p><button class=primary>Make token</button></p></form>""",

    "users": """<h1>Users</h1>{{!problem}}
% if made:
<p class=made role=status>User <b>{{made['login']}}</b> is added. Their sign-in token, shown \
this once: <code class=secret id=new-token>{{made['token']}}</code> \
<button type=button class=copy data-copy=new-token hidden>Copy</button><br>Give it to them: \
they sign in with it, then make their own tokens.</p>
% end
<div class=wide><table><tr><th>login</th><th>email</th><th>admin</th><th>added</th><th></th>\
</tr>
% for user in users:
<tr><td>{{user['login']}}</td><td>{{user['email'] or '-'}}</td>\
<td>{{'yes' if user['admin'] else 'no'}}</td><td>{{!ago(user['created_at'])}}</td><td>
% if user['login'] != me:
<form class=inline method=post action='{{url(f"/users/{user['login']}/admin")}}'>\
<input type=hidden name=csrf value='{{csrf}}'><input type=hidden name=admin \
value='{{'false' if user['admin'] else 'true'}}'><button id='admin-{{user['login']}}'>\
{{'Remove admin' if user['admin'] else 'Make admin'}}</button></form> \
<form class=inline method=post onsubmit="return confirm('Remove {{user['login']}} and their tokens?')" \
action='{{url(f"/users/{user['login']}/remove")}}'>\
<input type=hidden name=csrf value='{{csrf}}'><button class=danger \
id='remove-{{user['login']}}'>Remove</button></form>
% end
</td></tr>
% end
</table></div>
<h2>Add a user</h2>
<form method=post class=card action='{{url("/users")}}' id=add-user>
<input type=hidden name=csrf value='{{csrf}}'>
<div class=field><label for=login>Login</label><input id=login name=login required \
value='{{form.get("login", "")}}'></div>
<div class=field><label for=email>Email</label><input id=email name=email type=email \
value='{{form.get("email", "")}}'></div>
<div class=field><label><input type=checkbox name=admin value=true> Admin</label></div>
<p><button class=primary>Add user</button></p></form>""",

    "queue": """<h1>Queue</h1>
<div id=live data-stream='?events=1'>{{!live}}</div>""",

    "queue_live": """<p>{{busy}} of {{workers}} worker(s) busy{{'; the server is draining' if draining else ''}}.</p>
<h2>Waiting</h2>
% if pending:
<div class=wide><table><tr><th>#</th><th>job</th><th>waiting</th><th>why</th></tr>
% for item in pending:
<tr><td>{{item['position']}}</td><td><a href='{{url(f"/{item['repo']}/{item['build']}/{item['job']}")}}'>\
{{item['repo']}} #{{item['build']}} job {{item['job']}}</a></td>\
<td>{{seconds(item['waiting_seconds'])}}</td><td class=reason>{{item['reason']}}</td></tr>
% end
</table></div>
% else:
<p class=muted>No job waits.</p>
% end
<h2>Running</h2>
% if running:
<div class=wide><table><tr><th>job</th><th>running</th><th>on</th><th>doing</th></tr>
% for item in running:
<tr><td><a href='{{url(f"/{item['repo']}/{item['build']}/{item['job']}")}}'>\
{{item['repo']}} #{{item['build']}} job {{item['job']}}</a></td>\
<td>{{seconds(item['running_seconds'])}}</td><td>{{runner(item['runner'])}}</td>\
<td>{{item['activity'] or '-'}}</td></tr>
% end
</table></div>
% else:
<p class=muted>Nothing runs.</p>
% end""",

    "job": """<h1><a href='{{base}}'>{{repo['owner']}}/{{repo['name']}} #{{build['number']}}</a> \
job {{job['number']}} {{!label(job['status'], 'job-status')}}</h1>
% if failing:
<p class=failed id=failed>failed in <a href='#step-{{failing['number']}}'>{{failing['name']}}</a>\
{{failing['detail']}}</p>
% end
<nav class=tabs aria-label=jobs>
% if previous:
<a id=previous-job href='{{base}}/{{previous}}'>&larr; job {{previous}}</a>
% end
% if following:
<a id=next-job href='{{base}}/{{following}}'>job {{following}} &rarr;</a>
% end
</nav>
% if may_cancel:
<form class=inline method=post action='{{base}}/{{job['number']}}/cancel'>\
<input type=hidden name=csrf value='{{csrf}}'><button class=danger id=cancel-job>Cancel this job\
</button></form>
% end
<p>{{axis}} <a href='{{raw}}'>raw log</a> \
<label><input type=checkbox id=follow checked> follow</label></p>
% if start > 0 or later:
<p id=log-window>Showing bytes {{start}} to {{end}} of {{size}}.
% if start > 0:
<a id=earlier href='?to={{start}}'>load earlier output</a>
% end
% if later:
<a id=later href='?from={{later}}'>load later output</a> <a href='?'>the end</a>
% end
</p>
% end
<div class=log id=log data-done='{{0 if live else 1}}' \
data-stream='{{raw}}?follow=1&format=html&offset={{end}}&line={{next_line}}'>
% for section in sections:
<details class=step id='step-{{section['number']}}'{{!' data-failing=1' if section['failing'] else ''}}\
{{!' open' if section['open'] else ''}}><summary>{{!section['summary']}}</summary>\
<div class=rows>{{!section['rows']}}</div></details>
% end
</div>""",
}


def _ago_text(stamp):
    seconds = max(0, int(time.time()) - stamp)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def _duration(start, end):
    if not start:
        return "-"
    seconds = max(0, (end or int(time.time())) - start)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def _steps_text(steps):
    """A job's steps in a few words, for the build page: how many, and the
    first that failed or the one running."""
    if not steps:
        return "-"
    failed = next((step for step in steps if step["status"] in _FAILED_STATUSES), None)
    running = next((step for step in steps if step["status"] == RUNNING), None)
    done = sum(step["status"] in DONE_STATUSES for step in steps)
    text = f"{done} of {len(steps)} done"
    if failed:
        return f"{text}; {failed['name']} ended {failed['status']}"
    return f"{text}; {running['name']} running" if running else text


# The favicon, 16x16: a green badge with a white tick ("." clear, "#" green, "o" white).
_FAVICON_ART = (
    "....######......", "..##########....", ".############...", ".############...",
    "#############o##", "############oo##", "###########ooo##", "##o#######ooo###",
    "##oo#####ooo####", "##ooo###ooo#####", ".##ooo#ooo####..", ".###ooooo#####..",
    "..###ooo#####...", "...#########....", ".....#####......", "................")


@functools.lru_cache(maxsize=1)
def _favicon():
    """_FAVICON_ART as a Windows icon (one 32-bit bitmap): what browsers ask
    /favicon.ico for."""
    colours = {".": b"\0\0\0\0", "#": b"\x37\x7f\x1a\xff", "o": b"\xff\xff\xff\xff"}
    pixels = b"".join(colours[char] for row in reversed(_FAVICON_ART) for char in row)
    mask = b"\0" * (4 * 16)  # rows of 16 bits, padded to 32: the alpha channel decides
    header = struct.pack("<IiiHHIIiiII", 40, 16, 32, 1, 32, 0, len(pixels) + len(mask),
                         0, 0, 0, 0)
    image = header + pixels + mask
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32,
                                                      len(image), 22) + image


def _keep_credentials(typed, stored):
    """A clone URL typed over its redacted form (``https://***@host/...``)
    with the stored URL's credentials in place of the ``***``."""
    userinfo = urlsplit(stored).netloc.rpartition("@")[0] if "://" in stored else ""
    if userinfo and "://***@" in typed:
        return typed.replace("://***@", f"://{userinfo}@", 1)
    return typed


def _cron_words(expression):
    """A cron expression in words ("At 03:00 on Monday through Friday")."""
    cronsim = _optional("cronsim", "cron schedules", "cronsim")
    try:
        return cronsim.CronSim(expression, datetime.now(timezone.utc)).explain()
    except (cronsim.CronSimError, ValueError, AttributeError):
        return ""


def _seconds_text(seconds):
    """How long, in the largest two units ("3 min 5 s")."""
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


_RUNNER_ID = re.compile(r"\b([\w.-]+):(\d+):[0-9a-f]{8}\b")


def _runner_text(text):
    """Runner ids (HOST:PID:RANDOM) in `text` as a reader wants them: "HOST
    (process PID)"."""
    return _RUNNER_ID.sub(r"\1 (process \2)", text or "") or "-"


# Progressive enhancement of the forms: copy buttons, and a button that adds
# a variable row (without JavaScript, the forms work as they are).
_FORM_SCRIPT = """
(function(){
  document.querySelectorAll('button.copy').forEach(function(button){
    if(!navigator.clipboard)return;button.hidden=false;
    button.addEventListener('click',function(){
      navigator.clipboard.writeText(document.getElementById(button.dataset.copy).textContent)
        .then(function(){button.textContent='Copied';});});});
  document.querySelectorAll('button.add-row').forEach(function(button){
    button.hidden=false;button.addEventListener('click',function(){
      var rows=button.parentNode.querySelectorAll('.row'),row=rows[rows.length-1].cloneNode(true);
      row.querySelectorAll('input').forEach(function(input){input.value='';});
      button.parentNode.insertBefore(row,button);row.querySelector('input').focus();});});
})();
"""


def _same_server_path(value):
    """`value` if it is a path on this server, else "/": a sign-in sends the
    browser there. No scheme or host, no backslash, no whitespace or control
    character anywhere: browsers drop tabs and newlines from a URL, so a tab
    between two slashes would make "//evil.example"."""
    if (not isinstance(value, str) or not value.startswith("/") or value.startswith("//")
            or any(char == "\\" or char.isspace() or not char.isprintable() for char in value)
            or urlsplit(value).netloc):
        return "/"
    return value


class _Pages:
    """The web pages: repositories, builds, a build, a job's live log, sign-in.

    Forms post with a CSRF token that is also a signed cookie; a browser signs
    in with an API token and gets a signed session cookie naming that token.
    """

    def __init__(self, store, access, ops, log_html, *, streams, closing,
                 heartbeat=SSE_HEARTBEAT_SECONDS, secure_cookies=False):
        self.store = store
        self.access = access
        self.ops = ops
        self.log_html = log_html
        self.streams = streams
        self.closing = closing
        self.heartbeat = heartbeat
        self.csrf = _Signer(store.sealer.derive("csrf"))
        self.csrf_key = store.sealer.derive("csrf token")
        self.secure_cookies = secure_cookies
        self._templates = {name: bottle.SimpleTemplate(source)
                           for name, source in _TEMPLATES.items()}

    # -- helpers --------------------------------------------------------------

    def render(self, template, /, **values):
        return self._templates[template].render(url=_url, **values)

    def label(self, status, ident=""):
        return self.render("status", status=status or "none", ident=ident)

    def ago(self, stamp):
        exact = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp)) if stamp else ""
        return self.render("time", stamp=stamp, exact=exact, ago=_ago_text(stamp or 0))

    def secure(self):
        """Whether cookies must only travel over HTTPS: the server's public URL
        is https://, or this request came over HTTPS."""
        return self.secure_cookies or bottle.request.urlparts.scheme == "https"

    def _browser(self):
        """This browser's signed id (a cookie), made on first need."""
        request = bottle.request
        cookie = request.environ.get("cirunner.csrf") or request.get_cookie(CSRF_COOKIE) or ""
        if not (self.csrf.verify(cookie) or "").startswith("browser-"):
            cookie = self.csrf.sign(f"browser-{secrets.token_urlsafe(16)}", 10 * 365 * 86400)
            bottle.response.set_cookie(CSRF_COOKIE, cookie, httponly=True, samesite="strict",
                                       path="/", secure=self.secure())
        request.environ["cirunner.csrf"] = cookie
        return cookie

    def csrf_token(self):
        """The token this browser's forms carry: bound to its id and to its
        session, so that a form made before a sign-in or a sign-out, or for
        another session, is refused."""
        session = bottle.request.get_cookie(SESSION_COOKIE) or ""
        return hmac.new(self.csrf_key, f"{self._browser()}|{session}".encode(),
                        hashlib.sha256).hexdigest()

    def check_csrf(self):
        """The posted form, if it carries this browser's CSRF token for its
        session; else Forbidden, saying what to do."""
        try:
            form = bottle.request.forms.decode()
            posted = form.get("csrf", "")
        except UnicodeError:
            raise BadRequest("the form is not UTF-8 text") from None
        cookie = bottle.request.get_cookie(CSRF_COOKIE) or ""
        if not (self.csrf.verify(cookie) or "").startswith("browser-"):
            raise Forbidden("this form came without this site's cookie: let your browser keep "
                            "cookies from this site, reload the page and try again")
        if not hmac.compare_digest(posted, self.csrf_token()):
            raise Forbidden("this form is out of date (you signed in or out since it was "
                            "shown, perhaps in another tab): reload the page and try again")
        return form

    def page(self, title, body, status=200, script=""):
        bottle.response.status = status
        bottle.response.content_type = "text/html; charset=utf-8"
        # Pages act (approve, rotate a secret): no other site may frame them.
        bottle.response.set_header("X-Frame-Options", "DENY")
        bottle.response.set_header("Content-Security-Policy", "frame-ancestors 'none'")
        try:
            user = self.access.user(bottle.request)
        except Unauthorized:  # an error page for bad credentials shows as for a guest
            user = None
        return self.render("layout", title=title, style=_PAGE_STYLE, body=body,
                           user=user, csrf=self.csrf_token(),
                           path=bottle.request.path, quote=quote,
                           script=f"<script>{script}{_FORM_SCRIPT}</script>")

    @staticmethod
    def shown_once():
        """A page that shows a secret once: not kept by the browser (Back)."""
        bottle.response.set_header("Cache-Control", "no-store")

    def favicon(self):
        bottle.response.content_type = "image/x-icon"
        bottle.response.set_header("Cache-Control", "max-age=86400")
        return _favicon()

    def error_page(self, error):
        return self.page(error.code, self.render("message", heading=str(error.status),
                                                 text=error.message, link=""), error.status)

    def caller(self):
        return self.access.user(bottle.request)

    def readable_repo(self, owner, name):
        return self.ops.find_repo(self.caller(), owner, name)

    def find_build(self, repo, number):
        return self.store.get_build(repo["id"], _check_positive(number, "build number"))

    # -- pages ------------------------------------------------------------------

    def home(self):
        user = self.access.user(bottle.request)
        rows = []
        for repo in self.store.list_repos():
            if self.access.may_read(user, repo):
                build = None
                with contextlib.suppress(NotFound):
                    build = self.store.latest_build(repo["id"])
                rows.append((repo, build))
        return self.page("Repositories", self.render("home", rows=rows, label=self.label,
                                                     ago=self.ago))

    def login_form(self):
        return self.page("Sign in", self.render(
            "login", csrf=self.csrf_token(),
            next_path=_same_server_path(bottle.request.query.get("next", "/"))))

    def login(self):
        form = self.check_csrf()
        user = self.store.authenticate(form.get("token", "").strip())
        if user is None:
            return self.page("Sign in", self.render(
                "message", heading="Sign in", text="That token is not valid.", link=_url("/login"),
                link_text="Try again"), 401)
        bottle.response.set_cookie(SESSION_COOKIE, self.access.session_cookie(user),
                                   httponly=True, samesite="strict", path="/",
                                   max_age=SESSION_SECONDS, secure=self.secure())
        bottle.redirect(_url(_same_server_path(form.get("next", "/"))), 303)

    def logout(self):
        self.check_csrf()
        bottle.response.delete_cookie(SESSION_COOKIE, path="/")
        bottle.redirect(_url("/"), 303)

    def repo_page(self, owner, name, error="", form=None):
        repo = self.readable_repo(owner, name)
        params = dict(bottle.request.query.decode().items())
        page = _check_int(params.get("page"), "page", default=1, minimum=1, maximum=10 ** 9)
        status = params.get("status") or None
        if status is not None and status not in BUILD_STATUSES:
            raise BadRequest(f"status must be one of {', '.join(BUILD_STATUSES)}")
        branch = params.get("branch") or None
        query = "&".join(f"{key}={quote(value)}" for key, value in (("branch", branch),
                                                                     ("status", status)) if value)

        def live():
            builds = self.store.list_builds(repo["id"], offset=(page - 1) * DEFAULT_PER_PAGE,
                                            limit=DEFAULT_PER_PAGE + 1, branch=branch,
                                            status=status)
            return builds, lambda: self.render(
                "repo_builds", builds=builds[:DEFAULT_PER_PAGE], base=_url(f"/{owner}/{name}"),
                label=self.label, ago=self.ago, duration=_duration,
                newer=f"?page={page - 1}&{query}" if page > 1 else "",
                older=f"?page={page + 1}&{query}" if len(builds) > DEFAULT_PER_PAGE else "")

        if bottle.request.query.get("events"):
            return self.updates(live, lambda: False)
        start = ""
        if self.access.may_write(self.access.user(bottle.request), owner):
            start = self.render(
                "start_build", owner=owner, name=name, problem=self.problem(error),
                error=error, form=form or {}, csrf=self.csrf_token(),
                branches=self.store.git.known_branches(repo),
                default_branch=repo["default_branch"]
                or self.store.git.remembered_default_branch(repo),
                variables=self.variables(self.form_rows(form) if form else []))
        body = self.render("repo", repo=repo, branch=branch or "", status=status,
                           statuses=BUILD_STATUSES, live=live()[1](), tabs=self.tabs(repo, ""),
                           start=start or self.problem(error),
                           stream=f"?events=1&page={page}&{query}")
        return self.page(f"{owner}/{name}", body, status=bottle.response.status_code,
                         script=_LIVE_PAGE_SCRIPT)

    def build_page(self, owner, name, number):
        repo = self.readable_repo(owner, name)
        may_write = self.access.may_write(self.access.user(bottle.request), owner)
        build_id = self.find_build(repo, number)["id"]
        csrf = self.csrf_token()

        def live():
            build = self.store.get_build_by_id(build_id)
            jobs = _in_graph_order(self.store.list_jobs(build_id))
            steps = self.store.list_steps([job["id"] for job in jobs])
            history = self.store.list_statuses(build_id)
            actions = (() if not may_write else ("approve", "decline")
                       if build["status"] == BLOCKED else ("cancel",)
                       if build["status"] in ACTIVE_STATUSES else ("restart",))
            blocked = next((row["message"].partition(": ")[2] for row in reversed(history)
                            if row["status"] == BLOCKED and row["job_id"] is None), "")
            return (build, jobs, steps, len(history), actions), lambda: self.render(
                "build_live", repo=repo, build=build, jobs=jobs, history=history,
                actions=actions, blocked=blocked, csrf=csrf, would_run=would_run(build),
                variables=self.variables([]) if "restart" in actions else "",
                kept=json.loads(build["variables"] or "{}"),
                warnings=json.loads(build["warnings"] or "[]"),
                base=_url(f"/{owner}/{name}/{build['number']}"),
                repo_url=_url(f"/{owner}/{name}"), label=self.label, ago=self.ago,
                runner=_runner_text,
                duration=_duration, steps=lambda job: _steps_text(steps[job["id"]]),
                axis=lambda job: _axis_text(json.loads(job["environment"])),
                several=len({job["pipeline"] for job in jobs}) > 1, pipeline_cell=_pipeline_cell)

        def would_run(build):
            if build["status"] != BLOCKED or not build["pipeline_id"]:
                return ""
            return self.store.get_pipeline(build["pipeline_id"])["text"]

        def done():
            return self.store.get_build_by_id(build_id)["status"] in DONE_STATUSES

        if bottle.request.query.get("events"):
            return self.updates(live, done)
        (build, *_), render = live()
        body = self.render("build", live=render(), stream="?events=1",
                           done=int(build["status"] in DONE_STATUSES))
        return self.page(f"{owner}/{name} #{build['number']}", body, script=_LIVE_PAGE_SCRIPT)

    def updates(self, live, done):
        """A live page's Server-Sent Events: `update` with the HTML of its live
        part whenever what it shows changed (looked at when the store says
        something happened, at least every half second), a heartbeat comment
        when quiet, and `end` once `done()` (or once what it shows is gone)."""
        def events():
            shown, quiet_since = None, time.monotonic()
            while not self.closing.is_set():
                seen = self.store.log_events_seen()
                try:
                    finished = done()
                    state, render = live()
                except NotFound:  # deleted (or pruned) while the page was open
                    yield b"event: end\ndata: {}\n\n"
                    return
                if state != shown:
                    shown, quiet_since = state, time.monotonic()
                    yield f"event: update\ndata: {json.dumps({'html': render()})}\n\n".encode()
                elif time.monotonic() - quiet_since >= self.heartbeat:
                    quiet_since = time.monotonic()
                    yield b": heartbeat\n\n"
                if finished:
                    yield b"event: end\ndata: {}\n\n"
                    return
                self.store.wait_for_log(0.5, seen)

        return _send(_sse_reply(self.streams.take(events())))

    def build_action(self, owner, name, number, action):
        """Cancel, restart, approve or decline a build from its page (a form
        with the CSRF token); a restart may change variables."""
        form = self.check_csrf()
        caller = self.caller()
        number = _check_positive(number, "build number")
        if action == "cancel":
            self.ops.cancel_build(caller, owner, name, number, wait=False)
        elif action == "restart":
            dropped = dict.fromkeys(form.getall("drop"))  # {NAME: None}: not kept
            self.ops.restart_build(caller, owner, name, number,
                                   {"variables": {**dropped, **self.form_variables(form)}})
        else:
            getattr(self.ops, f"{action}_build")(caller, owner, name, number)
        bottle.redirect(_url(f"/{owner}/{name}/{number}"), 303)

    def cancel(self, owner, name, number):
        return self.build_action(owner, name, number, "cancel")

    def restart(self, owner, name, number):
        return self.build_action(owner, name, number, "restart")

    def approve(self, owner, name, number):
        return self.build_action(owner, name, number, "approve")

    def decline(self, owner, name, number):
        return self.build_action(owner, name, number, "decline")

    def agents_page(self, made=None):
        """The agents (admins): name, labels, version, address, last seen,
        workers and running jobs; a form to add one (its token shown once) and
        a button to revoke each."""
        agents = self.ops.list_agents(self.caller())
        bottle.response.status = 201 if made else 200
        if made:
            self.shown_once()
        body = self.render("agents", agents=agents, made=made, csrf=self.csrf_token(),
                           ago=self.ago, server=bottle.request.url.rsplit("/agents", 1)[0])
        return self.page("Agents", body, status=bottle.response.status_code)

    def add_agent(self):
        form = self.check_csrf()
        made = self.ops.add_agent(self.caller(), {"name": form.get("name", "").strip(),
                                                  "labels": form.get("labels", "").strip()})
        return self.agents_page(made)

    def revoke_agent(self, agent):
        self.check_csrf()
        self.ops.remove_agent(self.caller(), agent)
        bottle.redirect(_url("/agents"), 303)

    # -- forms ------------------------------------------------------------------

    def submit(self, show, act, then=None):
        """A form's POST: the CSRF check, then `act(caller, form)`: its page,
        or (None) 303 to the page `then`. A refusal (bad input, a conflict, not
        allowed) shows the form's page again with the API's message, what was
        typed and the error's status: `show(error=..., form=...)`."""
        form = self.check_csrf()
        caller = self.caller()
        if caller is None:
            raise Unauthorized("sign in first")
        try:
            answer = act(caller, form)
        except Unauthorized:
            raise
        except CIRunnerError as error:
            bottle.response.status = error.status
            return show(error=error.message, form=form)
        if answer is None and then is not None:
            bottle.redirect(_url(then), 303)
        return answer

    def problem(self, error):
        return self.render("problem", error=error)

    def tabs(self, repo, here):
        may_write = self.access.may_write(self.access.user(bottle.request), repo["owner"])
        links = [(path, text) for path, text in (("", "builds"), ("/settings", "settings"),
                                                 ("/secrets", "secrets"),
                                                 ("/schedules", "schedules"))
                 if may_write or path in ("", "/schedules")]
        return self.render("repo_tabs", owner=repo["owner"], name=repo["name"], links=links,
                           here=here)

    def variables(self, rows):
        """The name/value rows of a build's variables (two empty ones after)."""
        return self.render("variables", rows=[*rows, ("", ""), ("", "")])

    @staticmethod
    def form_rows(form):
        """A form's variable rows as typed: [(name, value)], empty ones left out."""
        return [(key, value) for key, value in zip(form.getall("var_name"),
                                                   form.getall("var_value")) if key or value]

    def form_variables(self, form):
        """{name: value} from a form's variable rows; a value without a name
        is refused."""
        variables = {}
        for key, value in self.form_rows(form):
            key = key.strip()
            if key:
                variables[key] = value
            elif value:
                raise BadRequest(f"the variable with value {value[:40]!r} has no name")
        return variables

    # -- repositories -----------------------------------------------------------

    def new_repo_page(self, error="", form=None):
        caller = self.caller()
        if caller is None:
            raise Unauthorized("sign in to add a repository")
        body = self.render("new_repo", problem=self.problem(error), form=form or {},
                           csrf=self.csrf_token(), login=caller["login"],
                           admin=bool(caller["admin"]))
        return self.page("Add a repository", body, status=bottle.response.status_code)

    def add_repo(self):
        def act(caller, form):
            owner, name = form.get("owner", "").strip(), form.get("name", "").strip()
            params = {"url": form.get("url", "").strip(),
                      "private": form.get("private", "true") == "true"}
            made = self.ops.add_repo(caller, owner, name, params, base_url=_base_url())
            bottle.response.status = 201
            return self.settings_page(owner, name, secret=made["webhook_secret"])
        return self.submit(self.new_repo_page, act)

    def _settings_fields(self, caller, repo):
        """The settings form's fields: (name, label, kind, value, help, options)."""
        fields = {field.name: field for field in _REPO.fields}
        shown = _REPO.to_json(repo)
        rows = [("url", "Clone URL", "text", shown["clone_url"]),
                ("default_branch", "Default branch", "text", shown["default_branch"]),
                ("config_path", "Pipeline file", "text", shown["config_path"]),
                ("private", "Private: hidden from guests and other users", "checkbox",
                 shown["private"]),
                ("approval", "Builds that wait for approval", "select", shown["approval"],
                 APPROVALS),
                ("events", "Events to build", "events", shown["events"], EVENTS),
                ("timeout", "Job timeout (minutes)", "number", shown["timeout"]),
                ("max_builds", "Builds at once", "number", shown["max_builds"]),
                ("keep_builds", "Builds to keep", "number", shown["keep_builds"]),
                ("keep_days", "Days to keep a build", "number", shown["keep_days"]),
                ("max_log_bytes", "Log cap (bytes)", "number", shown["max_log_bytes"]),
                ("forge", "Forge for commit statuses", "select", shown["forge"],
                 ("", *FORGES)),
                ("forge_url", "Forge API URL", "url", shown["forge_url"]),
                ("forge_project", "Project at the forge", "text", shown["forge_project"]),
                ("forge_token", "Forge API token", "password", "")]
        if caller["admin"]:
            trusted = "Trusted: privileged containers and host volumes (admins only)"
            rows.insert(4, ("trusted", trusted, "checkbox", shown["trusted"]))
        return [{"name": row[0], "label": row[1], "kind": row[2], "value": row[3],
                 "options": row[4] if len(row) > 4 else (),
                 "help": fields[row[0]].help + (
                     " (set; empty keeps it)" if row[0] == "forge_token"
                     and shown["forge_token_set"] else "")} for row in rows]

    def settings_page(self, owner, name, error="", form=None, secret="", saved=False):
        caller = self.caller()
        repo = self.ops.find_repo(caller, owner, name, write=True)
        fields = self._settings_fields(caller, repo)
        for field in fields if form else ():
            if field["kind"] == "events":
                field["value"] = form.getall("events")
            elif field["kind"] == "checkbox":
                field["value"] = form.get(field["name"]) == "true"
            elif field["kind"] != "password":
                field["value"] = form.get(field["name"], field["value"])
        webhook = f"{self.ops.public_url or _base_url()}/hook?repo={owner}/{name}"
        if secret:
            self.shown_once()
        body = self.render("settings", owner=owner, name=name, tabs=self.tabs(repo, "/settings"),
                           problem=self.problem(error), fields=fields, csrf=self.csrf_token(),
                           webhook_url=webhook, secret=secret, saved=saved or bottle.request
                           .query.get("saved") == "1")
        return self.page(f"{owner}/{name} settings", body, status=bottle.response.status_code)

    def save_settings(self, owner, name):
        def act(caller, form):
            repo = self.ops.find_repo(caller, owner, name, write=True)
            changed = {}
            for field in self._settings_fields(caller, repo):
                key, kind, value = field["name"], field["kind"], field["value"]
                if kind == "events":
                    typed = form.getall("events") if form.get("events_shown") else value
                    if not typed:
                        raise BadRequest("choose at least one event to build")
                elif kind == "checkbox":
                    typed = form.get(key, "false") == "true"
                else:
                    typed = form.get(key, "").strip() if key in form else value
                if key == "url" and typed != value:
                    typed = _keep_credentials(typed, repo["url"])
                if kind == "password":
                    if typed:
                        changed[key] = typed
                elif typed != value and str(typed) != str(value):
                    changed[key] = ",".join(typed) if kind == "events" else typed
            self.ops.update_repo(caller, owner, name, changed)
        return self.submit(functools.partial(self.settings_page, owner, name), act,
                           f"/{owner}/{name}/settings?saved=1")

    def webhook_secret(self, owner, name):
        """Show the webhook secret, or make a new one (POST: it is a secret)."""
        def act(caller, form):
            repo = self.ops.find_repo(caller, owner, name, write=True)
            if form.get("do") == "rotate":
                secret = secrets.token_urlsafe(24)
                self.ops.update_repo(caller, owner, name, {"webhook_secret": secret})
            else:
                secret = self.store.webhook_secret(repo)
            return self.settings_page(owner, name, secret=secret or "(none set)")
        return self.submit(functools.partial(self.settings_page, owner, name), act)

    def delete_repo(self, owner, name):
        def act(caller, _form):
            self.ops.delete_repo(caller, owner, name)
        return self.submit(functools.partial(self.settings_page, owner, name), act, "/")

    def start_build(self, owner, name):
        def act(caller, form):
            build = self.ops.start_build(caller, owner, name, {
                "branch": form.get("branch", "").strip(),
                "commit": form.get("commit", "").strip(),
                "variables": self.form_variables(form)})
            bottle.redirect(_url(f"/{owner}/{name}/{build['number']}"), 303)
        return self.submit(functools.partial(self.repo_page, owner, name), act)

    # -- secrets and schedules ------------------------------------------------------

    def secrets_page(self, owner, name, error="", form=None):
        caller = self.caller()
        repo = self.ops.find_repo(caller, owner, name, write=True)
        listed = self.ops.list_secrets(caller, owner, name)
        if form is None:  # "Replace" names a secret: its events and images as they are
            form = bottle.request.query.decode()
            existing = next((item for item in listed if item["name"] == form.get("name")), None)
            if existing is not None:
                form["images"] = ", ".join(existing["images"])
            chosen = existing["events"] if existing else SECRET_EVENTS
        else:
            chosen = form.getall("events")
        body = self.render("secrets", owner=owner, name=name, tabs=self.tabs(repo, "/secrets"),
                           problem=self.problem(error),
                           secrets=listed, form=form,
                           csrf=self.csrf_token(), events=EVENTS, chosen=chosen)
        return self.page(f"{owner}/{name} secrets", body, status=bottle.response.status_code)

    def add_secret(self, owner, name):
        def act(caller, form):
            images = [image.strip() for image in form.get("images", "").split(",")
                      if image.strip()]
            events = form.getall("events")
            if not events:
                raise BadRequest("choose at least one event")
            self.ops.add_secret(caller, owner, name, {
                "name": form.get("name", "").strip(), "value": form.get("value", ""),
                "events": events, "images": images})
        return self.submit(functools.partial(self.secrets_page, owner, name), act,
                           f"/{owner}/{name}/secrets")

    def delete_secret(self, owner, name, secret):
        def act(caller, _form):
            self.ops.delete_secret(caller, owner, name, secret)
        return self.submit(functools.partial(self.secrets_page, owner, name), act,
                           f"/{owner}/{name}/secrets")

    def _cron_preview(self, expression, after):
        """{words, next}: an expression in words and its next three runs
        after `after` (BadRequest if it is not one)."""
        times = []
        for _ in range(3):
            after = _next_cron_time(expression, after)
            times.append(self.ago_at(after))
        return {"words": _cron_words(expression), "next": times}

    def schedules_page(self, owner, name, error="", form=None, preview=None):
        caller = self.caller()
        repo = self.ops.find_repo(caller, owner, name)
        crons = self.ops.list_crons(caller, owner, name)
        for cron in crons:
            cron.update(words="", next=[])
            with contextlib.suppress(BadRequest):
                cron.update(self._cron_preview(cron["expression"], cron["next_at"] - 1))
        body = self.render("schedules", owner=owner, name=name,
                           tabs=self.tabs(repo, "/schedules"), problem=self.problem(error),
                           crons=crons, form=form or {}, csrf=self.csrf_token(), preview=preview,
                           default_branch=repo["default_branch"],
                           may_write=self.access.may_write(caller, owner))
        return self.page(f"{owner}/{name} schedules", body, status=bottle.response.status_code)

    def ago_at(self, stamp):
        """A future time, exact (UTC)."""
        return self.render("time", stamp=stamp, ago=time.strftime(
            "%a %Y-%m-%d %H:%M UTC", time.gmtime(stamp)), exact=time.strftime(
            "%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp)))

    def add_schedule(self, owner, name):
        """Add a schedule; with `check`, only show the expression in words and
        its next three runs (the form kept, nothing saved)."""
        def act(caller, form):
            if form.get("check"):
                self.ops.find_repo(caller, owner, name, write=True)
                preview = self._cron_preview(form.get("expression", "").strip(), time.time())
                return self.schedules_page(owner, name, form=form, preview=preview)
            self.ops.add_cron(caller, owner, name, {
                key: form.get(key, "").strip() for key in ("name", "expression", "branch")})
        return self.submit(functools.partial(self.schedules_page, owner, name), act,
                           f"/{owner}/{name}/schedules")

    def delete_schedule(self, owner, name, cron):
        def act(caller, _form):
            self.ops.delete_cron(caller, owner, name, cron)
        return self.submit(functools.partial(self.schedules_page, owner, name), act,
                           f"/{owner}/{name}/schedules")

    # -- tokens, users and the queue --------------------------------------------------

    def tokens_page(self, error="", form=None, made=None):
        caller = self.caller()
        if caller is None:
            raise Unauthorized("sign in to see your tokens")
        body = self.render("tokens", problem=self.problem(error), form=form or {},
                           made=made, tokens=self.ops.list_tokens(caller),
                           current=caller["token_id"], csrf=self.csrf_token(), ago=self.ago)
        return self.page("Your tokens", body, status=bottle.response.status_code)

    def make_token(self):
        def act(caller, form):
            made = self.ops.create_token(caller, {"name": form.get("name", "").strip(),
                                                  "scope": form.get("scope", "write")})
            bottle.response.status = 201
            self.shown_once()
            return self.tokens_page(made=made)
        return self.submit(self.tokens_page, act)

    def revoke_token(self, token_id):
        def act(caller, _form):
            self.ops.revoke_token(caller, token_id)
            if str(caller["token_id"]) == token_id:  # this session's own: signed out
                bottle.response.delete_cookie(SESSION_COOKIE, path="/")
                bottle.redirect(_url("/"), 303)
            bottle.redirect(_url("/tokens"), 303)
        return self.submit(self.tokens_page, act)

    def users_page(self, error="", form=None, made=None):
        caller = self.caller()
        users = self.ops.list_users(caller)
        body = self.render("users", problem=self.problem(error), form=form or {}, made=made,
                           users=users, me=caller["login"], csrf=self.csrf_token(),
                           ago=self.ago)
        return self.page("Users", body, status=bottle.response.status_code)

    def add_user(self):
        def act(caller, form):
            login = form.get("login", "").strip()
            self.ops.add_user(caller, {"login": login, "email": form.get("email", "").strip(),
                                       "admin": form.get("admin") == "true"})
            made = self.ops.create_token(caller, {"login": login, "name": "first sign-in"})
            bottle.response.status = 201
            self.shown_once()
            return self.users_page(made={"login": login, "token": made["token"]})
        return self.submit(self.users_page, act)

    def set_admin(self, login):
        def act(caller, form):
            self.ops.update_user(caller, login, {"admin": form.get("admin", "")})
        return self.submit(self.users_page, act, "/users")

    def remove_user(self, login):
        def act(caller, _form):
            if login == caller["login"]:
                raise Conflict("you cannot remove yourself: ask another admin")
            self.ops.delete_user(caller, login)
        return self.submit(self.users_page, act, "/users")

    def queue_page(self):
        """Waiting jobs in order with why each waits; running jobs with their
        step and runner (live)."""
        caller = self.access.user(bottle.request)

        def live():
            queue = self.ops.queue(caller)
            state = json.dumps([queue[key] for key in ("pending", "running", "busy",
                                                         "workers", "draining")])
            return state, lambda: self.render("queue_live", seconds=_seconds_text,
                                              runner=_runner_text, **queue)

        if bottle.request.query.get("events"):
            return self.updates(live, lambda: False)
        return self.page("Queue", self.render("queue", live=live()[1]()),
                         script=_LIVE_PAGE_SCRIPT)

    def job_page(self, owner, name, number, job):
        repo = self.readable_repo(owner, name)
        build = self.find_build(repo, number)
        job = self.store.get_job(build["id"], _check_positive(job, "job number"))
        size = self.store.log_size(job["id"])
        query = bottle.request.query
        if query.get("from") is not None:  # "load later output": from a line's start on
            start = _check_int(query.get("from"), "from", default=0, maximum=size)
            end = min(size, start + LOG_PAGE_BYTES)
        else:
            end = _check_int(query.get("to"), "to", default=size, maximum=size)
            start = max(0, end - LOG_PAGE_BYTES)
        data = self.store.open_log(job["id"], max(0, start - 1), end).read()
        if start > 0:
            before, data = data[:1], data[1:]
            if before != b"\n" and b"\n" in data[:-1]:
                cut = data.index(b"\n") + 1  # from the start of a line
                data, start = data[cut:], start + cut
        live = job["status"] in ACTIVE_STATUSES and end == size
        if (live or end < size) and b"\n" in data:
            # Whole lines only: the live stream, or the next window, goes on
            # from the end of the last one.
            data = data[:data.rfind(b"\n") + 1]
            end = start + len(data)
        first_line = 1 + self._newlines_before(job["id"], start)
        steps = self.store.list_steps([job["id"]])[job["id"]]
        rows, line = {}, first_line
        for section, piece in _split_by_section(_section_starts(steps), start, data):
            html, count = self.log_html.rows(piece.decode("utf-8", errors="replace"), line)
            rows[section], line = rows.get(section, "") + html, line + count
        sections = self.log_html.sections(job, steps)
        failing = next((section for section in sections if section["failing"]), None)
        for section in sections:
            section["rows"] = rows.get(section["number"], "")
            section["open"] = failing is None or section is failing
        if not rows.get(0) and not sections[0]["failing"] and steps:
            sections.pop(0)  # nothing before the first step (no checkout)
        failed = None
        if failing is not None:
            step = next((step for step in steps if step["number"] == failing["number"]), None)
            failed = {"number": failing["number"], "name": step["name"] if step else "clone",
                      "detail": f" (exit {step['exit_code']})" if step and step["exit_code"]
                      else f": {job['error']}" if job["error"] else ""}
        jobs = [row["number"] for row in _in_graph_order(self.store.list_jobs(build["id"]))]
        index = jobs.index(job["number"])
        body = self.render(
            "job", repo=repo, build=build, job=job, label=self.label, sections=sections,
            previous=jobs[index - 1] if index else None,
            following=jobs[index + 1] if index + 1 < len(jobs) else None,
            later=end if end < size else None, csrf=self.csrf_token(),
            may_cancel=job["status"] in ACTIVE_STATUSES
            and self.access.may_write(self.access.user(bottle.request), owner),
            failing=failed, axis=_axis_text(json.loads(job["environment"])), start=start,
            end=end, size=size, live=live, next_line=line,
            base=_url(f"/{owner}/{name}/{build['number']}"),
            raw=_url(f"/api/repos/{owner}/{name}/logs/{build['number']}/{job['number']}"))
        return self.page(f"{owner}/{name} #{build['number']} job {job['number']}", body,
                         script=_LIVE_LOG_SCRIPT)

    def cancel_job(self, owner, name, number, job):
        """Cancel one job of a build from its page (the others go on)."""
        self.check_csrf()
        self.ops.cancel_job(self.caller(), owner, name, number, job)
        bottle.redirect(_url(f"/{owner}/{name}/{number}/{job}"), 303)

    def _newlines_before(self, job_id, offset):
        """How many lines end before byte `offset` of a job's log (chunk by chunk)."""
        count = 0
        for chunk in self.store.read_log(job_id):
            if offset <= 0:
                break
            count += chunk[:offset].count(b"\n")
            offset -= len(chunk)
        return count


_PAGE_ROUTES = [
    ("GET", "/", _Pages.home),
    ("GET", "/login", _Pages.login_form),
    ("POST", "/login", _Pages.login),
    ("POST", "/logout", _Pages.logout),
    ("GET", "/favicon.ico", _Pages.favicon),
    ("GET", "/queue", _Pages.queue_page),
    ("GET", "/new", _Pages.new_repo_page),
    ("POST", "/new", _Pages.add_repo),
    ("GET", "/tokens", _Pages.tokens_page),
    ("POST", "/tokens", _Pages.make_token),
    ("POST", "/tokens/<token_id>/revoke", _Pages.revoke_token),
    ("GET", "/users", _Pages.users_page),
    ("POST", "/users", _Pages.add_user),
    ("POST", "/users/<login>/admin", _Pages.set_admin),
    ("POST", "/users/<login>/remove", _Pages.remove_user),
    ("GET", "/agents", _Pages.agents_page),
    ("POST", "/agents", _Pages.add_agent),
    ("POST", "/agents/<agent>/revoke", _Pages.revoke_agent),
    ("GET", "/<owner>/<name>", _Pages.repo_page),
    ("POST", "/<owner>/<name>/builds", _Pages.start_build),
    ("GET", "/<owner>/<name>/settings", _Pages.settings_page),
    ("POST", "/<owner>/<name>/settings", _Pages.save_settings),
    ("POST", "/<owner>/<name>/settings/webhook", _Pages.webhook_secret),
    ("POST", "/<owner>/<name>/settings/delete", _Pages.delete_repo),
    ("GET", "/<owner>/<name>/secrets", _Pages.secrets_page),
    ("POST", "/<owner>/<name>/secrets", _Pages.add_secret),
    ("POST", "/<owner>/<name>/secrets/<secret>/delete", _Pages.delete_secret),
    ("GET", "/<owner>/<name>/schedules", _Pages.schedules_page),
    ("POST", "/<owner>/<name>/schedules", _Pages.add_schedule),
    ("POST", "/<owner>/<name>/schedules/<cron>/delete", _Pages.delete_schedule),
    ("GET", "/<owner>/<name>/<number>", _Pages.build_page),
    ("POST", "/<owner>/<name>/<number>/cancel", _Pages.cancel),
    ("POST", "/<owner>/<name>/<number>/restart", _Pages.restart),
    ("POST", "/<owner>/<name>/<number>/approve", _Pages.approve),
    ("POST", "/<owner>/<name>/<number>/decline", _Pages.decline),
    ("GET", "/<owner>/<name>/<number>/<job>", _Pages.job_page),
    ("POST", "/<owner>/<name>/<number>/<job>/cancel", _Pages.cancel_job),
]

###############################################################################
# make_app ####################################################################
###############################################################################


class _Metrics:
    """The server's Prometheus metrics, in a registry of their own (an app
    that embeds cirunner keeps its own): counters and a histogram the server
    updates as it goes, and gauges read from the store at each scrape."""

    def __init__(self, store, executor):
        prometheus_client = self.prometheus = _optional("prometheus_client", "/metrics",
                                                        "prometheus-client", "metrics")
        self.registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter(
            "cirunner_http_requests", "HTTP requests answered, by route and status code",
            ["route", "code"], registry=self.registry)
        self.job_seconds = prometheus_client.Histogram(
            "cirunner_job_duration_seconds", "How long jobs ran, by how they ended",
            ["status"], registry=self.registry,
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, float("inf")))
        self.log_bytes = prometheus_client.Counter(
            "cirunner_log_bytes", "Bytes of output jobs printed (before any log cap)",
            registry=self.registry)
        self.registry.register(_StoreCollector(store, executor, _optional(
            "prometheus_client.core", "/metrics", "prometheus-client",
            "metrics").GaugeMetricFamily))

    def job_done(self, status, seconds, log_bytes):
        self.job_seconds.labels(status).observe(seconds)
        self.log_bytes.inc(log_bytes)

    def render(self):
        return self.prometheus.generate_latest(self.registry)


class _StoreCollector:
    """Gauges read from the store at each scrape: builds and jobs by status,
    the queue, and this process's busy workers."""

    def __init__(self, store, executor, gauge):
        self.store = store
        self.executor = executor
        self.gauge = gauge

    def describe(self):
        return []  # only collected at scrape time

    def collect(self):
        gauge = self.gauge
        for table in ("builds", "jobs"):
            family = gauge(f"cirunner_{table}", f"{table.title()} in the store, by status",
                           labels=["status"])
            counts = self.store.count_by_status(table)
            for status in BUILD_STATUSES if table == "builds" else STATUSES:
                family.add_metric([status], counts.get(status, 0))
            yield family
        length, oldest = self.store.queue_summary()
        yield gauge("cirunner_queue_length", "Jobs waiting to start", value=length)
        yield gauge("cirunner_queue_oldest_seconds", "How long the oldest waiting job has "
                    "waited", value=max(0, time.time() - oldest) if oldest else 0)
        if self.executor is not None:
            yield gauge("cirunner_workers", "Job worker threads", value=self.executor.workers)
            yield gauge("cirunner_workers_busy", "Worker threads running a job",
                        value=self.executor.busy_workers())
            yield gauge("cirunner_workers_stuck", "Worker threads the watchdog finds making "
                        "no progress", value=len(self.executor.stuck()))


def _metrics_plugin(api):
    """A Bottle plugin: counts each answer by its route's rule and status,
    once the metrics exist (see _Api.metrics_page)."""

    def count(code):
        if api.metrics is not None:
            api.metrics.requests.labels(bottle.request.route.rule, code).inc()

    def apply(callback):
        @functools.wraps(callback)
        def counted(*args, **kwargs):
            try:
                out = callback(*args, **kwargs)
            except bottle.HTTPResponse as response:  # redirects
                count(response.status_code)
                raise
            count(out.status_code if isinstance(out, bottle.HTTPResponse)
                  else bottle.response.status_code)
            return out

        return counted

    return apply


def _json_error(store, error):
    """The JSON error answer of an API or agent route that raised `error`: a
    CIRunnerError as it is, a full disk 507, a store that cannot be reached
    503, anything else (a bug) 500, logged. Called in the `except` block."""
    if isinstance(error, CIRunnerError):
        return _error_reply(error)
    if isinstance(error, (store.OperationalError, OSError)) and _is_disk_full(error):
        return _error_reply(StorageFull(_disk_full_message(error)))
    if isinstance(error, store.OperationalError):
        return _error_reply(_store_away(error))
    _log.exception("unhandled error in %s %s", bottle.request.method, bottle.request.path)
    return _error_reply(CIRunnerError("internal server error"))


def _api_callback(api, route):
    """The Bottle callback of an API route: access first, then the handler;
    every CIRunnerError (and any bug, as a 500) answered as the JSON error."""

    def callback(**params):
        try:
            if isinstance(route.handler, str):  # an operation: it checks access itself
                return _send(api.operation(route, route.handler, params))
            if route.access in ("read", "write"):
                caller = api.caller(route)
                params["repo"] = api.ops.find_repo(caller, params.pop("owner"),
                                                   params.pop("name"),
                                                   write=route.access == "write")
            elif route.access == "user":
                api.user()
            return _send(route.handler(api, **params))
        except Exception as error:  # noqa: BLE001 - each answered as JSON, a bug too
            return _json_error(api.store, error)

    return callback


def _page_callback(pages, handler):
    """The Bottle callback of a page: a guest who must sign in is sent to the
    form; other errors are an HTML page (JSON under /api/, where a page route
    matched a path that no API route has)."""

    def callback(**params):
        request = bottle.request
        try:
            try:
                return handler(pages, **params)
            except (pages.store.OperationalError, OSError) as error:
                if _is_disk_full(error):
                    raise StorageFull(_disk_full_message(error)) from None
                if isinstance(error, pages.store.OperationalError):
                    raise _store_away(error) from None
                raise
        except Unauthorized:
            # A form's address answers POST only: after signing in, the start.
            back = request.path if request.method in ("GET", "HEAD") else "/"
            bottle.redirect(_url(f"/login?next={quote(back)}"), 303)
        except CIRunnerError as error:
            if request.path.startswith("/api/"):
                return _error_reply(error)
            return pages.error_page(error)

    return callback


def _check_request_text(environ):
    """Refuse a request whose headers or query are not UTF-8 (Bottle would
    fail decoding them wherever they are read): 401 for credentials, else 400."""
    for key, value in environ.items():
        if key.startswith("HTTP_") or key == "CONTENT_TYPE":
            try:
                value.encode("latin-1").decode("utf-8")
            except UnicodeError:
                name = key.removeprefix("HTTP_").replace("_", "-").title()
                if name == "Authorization":
                    raise Unauthorized("the Authorization header is not UTF-8 text") from None
                raise BadRequest(f"the {name} header is not UTF-8 text") from None
    try:
        parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True, encoding="utf-8",
                  errors="strict")
        environ.get("QUERY_STRING", "").encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise BadRequest("the query string is not UTF-8 text") from None


@functools.cache
def _bottle_class():
    """Bottle, with its own errors (no such route, wrong method) answered as
    the JSON error body. Made at its first use, as Bottle is loaded then."""

    class _Bottle(bottle.Bottle):
        def default_error_handler(self, res):
            codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request",
                     413: "too_large", 500: "internal_error"}
            status = res.status_code
            message = {404: f"no route for {bottle.request.path}",
                       405: f"method {bottle.request.method} not allowed on "
                            f"{bottle.request.path}",
                       }.get(status, str(res.body) if status < 500 else "internal server error")
            bottle.response.content_type = _JSON
            return json.dumps({"error": codes.get(status, "error"), "message": message,
                               "status": status})

    return _Bottle


###############################################################################
# Agents: the server's side ###################################################
###############################################################################


def _pkt_line(text):
    """`text` as one git pkt-line (its length, four hex digits, first)."""
    data = text.encode()
    return b"%04x" % (len(data) + 4) + data


class _AgentService:
    """The server's side of agents that join over HTTP (`cirunner agent
    --server URL --token TOKEN`). An agent holds a token of its own (made by
    an admin, see `Store.create_agent`) that works on these routes only, and
    gets one job at a time per worker with only what that job needs. Each
    call is JSON, and carries the agent's runner id:

    - ``POST /api/agent/connect`` {protocol, version, runner, hostname, pid,
      pid_start, workers, labels}: register the runner (the admin's labels win
      over the agent's); the jobs of the agent's earlier runners on that host
      end (``recovered``: what the agent kills of them). A protocol other than
      AGENT_PROTOCOL is refused with both versions named.
    - ``POST /api/agent/poll`` {runner, stopping, holding, wait}: a heartbeat that
      waits (long-poll, at most AGENT_POLL_SECONDS) until there is news: jobs
      claimed for it (as many as it has free workers; each with its build,
      repository without sealed fields, pipeline, the previous build and the
      secrets its event and origin allow) or cancels of its jobs (besides
      those it says it is `stopping`); a job claimed for it that it does not
      say it is `holding` (an answer that never reached it) comes again.
      409 ``runner_lost`` once it was found lost: the agent connects again.
    - ``POST /api/agent/report`` {runner, messages}: a job's steps, step
      changes, log chunks and end, in order, each under the claim's lease; a
      job ended elsewhere refuses them (``ended``: {job: why}) and the agent
      stops it. Sent again after a lost answer, a report changes nothing.
    - ``/api/agent/git/OWNER/NAME/…``: git's smart HTTP (upload-pack) from the
      server's mirror, for a repository whose job the agent runs.

    The store's outages answer 503 (the agent keeps what it has and tries again)."""

    def __init__(self, store, *, agent_timeout, closing, max_polls):
        self.store = store
        self.codec = _LogCodec()
        self.agent_timeout = agent_timeout
        self.poll_seconds = min(AGENT_POLL_SECONDS, agent_timeout / 4)
        self.closing = closing
        self.polls = threading.BoundedSemaphore(max(1, max_polls))
        self.changed = threading.Condition()
        self.changes = 0
        self.stamped = {}  # runner id: when this process last stamped its heartbeat
        store.add_listener(self._on_event)

    def _on_event(self, event, _ids):
        if event in ("enqueued", "cancel"):
            self.notify()

    def notify(self):
        with self.changed:
            self.changes += 1
            self.changed.notify_all()

    # -- who calls -------------------------------------------------------------

    def agent(self, request):
        """The agent whose token `request` carries; 401 for anything else."""
        header = request.get_header("Authorization")
        if header is None:
            raise Unauthorized("an agent sends 'Authorization: Bearer <agent token>'")
        agent = self.store.agent_for_token(_parse_authorization(header))
        if agent is None:
            raise Unauthorized("invalid or revoked agent token (an admin makes one with "
                               "`cirunner agents add NAME`)")
        return agent

    def _runner(self, agent, runner_id):
        if not isinstance(runner_id, str) or not runner_id:
            raise BadRequest("runner is required")
        try:
            runner = self.store.get_runner(runner_id)
        except NotFound:
            self.stamped.pop(runner_id, None)
            raise RunnerLost(f"runner {runner_id} is not registered (found lost, or never "
                             "connected): connect again") from None
        if runner["agent"] != agent["name"]:
            raise Forbidden(f"runner {runner_id} is not agent {agent['name']}'s")
        return runner

    # -- connect and poll ----------------------------------------------------------

    def connect(self, agent, body, address):
        protocol = body.get("protocol")
        if protocol != AGENT_PROTOCOL:
            raise Conflict(f"this server (cirunner {__version__}) speaks agent protocol "
                           f"{AGENT_PROTOCOL}; the agent (cirunner {body.get('version', '?')}) "
                           f"speaks {protocol!r}: run the same cirunner version on both")
        runner_id = body.get("runner")
        if not isinstance(runner_id, str) or not 0 < len(runner_id) <= 200:
            raise BadRequest("runner must be a string")
        with contextlib.suppress(NotFound):
            if self.store.get_runner(runner_id)["agent"] != agent["name"]:
                raise Forbidden(f"runner {runner_id} is not agent {agent['name']}'s")
        hostname = _check_text(body.get("hostname") or "", "hostname", 255)
        workers = body.get("workers")
        if not isinstance(workers, int) or isinstance(workers, bool) or not 0 <= workers <= 1024:
            raise BadRequest("workers must be a whole number from 0 to 1024")
        labels = {**_check_labels(body.get("labels") or {}), **json.loads(agent["labels"])}
        pid, pid_start = body.get("pid"), body.get("pid_start")
        if not all(isinstance(value, int) and not isinstance(value, bool)
                   for value in (pid, pid_start)):
            raise BadRequest("pid and pid_start must be whole numbers")
        recovered = self.store.agent_connected(
            agent["name"], runner_id, hostname=hostname, address=address,
            version=_check_text(str(body.get("version") or ""), "version", 40),
            previous=str(body.get("previous") or ""), max_age=self.agent_timeout)
        self.store.register_runner(runner_id, hostname, pid, workers, labels,
                                   agent=agent["name"], pid_start=pid_start)
        self.notify()
        return {"protocol": AGENT_PROTOCOL, "version": __version__, "agent": agent["name"],
                "labels": labels, "timeout": self.agent_timeout, "poll": self.poll_seconds,
                "recovered": recovered}

    def disconnect(self, agent, body):
        runner = self._runner(agent, body.get("runner"))
        self.store.unregister_runner(runner["id"])
        self.stamped.pop(runner["id"], None)
        return {"disconnected": runner["id"]}

    def poll(self, agent, body):
        """Wait for news for the agent's runner (see the class docstring)."""
        runner = self._runner(agent, body.get("runner"))
        stopping = set(body.get("stopping") or [])
        holding = body.get("holding")
        holding = set(holding) if isinstance(holding, list) else None
        wait = body.get("wait", self.poll_seconds)
        wait = min(float(wait), self.poll_seconds) if isinstance(wait, (int, float)) else 0.0
        self.store.agent_seen(agent)
        labels = json.loads(runner["labels"])
        waits = self.polls.acquire(blocking=False)  # beyond max_polls: answer at once
        try:
            deadline = time.monotonic() + wait
            # A busy agent's polls come back to back: each needs no write of
            # its own (this process's clock, not the row's: servers' clocks
            # may differ from the database's).
            stamped = self.stamped.get(runner["id"], 0.0)
            while True:
                seen = self.changes
                now = time.monotonic()
                if now - stamped >= self.poll_seconds / 2:
                    if not self.store.heartbeat(runner["id"]):
                        self.stamped.pop(runner["id"], None)
                        raise RunnerLost(f"runner {runner['id']} was found lost: connect again")
                    stamped = self.stamped[runner["id"]] = now
                    if len(self.stamped) > 1024:  # runners of restarted agents
                        self.stamped = {key: value for key, value in self.stamped.items()
                                        if now - value < self.agent_timeout}
                answer = self._news(runner, labels, stopping, holding)
                if answer["jobs"] or answer["cancel"] or not waits or now >= deadline \
                        or self.closing.is_set():
                    return answer
                with self.changed:
                    # Woken by new jobs, cancels and job ends in this process;
                    # each second for those of other processes.
                    self.changed.wait_for(
                        lambda seen=seen: self.changes != seen or self.closing.is_set(),
                        min(1.0, deadline - now))
        finally:
            if waits:
                self.polls.release()

    def _news(self, runner, labels, stopping, holding=None):
        running = self.store.running_jobs(runner["id"])
        cancels = {job_id: why for job_id, why in running.items()
                   if why is not None and job_id not in stopping}
        jobs, ended = [], 0
        if holding is not None:
            jobs, ended = self._not_held([job_id for job_id in running
                                          if job_id not in holding and job_id not in stopping],
                                         cancels)
        free = runner["workers"] - len(running) + ended
        if free > 0 and self.store.queue_summary()[0]:
            while len(jobs) < free:
                job = self.store.claim_next_job(runner["id"], labels)
                if job is None:
                    break
                jobs.append(self._payload(job))
        return {"jobs": jobs, "cancel": cancels}

    def _not_held(self, job_ids, cancels):
        """Jobs claimed for a runner that its agent does not hold (`holding`:
        what it runs or has yet to report the end of). One it never started
        (no step told) is a claim whose answer never reached it: sent again,
        under that claim. One cancelled meanwhile ends killed here; one it
        started and dropped (a report the server refused) ends error: no
        job stays running with nobody to end it. (the jobs sent again, how
        many ended)"""
        steps = self.store.list_steps(job_ids)
        resend = []
        for job_id in job_ids:
            job = self.store.get_job_by_id(job_id)
            if job_id in cancels:
                reason = cancels.pop(job_id)
                with contextlib.suppress(Conflict):
                    self.store.finish_job(job_id, KILLED, error=reason, lease=job["lease"])
            elif steps[job_id]:
                with contextlib.suppress(Conflict):
                    self.store.finish_job(job_id, ERROR, lease=job["lease"],
                                          error="its agent no longer runs it (a report of it "
                                                "was refused)")
            else:
                resend.append(self._payload(job))
        return resend, len(job_ids) - len(resend)

    def _payload(self, job):
        """What an agent needs to run `job`, and nothing more: no other job's
        secrets, no sealed field of its repository."""
        build = self.store.get_build_by_id(job["build_id"])
        repo = {key: value for key, value in self.store.get_repo_by_id(build["repo_id"]).items()
                if key not in _SEALED_REPO_FIELDS}
        event = EVENT_PULL_REQUEST if build["fork"] else build["event"]
        pipeline = self.store.get_pipeline(build["pipeline_id"]) if build["pipeline_id"] \
            else None
        found = self.store.secrets_for(repo["id"], event)
        images = self.store.secret_images(repo["id"])
        if pipeline is not None and pipeline["parsed"]:  # only what one of its steps may get
            usable = _secrets_steps_may_get(Pipeline.from_json(pipeline["parsed"]).named(
                job.get("pipeline") or ""), found, images)
            found = {name: value for name, value in found.items() if name in usable}
            images = {name: value for name, value in images.items() if name in usable}
        return {"job": job, "build": build, "repo": repo, "pipeline": pipeline,
                "previous": self.store.previous_build(build), "event": event,
                "failed_pipelines": self.store.failed_pipelines(build["id"]),
                "secrets": found, "secret_images": images}

    # -- reports -------------------------------------------------------------------

    def report(self, agent, body):
        """Apply a runner's messages in order (see the class docstring)."""
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise BadRequest("messages must be a list")
        self._check_holder(agent, {message.get("job") for message in messages
                                   if isinstance(message, dict)})
        ended, finished = {}, False
        for message in messages:
            job_id = message.get("job") if isinstance(message, dict) else None
            if job_id in ended:
                continue
            try:
                finished |= self._apply(job_id, message)
            except Conflict as exc:
                ended[job_id] = exc.message
        if finished:
            self.notify()  # a worker is free: a waiting poll may take a job for it
        return {"ended": ended}

    def _check_holder(self, agent, job_ids):
        """Refuse a report about a job that another agent (or a server) holds."""
        for job_id in job_ids:
            if not isinstance(job_id, int) or isinstance(job_id, bool):
                raise BadRequest("each message names its job by id")
            if self.store.job_holder(job_id) not in (agent["name"], None):  # None: runner gone
                raise Forbidden(f"job {job_id} is not this agent's")

    def _apply(self, job_id, message):
        """One message; True if it ended its job."""
        lease, kind = message.get("lease"), message.get("type")
        if not isinstance(lease, str):
            raise BadRequest("each message carries its claim's lease")
        if kind == "steps":
            steps = message.get("steps")
            if not isinstance(steps, list) or not all(
                    isinstance(step, list) and len(step) == 2 for step in steps):
                raise BadRequest("steps must be a list of [name, kind]")
            self.store.add_steps(job_id, [(str(name), str(step_kind))
                                          for name, step_kind in steps], lease=lease)
        elif kind == "step":
            fields = message.get("fields")
            if not isinstance(fields, dict):
                raise BadRequest("a step message carries its fields")
            self.store.update_job_step(job_id, _check_positive(message.get("number"), "step"),
                                       lease, **fields)
        elif kind == "log":
            try:
                data = self.codec.decode_at_most(
                    message.get("codec") or "",
                    base64.b64decode(message.get("data") or "", validate=True), LOG_CHUNK_BYTES)
            except ValueError as exc:  # binascii.Error is one
                raise BadRequest(f"a log chunk that cannot be read: {exc}") from None
            try:
                self.store.append_log(job_id, _check_count(message.get("seq"), "seq"),
                                      _check_count(message.get("offset"), "offset"), data,
                                      lease=lease)
            except _ChunkMismatch as exc:  # not taken again and again: the job ends
                self.store.finish_job(job_id, ERROR, error=exc.message, lease=lease)
                raise
        elif kind == "end":
            status = message.get("status")
            if status not in (SUCCESS, FAILURE, KILLED, ERROR):
                raise BadRequest(f"invalid job status {status!r}")
            self.store.finish_job(job_id, status, exit_code=_check_int(message.get("exit_code"), "exit_code",
                                                          default=0, minimum=-(2 ** 31)),
                                  error=_check_text(message.get("error") or "", "error", 4000),
                                  lease=lease)
            return True
        else:
            raise BadRequest(f"unknown message type {kind!r}")
        return False

    # -- git -------------------------------------------------------------------------

    def git_repo(self, agent, owner, name):
        """The repository, if the agent runs a job of it now, its mirror
        holding every commit those jobs need (fetched with the server's
        credentials, which never leave it)."""
        repo = self.store.get_repo(owner, name)
        builds = self.store.agent_builds_in_repo(agent["name"], repo["id"])
        if not builds:
            raise Forbidden(f"agent {agent['name']} runs no job of {owner}/{name}")
        # Each of git's two requests may reach another serve (behind a load
        # balancer), each with a mirror of its own: each fetches what it lacks.
        for build in builds:
            self.store.git.fetch_commit(repo, build["commit_sha"], _pull_ref(build["ref"]))
        return repo

    def advertise(self, agent, owner, name):
        repo = self.git_repo(agent, owner, name)
        refs = self.store.git.run(["upload-pack", "--stateless-rpc", "--advertise-refs",
                                   self.store.git.path(repo)])
        return _pkt_line("# service=git-upload-pack\n") + b"0000" + refs

    def upload_pack(self, agent, owner, name, request_body):
        """Yield git-upload-pack's answer to a fetch's request, as it comes."""
        repo = self.git_repo(agent, owner, name)
        spool = tempfile.TemporaryFile(prefix="cirunner-git-")  # noqa: SIM115 - closed below
        spool.write(request_body)
        spool.seek(0)
        process = subprocess.Popen(
            ["git", "-c", "uploadpack.allowAnySHA1InWant=true", "upload-pack", "--stateless-rpc",
             self.store.git.path(repo)], stdin=spool, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=self.store.git.env)
        spool.close()

        def answer():
            try:
                while True:
                    data = process.stdout.read(LOG_CHUNK_BYTES)
                    if not data:
                        return
                    yield data
            finally:
                process.stdout.close()
                process.kill()
                process.wait()

        return answer()


def _check_count(value, name):
    """A whole number >= 0, else BadRequest."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"{name} must be a whole number >= 0")
    return value


def _agent_callback(service, handler):
    """The Bottle callback of an agent route: the agent's token first, then
    the handler; errors answered as the API's JSON errors (503 while the
    store cannot be reached)."""

    def callback(**params):
        try:
            return handler(service, service.agent(bottle.request), **params)
        except Exception as error:  # noqa: BLE001 - each answered as JSON, a bug too
            return _json_error(service.store, error)

    return callback


def _agent_body(api):
    body = _parse_json(api.read_body(), "body") if bottle.request.content_length else {}
    if not isinstance(body, dict):
        raise BadRequest("the JSON body must be an object")
    return body


def _agent_git_body(api):
    """A git request's body, gunzipped if git sent it compressed."""
    raw = api.read_body()
    if (bottle.request.get_header("Content-Encoding") or "").lower() != "gzip":
        return raw
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    data = inflater.decompress(raw, AGENT_MAX_BODY)
    if inflater.unconsumed_tail:
        raise TooLarge(f"a git request larger than {AGENT_MAX_BODY} bytes")
    return data


def _agent_routes(service, api):
    """(method, path, handler(service, agent, **params)) of the agent protocol."""

    def connect(service, agent):
        return _send(service.connect(agent, _agent_body(api), bottle.request.remote_addr or ""))

    def poll(service, agent):
        return _send(service.poll(agent, _agent_body(api)))

    def report(service, agent):
        return _send(service.report(agent, _agent_body(api)))

    def disconnect(service, agent):
        return _send(service.disconnect(agent, _agent_body(api)))

    def info_refs(service, agent, owner, name):
        if bottle.request.query.get("service") != "git-upload-pack":
            raise Forbidden("agents only fetch (git-upload-pack)")
        return _send(_Reply(service.advertise(agent, owner, name),
                            content_type="application/x-git-upload-pack-advertisement",
                            headers={"Cache-Control": "no-cache"}))

    def upload_pack(service, agent, owner, name):
        answer = service.upload_pack(agent, owner, name, _agent_git_body(api))
        bottle.response.content_type = "application/x-git-upload-pack-result"
        bottle.response.set_header("Cache-Control", "no-cache")
        return answer

    return [("POST", "/api/agent/connect", connect), ("POST", "/api/agent/poll", poll),
            ("POST", "/api/agent/report", report),
            ("POST", "/api/agent/disconnect", disconnect),
            ("GET", "/api/agent/git/<owner>/<name>/info/refs", info_refs),
            ("POST", "/api/agent/git/<owner>/<name>/git-upload-pack", upload_pack)]


###############################################################################
# Agents: the build machine's side ############################################
###############################################################################

OUTBOX_MEMORY_BYTES = 64 * 1024 * 1024   # log an agent holds in memory for the server
OUTBOX_DISK_BYTES = 1024 * 1024 * 1024   # then in its data directory; then it drops
OUTBOX_LINGER_SECONDS = 0.02  # a report waits this long for more of its job's messages


class _ServerAway(CIRunnerError):
    """The server cannot be reached, or cannot answer now (503): try again."""

    status = 503
    code = "unavailable"


class _AgentLink:
    """JSON calls from an agent to its server: one kept-alive connection per
    thread, the agent's token on each call. A server that cannot be reached
    or answers 5xx raises _ServerAway; its 4xx, the error it names."""

    def __init__(self, server, token):
        if not server.startswith(("http://", "https://")):
            raise BadRequest(f"--server must be an http(s) URL, not {server!r}")
        if not token:
            raise BadRequest("an agent needs its token: --token or CIRUNNER_TOKEN (an admin "
                             "makes one with `cirunner agents add NAME`)")
        self.server = server.rstrip("/")
        self.parts = urlsplit(self.server)
        self.token = token
        self.local = threading.local()

    def _connection(self, timeout):
        import http.client  # here: an agent's import, not the server's

        conn = getattr(self.local, "conn", None)
        if conn is None:
            kind = (http.client.HTTPSConnection if self.parts.scheme == "https"
                    else http.client.HTTPConnection)
            conn = self.local.conn = kind(self.parts.hostname, self.parts.port, timeout=timeout)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def reset(self):
        conn = getattr(self.local, "conn", None)
        self.local.conn = None
        if conn is not None:
            conn.close()

    def call(self, path, body, *, timeout=60.0):
        """POST `body` as JSON to the agent route `path`; the answer's JSON."""
        data = json.dumps(body).encode()
        headers = {"Content-Type": _JSON, "Accept": _JSON,
                   "Authorization": f"Bearer {self.token}",
                   "User-Agent": f"cirunner-agent/{__version__}"}
        try:
            conn = self._connection(timeout)
            conn.request("POST", self.parts.path + path, body=data, headers=headers)
            response = conn.getresponse()
            answer = response.read()
        # Refused, reset, timed out, cut off mid-answer (a server killed while
        # it answered: http.client's IncompleteRead), a bad answer.
        except (OSError, ValueError, http.client.HTTPException) as exc:
            self.reset()
            raise _ServerAway(f"cannot reach {self.server}: {exc}") from None
        if response.getheader("Connection", "").lower() == "close":
            self.reset()
        if response.status >= 500:
            raise _ServerAway(f"{self.server} answered {response.status}: "
                              f"{answer[:200].decode(errors='replace')}")
        try:
            parsed = json.loads(answer) if answer else {}
        except ValueError:
            raise _ServerAway(f"{self.server} answered {response.status} without JSON: "
                              "is it a cirunner server?") from None
        if response.status >= 400:
            parsed = parsed if isinstance(parsed, dict) else {}
            raise _error_of_answer(parsed.get("error"), response.status,
                                   str(parsed.get("message") or response.reason))
        return parsed


def _filler(size):
    """`size` bytes that stand where an agent had to drop output."""
    marker = (b"\n[cirunner: the agent dropped output here: the server could not be reached "
              b"and its buffer was full]")
    return (marker + b" " * size)[:max(0, size - 1)] + b"\n"[:size]


class _Outbox:
    """An agent's messages to its server, in order, until the server has
    them: log bytes in memory up to `memory`, then in a file in `directory`
    up to `disk`; past that a chunk's bytes are dropped (its place in the log
    kept, filled with a marker) rather than the job stopped."""

    def __init__(self, directory, *, memory=OUTBOX_MEMORY_BYTES, disk=OUTBOX_DISK_BYTES):
        self.directory, self.memory, self.disk = directory, memory, disk
        self.codec = _LogCodec()  # log goes out as the store keeps it: zstd, where it shrinks
        self.items = collections.deque()  # [message, bytes | ("spill", at, size) | size]
        self.changed = threading.Condition()
        self.in_memory = 0
        self.spill = None
        self.spilled = 0
        self.dropped = 0

    def put(self, message, data=None):
        with self.changed:
            if data is not None and self.in_memory + len(data) > self.memory:
                data = self._set_aside(data)
            elif data is not None:
                self.in_memory += len(data)
            self.items.append([message, data])
            self.changed.notify_all()

    def _set_aside(self, data):
        if self.spilled + len(data) > self.disk:
            self.dropped += len(data)
            return len(data)
        if self.spill is None:
            self.spill = tempfile.TemporaryFile(  # noqa: SIM115 - closed in done and close
                prefix="cirunner-outbox-", dir=self.directory)
        os.pwrite(self.spill.fileno(), data, self.spilled)
        self.spilled += len(data)
        return ("spill", self.spilled - len(data), len(data))

    def __len__(self):
        return len(self.items)

    def jobs(self):
        """The ids of the jobs with messages still to send."""
        with self.changed:
            return {item[0]["job"] for item in self.items}

    def take(self, *, max_bytes, wait, linger=OUTBOX_LINGER_SECONDS):
        """The first messages (at most about `max_bytes` of log), with their
        log compressed and in base64, left in place until `done`; [] if none
        came in `wait` s. A message that came alone waits up to `linger` s
        for those that follow it (a short job's steps, log and end go in one
        report, not three), unless a job's end or `max_bytes` of log is in."""
        with self.changed:
            if not self.items:
                self.changed.wait(wait)
            lingered = time.monotonic() + linger
            while self.items and self.items[-1][0].get("type") != "end" \
                    and self.in_memory < max_bytes and time.monotonic() < lingered:
                self.changed.wait(max(0.0, lingered - time.monotonic()))
            items = list(itertools.islice(self.items, 0, 1000))
        batch, size = [], 0
        for message, data in items:
            if data is not None:
                data = self._read(data)
                if batch and size + len(data) > max_bytes:
                    break
                size += len(data)
                codec, packed = self.codec.encode(data)
                message = dict(message, data=base64.b64encode(packed).decode(), codec=codec)
            batch.append(message)
        return batch

    def _read(self, data):
        if isinstance(data, bytes):
            return data
        if isinstance(data, int):
            return _filler(data)
        _, at, size = data
        return os.pread(self.spill.fileno(), size, at)

    def done(self, count, *, drop_jobs=()):
        """The first `count` messages reached the server; forget them, and any
        message of `drop_jobs` (jobs ended elsewhere)."""
        with self.changed:
            for _ in range(count):
                self._forget(self.items.popleft())
            if drop_jobs:
                kept = collections.deque()
                for item in self.items:
                    if item[0]["job"] in drop_jobs:
                        self._forget(item)
                    else:
                        kept.append(item)
                self.items = kept
            if not self.items and self.spill is not None:
                self.spill.close()
                self.spill, self.spilled = None, 0
            self.changed.notify_all()

    def _forget(self, item):
        if isinstance(item[1], bytes):
            self.in_memory -= len(item[1])

    def wait_empty(self, timeout):
        """Wait until every message reached the server; whether they did."""
        with self.changed:
            return self.changed.wait_for(lambda: not self.items, timeout)

    def close(self):
        with self.changed:
            if self.spill is not None:
                self.spill.close()
                self.spill = None


class _AgentStore(_Listeners):
    """What an agent's Executor works with in place of a store: its server,
    over HTTP (see _AgentService).

    Jobs come through a poll that one thread keeps open; the steps, log chunks
    and end of each job go out in order through an outbox that a second
    thread delivers in batches, and keeps while the server cannot be reached
    (a restart, a network blip): the jobs run on meanwhile. What a job reads
    (its build, repository, pipeline, previous build, secrets) is what its
    claim brought; nothing else of the store is here. The job's checkout
    comes from the server's mirror (git over HTTP, with the agent's token for
    that server only)."""

    Error = OperationalError = IntegrityError = _ServerAway

    def __init__(self, server, token, data_dir):
        self.link = _AgentLink(server, token)
        self.data_dir = data_dir
        _make_data_dir(data_dir)
        base = f"{self.link.server}/api/agent/"
        self.git = _GitMirrors(
            os.path.join(data_dir, "mirrors"), config={f"http.{base}.extraHeader":
                                                       f"Authorization: Bearer {token}"},
            source=lambda repo: f"{base}git/{repo['owner']}/{repo['name']}")
        self.outbox = _Outbox(data_dir)
        self.runner = None        # what register_runner was told, to connect again
        self.name = ""            # the agent's name, as the server knows it
        self.refusal = ""         # why the server refused this agent, if it did
        self.lost = False         # the server found this runner lost: connect again
        self.jobs = {}            # job id -> its claim (job, build, repo, ...)
        self.queue = collections.deque()  # claimed, not yet taken by a worker
        self.ended = {}           # job id -> why the server ended it elsewhere
        self.steps = {}           # job id -> [its steps, as told to the server]
        self.recovered = []
        self._listeners = []
        self._lock = threading.Lock()
        self._journal_lock = threading.Lock()
        self._closed = threading.Event()
        self._connected = threading.Event()
        self._threads = []
        self.poll_seconds = AGENT_POLL_SECONDS

    def identity(self):
        return f"{self.link.server} {os.path.abspath(self.data_dir)}"

    # What git says when the server it fetches from is not there (or not
    # itself: a proxy's 502/503/504), as opposed to a fetch that is refused.
    _GIT_AWAY = ("Failed to connect to", "Could not resolve host", "Connection refused",
                 "Connection reset", "Empty reply from server", "returned error: 502",
                 "returned error: 503", "returned error: 504", "Operation timed out")

    def unreachable(self, message):
        """Whether a git failure says the server could not be reached."""
        return any(sign in message for sign in self._GIT_AWAY)

    def socket_directories(self):
        return ()

    def release_connection(self):
        pass

    # -- connecting ---------------------------------------------------------------

    def register_runner(self, runner_id, hostname, pid, workers=0, labels=None):
        """Connect to the server (trying again while it cannot be reached),
        then start polling it and delivering the outbox."""
        self.runner = {"runner": runner_id, "hostname": hostname, "pid": pid,
                       "pid_start": _process_start(pid), "workers": workers,
                       "labels": labels or {}}
        # The runner this data directory ran as before (a restart): the
        # server ends what it ran, and the executor kills what is left here.
        remembered = os.path.join(self.data_dir, "agent-runner")
        with contextlib.suppress(OSError), open(remembered) as handle:
            self.runner["previous"] = handle.read().strip()
        self._connect()
        with open(remembered, "w") as handle:
            handle.write(runner_id + "\n")
        if not self._threads:
            for target, name in ((self._poll_loop, "cirunner-agent-poll"),
                                 (self._send_loop, "cirunner-agent-send")):
                thread = threading.Thread(target=target, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)

    def _connect(self):
        delay = 0.2
        while not self._closed.is_set():
            try:
                answer = self.link.call("/api/agent/connect", dict(
                    self.runner, protocol=AGENT_PROTOCOL, version=__version__))
                break
            except _ServerAway as exc:
                _log.warning("agent: %s; trying again in %g s", exc.message, delay)
                self._closed.wait(delay)
                delay = min(delay * 2, AGENT_RETRY_SECONDS)
            except CIRunnerError as exc:  # revoked, another version, another process
                self.refusal = exc.message
                raise
        else:
            return
        self.name = answer["agent"]
        self.poll_seconds = float(answer.get("poll") or AGENT_POLL_SECONDS)
        self.recovered += answer.get("recovered") or []
        self.lost = False
        self._connected.set()

    def unregister_runner(self, runner_id):
        """Deliver what is left (a while), then say goodbye."""
        if not self.outbox.wait_empty(30.0):
            _log.warning("agent: %d message(s) for the server were not delivered",
                         len(self.outbox))
        with contextlib.suppress(CIRunnerError):
            self.link.call("/api/agent/disconnect", {"runner": runner_id}, timeout=5.0)

    def heartbeat(self, _runner_id):
        """False once the server found this runner lost (the poll keeps it alive)."""
        return not self.lost

    def data_version(self):
        return 0  # news come with the poll (see _news)

    def queue_summary(self):
        return len(self.queue), 0

    def recover_lost_jobs(self, runner_id, hostname, pid, *, max_age=None, here=None,
                          listening_since=0):
        """The jobs this data directory ran before this process (a crash, a
        kill -9): the server ended them (now, or when it found the runner
        lost), and what is left of them here is for the executor to kill."""
        recovered, self.recovered = self.recovered, []
        with contextlib.suppress(OSError, ValueError), open(self._journal()) as handle:
            recovered = sorted(set(recovered) | set(json.load(handle)) - set(self.jobs))
        self._write_journal()
        if here is not None:
            here += recovered
        return recovered

    def _journal(self):
        return os.path.join(self.data_dir, "agent-jobs.json")

    def _write_journal(self):
        """The ids of the jobs this agent runs, on disk (for its next start).
        The poll and the workers write it: one at a time, each the whole list."""
        with self._journal_lock:
            with self._lock:
                ids = sorted(self.jobs)
            temporary = self._journal() + ".new"
            try:
                with open(temporary, "w") as handle:
                    json.dump(ids, handle)
                os.replace(temporary, self._journal())
            except OSError as exc:  # a help for the next start, not a reason to stop
                _log.error("agent: cannot write %s: %s", self._journal(), exc)

    def close(self):
        self._closed.set()
        self._connected.set()
        with self.outbox.changed:
            self.outbox.changed.notify_all()
        for thread in self._threads:
            thread.join(5.0)
        self.link.reset()
        self.outbox.close()

    # -- polling ------------------------------------------------------------------

    def _poll_loop(self):
        delay = 0.2
        while not self._closed.is_set():
            self._connected.wait()
            if self._closed.is_set() or self.refusal:
                return
            try:
                with self._lock:  # workers remove the jobs they end
                    stopping = [job_id for job_id, job in self.jobs.items()
                                if job["job"].get("stopping")]
                    # What it still runs or has to report the end of: a job
                    # claimed for it that is in neither comes again.
                    holding = sorted(set(self.jobs) | self.outbox.jobs())
                answer = self.link.call("/api/agent/poll", {
                    "runner": self.runner["runner"], "wait": self.poll_seconds,
                    "stopping": stopping, "holding": holding}, timeout=self.poll_seconds + 30)
                delay = 0.2
            except _ServerAway as exc:
                _log.warning("agent: %s; trying again in %g s", exc.message, delay)
                self._closed.wait(delay)
                delay = min(delay * 2, AGENT_RETRY_SECONDS)
                continue
            except RunnerLost as exc:
                self._found_lost(exc.message)
                continue
            except CIRunnerError as exc:
                self._refused(exc.message)
                return
            try:
                self._news(answer)
            except Exception:  # noqa: BLE001 - a bug: stop the agent loudly, not silently
                _log.exception("agent: the poll failed")
                self._refused("the agent's poll failed (see the error above); restart it")
                return

    def _news(self, answer):
        with self._lock:  # a job it has already is never taken twice
            jobs = [payload for payload in answer.get("jobs") or []
                    if payload["job"]["id"] not in self.jobs]
            for payload in jobs:
                self.jobs[payload["job"]["id"]] = payload
                self.steps[payload["job"]["id"]] = []
                self.queue.append(payload["job"])
        if jobs:
            self._write_journal()
            self._notify("enqueued", [payload["job"]["id"] for payload in jobs])
        cancels = {int(job_id): reason for job_id, reason in (answer.get("cancel") or {}).items()}
        for job_id, reason in cancels.items():
            payload = self.jobs.get(job_id)
            if payload is not None:
                payload["job"].update(stopping=True, error=reason)
        if cancels:
            self._notify("cancel", list(cancels))

    def _found_lost(self, message):
        """The server ended this runner's jobs (it was silent too long): stop
        them here; the executor connects again (see Executor._heartbeat)."""
        _log.warning("agent: %s", message)
        self._connected.clear()
        with self._lock:
            for job_id in self.jobs:
                self.ended.setdefault(job_id, f"agent lost: {message}")
                self.jobs[job_id]["job"].update(status=ERROR, error=self.ended[job_id])
        self.lost = True

    def _refused(self, message):
        _log.error("agent: the server refused this agent: %s", message)
        self.refusal = message
        self._found_lost(message)

    # -- delivering ------------------------------------------------------------------

    def _send_loop(self):
        delay = 0.2
        while True:
            batch = self.outbox.take(max_bytes=4 * LOG_CHUNK_BYTES, wait=1.0)
            if not batch:
                if self._closed.is_set():
                    return
                continue
            try:
                answer = self.link.call("/api/agent/report",
                                        {"runner": self.runner["runner"], "messages": batch})
                delay = 0.2
            except _ServerAway as exc:
                if self._closed.wait(delay):
                    return
                delay = min(delay * 2, 5.0)
                _log.warning("agent: %s; %d message(s) kept", exc.message, len(self.outbox))
                continue
            except CIRunnerError as exc:  # a message the server cannot take: not again
                _log.error("agent: the server refused a report: %s", exc.message)
                answer = {"ended": {str(message["job"]): exc.message for message in batch}}
            ended = {int(job_id): reason for job_id, reason in answer.get("ended", {}).items()}
            for job_id, reason in ended.items():
                _log.warning("agent: job %s was ended elsewhere (%s): stopping it", job_id,
                             reason)
            with self._lock:
                self.ended.update(ended)
                for job_id, reason in ended.items():
                    if job_id in self.jobs:
                        self.jobs[job_id]["job"].update(status=ERROR, error=reason)
            self.outbox.done(len(batch), drop_jobs=set(ended))
            if ended:
                self._notify("cancel", list(ended))

    # -- what the executor reads -----------------------------------------------------

    def claim_next_job(self, _runner_id, _labels=None):
        with self._lock:
            return dict(self.queue.popleft()) if self.queue else None

    def cancel_requested_jobs(self, _runner_id):
        return [job_id for job_id, payload in list(self.jobs.items())
                if payload["job"].get("stopping")]

    def _claim(self, key, value):
        for payload in list(self.jobs.values()):
            if payload[key]["id"] == value:
                return payload
        raise NotFound(f"no job of this agent has {key} {value}")

    def get_job_by_id(self, job_id):
        payload = self.jobs.get(job_id)
        if payload is None:
            raise NotFound(f"job {job_id} not found")
        return dict(payload["job"])

    def get_build_by_id(self, build_id):
        return dict(self._claim("build", build_id)["build"])

    def get_repo_by_id(self, repo_id):
        return dict(self._claim("repo", repo_id)["repo"])

    def get_pipeline(self, pipeline_id):
        for payload in list(self.jobs.values()):
            if payload["pipeline"] and payload["pipeline"]["id"] == pipeline_id:
                return payload["pipeline"]
        raise NotFound(f"pipeline {pipeline_id} not found")

    def previous_build(self, build):
        return self._claim("build", build["id"])["previous"]

    def failed_pipelines(self, build_id):
        return list(self._claim("build", build_id).get("failed_pipelines", ()))

    def secrets_for(self, repo_id, event, *, job_id=None):
        """The secrets that came with job `job_id` (only its own)."""
        payload = self.jobs.get(job_id)
        same = payload is not None and payload["repo"]["id"] == repo_id \
            and payload["event"] == event
        return dict(payload["secrets"]) if same else {}

    def secret_images(self, repo_id, *, job_id=None):
        payload = self.jobs.get(job_id)
        return dict(payload["secret_images"]) if payload is not None else {}

    def list_steps(self, job_ids):
        return {job_id: [dict(step) for step in self.steps.get(job_id, [])]
                for job_id in job_ids}

    # -- what the executor writes ------------------------------------------------------

    def _check(self, job_id):
        if job_id in self.ended:
            raise Conflict(self.ended[job_id])

    def _put(self, job_id, lease, message, data=None):
        self._check(job_id)
        self.outbox.put(dict(message, job=job_id, lease=lease), data)

    def add_steps(self, job_id, steps, *, lease=None):
        self._put(job_id, lease, {"type": "steps", "steps": [list(step) for step in steps]})
        self.steps[job_id] = [{"id": (job_id, number), "number": number, "name": name,
                               "kind": kind, "status": PENDING}
                              for number, (name, kind) in enumerate(steps, start=1)]
        return [step["id"] for step in self.steps[job_id]]

    def update_step(self, step_id, *, lease=None, **fields):
        job_id, number = step_id
        self._put(job_id, lease, {"type": "step", "number": number, "fields": fields})
        self.steps[job_id][number - 1].update(fields)

    def append_log(self, job_id, seq, offset, data, *, lease=None):
        self._put(job_id, lease, {"type": "log", "seq": seq, "offset": offset}, bytes(data))

    def finish_job(self, job_id, status, *, exit_code=0, error="", message="", lease=None):
        try:
            self._put(job_id, lease, {"type": "end", "status": status, "exit_code": exit_code,
                                      "error": _clip(error or "", 3950)})
        finally:
            with self._lock:
                self.jobs.pop(job_id, None)
                self.steps.pop(job_id, None)
                self.ended.pop(job_id, None)
            self._write_journal()


class App:
    """The WSGI app `make_app` makes: call it as any WSGI app. `ops` are the
    operations it answers with; set `closing` before a shutdown, and open
    streams end; `store`, `executor`, `max_body` and `max_webhook_body` are
    what it was made with."""

    def __init__(self, wsgi, *, ops, closing, max_body, max_webhook_body):
        self.wsgi = wsgi
        self.ops = ops
        self.store, self.executor = ops.store, ops.executor
        self.closing = closing
        self.max_body, self.max_webhook_body = max_body, max_webhook_body

    def __call__(self, environ, start_response):
        return self.wsgi(environ, start_response)


def make_app(store, executor=None, *, max_body=DEFAULT_MAX_BODY, metrics_from=(),
             max_webhook_body=MAX_WEBHOOK_BODY, max_streams=DEFAULT_HTTP_THREADS - 4, heartbeat=SSE_HEARTBEAT_SECONDS,
             max_jobs=DEFAULT_MAX_JOBS, public_url=None):
    """Build the Bottle WSGI app: both API dialects, webhooks and pages over `store`.

    `executor` is optional: jobs run wherever an executor shares the store.
    `max_body` bytes is the largest request body (413 beyond), and
    `max_webhook_body` that of a webhook; `max_streams`
    live log streams may be open at once (503 beyond), each holding a server
    thread; `heartbeat` seconds between keep-alive comments on streams.
    The app's ``closing`` event ends open streams (set it before shutdown).
    With a `public_url` (default: the executor's) that is https://, cookies
    are sent over HTTPS only.
    ``GET /metrics`` (with prometheus_client installed) is for admin tokens
    and the addresses in `metrics_from`; the metrics count from its first call.
    """
    app, closing = _bottle_class()(), threading.Event()
    access = _Access(store)
    if public_url is None:
        public_url = executor.public_url if executor is not None else ""
    ops = Operations(store, executor, max_jobs=max_jobs, public_url=public_url,
                     cancel_wait=executor.grace + 2 if executor is not None else 0.0)
    api = _Api(store, access, ops, closing=closing, max_body=max_body,
               max_webhook_body=max_webhook_body, max_streams=max_streams,
               heartbeat=heartbeat, metrics_from=metrics_from)
    pages = _Pages(store, access, ops, api.log_html, streams=api.streams, closing=closing,
                   heartbeat=heartbeat, secure_cookies=public_url.startswith("https://"))
    app.install(_metrics_plugin(api))
    routes = _API_ROUTES + _WEBHOOK_ROUTES
    api.openapi_document = _openapi_document(routes)
    for route in routes:
        app.route(route.path, route.method, _api_callback(api, route))
    agents = _AgentService(store, closing=closing, max_polls=max_streams,
                           agent_timeout=executor.agent_timeout if executor is not None
                           else RUNNER_LOST_SECONDS)
    if executor is not None:
        executor.on_waiting_jobs(agents.notify)
    for method, path, handler in _agent_routes(agents, api):
        app.route(path, method, _agent_callback(agents, handler))

    known = [(re.compile(re.sub(r"<[^>]+>", "[^/]+", route.path) + r"\Z"), route.method)
             for route in routes]

    def unknown_api_route(rest):  # not a page's path: a JSON 404 or 405, never a page
        request = bottle.request
        allowed = sorted({method for pattern, method in known if pattern.match(request.path)})
        if allowed:  # answered by _Bottle.default_error_handler, as Bottle's own
            raise bottle.HTTPError(405, Allow=", ".join(allowed))
        return _error_reply(NotFound(f"there is no API route {request.method} /api/{rest} "
                                     "(the routes: /api/openapi.json)"))

    app.route("/api/<rest:path>", ["GET", "POST", "PUT", "PATCH", "DELETE"], unknown_api_route)
    for method, path, handler in _PAGE_ROUTES:
        app.route(path, method, _page_callback(pages, handler))

    def before_request():
        environ = bottle.request.environ
        path = environ.get("PATH_INFO", "")
        if len(path) > 1 and path.endswith("/"):  # trailing slashes are optional
            environ["PATH_INFO"] = path.rstrip("/") or "/"
        try:
            _check_request_text(environ)
            length = environ.get("CONTENT_LENGTH") or "0"
            if not length.isdigit():
                raise BadRequest("invalid Content-Length")
            limit = api.body_limit()
            if int(length) > limit:  # refused before the app reads any of it
                raise TooLarge(f"request body larger than {limit} bytes")
        except CIRunnerError as error:
            raise _error_reply(error) from None

    app.add_hook("before_request", before_request)
    # A streamed body reads on after this, taking a connection back if it must.
    app.add_hook("after_request", store.release_connection)
    return App(app, ops=ops, closing=closing, max_body=max_body,
               max_webhook_body=max_webhook_body)

###############################################################################
# Server ######################################################################
###############################################################################


def _is_cacheable_request(method, path):
    """Whether a request is a bounded read of the store whose answer depends on
    the store and the request alone: API GETs, but never logs, which may be
    large or follow a running job for minutes."""
    return method in ("GET", "HEAD") and path.startswith("/api/") and "/logs" not in path


class _ReadCache:
    """WSGI middleware: answers a repeated API read from memory while the store
    is unchanged.

    Each entry is keyed by everything in the request that its answer can
    depend on, and carries the store's commit counter from before it was made
    (`Store.commit_counter`): any commit by any connection, in this process or
    another, changes it, and the entry is made again. So an answer is never
    stale (a token revoked with the CLI is refused at once); polling an
    unchanged build costs a lookup and one pragma. A store without a counter
    (PostgreSQL) is not cached.
    """

    MAX_BYTES = 4 * 1024 * 1024  # all answers kept, together; then it starts afresh
    MAX_BODY = 256 * 1024
    # Also made again after a minute: a hit skips authentication, and with it
    # the token's last-used stamp (at most one a minute, see Store.authenticate).
    MAX_AGE = 60.0

    def __init__(self, app, store):
        self.app = app
        self.store = store
        self._lock = threading.Lock()
        self._entries = {}
        self._bytes = 0

    def cached_bytes(self):
        """How many bytes of answers the cache holds."""
        return self._bytes

    def __call__(self, environ, start_response):
        method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
        # Not with cookies: a browser's session also ends with time, not only
        # with a commit.
        if not _is_cacheable_request(method, path) or "HTTP_COOKIE" in environ:
            return self.app(environ, start_response)
        key = (method, environ.get("SCRIPT_NAME", ""), path, environ.get("QUERY_STRING", ""),
               environ.get("HTTP_AUTHORIZATION"), environ.get("HTTP_HOST"),
               environ.get("wsgi.url_scheme"))
        try:
            version = self.store.commit_counter()  # before the answer: a commit voids it
        except self.store.Error:
            return self.app(environ, start_response)  # the answer itself reports what is wrong
        if version is None:
            return self.app(environ, start_response)
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and entry[0] == version and now - entry[1] < self.MAX_AGE:
            start_response(entry[2], list(entry[3]))
            return [entry[4]]
        answer = []

        def remember(status, headers, exc_info=None):
            answer[:] = [status, list(headers)]
            return start_response(status, headers, exc_info)

        result = self.app(environ, remember)
        try:
            body = b"".join(result)  # cacheable answers are bounded: never a log
        finally:
            if hasattr(result, "close"):
                result.close()
        if (answer and answer[0].startswith("200 ") and len(body) <= self.MAX_BODY
                and not any(name.lower() == "set-cookie" for name, _ in answer[1])):
            self._remember(key, (version, now, answer[0], tuple(answer[1]), body))
        return [body]

    def _remember(self, key, entry):
        with self._lock:
            if self._bytes + len(entry[4]) > self.MAX_BYTES:
                self._entries, self._bytes = {}, 0
            self._entries[key] = entry
            self._bytes += len(entry[4])


class _Shutdown:
    """What SIGTERM and SIGINT do to a running `serve`: the first ends the HTTP
    loop (waitress's own way out is SystemExit, which it catches), later ones
    skip the jobs' grace period. Handlers only set flags or raise that."""

    def __init__(self, closing, executor):
        self.closing = closing
        self.executor = executor
        self.serving = True
        self.requested = False

    def drain(self, signum, frame):
        """SIGUSR1: take no new jobs, and stop serving once the running ones end."""
        if self.executor.draining():
            return
        _log.warning("draining: no new jobs; exiting when the running ones end")
        self.executor.drain()
        threading.Thread(target=self._stop_when_idle, name="cirunner-drain", daemon=True).start()

    def _stop_when_idle(self):
        while self.executor.busy_workers() or self.executor.store.running_jobs_of(
                self.executor.runner_id):
            time.sleep(0.2)
        signal.raise_signal(signal.SIGTERM)  # the usual way out, with nothing left to stop

    def __call__(self, signum, frame):
        if self.requested and self.executor is not None:
            self.executor.grace = 0  # a second signal: do not wait for jobs to exit
        self.requested = True
        self.closing.set()
        if self.serving:
            self.serving = False
            raise SystemExit(0)


def _raise_open_file_limit(wanted):
    """Raise the soft limit on open files towards `wanted` (each connection is
    one), as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def serve(app, *, host=DEFAULT_HOST, port=DEFAULT_PORT, threads=DEFAULT_HTTP_THREADS,
          connection_limit=DEFAULT_CONNECTION_LIMIT, url_prefix="",
          ready=None, stop=None):
    """Serve a `make_app` app on waitress until SIGTERM or SIGINT, answering
    repeated API reads from the read cache; under `url_prefix` (e.g. "/ci",
    where a reverse proxy passes the path on as it came). `ready(url)` is
    called once the socket listens; `stop()` after the server stopped, while a
    second signal still skips the jobs' grace period. Run it in the main thread
    (signals are delivered there). Raises CIRunnerError when the address
    cannot be used.

    What it changes of the process, while it serves: handlers of SIGTERM,
    SIGINT and SIGUSR1 (given back at its end); the soft limit on open files,
    raised towards the connection limit (kept); the level of waitress's
    "waitress.queue" logger, to errors only (a burst of requests is normal).
    """
    waitress = _optional("waitress", "serve", "waitress")
    cached = _ReadCache(app, app.store)
    # A burst of requests (a push to many repositories) is normal for a CI
    # server: no warning per request queued behind the busy threads.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    _raise_open_file_limit(connection_limit + threads + 256)
    try:
        # Waitress reads requests on one event loop and hands complete ones to
        # the threads: a slow or stalled client costs a socket, not a thread.
        # Output is buffered 1 MiB per connection (waitress's default is 16
        # MB); a log download is sent from its file by the loop, so a client
        # that never reads holds no thread either. Bodies above the largest
        # limit are refused on their Content-Length before any is read (and a
        # chunked body is cut there); the app refuses smaller ones above its
        # route's limit.
        server = waitress.create_server(
            cached, host=host, port=port, threads=threads, ident="cirunner",
            asyncore_use_poll=True, clear_untrusted_proxy_headers=True,
            outbuf_high_watermark=1024 * 1024, connection_limit=connection_limit,
            channel_timeout=IDLE_CONNECTION_SECONDS, url_prefix=url_prefix,
            max_request_body_size=max(app.max_body, app.max_webhook_body, AGENT_MAX_BODY) + 1)
    except OSError as exc:
        raise CIRunnerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; stop what "
                            "uses it, or choose another address with --host/--port") from None
    shutdown = _Shutdown(app.closing, app.executor)
    previous = {sig: signal.signal(sig, shutdown) for sig in (signal.SIGTERM, signal.SIGINT)}
    if app.executor is not None:
        previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, shutdown.drain)
    try:
        if ready is not None:
            ready(f"http://{host}:{server.effective_port}{url_prefix.rstrip('/')}")
        server.run()  # returns once a signal raised SystemExit in it
    finally:
        shutdown.serving = False
        app.closing.set()
        try:
            if stop is not None:
                stop()
        finally:
            server.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

###############################################################################
# Command line ################################################################
###############################################################################

def _split_full_name(text):
    owner, slash, name = text.partition("/")
    if not slash:
        raise BadRequest(f"expected OWNER/NAME, not {text!r}")
    return _check_name(owner, "owner"), _check_name(name, "repository name")


def _parse_vars(pairs):
    variables = {}
    for pair in pairs or ():
        name, equals, value = pair.partition("=")
        if not equals:
            raise BadRequest(f"--var expects NAME=VALUE, not {pair!r}")
        variables[name] = value
    return _check_variables(variables)


def _print_summary(build, err):
    """The jobs' and the build's outcome (from the build's JSON), on stderr."""
    for job in build.get("jobs", []):
        axis = _axis_text(job.get("environment") or {})
        detail = f": {job['error']}" if job["error"] else ""
        print(f"job {job['number']}{' (' + axis + ')' if axis else ''}: {job['status']}{detail}",
              file=err)
    detail = f": {build['error']}" if build["error"] else ""
    print(f"build {build['number']}: {build['status']}{detail}", file=err)


def _follow_build(store, build_id, out):
    """Print the logs of a build's jobs, job after job, each line prefixed with
    its job number, as they grow, until the build ends. Returns the build."""
    for job in store.list_jobs(build_id):
        _write_prefixed((chunk for chunk, _ in _follow_log(store, job["id"], 0) if chunk),
                        f"[{job['number']}] ".encode(), out)
    build = store.wait_until_done(build_id, 60)
    while build["status"] in ACTIVE_STATUSES:
        build = store.wait_until_done(build_id, 60)
    return build


def _write_prefixed(chunks, prefix, out):
    """Write a log's chunks with `prefix` before each line; a last line
    without its newline gets one."""
    partial = b""
    for chunk in chunks:
        lines = (partial + chunk).split(b"\n")
        partial = lines.pop()
        for line in lines:
            out.write(prefix + line + b"\n")
        out.flush()
    if partial:
        out.write(prefix + partial + b"\n")
        out.flush()


# -- where the command line works: the local store, or a server over HTTP ----------


def open_store(data_dir, db=None):
    """The store of `data_dir`: its SQLite file, or the PostgreSQL database
    at `db` (postgresql://user:password@host/database) that several machines share."""
    if not db:
        return Store.open(data_dir)
    if not db.startswith(("postgresql://", "postgres://")):
        raise BadRequest(f"--db expects postgresql://user:password@host/database, not "
                         f"{_redact_url(db)!r}")
    return PostgresStore.open(data_dir, db)


def _open_store(data_dir, db=None):
    """The store in `data_dir` (or at `db`): only `serve` and `exec` make a file."""
    if db:
        return open_store(data_dir, db)
    if not os.path.exists(os.path.join(data_dir, "cirunner.db")):
        raise CIRunnerError(
            f"no cirunner store in {os.path.abspath(data_dir)}: point at one with --data DIR "
            "(or CIRUNNER_DATA), at a server with --server URL --token T (or `cirunner login "
            "URL`), or make one with `cirunner serve --data DIR`")
    return Store.open(data_dir)


def _cli_config_path(environ):
    """Where `cirunner login` keeps the server and token."""
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "cirunner", "cli.json")


def _read_cli_config(environ):
    path = _cli_config_path(environ)
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CIRunnerError(f"cannot read {path}: {exc}; `cirunner login URL` writes it "
                            "again") from None
    return config if isinstance(config, dict) else {}


def _client(args, environ):
    """The local store (--data), or a server (--server and --token, their
    environment variables, or the file `cirunner login` wrote). An explicit
    --data (or CIRUNNER_DATA) wins over that file."""
    server = args.server or environ.get("CIRUNNER_SERVER")
    token = args.token or environ.get("CIRUNNER_TOKEN")
    if not server and not args.data_given:
        config = _read_cli_config(environ)
        server, token = config.get("server"), token or config.get("token")
    if server:
        return _RemoteClient(server, token)
    return _LocalClient(_open_store(args.data, args.db), args)


def _build_number(client, owner, name, text):
    """A build number from the command line: a number, or `latest` (the newest build)."""
    if text == "latest":
        builds = client.call("list_builds", owner=owner, name=name, params={"per_page": 1})
        if not builds:
            raise NotFound(f"{owner}/{name} has no builds yet")
        return builds[0]["number"]
    return _check_positive(text, "build number")


class _LocalClient:
    """The command line on the store in --data, as the machine's admin: the
    operations, called here."""

    def __init__(self, store, args):
        self.store = store
        self.args = args
        # Links and the webhook URL: the address given, else the one of the
        # server running on this store, else serve's default.
        self.ops = Operations(store, public_url=getattr(args, "public_url", "") or
                              store.serving_url() or f"http://{DEFAULT_HOST}:{DEFAULT_PORT}")
        self.caller = local_admin()

    def close(self):
        self.store.close()

    def page(self, owner, name, number):
        """The address of a build's page."""
        return f"{self.ops.public_url}/{owner}/{name}/{number}"

    def call(self, operation, **arguments):
        """Operation `operation` of `Operations`, for the admin of this machine."""
        return getattr(self.ops, operation)(self.caller, **arguments)

    def log(self, owner, name, number, job_number, *, follow=False):
        build = self.ops.find_build(self.ops.find_repo(self.caller, owner, name), number)
        job = self.store.get_job(build["id"], job_number)
        if not follow:
            return self.store.read_log(job["id"])
        return (chunk for chunk, _ in _follow_log(self.store, job["id"], 0) if chunk)

    def wait(self, owner, name, build, out, err):
        """Stream a build's logs, job by job prefixed, until it ends; its jobs
        run here if no runner shares the store (after the builds queued
        before it, which it names). Returns the finished build."""
        executor = None
        if build["status"] in ACTIVE_STATUSES and not self.store.active_runners():
            ahead = self.store.builds_queued_before(build["id"])
            if ahead:
                names = ", ".join(f"{row['owner']}/{row['name']} #{row['number']} "
                                  f"({row['jobs']} job(s))" for row in ahead)
                print(f"cirunner: no server runs this store's jobs: running them here, "
                      f"oldest first; before build {build['number']}: {names}", file=err,
                      flush=True)
            # On a shared store, crons, reports and pruning are the servers'.
            executor = Executor(self.store, workers=self.args.workers,
                                serving=not self.args.db, **_isolation_options(self.args))
            executor.start()
        try:
            finished = _follow_build(self.store, build["id"], out)
        finally:
            if executor is not None:
                executor.stop()
        return _full_build_json(self.store, finished)


class _RemoteClient:
    """The command line on a server: one generic client of the API, which
    calls each operation through its route (`_OPERATIONS`) with a token."""

    def __init__(self, server, token, *, timeout=60):
        if not server.startswith(("http://", "https://")):
            raise BadRequest(f"--server must be an http(s) URL, not {server!r}")
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout

    def close(self):
        pass

    def page(self, owner, name, number):
        """The address of a build's page."""
        return f"{self.server}/{owner}/{name}/{number}"

    def call(self, operation, **arguments):
        """Operation `operation` through its route: path parameters in the
        path, `params` as the JSON body (as the query of a GET)."""
        route = _OPERATIONS[operation]
        params = arguments.pop("params", None)
        path = re.sub(r"<(\w+)>", lambda match: quote(str(arguments.pop(match.group(1))),
                                                      safe=""), route.path)
        if arguments:
            raise TypeError(f"{operation} takes no {', '.join(arguments)}")
        if params and route.method == "GET":
            return self.request("GET", f"{path}?{urlencode(params)}")
        return self.request(route.method, path, params)

    def request(self, method, path, body=None, *, stream=False, accept=_JSON):
        """The answer's JSON (or the open response, to `stream`); an API error
        is a CIRunnerError with the server's message."""
        import urllib.error  # here, not at the top: with ssl it costs megabytes
        import urllib.request

        headers = {"Accept": accept, "User-Agent": f"cirunner/{__version__}"}
        if self.token:
            headers["Authorization"] = f"Token {self.token}"
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), _JSON
        request = urllib.request.Request(self.server + path, data=data, method=method,
                                         headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            with error:
                try:
                    answer = json.loads(error.read())
                except ValueError:
                    answer = None
            answer = answer if isinstance(answer, dict) else {}
            message = str(answer.get("message") or error.reason)
            if error.code == 401 or "status" not in answer:
                # Credentials, or an answer that is not cirunner's: say whose it was.
                message = f"{message} (HTTP {error.code} from {self.server})"
            raise _error_of_answer(answer.get("error"), error.code, message) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise CIRunnerError(f"cannot reach {self.server}: {reason}") from None
        if stream:
            return response
        with response:
            answer = response.read()
        return json.loads(answer) if answer else None

    def log(self, owner, name, number, job_number, *, follow=False):
        path = f"/api/repos/{owner}/{name}/logs/{number}/{job_number}"
        if not follow:
            response = self.request("GET", path, stream=True, accept="text/plain")
            return self._read_all(response)
        response = self.request("GET", path + "?follow=1", stream=True,
                                accept="text/event-stream")
        return self._read_events(response)

    @staticmethod
    def _read_all(response):
        with response:
            while True:
                chunk = response.read(LOG_CHUNK_BYTES)
                if not chunk:
                    return
                yield chunk

    @staticmethod
    def _read_events(response):
        """The log text carried by a Server-Sent Events stream, until its `end` event."""
        with response:
            event, data = "message", []
            for raw in response:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif not line:
                    if event == "end":
                        return
                    if data and event == "message":
                        yield json.loads("\n".join(data)).encode("utf-8")
                    event, data = "message", []

    def wait(self, owner, name, build, out, err):
        """Follow each job's log over Server-Sent Events, in job order, prefixed
        as a local wait prints them; then the finished build."""
        for job in build["jobs"]:
            _write_prefixed(self.log(owner, name, build["number"], job["number"], follow=True),
                            f"[{job['number']}] ".encode(), out)
        while True:  # the last job's end can precede the build's roll-up by a moment
            finished = self.call("get_build", owner=owner, name=name, number=build["number"])
            if finished["status"] in DONE_STATUSES:
                return finished
            time.sleep(0.1)


def _await_room(store, executor, start, stderr, every=2.0):
    """A read-only server (its disk was full at start): once the store can be
    written again, start what serving starts (tried again while it fails)."""
    failed = ""
    while not executor.wait_stopping(every):
        if not store.try_writable():
            continue
        try:
            start()
        except Exception as exc:  # noqa: BLE001 - said once, tried again: the server stays up
            if str(exc) != failed:
                failed = str(exc)
                print(f"cirunner: room again, but starting failed: {exc}; trying again",
                      file=stderr, flush=True)
            continue
        print("cirunner: there is room again: serving, and running jobs", file=stderr,
              flush=True)
        return


def _bootstrap_admin(store, stdout):
    """On a store with no users, make an admin and print its token, once, on
    stdout (never into the log stream)."""
    if store.user_count():
        return
    with contextlib.suppress(Conflict):  # another process got there first
        store.create_user("admin", admin=True)
        _, secret = store.create_token("admin", name="bootstrap", scope="write")
        print(f"cirunner: created user 'admin'; its token (shown once, keep it safe):\n"
              f"{secret}\n"
              "cirunner: make more with `cirunner user add LOGIN` and "
              "`cirunner token create LOGIN`", file=stdout, flush=True)


def _warn_unisolated(executor, stderr):
    """Say once, at start, how steps are isolated when it is less than the
    default, and what to do; and who steps run as when the server is root."""
    runner = executor.runner
    if executor.isolation == "none":
        print("cirunner: WARNING: steps run without a sandbox (--sandbox none): every user "
              "who can start a build can read and change this server's data, secrets "
              "included; install bubblewrap (apt-get install bubblewrap) and use --sandbox "
              "auto", file=stderr, flush=True)
    elif executor.isolation == "unavailable":
        print(f"cirunner: WARNING: {executor.isolation_problem}: jobs with steps on the host "
              "will end error until you install bubblewrap (apt-get install bubblewrap) and "
              "restart, or accept the risk with --sandbox none", file=stderr, flush=True)
    elif getattr(runner, "network", "") == "host":
        print("cirunner: WARNING: --sandbox-network host: sandboxed steps share this "
              "machine's network, its loopback services (the API, databases) included",
              file=stderr, flush=True)
    if runner.user.other:
        print(f"cirunner: running as root: steps on the host run as {runner.user.name} "
              f"(uid {runner.user.uid}), never as root", file=stderr, flush=True)


def _command_serve(args, stdout, stderr):
    # On a full disk, serve what is stored (reads, pages, /healthz; writes
    # answer 507) rather than not at all, and start for real once there is room.
    store = open_store(args.data, args.db) if args.db else Store.open(args.data,
                                                                       read_only_if_full=True)
    executor = Executor(store, workers=args.workers, grace=args.grace,
                        keep_workspaces=args.keep_workspaces, keep_builds=args.keep_builds,
                        **_isolation_options(args),
                        keep_days=args.keep_days, max_log_bytes=args.max_log_bytes,
                        prune_every=args.prune_every, agent_timeout=args.agent_timeout,
                        watchdog=args.watchdog, public_url=args.public_url or
                        f"http://{args.host}:{args.port}{args.url_prefix.rstrip('/')}")
    app = make_app(store, executor, max_streams=max(1, args.threads - 4),
                   metrics_from=[address.strip() for address in args.metrics_from.split(",")
                                 if address.strip()])

    def start():
        _bootstrap_admin(store, stdout)
        store.keep_reserve()  # room to record jobs' ends if the disk fills up
        executor.start()

    def ready(url):
        if store.read_only:
            executor.check()  # what cannot work here fails now, as on any start
            print(f"cirunner: WARNING: {store.read_only}: serving read-only (reads and "
                  "/healthz answer, writes 507) until there is room again; jobs start then",
                  file=stderr, flush=True)
            threading.Thread(target=_await_room, args=(store, executor, start, stderr),
                             name="cirunner-await-room", daemon=True).start()
        else:
            start()
        store.release_connection()  # from here, lent out between requests like the pool's
        _warn_unisolated(executor, stderr)
        engine = executor.engine_description()
        print(f"cirunner {__version__}: serving {url}/ with {executor.workers} worker(s), "
              f"steps in {executor.isolation}, images in {engine}, "
              f"data in {os.path.abspath(args.data)}"
              f"{f', store {store.identity()}' if args.db else ''}", file=stderr, flush=True)

    def stop():
        print("cirunner: shutting down: stopping running jobs", file=stderr, flush=True)
        executor.stop(reason="server shut down")

    try:
        serve(app, host=args.host, port=args.port, threads=args.threads,
              connection_limit=args.connection_limit, url_prefix=args.url_prefix,
              ready=ready, stop=stop)
    finally:
        store.close()
    return 0


def _command_agent(args, stdout, stderr):
    """Run jobs of a server (--server and an agent's --token) or of a shared
    PostgreSQL store (--db) until SIGTERM or SIGINT (a second one skips the
    jobs' grace period); SIGUSR1 drains, as for `serve`."""
    server = getattr(args, "server", None) or args.environ.get("CIRUNNER_SERVER")
    token = getattr(args, "token", None) or args.environ.get("CIRUNNER_TOKEN")
    if server and args.db:
        raise BadRequest("an agent works for a server (--server) or from a shared store "
                         "(--db), not both")
    if not server and not args.db:
        raise BadRequest("agent runs jobs for a server: give it --server URL --token TOKEN "
                         "(an admin makes the token with `cirunner agents add NAME`), or, on "
                         "a machine trusted as much as the servers, --db postgresql://...")
    store = _AgentStore(server, token, args.data) if server else open_store(args.data, args.db)
    executor = Executor(store, workers=args.workers, grace=args.grace,
                        labels=_parse_labels(args.labels), **_isolation_options(args),
                        agent_timeout=args.agent_timeout, watchdog=args.watchdog,
                        serving=False)
    closing = threading.Event()
    shutdown = _Shutdown(closing, executor)
    shutdown.serving = False  # no HTTP loop to leave: the flag is enough
    handlers = {signal.SIGTERM: shutdown, signal.SIGINT: shutdown, signal.SIGUSR1: shutdown.drain}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        executor.start()
        _warn_unisolated(executor, stderr)
        engine = executor.engine_description()
        labels = ",".join(f"{key}={value}" for key, value in sorted(executor.labels.items()))
        source = f"server {server} as agent {store.name}" if server else store.identity()
        print(f"cirunner {__version__}: agent {executor.runner_id} runs jobs from "
              f"{source} with {executor.workers} worker(s), labels {labels}, "
              f"steps in {executor.isolation}, images in {engine}", file=stderr, flush=True)
        while not closing.wait(0.5):
            if getattr(store, "refusal", ""):
                print(f"cirunner: the server refused this agent: {store.refusal}",
                      file=stderr, flush=True)
                executor.stop(reason="the server refused the agent")
                return 1
        print("cirunner: shutting down: stopping running jobs", file=stderr, flush=True)
        executor.stop(reason="agent shut down")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        store.close()
    return 0


def _repo_params(args):
    """The repository settings given as flags, by field name (see _REPO)."""
    return {field.name: getattr(args, field.name) for field in _REPO.writable()
            if getattr(args, field.name, None) is not None}


def _with_client(command):
    """A command that works on the local store or a server, whichever `args` names."""

    @functools.wraps(command)
    def run(args, stdout, stderr):
        client = _client(args, args.environ)
        try:
            return command(client, args, stdout, stderr)
        finally:
            client.close()

    return run


@_with_client
def _command_repo(client, args, stdout, stderr):
    if args.repo_command == "list":
        for repo in client.call("list_repos"):
            print(f"{repo['full_name']}\t{repo['clone_url']}\t"
                  f"{repo['default_branch'] or '(remote default)'}", file=stdout)
        return 0
    owner, name = _split_full_name(args.full_name)
    full_name = f"{owner}/{name}"
    if args.repo_command == "add":
        repo = client.call("add_repo", owner=owner, name=name, params=_repo_params(args))
        print(f"added {full_name} ({repo['clone_url']})", file=stdout)
        print(f"webhook: point the forge at {repo['webhook_url']} (content type "
              f"application/json) with the secret, shown once:\n{repo['webhook_secret']}",
              file=stdout)
    elif args.repo_command == "update":
        client.call("update_repo", owner=owner, name=name, params=_repo_params(args))
        print(f"updated {full_name}", file=stdout)
    elif args.repo_command == "remove":
        client.call("delete_repo", owner=owner, name=name)
        print(f"removed {full_name}", file=stdout)
    return 0


@_with_client
def _command_user(client, args, stdout, stderr):
    if args.user_command == "add":
        user = client.call("add_user", params={"login": args.login, "email": args.email or "",
                                               "admin": args.admin})
        print(f"added user {user['login']}{' (admin)' if user['admin'] else ''}", file=stdout)
    elif args.user_command == "list":
        for user in client.call("list_users"):
            print(f"{user['login']}\t{'admin' if user['admin'] else 'user'}\t{user['email']}",
                  file=stdout)
    elif args.user_command == "update":
        params = {key: value for key, value in (("admin", args.admin), ("email", args.email))
                  if value is not None}
        user = client.call("update_user", login=args.login, params=params)
        print(f"{user['login']}\t{'admin' if user['admin'] else 'user'}\t{user['email']}",
              file=stdout)
    else:
        client.call("delete_user", login=args.login)
        print(f"removed user {args.login} and their tokens", file=stdout)
    return 0


@_with_client
def _command_agents(client, args, stdout, stderr):
    if args.agents_command == "add":
        agent = client.call("add_agent", params={"name": args.name,
                                                 "labels": _parse_labels(args.labels)})
        print(f"agent {agent['name']}: its token, shown once (cirunner agent --server URL "
              "--token TOKEN):", file=stderr)
        print(agent["token"], file=stdout)
    elif args.agents_command == "list":
        for agent in client.call("list_agents"):
            seen = (time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(agent["last_seen_at"]))
                    if agent["last_seen_at"] else "never")
            labels = ",".join(f"{key}={value}" for key, value in sorted(agent["labels"].items()))
            print(f"{agent['name']}	{labels or '-'}	{agent['version'] or '-'}	"
                  f"{agent['address'] or '-'}	last seen {seen}	{agent['running']}/"
                  f"{agent['workers']} running", file=stdout)
    else:
        client.call("remove_agent", agent=args.name)
        print(f"removed agent {args.name}: its token no longer works", file=stdout)
    return 0


@_with_client
def _command_token(client, args, stdout, stderr):
    if args.token_command == "create":
        token = client.call("create_token", params={
            "login": args.login, "name": args.name or "", "scope": args.scope})
        print(f"token {token['id']} for {token['login']} ({token['scope']}), shown once:",
              file=stderr)
        print(token["token"], file=stdout)
    elif args.token_command == "list":
        params = {"login": args.login} if args.login else {"all": True}
        for token in client.call("list_tokens", params=params):
            used = (time.strftime("%Y-%m-%d %H:%M", time.gmtime(token["last_used_at"]))
                    if token["last_used_at"] else "never")
            created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(token["created_at"]))
            print(f"{token['id']}\t{token['login']}\t{token['name'] or '-'}\t"
                  f"{token['scope']}\tcreated {created}\tlast used {used}", file=stdout)
    else:
        client.call("revoke_token", token_id=args.id)
        print(f"revoked token {args.id}", file=stdout)
    return 0


@_with_client
def _command_secret(client, args, stdout, stderr):
    owner, name = _split_full_name(args.full_name)
    if args.secret_command == "add":
        if (args.value is None) == (args.from_file is None):
            raise BadRequest("give the value with exactly one of --value or --from-file")
        value = args.value
        if args.from_file is not None:
            with open(args.from_file, encoding="utf-8") as handle:
                value = handle.read()
        params = {"name": args.name, "value": value,
                  **({"events": args.event.split(",")} if args.event else {}),
                  **({"images": args.image.split(",")} if args.image else {})}
        client.call("add_secret", owner=owner, name=name, params=params)
        print(f"secret {args.name} set for {args.full_name}", file=stdout)
    elif args.secret_command == "list":
        for secret in client.call("list_secrets", owner=owner, name=name):
            print(f"{secret['name']}\t{','.join(secret['events'])}"
                  f"\t{','.join(secret['images']) or '*'}", file=stdout)
    else:
        client.call("delete_secret", owner=owner, name=name, secret=args.name)
        print(f"secret {args.name} removed", file=stdout)
    return 0


def _due_text(stamp):
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stamp))


@_with_client
def _command_cron(client, args, stdout, stderr):
    if args.cron_command == "list":
        names = ([_split_full_name(args.full_name)] if args.full_name else
                 [(repo["owner"], repo["name"]) for repo in client.call("list_repos")])
        for owner, name in names:
            for cron in client.call("list_crons", owner=owner, name=name):
                print(f"{owner}/{name}\t{cron['name']}\t{cron['expression']}\t"
                      f"{cron['branch'] or '(default)'}\tnext {_due_text(cron['next_at'])}",
                      file=stdout)
        return 0
    owner, name = _split_full_name(args.full_name)
    if args.cron_command == "add":
        cron = client.call("add_cron", owner=owner, name=name, params={
            "name": args.name, "expression": args.expression, "branch": args.branch or ""})
        print(f"cron {args.name} added; next build {_due_text(cron['next_at'])}", file=stdout)
    else:
        client.call("delete_cron", owner=owner, name=name, cron=args.name)
        print(f"cron {args.name} removed", file=stdout)
    return 0


def _finish_command(client, args, build, stdout, stderr):
    """After a build or restart: with --wait, stream it and answer its outcome."""
    if not args.wait:
        return 1 if build["status"] == ERROR else 0
    build = client.wait(*_split_full_name(args.full_name), build, stdout.buffer, stderr)
    _print_summary(build, stderr)
    return 0 if build["status"] == SUCCESS else 1


def _announce(client, args, build, detail, stdout, stderr):
    """A build started: without --wait its number alone on stdout (for scripts:
    N=$(cirunner build OWNER/NAME)); what it is and its page on stderr."""
    if not args.wait:
        print(build["number"], file=stdout, flush=True)
    owner, name = _split_full_name(args.full_name)
    print(f"build {build['number']} of {args.full_name}: {build['status']}{detail}: "
          f"{client.page(owner, name, build['number'])}", file=stderr, flush=True)


@_with_client
def _command_build(client, args, stdout, stderr):
    owner, name = _split_full_name(args.full_name)
    params = {"variables": _parse_vars(args.var), **{key: value for key, value in (
        ("branch", args.branch), ("commit", args.commit), ("event", args.event),
        ("deploy_to", args.deploy_to)) if value}}
    build = client.call("start_build", owner=owner, name=name, params=params)
    _announce(client, args, build, f" (commit {build['commit'][:12] or '?'}, "
              f"{len(build['jobs'])} job(s))", stdout, stderr)
    if build["error"]:
        print(f"cirunner: {build['error']}", file=stderr)
    for warning in build.get("warnings", ()):
        print(f"cirunner: warning: {warning}", file=stderr)
    return _finish_command(client, args, build, stdout, stderr)


@_with_client
def _command_restart(client, args, stdout, stderr):
    owner, name = _split_full_name(args.full_name)
    number = _build_number(client, owner, name, args.number)
    build = client.call("restart_build", owner=owner, name=name, number=number, params={
        "variables": {**dict.fromkeys(args.unset or ()), **_parse_vars(args.var)},
        **({"fork": True} if args.fork else {})})
    _announce(client, args, build, "", stdout, stderr)
    return _finish_command(client, args, build, stdout, stderr)


@_with_client
def _command_cancel(client, args, stdout, stderr):
    owner, name = _split_full_name(args.full_name)
    number = _build_number(client, owner, name, args.number)
    if args.job:
        build = client.call("cancel_job", owner=owner, name=name, number=number, job=args.job)
    else:
        build = client.call("cancel_build", owner=owner, name=name, number=number)
    print(f"build {build['number']}: cancel requested ({build['status']})", file=stdout)
    return 0


@_with_client
def _command_review(client, args, stdout, stderr):
    owner, name = _split_full_name(args.full_name)
    number = _build_number(client, owner, name, args.number)
    build = client.call("approve_build" if args.approve else "decline_build", owner=owner,
                        name=name, number=number)
    print(f"build {build['number']}: {'approved' if args.approve else 'declined'} "
          f"({build['status']})", file=stdout)
    return 0


@_with_client
def _command_logs(client, args, stdout, stderr):
    owner, name = _split_full_name(args.full_name)
    build = client.call("get_build", owner=owner, name=name,
                        number=_build_number(client, owner, name, args.number))
    if not build["jobs"]:
        print(f"cirunner: build {build['number']} has no jobs: {build['status']}"
              + (f": {build['error']}" if build["error"] else ""), file=stderr)
        return 1 if build["status"] == ERROR else 0
    jobs = build["jobs"] if not args.job else [
        next((job for job in build["jobs"] if job["number"] == args.job), None)]
    if jobs[0] is None:
        raise NotFound(f"job {args.job} not found")
    for job in jobs:
        if not args.job:  # followed, its status is known at its end: in the summary
            axis = _axis_text(job["environment"] or {})
            status = "" if args.follow else f": {job['status']}"
            stdout.write(f"--- job {job['number']}{' ' + axis if axis else ''}{status}\n")
            stdout.flush()
        for chunk in client.log(owner, name, build["number"], job["number"],
                                follow=args.follow):
            stdout.buffer.write(chunk)
            stdout.buffer.flush()
    if not args.follow:
        return 0
    # Followed to its end: its outcome, and an exit status a script can test.
    build = client.call("get_build", owner=owner, name=name, number=build["number"])
    if args.job:
        job = next(job for job in build["jobs"] if job["number"] == args.job)
        print(f"job {job['number']}: {job['status']}"
              + (f": {job['error']}" if job["error"] else ""), file=stderr)
        return 0 if job["status"] == SUCCESS else 1
    _print_summary(build, stderr)
    return 0 if build["status"] == SUCCESS else 1


@_with_client
def _command_builds(client, args, stdout, stderr):
    owner, name = _split_full_name(args.full_name)
    builds = client.call("list_builds", owner=owner, name=name,
                         params={"per_page": min(max(args.limit, 1), MAX_PER_PAGE)})
    for build in builds:
        message = build["message"].splitlines()[0] if build["message"] else ""
        error = f"\terror: {build['error']}" if build["error"] else ""
        print(f"{build['number']}\t{build['status']}\t{build['branch']}\t"
              f"{build['commit'][:10]}\t{message}{error}", file=stdout)
    return 0


def _command_prune(args, stdout, stderr):
    """Prune by hand what a server prunes as it goes (or, --dry-run, show it)."""
    with _open_store(args.data, args.db) as store:
        size = (lambda: os.path.getsize(store.path)) if store.path else (lambda: 0)
        before = size()
        builds, times = prune(store, keep_builds=args.keep_builds, keep_days=args.keep_days,
                              dry_run=args.dry_run)
        for build in builds:
            day = time.strftime("%Y-%m-%d", time.gmtime(build["created_at"]))
            print(f"{'would prune' if args.dry_run else 'pruned'} {build['owner']}/"
                  f"{build['name']} #{build['number']} ({build['status']}, {day}, "
                  f"{build['log_bytes']} log bytes)", file=stdout)
        store.checkpoint()
        after = size()
        longest = f"; longest transaction {max(times) * 1000:.1f} ms" if times else ""
        where = (f"; {os.path.basename(store.path)} {before} -> {after} bytes" if store.path
                 else "")
        print(f"{len(builds)} build(s) {'to prune' if args.dry_run else 'pruned'}"
              f"{where}{longest}", file=stderr)
    return 0


_BACKUP_MEMBERS = ("cirunner-backup.json", "cirunner.db", "secret.key")


def backup(store, path):
    """Write a consistent copy of `store` (SQLite's online backup API: one
    snapshot, while the store is in use) and its key file to `path`, a
    gzipped tar file made 0600 and put in place whole. Returns its manifest."""
    import tarfile  # here: only backup and restore read tar files

    if store.path is None:
        raise BadRequest("backup copies a SQLite store; back a PostgreSQL store up with "
                         "pg_dump (and keep DATA/secret.key with it)")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise BadRequest(f"cannot write {path}: there is no folder {directory} (make it first)")
    with tempfile.TemporaryDirectory(dir=directory, prefix=".cirunner-backup-") as work:
        copy = os.path.join(work, "cirunner.db")
        source, target = sqlite3.connect(store.path), sqlite3.connect(copy)
        try:
            source.backup(target)  # all pages in one step: one consistent snapshot
            builds = target.execute("SELECT COUNT(*) FROM builds").fetchone()[0]
            version = target.execute("PRAGMA user_version").fetchone()[0]
        finally:
            source.close()
            target.close()
        manifest = {"cirunner": __version__, "schema_version": version, "builds": builds,
                    "created_at": _now()}
        with open(os.path.join(work, _BACKUP_MEMBERS[0]), "w") as handle:
            json.dump(manifest, handle)
        temporary = os.path.join(work, "backup.tar.gz")
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") \
                as raw, tarfile.open(fileobj=raw, mode="w:gz") as archive:
            for source, name in ((os.path.join(work, _BACKUP_MEMBERS[0]), _BACKUP_MEMBERS[0]),
                                 (copy, "cirunner.db"), (store.sealer.key_path, "secret.key")):
                if os.path.exists(source):  # each member 0600, as the store's own files
                    archive.add(source, name, filter=_private_member)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(temporary, path)
    return manifest


def _private_member(info):
    info.mode, info.uid, info.gid, info.uname, info.gname = 0o600, 0, 0, "", ""
    return info


def _running_servers(data_dir):
    """The pids of live runners on this host that use the store in `data_dir`
    (a runner row names a live process that has the store's file open: a
    copy of a store names the processes of its source, which do not)."""
    path = os.path.join(data_dir, "cirunner.db")
    if not os.path.exists(path):
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(runners)")}
        start = "pid_start" if "pid_start" in columns else "0"
        rows = conn.execute(f"SELECT pid, {start} FROM runners WHERE hostname = ?",
                            (socket.gethostname(),)).fetchall()
    finally:
        conn.close()
    return [pid for pid, started in rows
            if _same_process(pid, started) and _may_have_open(pid, path)]


def _may_have_open(pid, path):
    """Whether process `pid` has the file at `path` open (True when its files
    cannot be looked at: another user's process, or no /proc)."""
    wanted = os.stat(path)
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return not os.path.exists("/proc/self/fd")
    except PermissionError:
        return True
    for descriptor in descriptors:
        with contextlib.suppress(OSError):
            info = os.stat(f"/proc/{pid}/fd/{descriptor}")
            if (info.st_dev, info.st_ino) == (wanted.st_dev, wanted.st_ino):
                return True
    return False


def restore(path, data_dir, *, force=False):
    """Bring a `backup` back into `data_dir`: refused while a server runs on
    it, and over an existing store unless `force` (which moves that store
    aside). Returns the backup's manifest."""
    import tarfile  # here: only backup and restore read tar files

    if _running_servers(data_dir):
        raise Conflict(f"a cirunner process (pid {_running_servers(data_dir)[0]}) uses the store "
                       f"in {os.path.abspath(data_dir)}: stop it first")
    existing = os.path.join(data_dir, "cirunner.db")
    if os.path.exists(existing) and not force:
        raise Conflict(f"{os.path.abspath(data_dir)} already holds a store: restore into another "
                       "directory, or --force to move it aside first")
    for directory in (data_dir, os.path.join(data_dir, "mirrors"),
                      os.path.join(data_dir, "workspaces")):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".cirunner-restore-") as work:
        try:
            with tarfile.open(path, "r:gz") as archive:
                members = {member.name: member for member in archive.getmembers()}
                if set(members) - set(_BACKUP_MEMBERS) or "cirunner.db" not in members or any(
                        not member.isfile() for member in members.values()):
                    raise BadRequest(f"{path} is not a cirunner backup")
                for name, member in members.items():
                    with archive.extractfile(member) as source, os.fdopen(os.open(
                            os.path.join(work, name), os.O_WRONLY | os.O_CREAT, 0o600), "wb") \
                            as target:
                        shutil.copyfileobj(source, target)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise BadRequest(f"{path} is not a cirunner backup: {exc}") from None
        check = sqlite3.connect(os.path.join(work, "cirunner.db"))
        try:
            if check.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                raise BadRequest(f"the store in {path} is damaged")
            # The runners the backup names are the source's processes, some
            # perhaps alive beside this copy: none of them runs its jobs, so
            # the first start here ends those at once, not after a timeout.
            if check.execute("SELECT 1 FROM sqlite_master WHERE name = 'runners'").fetchone():
                check.execute("DELETE FROM runners")
                check.commit()
        finally:
            check.close()
        with open(os.path.join(work, _BACKUP_MEMBERS[0])) as handle:
            manifest = json.load(handle)
        aside = f".before-restore-{time.strftime('%Y%m%d-%H%M%S')}"
        for name in ("cirunner.db", "cirunner.db-wal", "cirunner.db-shm", "secret.key"):
            current = os.path.join(data_dir, name)
            if os.path.exists(current):
                os.replace(current, current + aside)
        for name in ("cirunner.db", "secret.key"):
            if os.path.exists(os.path.join(work, name)):
                os.replace(os.path.join(work, name), os.path.join(data_dir, name))
        _fsync_directory(data_dir)
    return manifest


def _command_backup(args, stdout, stderr):
    with _open_store(args.data, args.db) as store:
        manifest = backup(store, args.file)
    print(f"backed up {os.path.abspath(args.data)} ({manifest['builds']} builds, schema "
          f"{manifest['schema_version']}) and its key to {args.file}; keep it as safe as the "
          "key: it opens the secrets", file=stdout)
    return 0


def _command_restore(args, stdout, stderr):
    if args.db:
        raise BadRequest("restore brings back a SQLite store; restore a PostgreSQL store "
                         "with pg_restore or psql")
    manifest = restore(args.file, args.data, force=args.force)
    print(f"restored {args.file} ({manifest['builds']} builds, made "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(manifest['created_at']))}) into "
          f"{os.path.abspath(args.data)}; start it with `cirunner serve --data {args.data}`",
          file=stdout)
    return 0


@_with_client
def _command_queue(client, args, stdout, stderr):
    queue = client.call("queue")
    for item in queue["running"]:
        activity = f": {item['activity']}" if item.get("activity") else ""
        print(f"running\t{item['repo']} #{item['build']} job {item['job']}\t"
              f"{item['running_seconds']} s{activity}", file=stdout)
    for item in queue["pending"]:
        print(f"{item['position']}\t{item['repo']} #{item['build']} job {item['job']}\t"
              f"waiting {item['waiting_seconds']} s: {item['reason']}", file=stdout)
    print(f"{len(queue['pending'])} waiting, {queue['busy']} running on {queue['workers']} "
          "worker(s)" + (" (draining)" if queue.get("draining") else ""), file=stderr)
    return 0


def _command_drain(args, stdout, stderr):
    """Ask the servers on a store to take no new jobs and exit once their
    running jobs end (SIGUSR1); wait for that unless --no-wait."""
    pids = _running_servers(args.data)
    if not pids:
        raise NotFound(f"no cirunner serve runs on {os.path.abspath(args.data)} here")
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
        print(f"draining pid {pid}: no new jobs; it exits when its running jobs end",
              file=stdout, flush=True)
    if args.no_wait:
        return 0
    starts = {pid: _process_start(pid) for pid in pids}
    while any(_same_process(pid, start) for pid, start in starts.items()):
        time.sleep(0.2)
    print("drained: every server on the store has exited", file=stdout)
    return 0


def _command_login(args, stdout, stderr):
    """Check a token against a server, then keep both for later commands (0600)."""
    token = args.token or args.environ.get("CIRUNNER_TOKEN")
    if not token:
        token = (getpass.getpass(f"token for {args.url}: ") if sys.stdin.isatty()
                 else sys.stdin.readline()).strip()
    user = _RemoteClient(args.url, token).call("current_user")
    path = _cli_config_path(args.environ)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".cli.json.", dir=os.path.dirname(path))
    with os.fdopen(descriptor, "w") as handle:
        json.dump({"server": args.url.rstrip("/"), "token": token}, handle)
    os.replace(temporary, path)
    print(f"signed in to {args.url.rstrip('/')} as {user['login']} ({user['scope']} token); "
          f"saved in {path}", file=stdout)
    return 0


def _command_logout(args, stdout, stderr):
    path = _cli_config_path(args.environ)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        print(f"removed {path}", file=stdout)
    return 0


def _command_exec(args, stdout, stderr):
    directory = os.path.abspath(args.directory)
    config = args.config or ""
    read_pipeline_file(directory, config)  # no file: say so before making anything
    with tempfile.TemporaryDirectory(prefix="cirunner-exec-") as data_dir:
        if args.parallel > 1 and os.path.commonpath([directory, data_dir]) == directory:
            raise BadRequest(f"--parallel copies {directory} for each job, into "
                             f"{os.path.dirname(data_dir)}, which is inside it: run it on a "
                             "folder that does not hold the temporary directory (TMPDIR)")
        store = Store.open(data_dir)
        # One job at a time in the directory itself; side by side, each in a
        # copy of it (a matrix's jobs would otherwise share one folder).
        parallel = max(1, args.parallel)
        executor = Executor(store, workers=parallel, workspace=directory,
                            copy_workspace=parallel > 1, **_isolation_options(args))
        try:
            name = re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(directory)).strip(".")
            repo = store.create_repo("local", name[:100] or "local", directory)
            for secret, value in _exec_secrets(args.secret or [], args.environ).items():
                store.set_secret(repo["id"], secret, value, events=list(EVENTS))
            # The files its HEAD changes (`paths`, CI_PIPELINE_FILES): read in
            # the work tree, which has no mirror here.
            changed = _head_changed_files(directory)
            request = _BuildRequest(branch=args.branch, event=args.event,
                                    variables=_parse_vars(args.var), fields={} if changed is None
                                    else {"changed_files": json.dumps(changed)})
            build = _make_build(store, repo, request,
                                resolve=_directory_resolver(directory, config))
            if build["error"]:
                raise ConfigError(build["error"])
            executor.start()
            build = _full_build_json(store, _follow_build(store, build["id"], stdout.buffer))
            _print_summary(build, stderr)
            return 0 if build["status"] == SUCCESS else 1
        finally:
            executor.stop()
            store.close()


def _exec_secrets(given, environ):
    """`exec`'s secrets: NAME=VALUE, or NAME alone for the caller's variable
    NAME (so that the value is on no command line)."""
    found = {}
    for item in given:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in environ:
                raise BadRequest(f"--secret {name}: no variable {name} in the environment "
                                 f"(give {name}=VALUE, or export {name})")
            value = environ[name]
        found[name] = value
    return found


def _pipeline_file_at(path):
    """(filename, text) of the pipeline file at `path`: a file, or a folder's
    (a .woodpecker/ folder itself, or one of its files, is read as Woodpecker's)."""
    path = os.path.normpath(path or os.getcwd())
    if os.path.isdir(path) and os.path.basename(path) == ".woodpecker":
        return read_pipeline_file(os.path.dirname(path) or ".", WOODPECKER_FOLDER)
    if os.path.isdir(path):
        return read_pipeline_file(path)
    if not os.path.exists(path):
        raise CIRunnerError(f"no such file: {path}")
    with open(path, encoding="utf-8") as handle:
        name = os.path.basename(path)
        if os.path.basename(os.path.dirname(os.path.abspath(path))) == ".woodpecker":
            name = f".woodpecker/{name}"
        return name, handle.read()


def _command_matrix(args, stdout, stderr):
    filename, text = _pipeline_file_at(args.file)
    pipeline = parse_pipeline(text, filename)
    for number, environment in enumerate(pipeline.matrix, start=1):
        print(f"{number}\t{_axis_text(environment) or '(no matrix)'}", file=stdout)
    return 0


def _command_plan(args, stdout, stderr):
    """The steps and services a build would run, job by job (or `--json`)."""
    filename, text = read_pipeline_file(args.directory, args.config or "")
    pipeline = parse_pipeline(text, filename)
    branch = args.branch or _checked_out_branch(args.directory) or "main"
    plan = plan_pipeline(pipeline, event=args.event, branch=branch, ref=args.ref,
                         files=args.changed, cron=args.cron,
                         default_branch=args.default_branch)
    if args.json:
        json.dump(plan, stdout, indent=2)
        print(file=stdout)
        return 0
    print(f"{filename}: {_rules_name(pipeline, filename)} rules; {args.event} on {branch}",
          file=stdout)
    for planned in plan["pipelines"]:
        print(f"pipeline {planned['name']}: {'runs' if planned['runs'] else 'no build'}",
              file=stdout)
        for number, job in enumerate(planned["jobs"] if planned["runs"] else [], start=1):
            axis = " ".join(f"{name}={value}" for name, value in job["matrix"].items())
            services = f": services {', '.join(job['services'])}" if job["services"] else ""
            print(f"  job {number}{' ' + axis if axis else ''}{services}", file=stdout)
            for step in job["steps"]:
                print(f"    {'runs' if step['runs'] else 'skipped':8} {step['name']}"
                      f"{'  (' + step['image'] + ')' if step['image'] else ''}", file=stdout)
    for warning in plan["warnings"]:
        print(f"warning: {warning}", file=stdout)
    return 0


def _command_lint(args, stdout, stderr):
    """Every problem of a pipeline file (exit 1) and every warning (exit 0)."""
    filename, text = _pipeline_file_at(args.file)
    try:
        pipeline = parse_pipeline(text, filename)
    except ConfigError as exc:
        for line, problem in exc.problems:
            print(f"{filename}{f' line {line}' if line else ''}: error: {problem}", file=stdout)
        return 1
    for warning in pipeline.warnings:
        print(f"{warning.replace(': ', ': warning: ', 1)}", file=stdout)
    pipelines = pipeline.each()
    print(f"{filename}: {_rules_name(pipeline, filename)} rules, "
          + (f"{len(pipelines)} pipelines, " if len(pipelines) > 1 else "")
          + f"{sum(len(one.steps) for one in pipelines)} step(s), "
          f"{sum(len(one.matrix) for one in pipelines)} job(s), "
          f"{len(pipeline.warnings)} warning(s)", file=stdout)
    return 0


def _rules_name(pipeline, filename):
    """Whose rules a pipeline file is read by, as the command line says it."""
    if pipeline.era == "woodpecker":
        return "Woodpecker"
    return f"Drone {pipeline.era}" if _is_drone_file(filename) else "cirunner"


def _add_repo_options(parser, *, adding):
    """The repository settings as flags, from the declaration of its fields."""
    for field in _REPO.writable():
        if field.name == "private" and adding:  # private unless --public
            visibility = parser.add_mutually_exclusive_group()
            visibility.add_argument("--private", dest="private", action="store_const",
                                    const=True, help=field.help + " (the default)")
            visibility.add_argument("--public", dest="private", action="store_const",
                                    const=False, help="readable by anyone, signed in or not")
        elif field.name == "private":
            parser.add_argument("--private", choices=("true", "false"), help=field.help)
        else:
            parser.add_argument(field.option, dest=field.name, required=adding
                                and field.name == "url", help=field.help,
                                metavar=field.name.upper())


def _add_sandbox_option(parser, env):
    parser.add_argument("--sandbox", choices=SANDBOXES, default=env("SANDBOX", "auto"),
                        help="how steps run on the host: bwrap (bubblewrap), none (no "
                             "isolation: every build can read the server's data), or auto "
                             "(bwrap; without a working bwrap, jobs with steps on the host "
                             "end error) (env CIRUNNER_SANDBOX, default auto)")
    parser.add_argument("--sandbox-network", choices=SANDBOX_NETWORKS,
                        default=env("SANDBOX_NETWORK", "private"),
                        help="a sandboxed step's network: private (its own, outbound through "
                             "slirp4netns; the host's loopback is not reachable), none (its "
                             "own loopback only) or host (this machine's, loopback services "
                             "included) (env CIRUNNER_SANDBOX_NETWORK, default private)")
    parser.add_argument("--sandbox-user", default=env("SANDBOX_USER", ""), metavar="USER",
                        help="when serve runs as root: the user steps on the host run as "
                             "(env CIRUNNER_SANDBOX_USER, default nobody)")
    parser.add_argument("--engine", choices=ENGINES, default=env("ENGINE", "auto"),
                        help="how steps that name an image run: podman, docker, none (on the "
                             "host), or auto (podman, else docker, when installed) "
                             "(env CIRUNNER_ENGINE, default auto)")


def _add_subcommands(commands, name, help_text, handler, actions):
    """A command with actions: {action: (help, [(args, kwargs), ...])}."""
    parser = commands.add_parser(name, help=help_text)
    subparsers = parser.add_subparsers(dest=f"{name}_command", metavar="ACTION")
    subparsers.required = True
    for action, (action_help, arguments, parents) in actions.items():
        sub = subparsers.add_parser(action, parents=parents, help=action_help)
        for flags, options in arguments:
            sub.add_argument(*flags, **options)
    parser.set_defaults(handler=handler)


def _add_admin_parsers(commands, common):
    full_name = (("full_name",), {"metavar": "OWNER/NAME"})
    _add_subcommands(commands, "user", "add, list, change or remove users", _command_user, {
        "add": ("add a user", [(("login",), {}),
                               (("--admin",), {"action": "store_true",
                                               "help": "may act on every repository"}),
                               (("--email",), {})], [common]),
        "list": ("list users", [], [common]),
        "update": ("change a user's admin flag or email", [
            (("login",), {}),
            (("--admin",), {"action": argparse.BooleanOptionalAction, "default": None,
                            "help": "make an admin (--no-admin: no longer)"}),
            (("--email",), {})], [common]),
        "remove": ("remove a user and their tokens", [(("login",), {})], [common]),
    })
    _add_subcommands(commands, "secret", "add, list or remove repository secrets",
                     _command_secret, {
        "add": ("add or replace a secret", [
            full_name, (("name",), {"metavar": "NAME"}), (("--value",), {}),
            (("--from-file",), {"dest": "from_file", "metavar": "FILE"}),
            (("--event",), {"metavar": "EVENTS", "help": "comma-separated events that get it "
                                                         f"(default {','.join(SECRET_EVENTS)}: "
                                                         "not pull_request)"}),
            (("--image",), {"metavar": "IMAGES", "help": "comma-separated images (or globs, "
                                                         "like plugins/*) whose steps get it "
                                                         "(default: every step)"})], [common]),
        "list": ("names, events and images, never values", [full_name], [common]),
        "remove": ("remove a secret", [full_name, (("name",), {"metavar": "NAME"})], [common]),
    })
    _add_subcommands(commands, "cron", "add, list or remove build schedules", _command_cron, {
        "add": ("add a schedule (UTC)", [
            full_name, (("name",), {"metavar": "NAME"}),
            (("expression",), {"metavar": "EXPRESSION", "help": 'e.g. "0 3 * * *"'}),
            (("--branch",), {})], [common]),
        "list": ("list schedules", [(("full_name",), {"metavar": "OWNER/NAME", "nargs": "?"})],
                 [common]),
        "remove": ("remove a schedule", [full_name, (("name",), {"metavar": "NAME"})], [common]),
    })
    _add_subcommands(commands, "agents", "add, list or remove the agents (build machines) "
                     "that may join", _command_agents, {
        "add": ("make an agent's token; printed once", [
            (("name",), {"metavar": "NAME"}),
            (("--labels",), {"default": "", "metavar": "K=V,...",
                             "help": "labels its jobs may require (they win over the "
                                     "agent's own)"})], [common]),
        "list": ("agents: labels, version, address, last seen, running jobs", [], [common]),
        "remove": ("revoke an agent at once (its running jobs end error)",
                   [(("name",), {"metavar": "NAME"})], [common]),
    })
    _add_subcommands(commands, "token", "create, list or revoke API tokens", _command_token, {
        "create": ("make a token; printed once", [
            (("login",), {}), (("--name",), {"help": "a label to recognise it by"}),
            (("--scope",), {"choices": TOKEN_SCOPES, "default": "write"})], [common]),
        "list": ("tokens (never their secrets)", [(("login",), {"nargs": "?"})], [common]),
        "revoke": ("revoke a token", [(("id",), {"type": int, "metavar": "ID"})], [common]),
    })


def _add_build_parsers(commands, common, workers, env):
    build = commands.add_parser("build", parents=[common, workers], help="start a build")
    build.add_argument("full_name", metavar="OWNER/NAME")
    build.add_argument("--branch", help="branch to build (default: the repository's)")
    build.add_argument("--commit", help="commit SHA to build (default: the branch head)")
    build.add_argument("--event", choices=EVENTS,
                       help="the event it is made as, for `when` and `trigger` (default manual)")
    build.add_argument("--deploy-to", metavar="TARGET",
                       help="a deployment's target (DRONE_DEPLOY_TO; with --event deployment)")
    build.add_argument("--var", action="append", metavar="NAME=VALUE",
                       help="variable for the jobs' environment (repeatable)")
    build.add_argument("--wait", action="store_true",
                       help="stream the logs; exit 0 only if the build succeeds")
    build.set_defaults(handler=_command_build)

    builds = commands.add_parser("builds", parents=[common], help="list recent builds")
    builds.add_argument("full_name", metavar="OWNER/NAME")
    builds.add_argument("--limit", type=int, default=DEFAULT_PER_PAGE)
    builds.set_defaults(handler=_command_builds)

    for name, help_text, handler in (("logs", "print a build's logs", _command_logs),
                                     ("cancel", "cancel a build or one job", _command_cancel)):
        command = commands.add_parser(name, parents=[common], help=help_text)
        command.add_argument("full_name", metavar="OWNER/NAME")
        command.add_argument("number", metavar="NUMBER", help="a build number, or latest")
        command.add_argument("job", type=int, nargs="?", metavar="JOB")
        if name == "logs":
            command.add_argument("--follow", "-f", action="store_true",
                                 help="follow a running job's log until it ends")
        command.set_defaults(handler=handler)

    for name, approve in (("approve", True), ("decline", False)):
        review = commands.add_parser(name, parents=[common], help=(
            "let a build that waits for approval (a fork's pull request) run" if approve
            else "decline a build that waits for approval: it never runs"))
        review.add_argument("full_name", metavar="OWNER/NAME")
        review.add_argument("number", metavar="NUMBER", help="a build number, or latest")
        review.set_defaults(handler=_command_review, approve=approve)

    restart = commands.add_parser("restart", parents=[common, workers],
                                  help="run a finished build again")
    restart.add_argument("full_name", metavar="OWNER/NAME")
    restart.add_argument("number", metavar="NUMBER", help="a build number, or latest")
    restart.add_argument("--fork", action="store_true", help="as a new build number")
    restart.add_argument("--var", action="append", metavar="NAME=VALUE")
    restart.add_argument("--unset", action="append", metavar="NAME",
                         help="drop one of the build's variables")
    restart.add_argument("--wait", action="store_true")
    restart.set_defaults(handler=_command_restart)

    run = commands.add_parser("exec", help="run a working directory's pipeline once, "
                                           "without a server or store")
    run.add_argument("directory", nargs="?", default=".", metavar="DIR")
    run.add_argument("--config", help="pipeline file (default .cirunner.yml, .drone.yml, .woodpecker.yml)")
    run.add_argument("--branch", default="", help="branch for `when` filters")
    run.add_argument("--event", default=EVENT_MANUAL, choices=EVENTS)
    run.add_argument("--var", action="append", metavar="NAME=VALUE")
    run.add_argument("--parallel", type=_count_of("--parallel"), default=1, metavar="N",
                     help="run up to N jobs of the matrix at once, each in a copy of DIR "
                          "(default 1: one after another, in DIR itself)")
    run.add_argument("--secret", action="append", metavar="NAME[=VALUE]",
                     help="a secret for the steps (masked in the output): NAME=VALUE, or NAME "
                          "to take the value of the variable NAME of this environment")
    _add_sandbox_option(run, env)
    run.set_defaults(handler=_command_exec)

    matrix = commands.add_parser("matrix", help="print the jobs a pipeline file expands to")
    matrix.add_argument("file", nargs="?", metavar="FILE")
    matrix.set_defaults(handler=_command_matrix)

    lint = commands.add_parser("lint", help="check a pipeline file: its errors and warnings")
    lint.add_argument("file", nargs="?", metavar="FILE", help="a file or a folder (default: .)")
    lint.set_defaults(handler=_command_lint)

    _add_plan_parser(commands)


def _add_plan_parser(commands):
    plan = commands.add_parser("plan", help="print what a build would run, without running it")
    plan.add_argument("directory", nargs="?", default=".", metavar="DIR")
    plan.add_argument("--config", help="pipeline file (default .cirunner.yml, .drone.yml, .woodpecker.yml)")
    plan.add_argument("--event", default=EVENT_PUSH, choices=EVENTS)
    plan.add_argument("--branch", default="", help="default: DIR's checked-out branch, or main")
    plan.add_argument("--ref", default="", help="default refs/heads/BRANCH (a tag: "
                                                "refs/tags/BRANCH)")
    plan.add_argument("--changed", action="append", metavar="FILE",
                      help="a file the build changes, for `paths` conditions (repeat it; "
                           "none given: every `paths` matches)")
    plan.add_argument("--cron", default="", metavar="NAME",
                      help="the schedule that starts the build, for `cron` conditions")
    plan.add_argument("--default-branch", default="main", metavar="BRANCH",
                      help="the repository's default branch, for ${CI_REPO_DEFAULT_BRANCH} "
                           "(default main)")
    plan.add_argument("--json", action="store_true", help="the plan as JSON (a stable shape)")
    plan.set_defaults(handler=_command_plan)


def _add_store_options(parser, *, default):
    parser.add_argument("--data", default=default,
                        help="data directory (env CIRUNNER_DATA, default ./cirunner-data)")
    parser.add_argument("--db", default=default, metavar="URL",
                        help="a PostgreSQL store shared by several machines, "
                             "postgresql://user:password@host/database (env CIRUNNER_DB; "
                             "default: the SQLite file in the data directory)")


def _make_parser(environ):
    def env(name, default):
        return environ.get("CIRUNNER_" + name, default)

    common = argparse.ArgumentParser(add_help=False)
    # Before the command or after it (`cirunner --data D build ...`, or
    # `cirunner build ... --data D`): given after it, it wins.
    _add_store_options(common, default=argparse.SUPPRESS)
    _add_server_options(common, default=argparse.SUPPRESS)
    workers = argparse.ArgumentParser(add_help=False)  # the commands that may run jobs
    workers.add_argument("--workers", type=_count_of("--workers"),
                         default=_count_of("CIRUNNER_WORKERS")(env("WORKERS", "")),
                         help="job worker threads (env CIRUNNER_WORKERS, default: CPUs; "
                              "0: none, every job runs on agents)")
    _add_sandbox_option(workers, env)

    parser = argparse.ArgumentParser(prog="cirunner", description="A CI build runner in one file.")
    parser.add_argument("--version", action="version", version=f"cirunner {__version__}")
    _add_store_options(parser, default=None)
    _add_server_options(parser, default=None)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    _add_serve_parser(commands, common, workers, env)
    _add_agent_parser(commands, common, workers, env)
    _add_repo_parser(commands, common, env)
    _add_admin_parsers(commands, common)
    _add_build_parsers(commands, common, workers, env)
    backup_parser = commands.add_parser("backup", parents=[common],
                                        help="write a consistent copy of the store and its "
                                             "key, also while serve runs")
    backup_parser.add_argument("file", metavar="FILE", help="the backup to write (.tar.gz)")
    backup_parser.set_defaults(handler=_command_backup)
    restore_parser = commands.add_parser("restore", parents=[common],
                                         help="bring a backup back into a data directory")
    restore_parser.add_argument("file", metavar="FILE")
    restore_parser.add_argument("--force", action="store_true",
                                help="move a store already there aside first")
    restore_parser.set_defaults(handler=_command_restore)
    queue_parser = commands.add_parser("queue", parents=[common],
                                       help="the waiting jobs in order, and why each waits")
    queue_parser.set_defaults(handler=_command_queue)
    drain_parser = commands.add_parser("drain", parents=[common],
                                       help="servers on this store take no new jobs and exit "
                                            "when their running jobs end (for upgrades)")
    drain_parser.add_argument("--no-wait", action="store_true", help="do not wait for them")
    drain_parser.set_defaults(handler=_command_drain)
    prune_parser = commands.add_parser("prune", parents=[common],
                                       help="delete the builds past retention now")
    _add_retention_options(prune_parser, env)
    prune_parser.add_argument("--dry-run", action="store_true", help="only show them")
    prune_parser.set_defaults(handler=_command_prune)
    login = commands.add_parser("login", help="check a token against a server and keep both "
                                              "for the commands that follow")
    login.add_argument("url", metavar="URL", help="the server, e.g. https://ci.example.org")
    login.add_argument("--token", help="the API token (default: env CIRUNNER_TOKEN, or asked)")
    login.set_defaults(handler=_command_login)
    logout = commands.add_parser("logout", help="forget the server and token of `login`")
    logout.set_defaults(handler=_command_logout)
    return parser


def _add_server_options(parser, *, default):
    parser.add_argument("--server", default=default, metavar="URL",
                        help="work through this server's API instead of the local store "
                             "(env CIRUNNER_SERVER, or the file `cirunner login` writes)")
    parser.add_argument("--token", default=default, help="API token for --server "
                                                         "(env CIRUNNER_TOKEN)")


def _isolation_options(args):
    """The Executor's isolation settings from the command line."""
    return {"sandbox": args.sandbox, "engine": args.engine,
            "sandbox_network": args.sandbox_network, "sandbox_user": args.sandbox_user}


def _add_serve_parser(commands, common, workers, env):
    serve_parser = commands.add_parser("serve", parents=[common, workers],
                                       help="run the HTTP API and the executor")
    serve_parser.add_argument("--host", default=env("HOST", DEFAULT_HOST),
                              help="address to bind (env CIRUNNER_HOST, default 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, default=int(env("PORT", DEFAULT_PORT)),
                              help="port (env CIRUNNER_PORT, default 8080; 0 picks a free one)")
    serve_parser.add_argument("--threads", type=int,
                              default=int(env("THREADS", DEFAULT_HTTP_THREADS)),
                              help="HTTP threads, each live log viewer holds one "
                                   "(env CIRUNNER_THREADS, default 32)")
    serve_parser.add_argument("--connection-limit", dest="connection_limit", type=int,
                              default=int(env("CONNECTION_LIMIT", DEFAULT_CONNECTION_LIMIT)),
                              help="open connections at most; more wait to be accepted "
                                   "(env CIRUNNER_CONNECTION_LIMIT, default 1000)")
    serve_parser.add_argument("--grace", type=float,
                              default=float(env("GRACE", DEFAULT_GRACE_SECONDS)),
                              help="seconds between SIGTERM and SIGKILL of a stopped job "
                                   "(env CIRUNNER_GRACE, default 10)")
    serve_parser.add_argument("--public-url", dest="public_url", default=env("PUBLIC_URL", ""),
                              help="this server's address for links in commit statuses "
                                   "(env CIRUNNER_PUBLIC_URL; default http://HOST:PORT)")
    serve_parser.add_argument("--url-prefix", dest="url_prefix",
                              default=env("URL_PREFIX", ""), metavar="PREFIX",
                              help="serve under this path, e.g. /ci, for a reverse proxy that "
                                   "passes it on (env CIRUNNER_URL_PREFIX)")
    serve_parser.add_argument("--metrics-from", dest="metrics_from",
                              default=env("METRICS_FROM", ""), metavar="ADDRESSES",
                              help="comma-separated client addresses that may read /metrics "
                                   "without an admin token (env CIRUNNER_METRICS_FROM)")
    _add_retention_options(serve_parser, env)
    _add_agent_timeout_option(serve_parser, env)
    serve_parser.add_argument("--max-log-bytes", dest="max_log_bytes", type=int,
                              default=int(env("MAX_LOG_BYTES", DEFAULT_MAX_LOG_BYTES)),
                              help="a job's log keeps its start and its last MiB past this "
                                   "(env CIRUNNER_MAX_LOG_BYTES, default 100 MiB; 0: no cap)")
    serve_parser.add_argument("--keep-workspaces", action="store_true",
                              default=env("KEEP_WORKSPACES", "") in _TRUE_WORDS,
                              help="leave job workspaces on disk after the job")
    serve_parser.set_defaults(handler=_command_serve)


def _count_of(what):
    """An argparse type: a whole number >= 0 ("" is None: the default)."""

    def count(text):
        if text == "":
            return None
        if not text.isdigit():
            raise argparse.ArgumentTypeError(f"{what} must be a whole number >= 0, "
                                             f"not {text!r}")
        return int(text)

    return count


def _add_agent_timeout_option(parser, env):
    parser.add_argument("--agent-timeout", dest="agent_timeout", type=float,
                        default=float(env("AGENT_TIMEOUT", RUNNER_LOST_SECONDS)),
                        help="seconds without a heartbeat after which another runner's jobs "
                             "end as error, agent lost: the same on every machine (env "
                             "CIRUNNER_AGENT_TIMEOUT, default 60)")
    parser.add_argument("--watchdog", type=float,
                        default=float(env("WATCHDOG", WATCHDOG_SECONDS)),
                        help="seconds a job may spend outside its steps (checking out, "
                             "starting services, finishing) or not stopping after its grace "
                             "period before its worker is reported stuck (log, /healthz, "
                             f"metrics; env CIRUNNER_WATCHDOG, default {WATCHDOG_SECONDS:g}; "
                             "0: off)")


def _add_agent_parser(commands, common, workers, env):
    agent = commands.add_parser("agent", parents=[common, workers],
                                help="run jobs from a PostgreSQL store (--db) on this machine, "
                                     "without serving HTTP")
    agent.add_argument("--labels", default=env("LABELS", ""), metavar="K=V,...",
                       help="labels jobs may require of this machine, besides its platform "
                            "(env CIRUNNER_LABELS), e.g. gpu=yes,location=attic")
    _add_agent_timeout_option(agent, env)
    agent.add_argument("--grace", type=float, default=float(env("GRACE", DEFAULT_GRACE_SECONDS)),
                       help="seconds between SIGTERM and SIGKILL of a stopped job "
                            "(env CIRUNNER_GRACE, default 10)")
    agent.set_defaults(handler=_command_agent)


def _add_retention_options(parser, env):
    parser.add_argument("--keep-builds", dest="keep_builds", type=int,
                        default=int(env("KEEP_BUILDS", DEFAULT_KEEP_BUILDS)),
                        help="builds kept per repository; older ones are pruned (env "
                             f"CIRUNNER_KEEP_BUILDS, default {DEFAULT_KEEP_BUILDS}; 0: all)")
    parser.add_argument("--keep-days", dest="keep_days", type=int,
                        default=int(env("KEEP_DAYS", DEFAULT_KEEP_DAYS)),
                        help="days a build is kept (env CIRUNNER_KEEP_DAYS, default "
                             f"{DEFAULT_KEEP_DAYS}; 0: forever)")
    if parser.prog.endswith("serve"):
        parser.add_argument("--prune-every", dest="prune_every", type=float,
                            default=float(env("PRUNE_EVERY", PRUNE_SECONDS)),
                            help="seconds between two prunings (env CIRUNNER_PRUNE_EVERY, "
                                 f"default {PRUNE_SECONDS:g})")


def _add_repo_parser(commands, common, env):
    repo = commands.add_parser("repo", help="add, list, change or remove repositories")
    actions = repo.add_subparsers(dest="repo_command", metavar="ACTION")
    actions.required = True
    add = actions.add_parser("add", parents=[common], help="add a repository")
    add.add_argument("full_name", metavar="OWNER/NAME")
    _add_repo_options(add, adding=True)
    add.add_argument("--public-url", dest="public_url", default=env("PUBLIC_URL", ""),
                     help="this server's address as the forge sees it (env "
                          "CIRUNNER_PUBLIC_URL; default: the --public-url of the server "
                          "running on the store, else http://127.0.0.1:8080)")
    actions.add_parser("list", parents=[common], help="list repositories")
    update = actions.add_parser("update", parents=[common], help="change a repository's settings")
    update.add_argument("full_name", metavar="OWNER/NAME")
    _add_repo_options(update, adding=False)
    remove = actions.add_parser("remove", parents=[common],
                                help="remove a repository and its builds")
    remove.add_argument("full_name", metavar="OWNER/NAME")
    repo.set_defaults(handler=_command_repo)


def main(argv=None, *, environ=None, stdout=None, stderr=None):
    """Run the command line; returns the exit status (never calls sys.exit)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    environ = os.environ if environ is None else environ
    logging.basicConfig(level=environ.get("CIRUNNER_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = _make_parser(environ).parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    args.environ = environ
    args.data_given = getattr(args, "data", None) is not None or "CIRUNNER_DATA" in environ
    args.data = getattr(args, "data", None) or environ.get("CIRUNNER_DATA") or DEFAULT_DATA_DIR
    args.db = getattr(args, "db", None) or environ.get("CIRUNNER_DB") or None
    try:
        return args.handler(args, stdout, stderr)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as Unix tools do.
        if stdout is sys.stdout:
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except CIRunnerError as error:
        print(f"cirunner: {error.message}", file=stderr)
        return 1
    except OSError as error:
        where = f": {error.filename}" if error.filename else ""
        print(f"cirunner: {(error.strerror or str(error)).lower()}{where}", file=stderr)
        return 1
    except _database_errors() as error:
        print(f"cirunner: {error}", file=stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run as a script, register under the module name so that `import cirunner`
    # elsewhere in the process gives this same module (as bottle.py does).
    sys.modules.setdefault("cirunner", sys.modules[__name__])
    sys.exit(main())
