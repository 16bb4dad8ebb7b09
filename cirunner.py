#!/usr/bin/env python3
"""cirunner: a CI build runner in one Python file.

cirunner keeps repositories, builds, jobs, status history and logs in one
SQLite file, expands each build's pipeline matrix into jobs, runs them as real
processes in worker threads, and serves a Drone-style REST API over them.

Quick start::

    pip install . && cirunner serve            # http://127.0.0.1:8080
    cirunner repo add alice/hello --url ~/src/hello
    cirunner build alice/hello --wait          # streams the log, exits 0 on success

Embedding::

    import cirunner
    store = cirunner.Store.open("ci-data")
    executor = cirunner.Executor(store, workers=2)
    executor.start()
    app = cirunner.make_app(store, executor)   # any WSGI server can serve it

The sections below follow the design contract: errors, pipeline, store,
executor, web, command line.

License: MIT (see LICENSE).
"""

__version__ = "0.1.0"

__all__ = [
    "ACTIVE_STATUSES",
    "DEFAULT_DATA_DIR",
    "DEFAULT_GRACE_SECONDS",
    "DEFAULT_HOST",
    "DEFAULT_HTTP_THREADS",
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_JOBS",
    "DEFAULT_PER_PAGE",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT_MINUTES",
    "DONE_STATUSES",
    "ERROR",
    "EVENTS",
    "EVENT_CRON",
    "EVENT_MANUAL",
    "EVENT_PULL_REQUEST",
    "EVENT_PUSH",
    "EVENT_TAG",
    "FAILURE",
    "FORGES",
    "HEARTBEAT_SECONDS",
    "KILLED",
    "LOG_CHUNK_BYTES",
    "LOG_FLUSH_SECONDS",
    "MASK",
    "MAX_DESCRIPTION",
    "MAX_PER_PAGE",
    "MAX_SCRIPT_BYTES",
    "MIN_MASKED_LENGTH",
    "PAGE_BYTES",
    "PENDING",
    "PIPELINE_FILES",
    "PIPE_BYTES",
    "REPORT_ATTEMPTS",
    "REPORT_CONTEXT",
    "RUNNER_LOST_SECONDS",
    "RUNNING",
    "SKIPPED",
    "SSE_HEARTBEAT_SECONDS",
    "STATUSES",
    "STRAGGLER_SECONDS",
    "SUCCESS",
    "TOKEN_PREFIX",
    "TOKEN_SCOPES",
    "V1_PAGE_SIZE",
    "WAL_BACKSTOP_BYTES",
    "WAL_CHECKPOINT_BYTES",
    "BadRequest",
    "CIRunnerError",
    "ConfigError",
    "Conflict",
    "Executor",
    "Forbidden",
    "NotFound",
    "Pipeline",
    "Step",
    "Store",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "create_build",
    "expand_matrix",
    "main",
    "make_app",
    "normalize_repo_url",
    "parse_pipeline",
    "read_pipeline_file",
    "restart_build",
    "substitute",
]

###############################################################################
# Imports #####################################################################
###############################################################################

import ctypes
import sys

# Compiling this file leaves megabytes of freed syntax-tree memory in the heap
# that the imports below would then pin under their own objects; handing it
# back to the OS first keeps a long-running `serve` 8 MiB smaller (measured).
if sys.platform.startswith("linux"):
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass

import argparse
import codecs
import collections
import contextlib
import dataclasses
import fcntl
import fnmatch
import hashlib
import hmac
import itertools
import json
import logging
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from urllib.parse import parse_qsl, quote

import bottle

try:
    import waitress
    import waitress.task
    import waitress.wasyncore
except ImportError:  # pragma: no cover - only `serve` needs it
    waitress = None

try:
    import cronsim
except ImportError:  # pragma: no cover - only cron schedules need it
    cronsim = None

_log = logging.getLogger("cirunner")

###############################################################################
# Constants ###################################################################
###############################################################################

# Job and build statuses: one closed vocabulary for both (DESIGN.md section 3).
PENDING = "pending"
RUNNING = "running"
SUCCESS = "success"
FAILURE = "failure"
KILLED = "killed"
ERROR = "error"
SKIPPED = "skipped"
STATUSES = (PENDING, RUNNING, SUCCESS, FAILURE, KILLED, ERROR, SKIPPED)
ACTIVE_STATUSES = (PENDING, RUNNING)
DONE_STATUSES = (SUCCESS, FAILURE, KILLED, ERROR, SKIPPED)

# Build events.
EVENT_PUSH = "push"
EVENT_TAG = "tag"
EVENT_PULL_REQUEST = "pull_request"
EVENT_CRON = "cron"
EVENT_MANUAL = "manual"
EVENTS = (EVENT_PUSH, EVENT_TAG, EVENT_PULL_REQUEST, EVENT_CRON, EVENT_MANUAL)

FORGES = ("github", "gitea", "gitlab")
MASK = "********"
MIN_MASKED_LENGTH = 4           # shorter secret values would mask half the log
REPORT_CONTEXT = "cirunner/build"
REPORT_ATTEMPTS = 5

PIPELINE_FILES = (".cirunner.yml", ".drone.yml")
DEFAULT_DATA_DIR = "cirunner-data"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_HTTP_THREADS = 32
DEFAULT_MAX_JOBS = 256          # matrix size limit; larger is an error, never a cut
DEFAULT_TIMEOUT_MINUTES = 60
DEFAULT_GRACE_SECONDS = 10.0    # SIGTERM -> SIGKILL
DEFAULT_MAX_BODY = 1024 * 1024
DEFAULT_PER_PAGE = 25
MAX_PER_PAGE = 100
SSE_HEARTBEAT_SECONDS = 15.0
# A fast writer's log is stored 512 KiB at a time, half the step's pipe, so
# that it keeps writing into one half while the other is committed, and each
# commit's few rewritten tree pages are spread over more log: a 50 MB job took
# 1.30-1.44x the same command writing to a file, against 1.36-1.62x with
# 256 KiB chunks (bench, alternating runs). 1 MiB was no faster in one process.
LOG_CHUNK_BYTES = 512 * 1024    # largest chunk stored at once
PIPE_BYTES = 1024 * 1024        # a step's pipe (the most Linux gives without privileges)
# Pages of 4 KiB, SQLite's usual size, set explicitly. Bigger pages store a
# big log with fewer WAL writes, but every small commit writes whole pages:
# with 16 KiB, 200 one-job builds ran at 150-189 jobs/s against 245-259, and
# 8 KiB was no better than 4 on a 50 MB log (bench, alternating runs). A store
# made with another page size keeps it.
PAGE_BYTES = 4 * 1024
WAL_CHECKPOINT_BYTES = 128 * 1024 * 1024  # the executor checkpoints past this...
WAL_BACKSTOP_BYTES = 256 * 1024 * 1024    # ...and a writer itself past this
LOG_FLUSH_SECONDS = 0.05        # longest a byte waits in memory before the store
STRAGGLER_SECONDS = 0.5         # read on this long after a step's leader exits
HEARTBEAT_SECONDS = 10.0
RUNNER_LOST_SECONDS = 60.0      # a runner silent this long is gone
MAX_SCRIPT_BYTES = 96 * 1024    # a step's script is one argv entry (Linux: 128 KiB)

TOKEN_SCOPES = ("read", "write")
TOKEN_PREFIX = "cir_"           # lets secret scanners recognise a leaked token
MAX_DESCRIPTION = 10_000
V1_PAGE_SIZE = 20

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_COMMIT_PATTERN = re.compile(r"^[0-9a-fA-F]{4,64}$")
_BRANCH_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|^-|^/|/$|\.lock$|^$")

###############################################################################
# Errors ######################################################################
###############################################################################


class CIRunnerError(Exception):
    """Base of every error cirunner raises on purpose; maps to an HTTP status."""

    status = 500
    code = "internal_error"

    def __init__(self, message, **details):
        super().__init__(message)
        self.message = message
        self.details = details

    def to_json(self):
        return {"error": self.code, "message": self.message, "status": self.status}


class BadRequest(CIRunnerError):
    """The request or its input is malformed."""

    status = 400
    code = "bad_request"


class ConfigError(BadRequest):
    """A pipeline file cannot be used; `filename` and `line` say where."""

    code = "invalid_pipeline"

    def __init__(self, message, filename=None, line=None):
        where = filename or ""
        if line:
            where += f" line {line}"
        super().__init__(f"{where}: {message}" if where else message,
                         filename=filename, line=line)
        self.filename = filename
        self.line = line
        self.problem = message


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


class TooLarge(CIRunnerError):
    """The request body is larger than the server accepts."""

    status = 413
    code = "too_large"


class Unavailable(CIRunnerError):
    """The server cannot take this request now (e.g. too many live streams)."""

    status = 503
    code = "unavailable"


def _check_name(value, what):
    """Return `value` if it is a valid owner or repository name, else raise BadRequest."""
    if not isinstance(value, str) or not _NAME_PATTERN.match(value) or value in (".", ".."):
        raise BadRequest(f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-'")
    return value


def _check_branch(value):
    if not isinstance(value, str) or _BRANCH_FORBIDDEN.search(value) or len(value) > 255:
        raise BadRequest(f"invalid branch name {value!r}")
    return value


def _check_commit(value):
    if not isinstance(value, str) or not _COMMIT_PATTERN.match(value):
        raise BadRequest(f"invalid commit {value!r}: expected a hexadecimal SHA")
    return value.lower()


def _check_variables(variables):
    """Validate build variables: names as environment variable names, values strings."""
    if not isinstance(variables, dict):
        raise BadRequest("variables must be an object of NAME: value")
    checked = {}
    for name, value in variables.items():
        if not isinstance(name, str) or not _ENV_NAME_PATTERN.match(name):
            raise BadRequest(f"invalid variable name {name!r}")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise BadRequest(f"variable {name} must be a string")
        value = str(value)
        if "\x00" in value:
            raise BadRequest(f"variable {name} contains a NUL byte")
        checked[name] = value
    return checked

###############################################################################
# Pipeline ####################################################################
###############################################################################

_VARIABLE_PATTERN = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute(text, variables):
    """Replace ``${VAR}`` and ``${VAR:-default}`` in `text` from `variables`.

    ``$${VAR}`` stays literal (as ``${VAR}``). A ``${VAR}`` with no value and
    no default is left as it is, so the shell can still expand it from the
    job's environment.
    """

    def replace(match):
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        value = variables.get(name)
        if default is not None and not value:
            return default
        return match.group(0) if value is None else value

    return _VARIABLE_PATTERN.sub(replace, text)


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


def _yaml():
    """PyYAML, imported when the first pipeline is parsed: a server that only
    answers the API never needs its megabyte."""
    import yaml
    return yaml


def _load_yaml(text, filename):
    """Parse YAML `text` into dicts and lists that carry line numbers."""
    yaml = _yaml()
    # libyaml makes parsing large pipeline files several times faster.
    loader = (getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        return _convert_node(loader, node, raw=False, depth=0)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid YAML: {problem}", filename,
                          mark.line + 1 if mark else None) from None
    finally:
        loader.dispose()


def _convert_node(loader, node, raw, depth):
    yaml = _yaml()
    if depth > 50:
        raise ConfigError("YAML nested too deeply", None, node.start_mark.line + 1)
    line = node.start_mark.line + 1
    if isinstance(node, yaml.ScalarNode):
        if not raw:
            return loader.construct_object(node, deep=True)
        if node.tag == "tag:yaml.org,2002:null":
            return ""
        return node.value
    if isinstance(node, yaml.SequenceNode):
        items = _YamlList(line)
        for child in node.value:
            items.append(_convert_node(loader, child, raw, depth + 1))
            items.lines.append(child.start_mark.line + 1)
        return items
    loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor)
    mapping = _YamlMap(line)
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise yaml.constructor.ConstructorError(
                None, None, "mapping keys must be plain scalars", key_node.start_mark)
        key = key_node.value
        child_raw = raw or key in _RAW_SCALAR_KEYS
        mapping[key] = _convert_node(loader, value_node, child_raw, depth + 1)
        mapping.lines[key] = key_node.start_mark.line + 1
    return mapping


def _line_of(container, key=None):
    if key is not None and isinstance(container, _YamlMap):
        return container.lines.get(key, container.line)
    if isinstance(container, _YamlList) and isinstance(key, int) and key < len(container.lines):
        return container.lines[key]
    return getattr(container, "line", None)


@dataclasses.dataclass
class Step:
    """One pipeline step: commands run by ``/bin/sh -e`` in the job's workspace."""

    name: str
    commands: list
    image: str = ""
    environment: dict = dataclasses.field(default_factory=dict)
    when: dict = dataclasses.field(default_factory=dict)
    ignore_failure: bool = False

    def applies(self, *, branch, event, environment, job_status=SUCCESS):
        """True if the step's ``when`` filter lets it run for this job."""
        when = self.when
        include, exclude = when.get("branch", ([], []))
        if include and not any(fnmatch.fnmatchcase(branch, pattern) for pattern in include):
            return False
        if any(fnmatch.fnmatchcase(branch, pattern) for pattern in exclude):
            return False
        if when.get("event") and event not in when["event"]:
            return False
        for axis, value in when.get("matrix", {}).items():
            if environment.get(axis) != value:
                return False
        return job_status in when.get("status", (SUCCESS,))

    def with_variables(self, variables):
        """A copy of the step with ``${VAR}`` substituted in every string."""
        return dataclasses.replace(
            self,
            image=substitute(self.image, variables),
            commands=[substitute(command, variables) for command in self.commands],
            environment={name: substitute(value, variables)
                         for name, value in self.environment.items()},
        )

    def script(self):
        """The shell script for this step: each command echoed as ``+ cmd``, then run."""
        lines = []
        for command in self.commands:
            lines.append("printf '%s\\n' " + shlex.quote("+ " + command))
            lines.append(command)
        return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Pipeline:
    """A parsed pipeline file: ordered steps, matrix jobs and build options."""

    steps: list
    matrix: list
    filename: str = PIPELINE_FILES[0]
    fail_fast: bool = False
    max_parallel: int = 0
    timeout: float = 0      # minutes (fractions allowed); 0 means the repository's default
    clone: bool = True

    def steps_for(self, variables):
        """The steps with ``${VAR}`` substituted from `variables`."""
        return [step.with_variables(variables) for step in self.steps]


_TOP_LEVEL_KEYS = ("pipeline", "build", "matrix", "fail_fast", "max_parallel", "timeout", "clone")
_STEP_KEYS = ("image", "commands", "environment", "when", "failure")
_WHEN_KEYS = ("branch", "event", "matrix", "status")


def parse_pipeline(text, filename=PIPELINE_FILES[0], *, max_jobs=DEFAULT_MAX_JOBS):
    """Parse and validate pipeline `text` (YAML) into a `Pipeline`.

    Raises ConfigError naming `filename`, the line and the problem.
    """
    document = _load_yaml(text, filename)
    if not isinstance(document, dict):
        raise ConfigError("the pipeline file must be a mapping with a 'pipeline' key",
                          filename, _line_of(document))
    for key in document:
        if key not in _TOP_LEVEL_KEYS:
            raise ConfigError(f"unknown top-level key {key!r} (expected one of "
                              f"{', '.join(_TOP_LEVEL_KEYS)})", filename, _line_of(document, key))
    if "pipeline" in document and "build" in document:
        raise ConfigError("use either 'pipeline' or 'build', not both", filename,
                          _line_of(document, "build"))
    key = "pipeline" if "pipeline" in document else "build"
    steps_node = document.get(key)
    # Drone 0.4 form: `build:` holding one step directly.
    if key == "build" and isinstance(steps_node, dict) and (
            "commands" in steps_node or "image" in steps_node):
        wrapper = _YamlMap(_line_of(document, "build"))
        wrapper["build"] = steps_node
        wrapper.lines["build"] = wrapper.line
        steps_node = wrapper
    if not isinstance(steps_node, dict) or not steps_node:
        raise ConfigError("'pipeline' must be a mapping of step names to steps",
                          filename, _line_of(document, key) if key in document else 1)
    steps = [_parse_step(name, body, steps_node, filename) for name, body in steps_node.items()]
    pipeline = Pipeline(steps=steps, matrix=[{}], filename=filename)
    pipeline.fail_fast = _parse_flag(document, "fail_fast", False, filename)
    pipeline.clone = _parse_flag(document, "clone", True, filename)
    pipeline.max_parallel = _parse_count(document, "max_parallel", filename)
    pipeline.timeout = document.get("timeout", 0)
    if (isinstance(pipeline.timeout, bool) or not isinstance(pipeline.timeout, (int, float))
            or pipeline.timeout < 0):
        raise ConfigError("'timeout' must be a number of minutes", filename,
                          _line_of(document, "timeout"))
    if "matrix" in document:
        pipeline.matrix = expand_matrix(document["matrix"], max_jobs=max_jobs, filename=filename,
                                        line=_line_of(document, "matrix"))
    return pipeline


def _parse_flag(document, key, default, filename):
    value = document.get(key, default)
    if key == "clone" and isinstance(value, dict):
        return True  # Drone's clone plugin settings: cloning stays on
    if not isinstance(value, bool):
        raise ConfigError(f"'{key}' must be true or false", filename, _line_of(document, key))
    return value


def _parse_count(document, key, filename):
    value = document.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"'{key}' must be a whole number, 0 or more", filename,
                          _line_of(document, key))
    return value


def _parse_step(name, body, steps_node, filename):
    line = _line_of(steps_node, name)
    where = f"step {name!r}"
    if not isinstance(body, dict):
        raise ConfigError(f"{where} must be a mapping with 'commands'", filename, line)
    for key in body:
        if key not in _STEP_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (expected one of "
                              f"{', '.join(_STEP_KEYS)})", filename, _line_of(body, key))
    commands = body.get("commands")
    if isinstance(commands, str):
        commands = [commands]
    if (not isinstance(commands, list) or not commands
            or not all(isinstance(command, str) for command in commands)):
        raise ConfigError(f"{where}: 'commands' must be a list of strings "
                          "(plugin steps without commands are not supported)",
                          filename, _line_of(body, "commands") if "commands" in body else line)
    image = body.get("image", "")
    if not isinstance(image, str):
        raise ConfigError(f"{where}: 'image' must be a string", filename, _line_of(body, "image"))
    environment = _parse_environment(body.get("environment", {}), f"{where}: 'environment'",
                                     filename, _line_of(body, "environment"))
    failure = body.get("failure", "")
    if failure not in ("", "ignore", "fail"):
        raise ConfigError(f"{where}: 'failure' must be 'ignore'", filename,
                          _line_of(body, "failure"))
    step = Step(name=str(name), commands=list(commands), image=image, environment=environment,
                when=_parse_when(body.get("when", {}), where, filename,
                                 _line_of(body, "when")),
                ignore_failure=failure == "ignore")
    if len(step.script().encode()) > MAX_SCRIPT_BYTES:
        raise ConfigError(f"{where}: commands longer than {MAX_SCRIPT_BYTES} bytes", filename, line)
    return step


def _parse_environment(value, where, filename, line):
    """Environment as a mapping, or Drone's list of NAME=value strings."""
    if isinstance(value, list):
        pairs = {}
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise ConfigError(f"{where} items must be NAME=value", filename, line)
            name, _, text = item.partition("=")
            pairs[name] = text
        value = pairs
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of NAME: value", filename, line)
    for name, text in value.items():
        if not _ENV_NAME_PATTERN.match(name):
            raise ConfigError(f"{where}: invalid variable name {name!r}", filename, line)
        if not isinstance(text, str):
            raise ConfigError(f"{where}: {name} must be a string", filename, line)
    return dict(value)


def _string_list(value, where, filename, line):
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{where} must be a string or a list of strings", filename, line)
    return list(value)


def _parse_when(when, where, filename, line):
    if not isinstance(when, dict):
        raise ConfigError(f"{where}: 'when' must be a mapping", filename, line)
    parsed = {}
    for key, value in when.items():
        key_line = _line_of(when, key)
        if key not in _WHEN_KEYS:
            raise ConfigError(f"{where}: unknown 'when' key {key!r} (expected one of "
                              f"{', '.join(_WHEN_KEYS)})", filename, key_line)
        if key == "branch":
            if isinstance(value, dict):
                unknown = set(value) - {"include", "exclude"}
                if unknown:
                    raise ConfigError(f"{where}: 'when.branch' takes include and exclude",
                                      filename, key_line)
                parsed["branch"] = (
                    _string_list(value.get("include", []), f"{where}: when.branch.include",
                                 filename, key_line),
                    _string_list(value.get("exclude", []), f"{where}: when.branch.exclude",
                                 filename, key_line))
            else:
                parsed["branch"] = (_string_list(value, f"{where}: when.branch", filename,
                                                 key_line), [])
        elif key == "matrix":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: 'when.matrix' must be a mapping", filename, key_line)
            parsed["matrix"] = dict(value)
        else:
            items = _string_list(value, f"{where}: when.{key}", filename, key_line)
            allowed = EVENTS if key == "event" else DONE_STATUSES
            for item in items:
                if item not in allowed:
                    raise ConfigError(f"{where}: when.{key} {item!r} is not one of "
                                      f"{', '.join(allowed)}", filename, key_line)
            parsed[key] = items
    return parsed


def expand_matrix(matrix, *, max_jobs=DEFAULT_MAX_JOBS, filename=None, line=None):
    """Expand a matrix mapping into a list of job environments (dicts of str).

    Axes are sorted by name and combined as their cartesian product (the first
    axis varies slowest); ``exclude`` drops matching combinations; ``include``
    alone is the explicit list, and with axes is appended after the product.
    More than `max_jobs` combinations is a ConfigError, never a silent cut.
    """
    if not isinstance(matrix, dict):
        raise ConfigError("'matrix' must be a mapping of axis names to lists", filename, line)
    axes = {}
    for name, values in matrix.items():
        if name in ("include", "exclude"):
            continue
        where = _line_of(matrix, name)
        if not _ENV_NAME_PATTERN.match(name):
            raise ConfigError(f"matrix axis {name!r} is not a valid variable name", filename, where)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"matrix axis {name!r} must be a non-empty list", filename, where)
        if not all(isinstance(value, str) for value in values):
            raise ConfigError(f"matrix axis {name!r} must list plain values", filename, where)
        axes[name] = values
    exclude = _matrix_entries(matrix, "exclude", filename)
    include = _matrix_entries(matrix, "include", filename)
    names = sorted(axes)
    jobs = []
    if names:
        size = 1
        for name in names:
            size *= len(axes[name])
        if size > max_jobs * 64 or (size > max_jobs and not exclude):
            raise ConfigError(f"matrix expands to {size} jobs, more than the limit of "
                              f"{max_jobs}", filename, line)
        for combination in itertools.product(*(axes[name] for name in names)):
            environment = dict(zip(names, combination))
            if any(all(environment.get(k) == v for k, v in rule.items()) for rule in exclude):
                continue
            jobs.append(environment)
    jobs.extend(include)
    if len(jobs) > max_jobs:
        raise ConfigError(f"matrix expands to {len(jobs)} jobs, more than the limit of "
                          f"{max_jobs}", filename, line)
    if not jobs:
        raise ConfigError("matrix expands to no jobs", filename, line)
    return jobs


def _matrix_entries(matrix, key, filename):
    entries = matrix.get(key, [])
    where = _line_of(matrix, key)
    if not isinstance(entries, list):
        raise ConfigError(f"matrix '{key}' must be a list of mappings", filename, where)
    for entry in entries:
        if not isinstance(entry, dict) or not entry or not all(
                isinstance(value, str) and _ENV_NAME_PATTERN.match(name)
                for name, value in entry.items()):
            raise ConfigError(f"matrix '{key}' entries must map axis names to values",
                              filename, where)
    return [dict(entry) for entry in entries]


def _axis_text(environment):
    return " ".join(f"{name}={value}" for name, value in environment.items())


def read_pipeline_file(directory, config_path=""):
    """Return (filename, text) of the pipeline file in a working `directory`.

    Looks for `config_path` if given, else ``.cirunner.yml`` then ``.drone.yml``.
    """
    for name in (config_path,) if config_path else PIPELINE_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as handle:
                return name, handle.read()
    raise ConfigError(f"no pipeline file ({', '.join((config_path,) if config_path else PIPELINE_FILES)})"
                      f" in {directory}")

###############################################################################
# Store #######################################################################
###############################################################################

# Each entry upgrades the schema by one version (PRAGMA user_version) and runs
# in one transaction. Append new entries; never edit a released one.
_MIGRATIONS = [
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        login TEXT NOT NULL UNIQUE,
        email TEXT NOT NULL DEFAULT '',
        admin INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE tokens (
        id INTEGER PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name TEXT NOT NULL DEFAULT '',
        hash TEXT NOT NULL UNIQUE,
        scope TEXT NOT NULL DEFAULT 'write',
        created_at INTEGER NOT NULL,
        last_used_at INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE repos (
        id INTEGER PRIMARY KEY,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        url TEXT NOT NULL,
        default_branch TEXT NOT NULL DEFAULT '',
        config_path TEXT NOT NULL DEFAULT '',
        private INTEGER NOT NULL DEFAULT 0,
        timeout INTEGER NOT NULL DEFAULT 60,
        webhook_secret TEXT NOT NULL DEFAULT '',
        max_builds INTEGER NOT NULL DEFAULT 0,
        last_number INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        UNIQUE (owner, name)
    );
    CREATE TABLE builds (
        id INTEGER PRIMARY KEY,
        repo_id INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
        number INTEGER NOT NULL,
        parent INTEGER NOT NULL DEFAULT 0,
        event TEXT NOT NULL,
        status TEXT NOT NULL,
        error TEXT NOT NULL DEFAULT '',
        created_at INTEGER NOT NULL,
        enqueued_at INTEGER NOT NULL,
        started_at INTEGER NOT NULL DEFAULT 0,
        finished_at INTEGER NOT NULL DEFAULT 0,
        commit_sha TEXT NOT NULL DEFAULT '',
        branch TEXT NOT NULL DEFAULT '',
        ref TEXT NOT NULL DEFAULT '',
        remote TEXT NOT NULL DEFAULT '',
        message TEXT NOT NULL DEFAULT '',
        timestamp INTEGER NOT NULL DEFAULT 0,
        author TEXT NOT NULL DEFAULT '',
        author_avatar TEXT NOT NULL DEFAULT '',
        author_email TEXT NOT NULL DEFAULT '',
        link_url TEXT NOT NULL DEFAULT '',
        description TEXT NOT NULL DEFAULT '',
        tags TEXT NOT NULL DEFAULT '[]',
        pinned INTEGER NOT NULL DEFAULT 0,
        pipeline TEXT NOT NULL DEFAULT '',
        pipeline_file TEXT NOT NULL DEFAULT '',
        variables TEXT NOT NULL DEFAULT '{}',
        fail_fast INTEGER NOT NULL DEFAULT 0,
        max_parallel INTEGER NOT NULL DEFAULT 0,
        UNIQUE (repo_id, number)
    );
    CREATE INDEX builds_active ON builds(repo_id) WHERE status IN ('pending', 'running');
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        build_id INTEGER NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
        number INTEGER NOT NULL,
        status TEXT NOT NULL,
        error TEXT NOT NULL DEFAULT '',
        exit_code INTEGER NOT NULL DEFAULT 0,
        environment TEXT NOT NULL DEFAULT '{}',
        enqueued_at INTEGER NOT NULL,
        started_at INTEGER NOT NULL DEFAULT 0,
        finished_at INTEGER NOT NULL DEFAULT 0,
        claimed_by TEXT NOT NULL DEFAULT '',
        heartbeat_at INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        UNIQUE (build_id, number)
    );
    CREATE INDEX jobs_queue ON jobs(id) WHERE status = 'pending';
    CREATE INDEX jobs_running ON jobs(claimed_by) WHERE status = 'running';
    CREATE TABLE statuses (
        id INTEGER PRIMARY KEY,
        build_id INTEGER NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
        job_id INTEGER REFERENCES jobs(id) ON DELETE CASCADE,
        status TEXT NOT NULL,
        message TEXT NOT NULL DEFAULT '',
        created_at INTEGER NOT NULL
    );
    CREATE INDEX statuses_build ON statuses(build_id);
    CREATE INDEX statuses_job ON statuses(job_id) WHERE job_id IS NOT NULL;
    CREATE TABLE log_chunks (
        job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        offset INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (job_id, seq)
    );
    CREATE TABLE secrets (
        id INTEGER PRIMARY KEY,
        repo_id INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        events TEXT NOT NULL DEFAULT '["push", "tag", "cron", "manual"]',
        UNIQUE (repo_id, name)
    );
    CREATE TABLE runners (
        id TEXT PRIMARY KEY,
        hostname TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started_at INTEGER NOT NULL,
        heartbeat_at INTEGER NOT NULL
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
        id INTEGER PRIMARY KEY,
        repo_id INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        expression TEXT NOT NULL,
        branch TEXT NOT NULL DEFAULT '',
        next_at INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        UNIQUE (repo_id, name)
    );
    ALTER TABLE repos ADD COLUMN forge TEXT NOT NULL DEFAULT '';
    ALTER TABLE repos ADD COLUMN forge_url TEXT NOT NULL DEFAULT '';
    ALTER TABLE repos ADD COLUMN forge_token TEXT NOT NULL DEFAULT '';
    ALTER TABLE repos ADD COLUMN forge_project TEXT NOT NULL DEFAULT '';
    ALTER TABLE builds ADD COLUMN report_error TEXT NOT NULL DEFAULT '';
    CREATE TABLE reports (
        id INTEGER PRIMARY KEY,
        build_id INTEGER NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
        state TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        claimed_until REAL NOT NULL DEFAULT 0,
        done INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX reports_due ON reports(next_at) WHERE done = 0;
    """,
    # 4: numbers of deleted builds. Numbers are otherwise gap-free, so a page
    # deep in a long history is found by arithmetic, not by an OFFSET walk.
    """
    CREATE TABLE deleted_builds (
        repo_id INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
        number INTEGER NOT NULL,
        PRIMARY KEY (repo_id, number)
    ) WITHOUT ROWID;
    """,
]

_REPO_FIELDS = ("url", "default_branch", "config_path", "private", "timeout", "max_builds",
                "events", "webhook_secret", "forge", "forge_url", "forge_token", "forge_project")
_BUILD_FIELDS = ("parent", "event", "commit_sha", "branch", "ref", "remote", "message",
                 "timestamp", "author", "author_avatar", "author_email", "link_url",
                 "pipeline", "pipeline_file", "variables", "fail_fast", "max_parallel")


def _now():
    return int(time.time())


def _next_cron_time(expression, after):
    """The first time (Unix seconds, UTC) after `after` that `expression` names."""
    if cronsim is None:
        raise CIRunnerError("cron schedules need the cronsim package: pip install cronsim")
    start = datetime.fromtimestamp(int(after), timezone.utc)
    try:
        return int(next(cronsim.CronSim(expression, start)).timestamp())
    except (cronsim.CronSimError, StopIteration) as exc:
        raise BadRequest(f"invalid cron expression {expression!r}: {exc}") from None


def _token_hash(secret):
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def _keystream_xor(key, nonce, data):
    out = bytearray()
    for counter in range(0, len(data), 32):
        block = hmac.new(key, nonce + counter.to_bytes(8, "big"), hashlib.sha256).digest()
        out += bytes(a ^ b for a, b in zip(data[counter:counter + 32], block))
    return bytes(out)


def _seal(master_key, text):
    """Encrypt `text` for storage: HMAC-SHA256 in counter mode as the stream
    cipher, then HMAC-SHA256 over nonce and ciphertext (encrypt-then-MAC).
    Stdlib only; the key lives in a file beside the database, not in it."""
    encryption = hmac.new(master_key, b"encrypt", hashlib.sha256).digest()
    authentication = hmac.new(master_key, b"authenticate", hashlib.sha256).digest()
    nonce = secrets.token_bytes(16)
    body = nonce + _keystream_xor(encryption, nonce, text.encode())
    tag = hmac.new(authentication, body, hashlib.sha256).digest()
    return "v1:" + (body + tag).hex()


def _unseal(master_key, sealed):
    if not sealed:
        return ""
    encryption = hmac.new(master_key, b"encrypt", hashlib.sha256).digest()
    authentication = hmac.new(master_key, b"authenticate", hashlib.sha256).digest()
    raw = bytes.fromhex(sealed[3:])
    body, tag = raw[:-32], raw[-32:]
    if not sealed.startswith("v1:") or not hmac.compare_digest(
            tag, hmac.new(authentication, body, hashlib.sha256).digest()):
        raise CIRunnerError("a stored secret does not match the secret key file")
    return _keystream_xor(encryption, body[:16], body[16:]).decode()


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """The SQLite store: repositories, builds, jobs, status history and logs.

    One connection per thread, WAL journal, ``BEGIN IMMEDIATE`` for every
    read-modify-write. Safe to share between threads and between processes
    that open the same file.
    """

    def __init__(self, path, *, data_dir=None, busy_timeout=5.0):
        self.path = path
        self.data_dir = data_dir or os.path.dirname(os.path.abspath(path))
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._connections = []
        self._idle_connections = []  # released by threads that come and go
        self._columns = {}  # statement text -> the names of its result columns
        self._connections_lock = threading.Lock()
        self._listeners = []
        self._closed = False
        # Followers of live logs wait on this; appends (and job ends) in this
        # process count up and notify it.
        self.log_appended = threading.Condition()
        self._log_events = 0
        self._migrate()

    @classmethod
    def open(cls, data_dir, **options):
        """Open (creating if needed) the store ``cirunner.db`` in `data_dir`."""
        os.makedirs(data_dir, exist_ok=True)
        return cls(os.path.join(data_dir, "cirunner.db"), data_dir=data_dir, **options)

    # -- connections and transactions ---------------------------------------

    def _connect(self):
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        # Checkpoints run in the executor's maintenance thread, beside the
        # writers; left to the writer (every 1000 pages by default) they
        # tripled the cost of storing a big log. This is only the backstop.
        page_bytes = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_BACKSTOP_BYTES // page_bytes}")
        # 1 MiB of page cache per connection (default 2 MiB): there is one
        # connection per HTTP thread, and the OS caches the file anyway.
        conn.execute("PRAGMA cache_size = -1024")
        return conn

    def _connection(self):
        conn = getattr(self._local, "conn", None)
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

    def release_connection(self):
        """Lend this thread's connection to whichever thread needs one next.
        The HTTP server calls this after each request: its 32 threads then share
        the few connections in use at once instead of holding 32 (each with its
        own schema and page cache: 9 MiB of a server's idle memory, measured)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.in_transaction:
            self._local.conn = None
            with self._connections_lock:
                if not self._closed:
                    self._idle_connections.append(conn)

    @contextlib.contextmanager
    def _write(self):
        """A write transaction. BEGIN IMMEDIATE: a deferred BEGIN that reads and
        then writes fails at once under contention, whatever the busy timeout."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

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

    def _column_names(self, sql, cursor, row):
        """The column names of `sql`'s rows, learned once per statement: dict(row)
        looks each name up again and was a tenth of an API request's time."""
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

    def _migrate(self):
        conn = self._connect()
        try:
            # auto_vacuum only takes effect before the first table exists, and
            # journal_mode=WAL cannot change inside a transaction.
            conn.execute(f"PRAGMA page_size = {PAGE_BYTES}")
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("PRAGMA journal_mode = WAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    # Re-read inside the lock: another process may have migrated.
                    if conn.execute("PRAGMA user_version").fetchone()[0] >= number:
                        conn.execute("ROLLBACK")
                        continue
                    for statement in script.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {number}")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        finally:
            conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        """Close every connection of every thread."""
        self._closed = True
        with self._connections_lock:
            connections, self._connections = self._connections, []
            self._idle_connections = []
        for conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def checkpoint(self):
        """Checkpoint the WAL (PASSIVE: never waits for writers) and give back
        free pages, so neither the WAL nor the file grows without bound."""
        conn = self._connection()
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        if conn.execute("PRAGMA freelist_count").fetchone()[0]:
            # execute() steps this pragma once, freeing one page; a script runs
            # it to the end. (No transaction is open here, so nothing commits.)
            conn.executescript("PRAGMA incremental_vacuum(1000);")

    def wal_bytes(self):
        """How big the write-ahead log file is now (0 if there is none)."""
        try:
            return os.path.getsize(self.path + "-wal")
        except OSError:
            return 0

    def data_version(self):
        """A number that changes whenever another connection commits a change."""
        return self._connection().execute("PRAGMA data_version").fetchone()[0]

    def integrity_check(self):
        return self._connection().execute("PRAGMA integrity_check").fetchone()[0]

    # -- change listeners (same process) ------------------------------------

    def add_listener(self, callback):
        """Call ``callback(event, job_ids)`` after commits that enqueue jobs
        (event "enqueued") or ask running jobs to stop (event "cancel")."""
        self._listeners.append(callback)

    def remove_listener(self, callback):
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    def _notify_reports(self):
        if getattr(self._local, "reports_added", False):
            self._local.reports_added = False
            self._notify("report", [0])

    def _notify(self, event, job_ids):
        if not job_ids:
            return
        for callback in list(self._listeners):
            try:
                callback(event, job_ids)
            except Exception:  # noqa: BLE001 - one bad listener must not break a commit
                _log.exception("store listener failed")

    # -- users and tokens ---------------------------------------------------

    def create_user(self, login, *, email="", admin=False):
        """Add a user; raises Conflict if the login exists."""
        _check_name(login, "login")
        try:
            with self._write() as conn:
                conn.execute("INSERT INTO users (login, email, admin, created_at) "
                             "VALUES (?, ?, ?, ?)", (login, email, int(admin), _now()))
        except sqlite3.IntegrityError:
            raise Conflict(f"user {login} already exists") from None
        return self.get_user(login)

    def get_user(self, login):
        return self._one("SELECT * FROM users WHERE login = ?", (login,),
                         f"user {login} not found")

    def list_users(self):
        return self._query("SELECT * FROM users ORDER BY login")

    def user_count(self):
        return self._connection().execute("SELECT count(*) FROM users").fetchone()[0]

    def delete_user(self, login):
        """Remove a user and every token of theirs."""
        with self._write() as conn:
            if not conn.execute("DELETE FROM users WHERE login = ?", (login,)).rowcount:
                raise NotFound(f"user {login} not found")

    def create_token(self, login, *, name="", scope="write"):
        """Make a token for `login`; returns (token row, secret). Only the
        SHA-256 of the secret is stored: the secret is shown this once."""
        if scope not in TOKEN_SCOPES:
            raise BadRequest(f"scope must be one of {', '.join(TOKEN_SCOPES)}")
        user = self.get_user(login)
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._write() as conn:
            token_id = conn.execute(
                "INSERT INTO tokens (user_id, name, hash, scope, created_at) VALUES (?, ?, ?, ?, ?)",
                (user["id"], name, _token_hash(secret), scope, _now())).lastrowid
        return self._query_one("SELECT * FROM tokens WHERE id = ?", (token_id,)), secret

    def list_tokens(self, login=None):
        """Tokens (never their secrets), with their user's login."""
        sql = ("SELECT t.id, t.name, t.scope, t.created_at, t.last_used_at, u.login "
               "FROM tokens t JOIN users u ON u.id = t.user_id")
        if login:
            self.get_user(login)
            return self._query(sql + " WHERE u.login = ? ORDER BY t.id", (login,))
        return self._query(sql + " ORDER BY t.id")

    def user_for_token(self, token_id):
        """The user owning token `token_id` (with the token's scope), or None if revoked."""
        return self._query_one("SELECT u.*, t.id AS token_id, t.scope FROM tokens t "
                               "JOIN users u ON u.id = t.user_id WHERE t.id = ?", (token_id,))

    def revoke_token(self, token_id):
        with self._write() as conn:
            if not conn.execute("DELETE FROM tokens WHERE id = ?", (token_id,)).rowcount:
                raise NotFound(f"token {token_id} not found")

    def authenticate(self, secret):
        """The user a token secret belongs to (with its token's scope), or None."""
        digest = _token_hash(secret)
        row = self._query_one(
            "SELECT u.*, t.id AS token_id, t.scope, t.hash, t.last_used_at FROM tokens t "
            "JOIN users u ON u.id = t.user_id WHERE t.hash = ?", (digest,))
        # The lookup is by hash, so its timing says nothing about the secret;
        # the comparison is constant-time all the same.
        if row is None or not hmac.compare_digest(row.pop("hash"), digest):
            return None
        now = _now()
        if row["last_used_at"] < now - 60:  # at most one write a minute per token
            # Never waits for another writer: the stamp is advisory, and the
            # caller may be the server's loop thread (see _QuickLane).
            conn = self._connection()
            conn.execute("PRAGMA busy_timeout = 0")
            try:
                with contextlib.suppress(sqlite3.OperationalError):
                    conn.execute("UPDATE tokens SET last_used_at = ? WHERE id = ?",
                                 (now, row["token_id"]))
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        return row

    # -- repositories --------------------------------------------------------

    def create_repo(self, owner, name, url, **fields):
        """Add a repository; raises Conflict if `owner/name` exists."""
        _check_name(owner, "owner")
        _check_name(name, "repository name")
        values = self._repo_values(fields)
        values.update(owner=owner, name=name, url=url, created_at=_now())
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        try:
            with self._write() as conn:
                conn.execute(f"INSERT INTO repos ({columns}) VALUES ({marks})",
                             tuple(values.values()))
        except sqlite3.IntegrityError:
            raise Conflict(f"repository {owner}/{name} already exists") from None
        return self.get_repo(owner, name)

    def get_repo(self, owner, name):
        """The repository `owner/name` as a dict; raises NotFound."""
        return self._one("SELECT * FROM repos WHERE owner = ? AND name = ?", (owner, name),
                         f"repository {owner}/{name} not found")

    def get_repo_by_id(self, repo_id):
        return self._one("SELECT * FROM repos WHERE id = ?", (repo_id,),
                         f"repository {repo_id} not found")

    def list_repos(self):
        return self._query("SELECT * FROM repos ORDER BY owner, name")

    def update_repo(self, repo_id, **fields):
        unknown = set(fields) - set(_REPO_FIELDS)
        if unknown:
            raise BadRequest(f"unknown repository field {min(unknown)!r}")
        values = self._repo_values(fields)
        if values:
            assignments = ", ".join(f"{key} = ?" for key in values)
            with self._write() as conn:
                conn.execute(f"UPDATE repos SET {assignments} WHERE id = ?",
                             (*values.values(), repo_id))
        return self.get_repo_by_id(repo_id)

    def _repo_values(self, fields):
        values = {key: fields[key] for key in _REPO_FIELDS if key in fields}
        if values.get("forge_token"):
            values["forge_token"] = _seal(self.secret_key, values["forge_token"])
        return values

    def delete_repo(self, repo_id):
        """Delete a repository with all its builds; Conflict while one is active."""
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM builds WHERE repo_id = ? AND status IN (?, ?)",
                            (repo_id, PENDING, RUNNING)).fetchone():
                raise Conflict("the repository has pending or running builds")
            conn.execute("DELETE FROM repos WHERE id = ?", (repo_id,))

    # -- builds -------------------------------------------------------------

    def create_build(self, repo_id, fields, environments, *, error=""):
        """Insert a build numbered next for its repository, with one job per
        environment of `environments`. With `error`, the build is created
        finished with status error and no jobs. Returns the build dict."""
        now = _now()
        with self._write() as conn:
            conn.execute("UPDATE repos SET last_number = last_number + 1 WHERE id = ?",
                         (repo_id,))
            row = conn.execute("SELECT last_number FROM repos WHERE id = ?", (repo_id,)).fetchone()
            if row is None:
                raise NotFound(f"repository {repo_id} not found")
            values = {key: fields[key] for key in _BUILD_FIELDS if key in fields}
            values.update(repo_id=repo_id, number=row[0], status=PENDING, created_at=now,
                          enqueued_at=now)
            columns = ", ".join(values)
            marks = ", ".join("?" for _ in values)
            build_id = conn.execute(f"INSERT INTO builds ({columns}) VALUES ({marks})",
                                    tuple(values.values())).lastrowid
            self._record_status(conn, build_id, None, PENDING, "build created", now)
            self._enqueue_report(conn, build_id, PENDING)
            job_ids = self._insert_jobs(conn, build_id, environments, error, now)
        self._notify("enqueued", job_ids)
        self._notify_reports()
        return self.get_build_by_id(build_id)

    def _insert_jobs(self, conn, build_id, environments, error, now):
        if error:
            conn.execute("UPDATE builds SET status = ?, error = ?, started_at = ?, "
                         "finished_at = ? WHERE id = ?", (ERROR, error, now, now, build_id))
            self._record_status(conn, build_id, None, ERROR, error, now)
            self._enqueue_report(conn, build_id, ERROR)
            return []
        job_ids = []
        for number, environment in enumerate(environments, start=1):
            job_ids.append(conn.execute(
                "INSERT INTO jobs (build_id, number, status, environment, enqueued_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (build_id, number, PENDING, json.dumps(environment), now)).lastrowid)
        return job_ids

    def reset_build(self, build_id, fields, environments, *, error="", message="build restarted"):
        """Run a finished build again under the same number: its jobs, logs and
        job statuses are replaced. Raises Conflict while it is pending or running."""
        now = _now()
        with self._write() as conn:
            row = conn.execute("SELECT status FROM builds WHERE id = ?", (build_id,)).fetchone()
            if row is None:
                raise NotFound(f"build {build_id} not found")
            if row[0] in ACTIVE_STATUSES:
                raise Conflict(f"the build is {row[0]}; wait for it to finish or cancel it")
            conn.execute("DELETE FROM jobs WHERE build_id = ?", (build_id,))
            values = {key: fields[key] for key in _BUILD_FIELDS if key in fields}
            values.update(status=PENDING, error="", enqueued_at=now, started_at=0, finished_at=0)
            assignments = ", ".join(f"{key} = ?" for key in values)
            conn.execute(f"UPDATE builds SET {assignments} WHERE id = ?",
                         (*values.values(), build_id))
            self._record_status(conn, build_id, None, PENDING, message, now)
            self._enqueue_report(conn, build_id, PENDING)
            job_ids = self._insert_jobs(conn, build_id, environments, error, now)
        self._notify("enqueued", job_ids)
        self._notify_reports()
        return self.get_build_by_id(build_id)

    def get_build_by_id(self, build_id):
        return self._one("SELECT * FROM builds WHERE id = ?", (build_id,),
                         f"build {build_id} not found")

    def get_build(self, repo_id, number):
        """Build `number` of a repository; raises NotFound."""
        build = self._query_one("SELECT * FROM builds WHERE repo_id = ? AND number = ?",
                                (repo_id, number))
        if build is None:
            raise NotFound(f"build {number} not found")
        return build

    def latest_build(self, repo_id, branch=None):
        sql = "SELECT * FROM builds WHERE repo_id = ?"
        params = [repo_id]
        if branch:
            sql += " AND branch = ?"
            params.append(branch)
        return self._one(sql + " ORDER BY number DESC LIMIT 1", params,
                         "no build yet" + (f" on branch {branch}" if branch else ""))

    def list_builds(self, repo_id, *, offset=0, limit=DEFAULT_PER_PAGE, branch=None,
                    status=None):
        """Builds of a repository, newest first."""
        if offset and not branch and not status:
            return self._query("SELECT * FROM builds WHERE repo_id = ? AND number <= ? "
                               "ORDER BY number DESC LIMIT ?",
                               (repo_id, self._number_at_offset(repo_id, offset), limit))
        where, params = self._build_filter(repo_id, branch, status)
        return self._query(f"SELECT * FROM builds WHERE {where} ORDER BY number DESC "
                           "LIMIT ? OFFSET ?", (*params, limit, offset))

    def _number_at_offset(self, repo_id, offset):
        """The largest number with exactly `offset` existing builds above it: the
        builds above `x` are the numbers above it less the deleted ones."""
        conn = self._connection()
        last = conn.execute("SELECT last_number FROM repos WHERE id = ?",
                            (repo_id,)).fetchone()
        last = last[0] if last else 0
        number = last - offset
        for _ in range(1000):
            deleted = conn.execute("SELECT count(*) FROM deleted_builds WHERE repo_id = ? "
                                   "AND number > ?", (repo_id, number)).fetchone()[0]
            if last - offset - deleted == number:
                break
            number = last - offset - deleted
        return number

    def count_builds(self, repo_id, *, branch=None, status=None):
        where, params = self._build_filter(repo_id, branch, status)
        return self._connection().execute(f"SELECT count(*) FROM builds WHERE {where}",
                                          params).fetchone()[0]

    @staticmethod
    def _build_filter(repo_id, branch, status):
        where, params = "repo_id = ?", [repo_id]
        if branch:
            where += " AND branch = ?"
            params.append(branch)
        if status:
            where += " AND status = ?"
            params.append(status)
        return where, params

    def update_build(self, build_id, *, description=None, tags=None, pinned=None):
        """Change a build's description, tags (a list) or pinned flag."""
        values = {}
        if description is not None:
            values["description"] = description
        if tags is not None:
            values["tags"] = json.dumps(tags)
        if pinned is not None:
            values["pinned"] = int(pinned)
        if values:
            assignments = ", ".join(f"{key} = ?" for key in values)
            with self._write() as conn:
                conn.execute(f"UPDATE builds SET {assignments} WHERE id = ?",
                             (*values.values(), build_id))
        return self.get_build_by_id(build_id)

    def delete_build(self, build_id):
        """Delete a finished build with its jobs, statuses and logs."""
        with self._write() as conn:
            row = conn.execute("SELECT status FROM builds WHERE id = ?", (build_id,)).fetchone()
            if row is None:
                raise NotFound(f"build {build_id} not found")
            if row[0] in ACTIVE_STATUSES:
                raise Conflict(f"the build is {row[0]}; cancel it first")
            conn.execute("INSERT OR IGNORE INTO deleted_builds (repo_id, number) "
                         "SELECT repo_id, number FROM builds WHERE id = ?", (build_id,))
            conn.execute("DELETE FROM builds WHERE id = ?", (build_id,))

    # -- jobs ---------------------------------------------------------------

    def list_jobs(self, build_id):
        return self._query("SELECT * FROM jobs WHERE build_id = ? ORDER BY number", (build_id,))

    def get_job(self, build_id, number):
        job = self._query_one("SELECT * FROM jobs WHERE build_id = ? AND number = ?",
                              (build_id, number))
        if job is None:
            raise NotFound(f"job {number} not found")
        return job

    def get_job_by_id(self, job_id):
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,),
                         f"job {job_id} not found")

    def claim_next_job(self, runner_id):
        """Atomically take the oldest runnable pending job for `runner_id`.

        Respects each build's ``max_parallel`` and each repository's
        ``max_builds``. Returns the job dict (now running), or None.
        """
        now = _now()
        with self._write() as conn:
            candidates = conn.execute(
                "SELECT j.id, j.build_id, b.status AS build_status, b.max_parallel, b.repo_id, "
                "r.max_builds FROM jobs j JOIN builds b ON b.id = j.build_id "
                "JOIN repos r ON r.id = b.repo_id WHERE j.status = ? ORDER BY j.id LIMIT 64",
                (PENDING,))
            for candidate in candidates:
                if candidate["max_parallel"] and conn.execute(
                        "SELECT count(*) FROM jobs WHERE build_id = ? AND status = ?",
                        (candidate["build_id"], RUNNING)).fetchone()[0] >= candidate["max_parallel"]:
                    continue
                if candidate["max_builds"] and candidate["build_status"] == PENDING and conn.execute(
                        "SELECT count(*) FROM builds WHERE repo_id = ? AND status = ?",
                        (candidate["repo_id"], RUNNING)).fetchone()[0] >= candidate["max_builds"]:
                    continue
                conn.execute("UPDATE jobs SET status = ?, started_at = ?, claimed_by = ?, "
                             "heartbeat_at = ? WHERE id = ?",
                             (RUNNING, now, runner_id, now, candidate["id"]))
                self._record_status(conn, candidate["build_id"], candidate["id"], RUNNING,
                                    f"started by runner {runner_id}", now)
                self._roll_up(conn, candidate["build_id"], now)
                job = dict(conn.execute("SELECT * FROM jobs WHERE id = ?",
                                        (candidate["id"],)).fetchone())
                break
            else:
                return None
        self._notify_reports()
        return job

    def finish_job(self, job_id, status, *, exit_code=0, error="", message=""):
        """Record a job's end, apply fail_fast and roll the build's status up."""
        now = _now()
        cancel_ids = []
        with self._write() as conn:
            job = conn.execute("SELECT build_id, status FROM jobs WHERE id = ?",
                               (job_id,)).fetchone()
            if job is None or job["status"] in DONE_STATUSES:
                return  # deleted, or already finished by recovery
            conn.execute("UPDATE jobs SET status = ?, exit_code = ?, error = ?, finished_at = ? "
                         "WHERE id = ?", (status, exit_code, error, now, job_id))
            self._record_status(conn, job["build_id"], job_id, status,
                                message or error or f"exit code {exit_code}", now)
            build = conn.execute("SELECT fail_fast FROM builds WHERE id = ?",
                                 (job["build_id"],)).fetchone()
            if build["fail_fast"] and status not in (SUCCESS, SKIPPED):
                number = conn.execute("SELECT number FROM jobs WHERE id = ?",
                                      (job_id,)).fetchone()[0]
                cancel_ids = self._cancel_jobs(
                    conn, job["build_id"], None, SKIPPED,
                    f"cancelled by fail_fast: job {number} ended {status}", now)
            self._roll_up(conn, job["build_id"], now)
        self._notify("cancel", cancel_ids)
        self._notify_reports()
        self._wake_log_followers()  # live logs end now, not at their next poll

    def _wake_log_followers(self):
        with self.log_appended:
            self._log_events += 1
            self.log_appended.notify_all()

    def log_events_seen(self):
        """A mark to pass to `wait_for_log`, taken before reading a job and
        its log, so that an append or end in between is not waited through."""
        return self._log_events

    def cancel_jobs(self, build_id, job_number=None, *, pending_status=KILLED,
                    message="cancelled"):
        """Stop a build's active jobs (or one job): pending ones get
        `pending_status` at once, running ones are asked to stop and end as
        killed. Raises Conflict if nothing is active. Returns the build."""
        now = _now()
        with self._write() as conn:
            cancel_ids = self._cancel_jobs(conn, build_id, job_number, pending_status, message,
                                           now, require_active=True)
            self._roll_up(conn, build_id, now)
        self._notify("cancel", cancel_ids)
        self._notify_reports()
        return self.get_build_by_id(build_id)

    def _cancel_jobs(self, conn, build_id, job_number, pending_status, message, now,
                     require_active=False):
        sql = "SELECT id, number, status FROM jobs WHERE build_id = ? AND status IN (?, ?)"
        params = [build_id, PENDING, RUNNING]
        if job_number is not None:
            sql += " AND number = ?"
            params.append(job_number)
        jobs = conn.execute(sql, params).fetchall()
        if require_active and not jobs:
            if job_number is not None:
                if not conn.execute("SELECT 1 FROM jobs WHERE build_id = ? AND number = ?",
                                    (build_id, job_number)).fetchone():
                    raise NotFound(f"job {job_number} not found")
                raise Conflict(f"job {job_number} is not pending or running")
            raise Conflict("the build has no pending or running jobs")
        running = []
        for job in jobs:
            if job["status"] == PENDING:
                conn.execute("UPDATE jobs SET status = ?, error = ?, finished_at = ? WHERE id = ?",
                             (pending_status, message, now, job["id"]))
                self._record_status(conn, build_id, job["id"], pending_status, message, now)
            else:
                conn.execute("UPDATE jobs SET cancel_requested = 1, error = ? WHERE id = ?",
                             (message, job["id"]))
                running.append(job["id"])
        return running

    def cancel_requested_jobs(self, runner_id):
        """Ids of `runner_id`'s running jobs that someone asked to stop."""
        return [row[0] for row in self._connection().execute(
            "SELECT id FROM jobs WHERE status = ? AND claimed_by = ? AND cancel_requested = 1",
            (RUNNING, runner_id))]

    def _record_status(self, conn, build_id, job_id, status, message, now):
        conn.execute("INSERT INTO statuses (build_id, job_id, status, message, created_at) "
                     "VALUES (?, ?, ?, ?, ?)", (build_id, job_id, status, message, now))

    def _roll_up(self, conn, build_id, now):
        """Derive the build's status from its jobs (DESIGN.md section 3), with
        aggregates: a 256-job matrix costs one pass in SQLite, not 256 rows."""
        build = conn.execute("SELECT status FROM builds WHERE id = ?", (build_id,)).fetchone()
        totals = conn.execute(
            "SELECT count(*), sum(status IN ('pending', 'running')), "
            "min(CASE WHEN started_at > 0 THEN started_at END), max(finished_at) "
            "FROM jobs WHERE build_id = ?", (build_id,)).fetchone()
        if build is None or not totals[0]:
            return
        _, active, started_at, finished_at = totals
        if active:
            status = RUNNING if started_at or build["status"] == RUNNING else PENDING
            finished_at = 0
            message = "build running"
        else:
            failed = conn.execute(
                "SELECT number, status FROM jobs WHERE build_id = ? "
                "AND status NOT IN ('success', 'skipped') ORDER BY number LIMIT 1",
                (build_id,)).fetchone()
            status = failed["status"] if failed else SUCCESS
            message = (f"build finished: job {failed['number']} ended {status}" if failed
                       else "build finished: every job succeeded")
        conn.execute("UPDATE builds SET status = ?, started_at = ?, finished_at = ? WHERE id = ?",
                     (status, started_at or 0, finished_at, build_id))
        if status != build["status"]:
            self._record_status(conn, build_id, None, status, message, now)
            self._enqueue_report(conn, build_id, status)

    def list_statuses(self, build_id, *, offset=0, limit=-1):
        """The build's status history, oldest first."""
        return self._query("SELECT s.*, j.number AS job_number FROM statuses s "
                           "LEFT JOIN jobs j ON j.id = s.job_id WHERE s.build_id = ? "
                           "ORDER BY s.id LIMIT ? OFFSET ?", (build_id, limit, offset))

    def count_statuses(self, build_id):
        return self._connection().execute("SELECT count(*) FROM statuses WHERE build_id = ?",
                                          (build_id,)).fetchone()[0]

    def get_status(self, build_id, status_id):
        row = self._query_one("SELECT s.*, j.number AS job_number FROM statuses s "
                              "LEFT JOIN jobs j ON j.id = s.job_id "
                              "WHERE s.build_id = ? AND s.id = ?", (build_id, status_id))
        if row is None:
            raise NotFound(f"status {status_id} not found")
        return row

    # -- secrets ------------------------------------------------------------

    @property
    def secret_key(self):
        """The key that seals secret values, from DATA/secret.key (made once, mode 0600)."""
        if getattr(self, "_secret_key", None) is None:
            path = os.path.join(self.data_dir, "secret.key")
            with contextlib.suppress(FileExistsError):
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "w") as handle:
                    handle.write(secrets.token_hex(32))
            with open(path) as handle:
                self._secret_key = bytes.fromhex(handle.read().strip())
        return self._secret_key

    def set_secret(self, repo_id, name, value, events=None):
        """Add or replace a repository secret (stored sealed)."""
        if not isinstance(name, str) or not _ENV_NAME_PATTERN.match(name):
            raise BadRequest(f"invalid secret name {name!r}: use a variable name")
        if not isinstance(value, str) or not value or "\x00" in value:
            raise BadRequest("the secret value must be a non-empty string")
        events = list(events) if events else [EVENT_PUSH, EVENT_TAG, EVENT_CRON, EVENT_MANUAL]
        if not all(event in EVENTS for event in events):
            raise BadRequest(f"events must be among {', '.join(EVENTS)}")
        with self._write() as conn:
            conn.execute("INSERT INTO secrets (repo_id, name, value, events) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (repo_id, name) DO UPDATE SET value = excluded.value, "
                         "events = excluded.events",
                         (repo_id, name, _seal(self.secret_key, value), json.dumps(events)))

    def list_secrets(self, repo_id):
        """Names and events of a repository's secrets (never the values)."""
        return [{"name": row["name"], "events": json.loads(row["events"])}
                for row in self._query("SELECT name, events FROM secrets WHERE repo_id = ? "
                                       "ORDER BY name", (repo_id,))]

    def delete_secret(self, repo_id, name):
        with self._write() as conn:
            if not conn.execute("DELETE FROM secrets WHERE repo_id = ? AND name = ?",
                                (repo_id, name)).rowcount:
                raise NotFound(f"secret {name} not found")

    def secrets_for(self, repo_id, event):
        """{name: value} of the secrets a build of `event` may see."""
        return {row["name"]: _unseal(self.secret_key, row["value"])
                for row in self._query("SELECT name, value, events FROM secrets "
                                       "WHERE repo_id = ?", (repo_id,))
                if event in json.loads(row["events"])}

    def forge_token(self, repo):
        return _unseal(self.secret_key, repo["forge_token"])

    # -- cron schedules -----------------------------------------------------

    def add_cron(self, repo_id, name, expression, branch=""):
        _check_name(name, "cron name")
        next_at = _next_cron_time(expression, time.time())
        try:
            with self._write() as conn:
                conn.execute("INSERT INTO crons (repo_id, name, expression, branch, next_at, "
                             "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                             (repo_id, name, expression, branch, next_at, _now()))
        except sqlite3.IntegrityError:
            raise Conflict(f"cron {name} already exists") from None
        return self._query_one("SELECT * FROM crons WHERE repo_id = ? AND name = ?",
                               (repo_id, name))

    def list_crons(self, repo_id=None):
        sql = ("SELECT c.*, r.owner, r.name AS repo_name FROM crons c "
               "JOIN repos r ON r.id = c.repo_id")
        if repo_id is not None:
            return self._query(sql + " WHERE c.repo_id = ? ORDER BY c.name", (repo_id,))
        return self._query(sql + " ORDER BY r.owner, r.name, c.name")

    def delete_cron(self, repo_id, name):
        with self._write() as conn:
            if not conn.execute("DELETE FROM crons WHERE repo_id = ? AND name = ?",
                                (repo_id, name)).rowcount:
                raise NotFound(f"cron {name} not found")

    def take_due_crons(self, now=None):
        """The crons due now, each moved on to its next time after `now` in the
        same transaction: across processes each due time is taken once, and a
        schedule missed during downtime runs once, not once per missed slot."""
        now = time.time() if now is None else now
        taken = []
        with self._write() as conn:
            for cron in conn.execute("SELECT * FROM crons WHERE next_at <= ?", (now,)).fetchall():
                conn.execute("UPDATE crons SET next_at = ? WHERE id = ?",
                             (_next_cron_time(cron["expression"], now), cron["id"]))
                taken.append(dict(cron))
        return taken

    # -- commit status reports (outbox) --------------------------------------

    def _enqueue_report(self, conn, build_id, status):
        forge = conn.execute("SELECT r.forge FROM builds b JOIN repos r ON r.id = b.repo_id "
                             "WHERE b.id = ?", (build_id,)).fetchone()
        if forge and forge[0]:
            descriptions = {PENDING: "the build is queued", RUNNING: "the build is running",
                            SUCCESS: "the build succeeded", FAILURE: "the build failed",
                            KILLED: "the build was cancelled", ERROR: "the build errored",
                            SKIPPED: "the build was skipped"}
            conn.execute("INSERT INTO reports (build_id, state, description, next_at) "
                         "VALUES (?, ?, ?, ?)",
                         (build_id, status, descriptions[status], time.time()))
            self._local.reports_added = True

    def claim_report(self, lease=60.0):
        """Take the oldest due report whose build has no older undelivered one
        (so a forge sees pending before success); None if there is none."""
        now = time.time()
        # A read first: the reporter asks twice a second, and an idle server
        # should not take the write lock for nothing.
        if self._query_one("SELECT 1 FROM reports WHERE done = 0 AND next_at <= ? "
                           "AND claimed_until < ? LIMIT 1", (now, now)) is None:
            return None
        with self._write() as conn:
            row = conn.execute(
                "SELECT * FROM reports r WHERE done = 0 AND next_at <= ? AND claimed_until < ? "
                "AND NOT EXISTS (SELECT 1 FROM reports o WHERE o.build_id = r.build_id "
                "AND o.done = 0 AND o.id < r.id) ORDER BY id LIMIT 1", (now, now)).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE reports SET claimed_until = ? WHERE id = ?",
                         (now + lease, row["id"]))
            return dict(row)

    def finish_report(self, report_id, *, error="", retry_in=None):
        """Record a delivery: done, or (with `retry_in` seconds) tried again
        later; a final failure is shown on the build as report_error."""
        with self._write() as conn:
            report = conn.execute("SELECT build_id FROM reports WHERE id = ?",
                                  (report_id,)).fetchone()
            if report is None:
                return
            if retry_in is not None:
                conn.execute("UPDATE reports SET attempts = attempts + 1, next_at = ?, "
                             "claimed_until = 0 WHERE id = ?", (time.time() + retry_in, report_id))
            else:
                conn.execute("UPDATE reports SET attempts = attempts + 1, done = 1 WHERE id = ?",
                             (report_id,))
            conn.execute("UPDATE builds SET report_error = ? WHERE id = ?",
                         (error, report["build_id"]))

    # -- runners ------------------------------------------------------------

    def register_runner(self, runner_id, hostname, pid):
        now = _now()
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO runners (id, hostname, pid, started_at, "
                         "heartbeat_at) VALUES (?, ?, ?, ?, ?)",
                         (runner_id, hostname, pid, now, now))

    def unregister_runner(self, runner_id):
        with self._write() as conn:
            conn.execute("DELETE FROM runners WHERE id = ?", (runner_id,))

    def heartbeat(self, runner_id):
        now = _now()
        with self._write() as conn:
            conn.execute("UPDATE runners SET heartbeat_at = ? WHERE id = ?", (now, runner_id))
            conn.execute("UPDATE jobs SET heartbeat_at = ? WHERE status = ? AND claimed_by = ?",
                         (now, RUNNING, runner_id))

    def active_runners(self, max_age=RUNNER_LOST_SECONDS):
        return self._query("SELECT * FROM runners WHERE heartbeat_at >= ?",
                           (_now() - max_age,))

    def recover_lost_jobs(self, runner_id, hostname, pid, *, max_age=RUNNER_LOST_SECONDS):
        """Mark as error the running jobs of runners that are gone.

        A runner is gone when it is on this host and its process is dead (or is
        this process under another runner id, as after a restart in a
        container), or when its heartbeat is older than `max_age` seconds.
        Returns the ids of the jobs recovered.
        """
        now = _now()
        with self._write() as conn:
            lost = set()
            for runner in conn.execute("SELECT * FROM runners WHERE id != ?", (runner_id,)):
                same_host = runner["hostname"] == hostname
                if ((same_host and (runner["pid"] == pid or not _pid_alive(runner["pid"])))
                        or runner["heartbeat_at"] < now - max_age):
                    lost.add(runner["id"])
            known = {row[0] for row in conn.execute("SELECT id FROM runners")}
            jobs = [job for job in conn.execute(
                "SELECT id, build_id, claimed_by FROM jobs WHERE status = ?", (RUNNING,))
                if job["claimed_by"] in lost or job["claimed_by"] not in known]
            message = "runner stopped: the runner running this job is gone (crash or kill)"
            for job in jobs:
                conn.execute("UPDATE jobs SET status = ?, error = ?, exit_code = 0, "
                             "finished_at = ? WHERE id = ?", (ERROR, message, now, job["id"]))
                self._record_status(conn, job["build_id"], job["id"], ERROR, message, now)
            for build_id in {job["build_id"] for job in jobs}:
                self._roll_up(conn, build_id, now)
            for lost_id in lost:
                conn.execute("DELETE FROM runners WHERE id = ?", (lost_id,))
        return [job["id"] for job in jobs]

    # -- logs ---------------------------------------------------------------

    def append_log(self, job_id, seq, offset, data):
        """Store one chunk of a job's log (seq and offset kept by the one writer)."""
        self._connection().execute(
            "INSERT INTO log_chunks (job_id, seq, offset, data) VALUES (?, ?, ?, ?)",
            (job_id, seq, offset, data))
        self._wake_log_followers()

    def log_size(self, job_id):
        row = self._connection().execute(
            "SELECT offset + length(data) FROM log_chunks WHERE job_id = ? "
            "ORDER BY seq DESC LIMIT 1", (job_id,)).fetchone()
        return row[0] if row else 0

    def read_log(self, job_id, offset=0):
        """Yield the job's log from byte `offset` on, chunk by chunk (never whole)."""
        conn = self._connection()
        row = conn.execute("SELECT max(seq) FROM log_chunks WHERE job_id = ? AND offset <= ?",
                           (job_id, offset)).fetchone()
        seq = row[0] if row and row[0] is not None else 0
        chunks = []
        while True:
            # A few chunks per query, fetched one at a time: memory stays flat
            # however long the log, and no statement stays open between yields.
            rows = 0
            for row in conn.execute("SELECT seq, offset, data FROM log_chunks WHERE job_id = ? "
                                    "AND seq >= ? ORDER BY seq LIMIT 4", (job_id, seq)):
                rows += 1
                seq = row[0] + 1
                start, data = row[1], row[2]
                if start + len(data) > offset:
                    chunks.append(data[max(0, offset - start):])
            yield from chunks
            chunks.clear()
            if rows < 4:
                return

    def wait_for_log(self, timeout, seen):
        """Block until a log chunk is appended or a job ends in this process
        since `seen` (from `log_events_seen`), or `timeout` passes."""
        with self.log_appended:
            self.log_appended.wait_for(lambda: self._log_events != seen, timeout)

###############################################################################
# Executor ####################################################################
###############################################################################

# -- git: mirrors, commits, pipeline files, workspaces -------------------------

_GIT_ENV = dict(os.environ, GIT_TERMINAL_PROMPT="0", LC_ALL="C", GIT_ASKPASS="/bin/true")
_URL_SCHEMES = ("https://", "http://", "ssh://", "git://", "file://")
_mirror_locks = {}
_mirror_locks_guard = threading.Lock()


class _GitError(CIRunnerError):
    """A git command failed; the message holds what git printed."""


def _git(args, *, cwd=None, timeout=600, input=None):
    try:
        result = subprocess.run(["git", *args], cwd=cwd, input=input, capture_output=True,
                                timeout=timeout, env=_GIT_ENV, check=False)
    except subprocess.TimeoutExpired:
        raise _GitError(f"git {args[0]} took longer than {timeout} s") from None
    except OSError as exc:
        raise _GitError(f"cannot run git: {exc}") from None
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}"
        raise _GitError(f"git {args[0]} failed: {message}")
    return result.stdout


def normalize_repo_url(url):
    """Return the clone URL to store: a URL as given, a local path made absolute.

    Raises BadRequest for a URL git could take as an option, or a local path
    that does not exist.
    """
    if not isinstance(url, str) or not url.strip() or url.startswith("-") or "\x00" in url:
        raise BadRequest(f"invalid repository URL {url!r}")
    if url.startswith(_URL_SCHEMES) or re.match(r"^[\w.-]+@[\w.-]+:", url):
        return url
    path = os.path.abspath(os.path.expanduser(url))
    if not os.path.isdir(path):
        raise BadRequest(f"repository path {path} does not exist")
    return path


def _mirror_path(data_dir, repo):
    return os.path.join(data_dir, "mirrors", repo["owner"], repo["name"] + ".git")


@contextlib.contextmanager
def _mirror_lock(path):
    """Serialise fetches into one mirror, across threads and processes."""
    with _mirror_locks_guard:
        lock = _mirror_locks.setdefault(path, threading.Lock())
    with lock:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield


def _sync_mirror(data_dir, repo, commit="", pull_ref=""):
    """Fetch the repository into its bare mirror under DATA/mirrors; return its path.

    Callers look for a commit in the mirror first (commits never change) and
    come here when it is missing. A commit on no branch (a pull request from a
    fork) is fetched by `pull_ref` (e.g. refs/pull/7/head), then by its SHA.
    """
    path = _mirror_path(data_dir, repo)
    with _mirror_lock(path):
        if not os.path.isdir(os.path.join(path, "objects")):
            _git(["init", "--bare", "--quiet", path])
        _git(["-C", path, "fetch", "--quiet", "--prune", "--force", "--end-of-options",
              repo["url"], "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"])
        if commit and pull_ref and not _has_commit(path, commit):
            with contextlib.suppress(_GitError):
                _git(["-C", path, "fetch", "--quiet", "--force", "--end-of-options", repo["url"],
                      f"+{pull_ref}:{pull_ref}"])
        if commit and not _has_commit(path, commit):
            with contextlib.suppress(_GitError):
                _git(["-C", path, "fetch", "--quiet", "--end-of-options", repo["url"], commit])
    return path


def _has_commit(mirror, commit):
    try:
        _git(["-C", mirror, "cat-file", "-e", "--end-of-options", commit + "^{commit}"])
    except _GitError:
        return False
    return True


def _default_branch(mirror, url):
    """The remote's default branch, learned once (from the remote's HEAD) and
    kept beside the mirror: a build needs no git process to know it. Set a
    repository's branch explicitly to follow a changed default."""
    remembered = os.path.join(mirror, "cirunner-default-branch")
    with contextlib.suppress(OSError), open(remembered) as handle:
        branch = handle.read().strip()
        if branch:
            return branch
    branch = ""
    with contextlib.suppress(_GitError):
        head = _git(["ls-remote", "--symref", "--end-of-options", url, "HEAD"]).decode()
        match = re.search(r"^ref: refs/heads/(\S+)\s+HEAD", head, re.MULTILINE)
        if match:
            branch = match.group(1)
    if not branch:
        branches = _git(["-C", mirror, "for-each-ref", "--format=%(refname:short)",
                         "refs/heads/"]).decode().split()
        branch = next((name for name in ("main", "master") if name in branches),
                      branches[0] if branches else "")
    if branch:
        with open(remembered, "w") as handle:
            handle.write(branch + "\n")
    return branch


_AUTHOR_PATTERN = re.compile(rb"^author (.*) <(.*)> (\d+) [+-]\d{4}$", re.MULTILINE)


def _read_commit(mirror, revision, config_path):
    """Resolve `revision` and read its commit and pipeline file with one
    `git cat-file --batch` process (asked one object at a time, so the file
    is read at exactly the commit resolved). Returns (commit fields,
    (filename, text) or None), or None if the revision is not in the mirror."""
    process = subprocess.Popen(["git", "-C", mirror, "cat-file", "--batch"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, env=_GIT_ENV)

    def ask(spec):
        process.stdin.write(spec.encode() + b"\n")
        process.stdin.flush()
        header = process.stdout.readline().split()
        if len(header) != 3 or header[1] not in (b"commit", b"blob", b"tree", b"tag"):
            return None, None
        data = process.stdout.read(int(header[2]))
        process.stdout.read(1)
        return header[0].decode(), data

    try:
        sha, raw = ask(f"{revision}^{{commit}}")
        if sha is None:
            return None
        headers, _, message = raw.partition(b"\n\n")
        author = _AUTHOR_PATTERN.search(headers)
        name, email, timestamp = (author.groups() if author else (b"", b"", b"0"))
        email = email.decode(errors="replace")
        fields = {"commit_sha": sha, "author": name.decode(errors="replace"),
                  "author_email": email, "timestamp": int(timestamp),
                  "message": message.decode(errors="replace").strip(),
                  "author_avatar": "https://www.gravatar.com/avatar/" + hashlib.md5(
                      email.strip().lower().encode()).hexdigest() if email else ""}
        for filename in (config_path,) if config_path else PIPELINE_FILES:
            _, text = ask(f"{sha}:{filename}")
            if text is not None:
                return fields, (filename, text.decode("utf-8", errors="replace"))
        return fields, None
    except (OSError, ValueError) as exc:
        raise _GitError(f"git cat-file failed: {exc}") from None
    finally:
        process.stdin.close()
        process.stdout.close()
        process.wait()


class _CommitCache:
    """What `_read_commit` found, by full commit id: a commit and its files
    never change, so building one again (a restart, a cron, an API trigger of
    the same commit) needs no git process, which was 4 of a build's 12 ms of
    start-up (measured). Keyed by mirror and remote URL too, so that a
    repository removed and added again with another remote starts afresh."""

    def __init__(self, size=256):
        self.size = size
        self._found = {}
        self._lock = threading.Lock()

    def get(self, mirror, url, revision, config_path):
        with self._lock:
            found = self._found.get((mirror, url, revision, config_path))
        return None if found is None else (dict(found[0]), found[1])

    def put(self, mirror, url, config_path, found):
        key = (mirror, url, found[0]["commit_sha"], config_path)
        with self._lock:
            self._found[key] = (dict(found[0]), found[1])
            while len(self._found) > self.size:
                del self._found[next(iter(self._found))]  # the oldest


_COMMITS = _CommitCache()


def _prepare_build(store, repo, *, branch, commit, variables, event, data_dir, max_jobs,
                   pull_ref=""):
    """Resolve the commit, read and expand its pipeline: (fields, environments, error).

    An unusable pipeline or an unreachable repository becomes `error` (the
    build is still created, so the failure is visible); an unknown branch or
    commit is BadRequest (nothing is created).
    """
    fields = {"event": event, "branch": branch, "remote": repo["url"],
              "variables": json.dumps(variables)}
    mirror = _mirror_path(data_dir, repo)
    found = None
    if commit and os.path.isdir(mirror):
        # A commit already fetched needs no fetch: commits never change.
        found = (_COMMITS.get(mirror, repo["url"], commit, repo["config_path"])
                 or _read_commit(mirror, commit, repo["config_path"]))
    if found is None:
        try:
            _sync_mirror(data_dir, repo, commit, pull_ref)
        except _GitError as exc:
            return fields, [], f"cannot fetch {repo['url']}: {exc.message}"
        if not branch and not commit:
            branch = repo["default_branch"] or _default_branch(mirror, repo["url"])
            fields["branch"] = branch
        found = _read_commit(mirror, commit or f"refs/heads/{branch}", repo["config_path"])
    if found is None:
        what = f"commit {commit}" if commit else f"branch {branch!r}"
        raise BadRequest(f"{what} not found in {repo['owner']}/{repo['name']}")
    _COMMITS.put(mirror, repo["url"], repo["config_path"], found)
    commit_fields, pipeline_file = found
    fields.update(commit_fields)
    if not fields["branch"]:
        fields["branch"] = repo["default_branch"] or _default_branch(mirror, repo["url"])
    fields["ref"] = f"refs/heads/{fields['branch']}" if fields["branch"] else ""
    if pipeline_file is None:
        names = (repo["config_path"],) if repo["config_path"] else PIPELINE_FILES
        return fields, [], (f"no pipeline file ({', '.join(names)}) at commit "
                            f"{fields['commit_sha'][:12]}")
    filename, text = pipeline_file
    fields.update(pipeline=text, pipeline_file=filename)
    try:
        pipeline = parse_pipeline(text, filename, max_jobs=max_jobs)
    except ConfigError as exc:
        return fields, [], exc.message
    fields.update(fail_fast=int(pipeline.fail_fast), max_parallel=pipeline.max_parallel)
    return fields, pipeline.matrix, ""


def create_build(store, repo, *, branch="", commit="", variables=None, event=EVENT_MANUAL,
                 data_dir=None, max_jobs=DEFAULT_MAX_JOBS, pull_ref="", **fields):
    """Start a build of `repo` (a dict from the store) and return it.

    The commit is `commit`, else the head of `branch`, else of the default
    branch. `variables` reach every job's environment and ``${VAR}``. Extra
    `fields` (message, author, link_url...) override what git says.
    """
    variables = _check_variables(variables or {})
    branch = _check_branch(branch) if branch else ""
    commit = _check_commit(commit) if commit else ""
    if event not in EVENTS:
        raise BadRequest(f"unknown event {event!r}")
    prepared, environments, error = _prepare_build(
        store, repo, branch=branch, commit=commit, variables=variables, event=event,
        data_dir=data_dir or store.data_dir, max_jobs=max_jobs, pull_ref=pull_ref)
    prepared.update({key: value for key, value in fields.items()
                     if key in _BUILD_FIELDS and value not in (None, "")})
    return store.create_build(repo["id"], prepared, environments, error=error)


def restart_build(store, repo, number, *, fork=False, variables=None, data_dir=None,
                  max_jobs=DEFAULT_MAX_JOBS):
    """Run build `number` again: under the same number, or with `fork` as a
    new build whose ``parent`` is `number`. Conflict while it is active."""
    build = store.get_build(repo["id"], number)
    if build["status"] in ACTIVE_STATUSES:
        raise Conflict(f"build {number} is {build['status']}; wait for it or cancel it first")
    merged = json.loads(build["variables"] or "{}")
    merged.update(_check_variables(variables or {}))
    pull_ref = build["ref"] if build["ref"].startswith(("refs/pull/", "refs/merge-requests/")) else ""
    prepared, environments, error = _prepare_build(
        store, repo, branch=build["branch"], commit=build["commit_sha"], variables=merged,
        event=build["event"], data_dir=data_dir or store.data_dir, max_jobs=max_jobs,
        pull_ref=pull_ref)
    for key in ("link_url", "message", "author", "author_email", "author_avatar", "ref"):
        if build[key]:
            prepared[key] = build[key]
    if fork:
        prepared["parent"] = number
        return store.create_build(repo["id"], prepared, environments, error=error)
    return store.reset_build(build["id"], prepared, environments, error=error,
                             message=f"build {number} restarted")


# -- process control -------------------------------------------------------

_PR_SET_CHILD_SUBREAPER = 36


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


def _has_marker(pid, marker):
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return marker in handle.read().split(b"\x00")
    except OSError:
        return False


def _process_state(pid):
    """(state letter, process group) of `pid` from /proc, or (None, None)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[2])
    except (OSError, IndexError, ValueError):
        return None, None


_GITHUB_STATES = {PENDING: "pending", RUNNING: "pending", SUCCESS: "success",
                  FAILURE: "failure", KILLED: "error", ERROR: "error", SKIPPED: "success"}
_GITLAB_STATES = {PENDING: "pending", RUNNING: "running", SUCCESS: "success",
                  FAILURE: "failed", KILLED: "canceled", ERROR: "failed", SKIPPED: "success"}


def _forge_status_request(repo, build, state, description, target_url, token):
    """The HTTP request that sets a commit's status on the repository's forge:
    GitHub's statuses API (Gitea and Forgejo take the same), or GitLab's."""
    import urllib.request  # here, not at the top: with ssl it costs 7 MB of memory
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


class _LogWriter:
    """Buffers a job's output briefly and appends it to the store in chunks.

    Memory stays bounded (one chunk) whatever the log size; no byte waits in
    memory longer than `flush_seconds`, so the log is readable live.
    """

    def __init__(self, store, job_id, flush_seconds=LOG_FLUSH_SECONDS):
        self.store = store
        self.job_id = job_id
        self.flush_seconds = flush_seconds
        self.seq = 0
        self.offset = 0
        self.buffer = bytearray()
        self.first_at = None
        self.masked = []

    def mask(self, values):
        """Replace these secret values (and each line of a multi-line one) by
        ``********`` before anything reaches the store."""
        texts = set()
        for value in values:
            texts.update(line for line in [value, *value.splitlines()]
                         if len(line.strip()) >= MIN_MASKED_LENGTH)
        self.masked = sorted((text.encode() for text in texts), key=len, reverse=True)

    def _held_back(self):
        """Bytes at the buffer's end that could be the start of a secret whose
        rest has not been read yet: kept until the next read or the end."""
        held = 0
        for secret in self.masked:
            for length in range(min(len(secret) - 1, len(self.buffer)), held, -1):
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
            for secret in self.masked:
                if secret in self.buffer:
                    self.buffer = bytearray(bytes(self.buffer).replace(secret, MASK.encode()))
            keep = 0 if final else self._held_back()
            if keep:
                held = bytes(self.buffer[-keep:])
                del self.buffer[-keep:]
        while self.buffer:
            chunk = bytes(self.buffer[:LOG_CHUNK_BYTES])
            self._store_chunk(chunk)
            del self.buffer[:len(chunk)]
        self.buffer += held
        self.first_at = None

    def _store_chunk(self, chunk):
        for attempt in range(5):
            try:
                self.store.append_log(self.job_id, self.seq, self.offset, chunk)
                break
            except sqlite3.OperationalError:
                # Busy beyond the busy timeout: retry rather than lose output.
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        self.seq += 1
        self.offset += len(chunk)


def _job_token_prefix(store_key, job_id):
    return f"{store_key}-{job_id}-"


def _kill_leftovers(store_key, job_ids):
    """Kill processes of jobs whose runner died (found by their token in
    /proc/PID/environ): after a crash nothing of a lost job keeps running."""
    prefixes = tuple(f"CIRUNNER_JOB_TOKEN={_job_token_prefix(store_key, job_id)}".encode()
                     for job_id in job_ids)
    for pid in _all_pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                entries = handle.read().split(b"\x00")
        except OSError:
            continue
        if any(entry.startswith(prefixes) for entry in entries):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


class _RunningJob:
    """A job this executor is running, and how to ask it to stop."""

    def __init__(self, job, store_key):
        self.job = job
        self.token = _job_token_prefix(store_key, job["id"]) + uuid.uuid4().hex[:12]
        self.secrets = {}
        self.stop_requested = threading.Event()
        self.reason = ""

    def request_stop(self, reason):
        if not self.stop_requested.is_set():
            self.reason = reason
            self.stop_requested.set()


class _JobError(CIRunnerError):
    """The runner could not prepare or check out a job (job status error)."""


class Executor:
    """Worker threads that take jobs from the store's queue and run them.

    `workers` threads (default: the number of CPUs) each claim a job
    atomically, run its steps as processes in the job's own workspace and
    process group, stream the output into the store and record the result.
    Several executors (in this or other processes) can share one store.

    Parameters: `grace` seconds between SIGTERM and SIGKILL; `workspace`, a
    fixed directory to run every job in without checkout (``cirunner exec``);
    `keep_workspaces` to leave job directories behind for inspection;
    `public_url`, this server's address for links in commit statuses;
    `report_backoff`, seconds before the first retry of a failed status post.

    A started executor also fires due cron schedules and posts commit
    statuses to forges, from the store's outbox.
    """

    def __init__(self, store, *, workers=None, data_dir=None, grace=DEFAULT_GRACE_SECONDS,
                 workspace=None, keep_workspaces=False, poll_interval=0.25,
                 runner_id=None, max_jobs=DEFAULT_MAX_JOBS, public_url="",
                 report_backoff=2.0):
        self.store = store
        self.workers = workers or os.cpu_count() or 1
        self.data_dir = data_dir or store.data_dir
        self.grace = grace
        self.workspace = workspace
        self.keep_workspaces = keep_workspaces
        self.poll_interval = poll_interval
        self.max_jobs = max_jobs
        self.public_url = public_url.rstrip("/")
        self.report_backoff = report_backoff
        self._report_wakeup = threading.Event()
        self.hostname = socket.gethostname()
        self.runner_id = runner_id or f"{self.hostname}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.subreaper = False
        self._registered = False
        self._stopping = threading.Event()
        self._wakeup = threading.Condition()
        self._work_hint = False
        self._running = {}
        self._running_lock = threading.Lock()
        self._spawn_lock = threading.Lock()
        self._leaders = set()
        self._threads = []
        self._pipelines = {}
        self._store_key = hashlib.sha1(os.path.abspath(store.path).encode()).hexdigest()[:10]
        # The server's environment, less its own settings, read once: copying
        # os.environ decodes every entry, a measurable cost per job.
        self._base_environment = {name: value for name, value in os.environ.items()
                                  if not name.startswith("CIRUNNER_")}

    # -- lifecycle ----------------------------------------------------------

    def start(self):
        """Register with the store, recover lost jobs, start the worker threads."""
        self._register()
        self.subreaper = _become_subreaper()
        for index in range(self.workers):
            self._spawn_thread(self._worker_loop, f"cirunner-worker-{index + 1}")
        self._spawn_thread(self._maintenance_loop, "cirunner-maintenance")
        self._spawn_thread(self._report_loop, "cirunner-reporter")

    def _spawn_thread(self, target, name):
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _register(self):
        if self._registered:
            return
        self.store.register_runner(self.runner_id, self.hostname, os.getpid())
        self._recover()
        self.store.add_listener(self._on_store_event)
        self._registered = True

    def _recover(self):
        recovered = self.store.recover_lost_jobs(self.runner_id, self.hostname, os.getpid())
        if recovered:
            _log.warning("marked %d job(s) of stopped runners as error", len(recovered))
            _kill_leftovers(self._store_key, recovered)

    def stop(self, reason="server shut down", timeout=None):
        """Stop taking jobs, kill running ones (recorded as killed with
        `reason`), and wait for the threads to end."""
        self._stopping.set()
        self._report_wakeup.set()
        with self._running_lock:
            running = list(self._running.values())
        for job in running:
            job.request_stop(reason)
        self._wake()
        deadline = time.monotonic() + (timeout if timeout is not None else self.grace + 10)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [thread for thread in self._threads if thread.is_alive()]
        if self._registered:
            self.store.remove_listener(self._on_store_event)
            with contextlib.suppress(sqlite3.Error, CIRunnerError):
                self.store.unregister_runner(self.runner_id)
            self._registered = False

    def run_until_idle(self):
        """Run queued jobs in the calling thread until none is left (for
        tests and scripts: no threads, no sleeps). Returns how many ran."""
        self._register()
        count = 0
        while True:
            job = self.store.claim_next_job(self.runner_id)
            if job is None:
                return count
            self.run_job(job)
            count += 1

    def running_job_ids(self):
        with self._running_lock:
            return sorted(self._running)

    # -- wake-ups -----------------------------------------------------------

    def _wake(self):
        with self._wakeup:
            self._work_hint = True
            self._wakeup.notify_all()

    def _on_store_event(self, event, job_ids):
        if event == "enqueued":
            self._wake()
        elif event == "report":
            self._report_wakeup.set()
        elif event == "cancel":
            self._stop_jobs(job_ids)

    def _stop_jobs(self, job_ids):
        for job_id in job_ids:
            with self._running_lock:
                running = self._running.get(job_id)
            if running is not None:
                with contextlib.suppress(NotFound):
                    running.request_stop(self.store.get_job_by_id(job_id)["error"] or "cancelled")

    def _worker_loop(self):
        while not self._stopping.is_set():
            with self._wakeup:
                self._work_hint = False
            try:
                job = self.store.claim_next_job(self.runner_id)
            except Exception:  # noqa: BLE001 - the worker logs and keeps running
                _log.exception("claiming a job failed")
                job = None
                self._stopping.wait(1.0)
            if job is not None:
                self.run_job(job)
                continue
            self.store.release_connection()  # idle workers share one
            with self._wakeup:
                if not self._work_hint and not self._stopping.is_set():
                    self._wakeup.wait(5.0)

    def _maintenance_loop(self):
        """Notice work from other processes (new jobs, cancels), heartbeat,
        recover jobs of dead runners, checkpoint the WAL, reap orphans."""
        last_version = None
        last_heartbeat = last_recovery = last_checkpoint = last_reap = time.monotonic()
        while not self._stopping.wait(self.poll_interval):
            try:
                version = self.store.data_version()
                if version != last_version:
                    last_version = version
                    self._wake()
                    self._stop_jobs(self.store.cancel_requested_jobs(self.runner_id))
                now = time.monotonic()
                if now - last_heartbeat >= HEARTBEAT_SECONDS:
                    last_heartbeat = now
                    self.store.heartbeat(self.runner_id)
                if now - last_recovery >= RUNNER_LOST_SECONDS / 2:
                    last_recovery = now
                    self._recover()
                # Also as soon as the WAL is big: a writer that reaches the
                # backstop checkpoints in line, and a job logging 50 MB/s
                # then stalled for 1.5-2.5 s every few seconds. (The mark is
                # above journal_size_limit, 64 MiB: a restarted WAL keeps its
                # file up to that size, written over from the start.)
                if (now - last_checkpoint >= 5.0
                        or self.store.wal_bytes() >= WAL_CHECKPOINT_BYTES):
                    last_checkpoint = now
                    self.store.checkpoint()
                if now - last_reap >= 1.0:
                    last_reap = now
                    self._reap_orphans()
                    self._fire_crons()
            except Exception:  # noqa: BLE001 - the loop logs and keeps running
                _log.exception("executor maintenance failed; continuing")

    # -- cron schedules and commit statuses ---------------------------------

    def _fire_crons(self):
        """Start a build for each due schedule (taken atomically in the store)."""
        for cron in self.store.take_due_crons():
            try:
                repo = self.store.get_repo_by_id(cron["repo_id"])
                if EVENT_CRON not in json.loads(repo["events"]):
                    continue
                create_build(self.store, repo, branch=cron["branch"], event=EVENT_CRON,
                             data_dir=self.data_dir, max_jobs=self.max_jobs)
            except Exception:  # noqa: BLE001 - one bad schedule must not stop the others
                _log.exception("cron %s could not start a build", cron["name"])

    def _report_loop(self):
        while not self._stopping.is_set():
            try:
                report = self.store.claim_report()
            except Exception:  # noqa: BLE001 - the loop logs and keeps running
                _log.exception("claiming a commit status report failed")
                report = None
            if report is None:
                self.store.release_connection()
                self._report_wakeup.wait(0.5)
                self._report_wakeup.clear()
                continue
            self._deliver_report(report)

    def _deliver_report(self, report):
        """Post one commit status; retry with exponential backoff, and after the
        last attempt show the failure on the build. Never fails the build."""
        try:
            build = self.store.get_build_by_id(report["build_id"])
            repo = self.store.get_repo_by_id(build["repo_id"])
            request = _forge_status_request(repo, build, report["state"], report["description"],
                                            self._build_link(repo, build),
                                            self.store.forge_token(repo))
            import urllib.request  # loaded on first use (see _forge_status_request)

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

    # -- one job: prepare workspace, check out, run steps, finish -----------

    def run_job(self, job):
        """Run one claimed job to its end and record the result."""
        running = _RunningJob(job, self._store_key)
        with self._running_lock:
            self._running[job["id"]] = running
        log = _LogWriter(self.store, job["id"])
        status, exit_code, error, workspace = ERROR, 0, "", None
        try:
            build = self.store.get_build_by_id(job["build_id"])
            repo = self.store.get_repo_by_id(build["repo_id"])
            secret_values = self.store.secrets_for(repo["id"], build["event"])
            log.mask(secret_values.values())
            running.secrets = secret_values
            pipeline = self._pipeline_for(build)
            workspace = self._prepare_workspace(repo, build, job)
            if pipeline.clone and self.workspace is None:
                self._check_out(repo, build, workspace, log)
            status, exit_code, error = self._run_steps(running, repo, build, pipeline,
                                                       workspace, log)
        except CIRunnerError as exc:
            status, error = ERROR, exc.message
            log.write(f"cirunner: {exc.message}\n")
        except Exception as exc:  # noqa: BLE001 - any runner fault ends the job as error
            _log.exception("job %s failed inside the runner", job["id"])
            status, error = ERROR, f"runner error: {exc}"
            log.write(f"cirunner: runner error: {exc}\n")
        finally:
            self._finish(running, job, log, workspace, status, exit_code, error)

    def _finish(self, running, job, log, workspace, status, exit_code, error):
        try:
            log.flush()
        except Exception:  # noqa: BLE001 - the job must still be finished
            _log.exception("could not store the end of job %s's log", job["id"])
        self._sweep(running.token)  # before the job is finished: nothing of it runs on
        with self._running_lock:
            self._running.pop(job["id"], None)
        self.store.finish_job(job["id"], status, exit_code=exit_code, error=error)
        if workspace and self.workspace is None and not self.keep_workspaces:
            shutil.rmtree(workspace, ignore_errors=True)  # after: not on anyone's wait

    def _pipeline_for(self, build):
        key = (build["id"], hashlib.sha1(build["pipeline"].encode()).hexdigest())
        pipeline = self._pipelines.get(key)
        if pipeline is None:
            pipeline = parse_pipeline(build["pipeline"], build["pipeline_file"] or PIPELINE_FILES[0],
                                      max_jobs=self.max_jobs)
            if len(self._pipelines) > 64:
                self._pipelines.clear()
            self._pipelines[key] = pipeline
        return pipeline

    def _prepare_workspace(self, repo, build, job):
        if self.workspace is not None:
            return self.workspace
        path = os.path.join(self.data_dir, "workspaces", repo["owner"], repo["name"],
                            str(build["number"]), str(job["number"]))
        try:
            if os.path.exists(path):
                shutil.rmtree(path)
            os.makedirs(path)
        except OSError as exc:
            raise _JobError(f"cannot make the workspace {path}: {exc}") from None
        return path

    def _check_out(self, repo, build, workspace, log):
        """Check the build's commit out into the workspace with one git process:
        a .git that borrows the mirror's objects (what `clone --shared` makes),
        HEAD at the commit, then `read-tree -u`. A mirror that lacks the commit
        is fetched once and the checkout tried again."""
        commit = build["commit_sha"]
        log.write(f"+ git checkout {commit}\n")
        mirror = _mirror_path(self.data_dir, repo)
        dot_git = os.path.join(workspace, ".git")
        pull_ref = build["ref"] if build["ref"].startswith(
            ("refs/pull/", "refs/merge-requests/")) else ""
        for attempt in range(2):
            try:
                if attempt or not os.path.isdir(mirror):
                    _sync_mirror(self.data_dir, repo, commit, pull_ref)
                for folder in ("objects/info", "refs/heads", "refs/tags"):
                    os.makedirs(os.path.join(dot_git, folder), exist_ok=True)
                with open(os.path.join(dot_git, "objects", "info", "alternates"), "w") as handle:
                    handle.write(os.path.join(os.path.abspath(mirror), "objects") + "\n")
                with open(os.path.join(dot_git, "HEAD"), "w") as handle:
                    handle.write(commit + "\n")
                with open(os.path.join(dot_git, "config"), "w") as handle:
                    handle.write("[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n"
                                 "\tbare = false\n")
                _git(["-C", workspace, "read-tree", "--reset", "-u", "HEAD"])
                return
            except (_GitError, OSError) as exc:
                if attempt:
                    log.write(f"{exc}\n")
                    raise _JobError(f"checkout of {commit[:12]} failed") from None

    def _environment(self, repo, build, job, workspace):
        """(base, substitution variables, CI variables, matrix axis) for the job."""
        variables = json.loads(build["variables"] or "{}")
        matrix = json.loads(job["environment"] or "{}")
        ci = {
            "REPO": f"{repo['owner']}/{repo['name']}", "REPO_OWNER": repo["owner"],
            "REPO_NAME": repo["name"], "REMOTE_URL": build["remote"],
            "BUILD_NUMBER": str(build["number"]), "PARENT_BUILD_NUMBER": str(build["parent"]),
            "BUILD_EVENT": build["event"], "BUILD_CREATED": str(build["created_at"]),
            "BUILD_LINK": build["link_url"], "JOB_NUMBER": str(job["number"]),
            "COMMIT": build["commit_sha"], "COMMIT_SHA": build["commit_sha"],
            "COMMIT_BRANCH": build["branch"], "BRANCH": build["branch"],
            "COMMIT_REF": build["ref"], "COMMIT_MESSAGE": build["message"],
            "COMMIT_AUTHOR": build["author"], "COMMIT_AUTHOR_EMAIL": build["author_email"],
            "WORKSPACE": workspace,
        }
        if build["ref"].startswith("refs/tags/"):
            ci["TAG"] = build["ref"][len("refs/tags/"):]
        ci_env = {"CI": "true", "DRONE": "true"}
        for name, value in ci.items():
            ci_env["CI_" + name] = ci_env["DRONE_" + name] = value
        base = dict(self._base_environment)
        base.update(variables)
        base.update(matrix)
        return base, {**variables, **matrix, **ci_env}, ci_env, matrix

    def _run_steps(self, running, repo, build, pipeline, workspace, log):
        job = running.job
        base, variables, ci_env, matrix = self._environment(repo, build, job, workspace)
        minutes = pipeline.timeout or repo["timeout"] or DEFAULT_TIMEOUT_MINUTES
        deadline = time.monotonic() + minutes * 60
        status, exit_code, error = SUCCESS, 0, ""
        for step in pipeline.steps_for(variables):
            if running.stop_requested.is_set():
                return KILLED, exit_code, running.reason
            if not step.applies(branch=build["branch"], event=build["event"],
                                environment=matrix, job_status=status):
                continue
            environment = {**base, **running.secrets, **step.environment, **ci_env,
                           "CIRUNNER_JOB_TOKEN": running.token}
            code, stopped = self._run_step(running, step, environment, workspace, log,
                                           deadline, minutes)
            if stopped:
                return KILLED, code, stopped
            if code != 0 and step.ignore_failure:
                log.write(f"cirunner: step {step.name!r} failed with exit code {code} "
                          "(failure: ignore)\n")
            elif code != 0 and status == SUCCESS:
                status, exit_code = FAILURE, code
                error = f"step {step.name!r} failed with exit code {code}"
        return status, exit_code, error

    def _run_step(self, running, step, environment, workspace, log, deadline, minutes):
        """Run one step; returns (exit code, reason it was stopped or "")."""
        with self._spawn_lock:
            try:
                process = subprocess.Popen(
                    ["/bin/sh", "-e", "-c", step.script()], cwd=workspace, env=environment,
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True)
            except OSError as exc:
                raise _JobError(f"cannot start step {step.name!r}: {exc}") from None
            self._leaders.add(process.pid)
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(process.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        try:
            stopped = self._pump(process, running, log, deadline, minutes)
        finally:
            _signal_group(process.pid, signal.SIGKILL)  # always: sweep stragglers
            process.wait()
            process.stdout.close()
            with self._spawn_lock:
                self._leaders.discard(process.pid)
            self._await_group_exit(process.pid)
        code = process.returncode
        return (128 - code if code < 0 else code), stopped

    def _pump(self, process, running, log, deadline, minutes):
        """Copy the step's output into the log until it ends; stop it when
        asked or at the deadline (SIGTERM, grace, SIGKILL to the group)."""
        descriptor = process.stdout.fileno()
        poller = select.poll()
        poller.register(descriptor, select.POLLIN | select.POLLHUP | select.POLLERR)
        term_at = killed_at = exited_at = None
        stopped = ""
        while True:
            now = time.monotonic()
            if term_at is None:
                if running.stop_requested.is_set():
                    stopped = running.reason or "cancelled"
                elif now >= deadline:
                    stopped = f"timed out after {minutes} minutes"
                if stopped:
                    log.write(f"\ncirunner: {stopped}: stopping the job\n")
                    _signal_group(process.pid, signal.SIGTERM)
                    term_at = now
            elif killed_at is None and now - term_at >= self.grace:
                _signal_group(process.pid, signal.SIGKILL)
                killed_at = now
            if exited_at is None and process.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at >= STRAGGLER_SECONDS:
                break  # a detached grandchild holds the pipe open: stop reading
            due = log.flush_due_in()
            wait = 0.1 if due is None else min(due, 0.1)
            if exited_at is not None:
                wait = min(wait, 0.02)
            if poller.poll(int(wait * 1000) + 1):
                data = os.read(descriptor, LOG_CHUNK_BYTES)
                if not data:
                    break
                log.write(data)
            log.flush_if_due()
        return stopped

    # -- orphans ------------------------------------------------------------

    def _await_group_exit(self, pgid, timeout=2.0):
        """Wait until no process of the group is left, not even a zombie: the
        group's members may have been adopted by us and need reaping."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            self._reap_orphans()
            time.sleep(0.005)

    def _sweep(self, token):
        """Kill every process that still carries this job's token, however it
        detached (setsid, double fork), and reap those that were adopted."""
        marker = f"CIRUNNER_JOB_TOKEN={token}".encode()
        for _ in range(20):
            candidates = _adopted_pids() if self.subreaper else _all_pids()
            with self._spawn_lock:
                candidates -= self._leaders
            found = [pid for pid in candidates if pid != os.getpid() and _has_marker(pid, marker)]
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
        self._reap_orphans()

    def _reap_orphans(self):
        """Reap adopted orphans that exited on their own. Only zombies outside
        our own process group: our direct subprocesses (git) stay in it, and
        step leaders are waited for by their own thread."""
        if not self.subreaper:
            return
        own_group = os.getpgrp()
        with self._spawn_lock:
            for pid in _adopted_pids() - self._leaders:
                state, group = _process_state(pid)
                if state == "Z" and group != own_group:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)

###############################################################################
# Web #########################################################################
###############################################################################

_TRUE_WORDS = ("1", "true", "yes", "on")
_RESERVED_PARAMS = ("access_token",)


def _error_response(error):
    """Every API error leaves as this JSON body: {error, message, status}."""
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Token realm="cirunner"'
    return bottle.HTTPResponse(json.dumps(error.to_json()), status=error.status, headers=headers)


def _json_response(data, status=200):
    """A route's JSON body that is not a dict (dicts go through Bottle's JSON
    plugin); set on the request's own response rather than a new HTTPResponse,
    which Bottle would then copy onto it (a tenth of a small request's time)."""
    bottle.response.status = status
    bottle.response.content_type = "application/json"
    return json.dumps(data)


def _json_errors_plugin(callback):
    """Bottle plugin: routes raise CIRunnerError; this turns it into JSON."""

    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except CIRunnerError as error:
            return _error_response(error)
        except bottle.HTTPResponse:
            raise
        except Exception:  # noqa: BLE001 - a bug answers 500 JSON, never HTML
            _log.exception("unhandled error in %s %s", bottle.request.method, bottle.request.path)
            return _error_response(CIRunnerError("internal server error"))

    return wrapper


def _bottle_error_handler(response):
    """Bottle's own errors (no such route, wrong method) as the JSON error body."""
    codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request",
             413: "too_large", 500: "internal_error"}
    status = response.status_code
    message = {404: f"no route for {bottle.request.path}",
               405: f"method {bottle.request.method} not allowed on {bottle.request.path}",
               }.get(status, str(response.body) if status < 500 else "internal server error")
    bottle.response.content_type = "application/json"
    return json.dumps({"error": codes.get(status, "error"), "message": message, "status": status})


def _build_json(build, jobs=None):
    """A build in the Drone dialect's shape (times are Unix seconds, 0 if unset)."""
    data = {
        "id": build["id"], "number": build["number"], "parent": build["parent"],
        "event": build["event"], "status": build["status"], "error": build["error"],
        "created_at": build["created_at"], "enqueued_at": build["enqueued_at"],
        "started_at": build["started_at"], "finished_at": build["finished_at"],
        "commit": build["commit_sha"], "branch": build["branch"], "ref": build["ref"],
        "remote": build["remote"], "message": build["message"], "timestamp": build["timestamp"],
        "author": build["author"], "author_avatar": build["author_avatar"],
        "author_email": build["author_email"], "link_url": build["link_url"],
        "description": build["description"], "tags": json.loads(build["tags"] or "[]"),
        "pinned": bool(build["pinned"]), "variables": json.loads(build["variables"] or "{}"),
        "report_error": build["report_error"],
    }
    if jobs is not None:
        data["jobs"] = [_job_json(job) for job in jobs]
    return data


def _job_json(job):
    return {
        "id": job["id"], "build_id": job["build_id"], "number": job["number"],
        "status": job["status"], "error": job["error"], "exit_code": job["exit_code"],
        "enqueued_at": job["enqueued_at"], "started_at": job["started_at"],
        "finished_at": job["finished_at"], "environment": json.loads(job["environment"] or "{}"),
    }


def _repo_json(repo):
    return {
        "id": repo["id"], "owner": repo["owner"], "name": repo["name"],
        "full_name": f"{repo['owner']}/{repo['name']}", "clone_url": repo["url"],
        "default_branch": repo["default_branch"], "config_path": repo["config_path"],
        "private": bool(repo["private"]), "timeout": repo["timeout"],
        "max_builds": repo["max_builds"], "last_build_number": repo["last_number"],
        "events": json.loads(repo["events"]), "webhook_secret_set": bool(repo["webhook_secret"]),
        "forge": repo["forge"], "forge_url": repo["forge_url"],
        "forge_project": repo["forge_project"], "forge_token_set": bool(repo["forge_token"]),
        "created_at": repo["created_at"],
    }


def _positive_int(text, what):
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str) and re.fullmatch(r"[0-9]{1,15}", text):
        value = int(text)
    else:
        raise BadRequest(f"{what} must be a positive whole number, not {text!r}")
    if value < 1:
        raise BadRequest(f"{what} must be a positive whole number, not {text!r}")
    return value


def _int_param(params, name, default, minimum=0, maximum=None):
    if name not in params or params[name] in ("", None):
        return default
    text = params[name]
    if isinstance(text, bool) or not (isinstance(text, int) or (
            isinstance(text, str) and re.fullmatch(r"-?[0-9]{1,15}", text))):
        raise BadRequest(f"{name} must be a whole number")
    value = int(text)
    if value < minimum or (maximum is not None and value > maximum):
        raise BadRequest(f"{name} must be between {minimum} and {maximum}"
                         if maximum is not None else f"{name} must be {minimum} or more")
    return value


def _bool_value(value, name):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE_WORDS + ("0", "false", "no", "off", ""):
        return value.lower() in _TRUE_WORDS
    raise BadRequest(f"{name} must be true or false")


def _repo_fields(params, *, creating):
    """Validate repository settings from a request or the CLI."""
    aliases = {"branch": "default_branch", "config": "config_path", "clone_url": "url"}
    fields = {}
    for key, value in params.items():
        key = aliases.get(key, key)
        if key in _RESERVED_PARAMS:
            continue
        if key == "url":
            fields["url"] = normalize_repo_url(value)
        elif key == "default_branch":
            fields[key] = _check_branch(value) if value else ""
        elif key == "config_path":
            if not isinstance(value, str) or value.startswith("/") or ".." in value.split("/"):
                raise BadRequest("config_path must be a path inside the repository")
            fields[key] = value
        elif key == "private":
            fields[key] = int(_bool_value(value, key))
        elif key == "timeout":
            fields[key] = _int_param(params, key, DEFAULT_TIMEOUT_MINUTES, 1, 7 * 24 * 60)
        elif key == "max_builds":
            fields[key] = _int_param(params, key, 0, 0, 1000)
        elif key == "events":
            events = value.split(",") if isinstance(value, str) else value
            if not isinstance(events, list) or not all(event in EVENTS for event in events):
                raise BadRequest(f"events must be a list of {', '.join(EVENTS)}")
            fields[key] = json.dumps(list(dict.fromkeys(events)))
        elif key == "webhook_secret":
            if not isinstance(value, str) or len(value) > 256:
                raise BadRequest("webhook_secret must be a string of at most 256 characters")
            fields[key] = value
        elif key == "forge":
            if value not in FORGES + ("",):
                raise BadRequest(f"forge must be one of {', '.join(FORGES)} (or empty)")
            fields[key] = value
        elif key == "forge_url":
            if not isinstance(value, str) or (value and not value.startswith(("http://",
                                                                              "https://"))):
                raise BadRequest("forge_url must be an http(s) URL of the forge's API")
            fields[key] = value
        elif key in ("forge_token", "forge_project"):
            if not isinstance(value, str) or len(value) > 1024:
                raise BadRequest(f"{key} must be a string")
            fields[key] = value
        else:
            raise BadRequest(f"unknown repository field {key!r}")
    if creating and "url" not in fields:
        raise BadRequest("url is required: a clone URL or a local path")
    return fields


# Badge colours and words per build status (None: no build yet).
_BADGES = {SUCCESS: ("#4c1", "passing"), FAILURE: ("#e05d44", "failing"),
           RUNNING: ("#dfb317", "running"), PENDING: ("#dfb317", "pending"),
           ERROR: ("#9f9f9f", "error"), KILLED: ("#9f9f9f", "killed"),
           SKIPPED: ("#9f9f9f", "skipped"), None: ("#9f9f9f", "none")}
_CC_STATUS = {SUCCESS: "Success", FAILURE: "Failure", ERROR: "Exception", KILLED: "Exception",
              SKIPPED: "Success"}


def _badge_svg(status):
    """A flat 'build | passing' badge in the shields.io style, as SVG text."""
    colour, word = _BADGES[status]
    left, right = 37, 8 + 6 * len(word)
    width = left + right
    return f"""<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="20" \
role="img" aria-label="build: {word}"><title>build: {word}</title>\
<linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" stop-opacity=".1"/>\
<stop offset="1" stop-opacity=".1"/></linearGradient>\
<clipPath id="r"><rect width="{width}" height="20" rx="3" fill="#fff"/></clipPath>\
<g clip-path="url(#r)"><rect width="{left}" height="20" fill="#555"/>\
<rect x="{left}" width="{right}" height="20" fill="{colour}"/>\
<rect width="{width}" height="20" fill="url(#s)"/></g>\
<g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" \
font-size="11"><text x="{left / 2}" y="14">build</text>\
<text x="{left + right / 2}" y="14">{word}</text></g></svg>"""


def _xml_attribute(text):
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


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


def _paginated(results, count, offset, limit):
    """A list in the project dialect's shape: {count, next, previous, results}."""
    url = bottle.request.url.split("?")[0]
    query = {key: value for key, value in bottle.request.query.decode().items()
             if key not in ("offset", "limit")}

    def link(new_offset):
        params = dict(query, limit=str(limit), offset=str(new_offset))
        return url + "?" + "&".join(f"{key}={bottle.urlquote(value)}"
                                    for key, value in params.items())

    return {"count": count,
            "next": link(offset + limit) if offset + limit < count else None,
            "previous": link(max(0, offset - limit)) if offset > 0 else None,
            "results": results}


def _status_json(row):
    return {"id": row["id"], "status": row["status"], "message": row["message"],
            "created_at": row["created_at"], "job": row["job_number"]}


def _patch_fields(body):
    """Validate a build PATCH: description, tags (+ merge), pinned; else 400."""
    read_only = ("id", "number", "parent", "event", "status", "error", "created_at",
                 "enqueued_at", "started_at", "finished_at", "commit", "branch", "ref", "remote",
                 "message", "timestamp", "author", "author_avatar", "author_email", "link_url",
                 "jobs", "variables")
    fields = {}
    for key, value in body.items():
        if key == "description":
            if not isinstance(value, str):
                raise BadRequest("description must be a string")
            if len(value) > MAX_DESCRIPTION:
                raise BadRequest(f"description is longer than {MAX_DESCRIPTION} characters")
            fields[key] = value
        elif key == "tags":
            if not isinstance(value, list) or not all(isinstance(tag, str) and tag
                                                      for tag in value):
                raise BadRequest("tags must be a list of non-empty strings")
            fields[key] = list(dict.fromkeys(value))
        elif key == "pinned":
            if not isinstance(value, bool):
                raise BadRequest("pinned must be true or false")
            fields[key] = value
        elif key == "merge":
            if not isinstance(value, bool):
                raise BadRequest("merge must be true or false")
        elif key in read_only:
            raise BadRequest(f"field {key!r} is read-only")
        else:
            raise BadRequest(f"unknown field {key!r}: only description, tags, merge and "
                             "pinned can change")
    return fields


_ZERO_SHA = "0" * 40
_SKIP_PATTERN = re.compile(r"\[(ci skip|skip ci)\]", re.IGNORECASE)


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
    if isinstance(text, (int, float)):
        return int(text)
    try:
        return int(datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


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


def _parse_webhook(forge, event, payload):
    """Turn a verified payload into build fields, or None for an event that
    starts no build. Raises BadRequest for a payload of the wrong shape."""
    if forge == "gitlab":
        return _parse_gitlab_hook(event, payload)
    if event == "push":
        ref = _require(payload, "ref")
        after = _require(payload, "after")
        if after == _ZERO_SHA or payload.get("deleted"):
            return None  # a branch or tag deletion
        commits = payload.get("commits") if isinstance(payload.get("commits"), list) else []
        head = payload.get("head_commit") or (commits[-1] if commits else {})
        head = head if isinstance(head, dict) else {}
        is_tag = ref.startswith("refs/tags/")
        return {
            "event": EVENT_TAG if is_tag else EVENT_PUSH, "commit": after, "ref": ref,
            "branch": "" if is_tag else ref[len("refs/heads/"):],
            "message": head.get("message", ""), "timestamp": _iso_time(head.get("timestamp", 0)),
            "author": _dig(head, "author", "username") or _dig(head, "author", "name") or "",
            "author_email": _dig(head, "author", "email") or "",
            "author_avatar": _dig(payload, "sender", "avatar_url") or "",
            "link_url": payload.get("compare") or payload.get("compare_url") or "",
            "remote": _dig(payload, "repository", "clone_url") or "",
        }
    if event == "pull_request":
        action = _require(payload, "action")
        if action not in ("opened", "synchronize", "synchronized", "reopened"):
            return None
        number = _require(payload, "pull_request", "number", kind=int)
        return {
            "event": EVENT_PULL_REQUEST, "commit": _require(payload, "pull_request", "head", "sha"),
            "ref": f"refs/pull/{number}/head",
            "branch": _require(payload, "pull_request", "base", "ref"),
            "message": _dig(payload, "pull_request", "title") or "",
            "author": _dig(payload, "pull_request", "user", "login") or "",
            "author_avatar": _dig(payload, "pull_request", "user", "avatar_url") or "",
            "link_url": _dig(payload, "pull_request", "html_url") or "",
            "remote": _dig(payload, "pull_request", "head", "repo", "clone_url") or "",
        }
    return None


def _parse_gitlab_hook(event, payload):
    kind = payload.get("object_kind")
    if event in ("Push Hook", "Tag Push Hook") and kind in ("push", "tag_push"):
        ref = _require(payload, "ref")
        after = _require(payload, "after")
        if after == _ZERO_SHA:
            return None
        commits = [c for c in payload.get("commits") or [] if isinstance(c, dict)] \
            if isinstance(payload.get("commits"), list) else []
        head = next((c for c in commits if c.get("id") == after), commits[-1] if commits else {})
        is_tag = kind == "tag_push"
        return {
            "event": EVENT_TAG if is_tag else EVENT_PUSH,
            "commit": payload.get("checkout_sha") or after, "ref": ref,
            "branch": "" if is_tag else ref[len("refs/heads/"):],
            "message": head.get("message", ""), "timestamp": _iso_time(head.get("timestamp", 0)),
            "author": _dig(head, "author", "name") or payload.get("user_name", ""),
            "author_email": _dig(head, "author", "email") or payload.get("user_email", ""),
            "author_avatar": payload.get("user_avatar") or "",
            "link_url": head.get("url", ""),
            "remote": _dig(payload, "project", "git_http_url") or "",
        }
    if event == "Merge Request Hook" and kind == "merge_request":
        attributes = _require(payload, "object_attributes", kind=dict)
        if attributes.get("action") not in ("open", "update", "reopen"):
            return None
        number = _require(payload, "object_attributes", "iid", kind=int)
        last = attributes.get("last_commit") if isinstance(attributes.get("last_commit"),
                                                             dict) else {}
        return {
            "event": EVENT_PULL_REQUEST,
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
        }
    if kind is None and event not in ("Push Hook", "Tag Push Hook", "Merge Request Hook"):
        return None
    raise BadRequest(f"the payload is not a GitLab {event!r} of a known shape")


# -- web pages -----------------------------------------------------------------

SESSION_COOKIE = "cirunner_session"
CSRF_COOKIE = "cirunner_csrf"
SESSION_SECONDS = 12 * 3600
LOG_PAGE_BYTES = 256 * 1024     # a log page shows this much; earlier parts on request

_PAGE_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:.6em 1.2em;display:flex;gap:1em;align-items:center}
header a{color:#fff;text-decoration:none;font-weight:600}header .account{margin-left:auto}
main{max-width:1100px;margin:1.2em auto;padding:0 1em}
table{border-collapse:collapse;width:100%;background:#fff}th,td{text-align:left;padding:.35em .6em;border-bottom:1px solid #d0d7de}
th{background:#eaeef2}.status{display:inline-block;padding:0 .5em;border-radius:1em;color:#fff;font-weight:600;font-size:12px}
.s-success{background:#1a7f37}.s-failure{background:#cf222e}.s-running,.s-pending{background:#9a6700}
.s-error,.s-killed{background:#6e7781}.s-skipped{background:#8c959f}.s-none{background:#afb8c1}
.log{background:#0d1117;color:#e6edf3;font:12px/1.5 ui-monospace,Menlo,Consolas,monospace;padding:.5em 0;overflow-x:auto}
.log div{white-space:pre-wrap;word-break:break-all;padding:0 .8em 0 4.5em;text-indent:-3.7em}
.log a{color:#6e7681;display:inline-block;width:3.2em;text-align:right;margin-right:.5em;text-indent:0;text-decoration:none}
.log div:target{background:#264f78}.muted{color:#57606a}form.inline{display:inline}button{cursor:pointer}
.a1{font-weight:700}.a30{color:#8b949e}.a31{color:#ff7b72}.a32{color:#3fb950}.a33{color:#d29922}
.a34{color:#58a6ff}.a35{color:#bc8cff}.a36{color:#39c5cf}.a37{color:#e6edf3}
"""

_ANSI_PATTERN = re.compile(r"\x1b\[([0-9;]*)m")
_ANSI_OTHER = re.compile(r"\x1b\[[0-9;?]*[A-Za-ln-z]")

_LIVE_SCRIPT = """
(function(){
  var log=document.getElementById('log'), state=document.getElementById('job-status');
  if(!log||!window.EventSource||log.dataset.done==='1')return;
  var line=Number(log.dataset.lines), tail=log.lastElementChild, open=log.dataset.open==='1';
  function esc(t){return t.replace(/&/g,'&amp;').replace(/</g,'&lt;').replace(/>/g,'&gt;');}
  function ansi(t){var out='',open=0;t=esc(t).replace(/\\x1b\\[[0-9;?]*[A-Za-ln-z]/g,'');
    return t.replace(/\\x1b\\[([0-9;]*)m/g,function(m,c){var s='';while(open){s+='</span>';open--;}
      (c||'0').split(';').forEach(function(n){n=Number(n);if(n>=90&&n<=97)n-=60;
        if(n===1||(n>=30&&n<=37)){s+='<span class="a'+n+'">';open++;}});return s;})+'</span>'.repeat(open);}
  function add(text){var parts=text.split('\\n');
    parts.forEach(function(part,i){
      if(i===0&&open&&tail){tail.dataset.raw=(tail.dataset.raw||'')+part;tail.lastChild.innerHTML=ansi(tail.dataset.raw);}
      else if(i>0||!open||!tail){line+=1;var d=document.createElement('div');d.id='L'+line;
        d.innerHTML='<a href="#L'+line+'">'+line+'</a><span></span>';d.dataset.raw=part;
        d.lastChild.innerHTML=ansi(part);log.appendChild(d);tail=d;}
    });open=!text.endsWith('\\n');if(!open&&tail&&tail.dataset.raw===''){log.removeChild(tail);line-=1;tail=log.lastElementChild;}
    if(document.getElementById('follow').checked)window.scrollTo(0,document.body.scrollHeight);}
  var source=new EventSource(log.dataset.stream);
  source.onmessage=function(e){add(JSON.parse(e.data));};
  source.addEventListener('end',function(e){var end=JSON.parse(e.data);source.close();
    state.textContent=end.status;state.className='status s-'+end.status;});
})();
"""


def _session_key(store):
    return hmac.new(store.secret_key, b"web session", hashlib.sha256).digest()


def _sign_session(store, token_id, login, csrf, expires):
    payload = f"{token_id}:{login}:{csrf}:{expires}"
    signature = hmac.new(_session_key(store), payload.encode(), hashlib.sha256).hexdigest()
    return f"{payload}:{signature}"


def _read_session(store, value):
    """(token id, login) of a valid, unexpired session cookie, or None."""
    try:
        token_id, login, csrf, expires, signature = value.split(":")
        expected = hmac.new(_session_key(store), f"{token_id}:{login}:{csrf}:{expires}".encode(),
                            hashlib.sha256).hexdigest()
        if hmac.compare_digest(signature, expected) and int(expires) > time.time():
            return int(token_id), login
    except (ValueError, AttributeError):
        pass
    return None


def _ansi_html(text):
    """Escape a log line and turn its ANSI colour codes into spans."""
    text = _ANSI_OTHER.sub("", bottle.html_escape(text))
    opened = 0

    def span(match):
        nonlocal opened
        out = "</span>" * opened
        opened = 0
        for code in (match.group(1) or "0").split(";"):
            number = int(code) if code.isdigit() else 0
            if 90 <= number <= 97:
                number -= 60
            if number == 1 or 30 <= number <= 37:
                out += f'<span class="a{number}">'
                opened += 1
        return out

    return _ANSI_PATTERN.sub(span, text) + "</span>" * opened


def _ago(timestamp):
    if not timestamp:
        return '<span class="muted">-</span>'
    exact = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
    seconds = max(0, int(time.time()) - timestamp)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            text = f"{seconds // size} {unit} ago"
            break
    else:
        text = f"{seconds} s ago"
    return f'<time datetime="{exact}" title="{exact}">{text}</time>'


def _duration(start, end):
    if not start:
        return "-"
    seconds = max(0, (end or int(time.time())) - start)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def _status_label(status, element_id=""):
    status = status or "none"
    identity = f' id="{element_id}"' if element_id else ""
    return f'<span class="status s-{status}"{identity}>{bottle.html_escape(status)}</span>'


def _install_pages(app, store, current_user, may_read, data_dir, max_jobs):
    """The web pages: repositories, builds, a build, a job's log (live), sign-in."""
    request = bottle.request
    escape = bottle.html_escape

    def csrf_token():
        """The browser's CSRF token (a cookie the forms repeat), made on first need."""
        token = request.environ.get("cirunner.csrf") or request.get_cookie(CSRF_COOKIE) or ""
        if not re.fullmatch(r"[A-Za-z0-9_-]{20,64}", token):
            token = secrets.token_urlsafe(24)
            bottle.response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict",
                                       path="/")
        request.environ["cirunner.csrf"] = token
        return token

    def check_csrf():
        form = request.forms.decode()
        cookie = request.get_cookie(CSRF_COOKIE) or ""
        if not cookie or not hmac.compare_digest(cookie, form.get("csrf", "")):
            raise Forbidden("missing or wrong CSRF token: reload the page and try again")
        return form

    def page(title, body, status=200):
        user = current_user()
        token = csrf_token()
        if user:
            account = (f'<form class=account method="post" action="/logout"><span>{escape(user["login"])}</span> '
                       f'<input type="hidden" name="csrf" value="{token}">'
                       '<button>Sign out</button></form>')
        else:
            account = f'<span class=account><a href="/login?next={quote(request.path)}">Sign in</a></span>'
        bottle.response.status = status
        bottle.response.content_type = "text/html; charset=utf-8"
        return (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
                f"<meta name=viewport content='width=device-width,initial-scale=1'>"
                f"<title>{escape(title)} - cirunner</title><style>{_PAGE_STYLE}</style></head>"
                f"<body><header><a href='/'>cirunner</a>{account}</header><main>{body}</main>"
                f"</body></html>")

    def pages(callback):
        """Page errors as HTML; a guest who needs to sign in is sent to the form."""
        def wrapper(*args, **kwargs):
            try:
                if kwargs.get("owner") == "api":
                    raise NotFound(f"no route for {request.path}")
                return callback(*args, **kwargs)
            except Unauthorized:
                bottle.redirect(f"/login?next={quote(request.path)}", 303)
            except CIRunnerError as error:
                if request.path.startswith("/api/"):
                    return _error_response(error)
                return page(error.code, f"<h1>{error.status}</h1><p>{escape(error.message)}</p>",
                            error.status)
        return wrapper

    def readable_repo(owner, name):
        _check_name(owner, "owner")
        _check_name(name, "repository name")
        repo = store.get_repo(owner, name)
        user = current_user()
        if not may_read(user, repo):
            if user is None:
                raise Unauthorized("sign in to see this repository")
            raise NotFound(f"repository {owner}/{name} not found")
        return repo, user

    def may_write(user, repo):
        return bool(user and user["scope"] == "write" and (user["admin"]
                                                           or user["login"] == repo["owner"]))

    @app.get("/", apply=[pages])
    def home():
        user = current_user()
        rows = []
        for repo in store.list_repos():
            if not may_read(user, repo):
                continue
            with contextlib.suppress(NotFound):
                build = store.latest_build(repo["id"])
                rows.append((repo, build))
                continue
            rows.append((repo, None))
        body = "".join(
            f"<tr><td><a href='/{escape(r['owner'])}/{escape(r['name'])}'>"
            f"{escape(r['owner'])}/{escape(r['name'])}</a>{' (private)' if r['private'] else ''}"
            f"</td><td>{_status_label(b['status'] if b else None)}</td>"
            f"<td>{'#' + str(b['number']) if b else ''}</td><td>{_ago(b['created_at']) if b else ''}"
            f"</td></tr>" for r, b in rows)
        return page("Repositories", "<h1>Repositories</h1><table><tr><th>repository</th>"
                    f"<th>latest build</th><th>#</th><th>when</th></tr>{body}</table>"
                    + ("" if rows else "<p class=muted>No repositories you may see.</p>"))

    @app.get("/login")
    def login_form():
        next_path = request.query.get("next", "/")
        return page("Sign in", "<h1>Sign in</h1><form method=post action=/login>"
                    f"<input type=hidden name=csrf value='{csrf_token()}'>"
                    f"<input type=hidden name=next value='{escape(next_path)}'>"
                    "<p><label>API token <input name=token type=password size=50 autofocus>"
                    "</label> <button>Sign in</button></p></form>"
                    "<p class=muted>Make one with <code>cirunner token create LOGIN</code>.</p>")

    @app.post("/login")
    def login():
        try:
            form = check_csrf()
        except Forbidden as error:
            return page("Forbidden", f"<h1>403</h1><p>{escape(error.message)}</p>", 403)
        user = store.authenticate(form.get("token", "").strip())
        if user is None:
            return page("Sign in", "<h1>Sign in</h1><p>That token is not valid.</p>"
                        "<p><a href=/login>Try again</a></p>", 401)
        expires = int(time.time()) + SESSION_SECONDS
        bottle.response.set_cookie(
            SESSION_COOKIE, _sign_session(store, user["token_id"], user["login"],
                                          request.get_cookie(CSRF_COOKIE), expires),
            httponly=True, samesite="strict", path="/", max_age=SESSION_SECONDS)
        next_path = form.get("next", "/")
        if not next_path.startswith("/") or next_path[1:2] in ("/", "\\"):
            next_path = "/"  # only paths on this server: "//host" and "/\\host" leave it
        bottle.redirect(next_path, 303)

    @app.post("/logout")
    def logout():
        try:
            check_csrf()
        except Forbidden as error:
            return page("Forbidden", f"<h1>403</h1><p>{escape(error.message)}</p>", 403)
        bottle.response.delete_cookie(SESSION_COOKIE, path="/")
        bottle.redirect("/", 303)

    @app.get("/<owner>/<name>", apply=[pages])
    def repo_page(owner, name):
        repo, _ = readable_repo(owner, name)
        params = dict(request.query.decode().items())
        page_number = _int_param(params, "page", 1, 1, 10 ** 9)
        status = params.get("status") or None
        if status is not None and status not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
        branch = params.get("branch") or None
        builds = store.list_builds(repo["id"], offset=(page_number - 1) * DEFAULT_PER_PAGE,
                                   limit=DEFAULT_PER_PAGE + 1, branch=branch, status=status)
        base = f"/{escape(owner)}/{escape(name)}"
        rows = "".join(
            f"<tr><td><a href='{base}/{b['number']}'>#{b['number']}</a></td>"
            f"<td>{_status_label(b['status'])}</td><td>{escape(b['event'])}</td>"
            f"<td>{escape(b['branch'])}</td><td><code>{escape(b['commit_sha'][:8])}</code> "
            f"{escape((b['message'].splitlines() or [''])[0][:100])}</td>"
            f"<td>{escape(b['author'])}</td><td>{_ago(b['started_at'])}</td>"
            f"<td>{_duration(b['started_at'], b['finished_at'])}</td></tr>"
            for b in builds[:DEFAULT_PER_PAGE])
        options = "".join(f"<option{' selected' if s == status else ''}>{s}</option>"
                          for s in ("",) + STATUSES)
        filters = (f"<form method=get><label>branch <input name=branch value='{escape(branch or '')}'>"
                   f"</label> <label>status <select name=status>{options}</select></label> "
                   "<button>Filter</button></form>")
        query = "&".join(f"{k}={quote(v)}" for k, v in (("branch", branch), ("status", status)) if v)
        nav = ""
        if page_number > 1:
            nav += f"<a href='?page={page_number - 1}&{query}'>newer</a> "
        if len(builds) > DEFAULT_PER_PAGE:
            nav += f"<a href='?page={page_number + 1}&{query}'>older</a>"
        return page(f"{owner}/{name}", f"<h1>{escape(owner)}/{escape(name)}</h1>{filters}"
                    "<table><tr><th>#</th><th>status</th><th>event</th><th>branch</th>"
                    "<th>commit</th><th>author</th><th>started</th><th>duration</th></tr>"
                    f"{rows}</table><p>{nav}</p>")

    @app.get("/<owner>/<name>/<number>", apply=[pages])
    def build_page(owner, name, number):
        repo, user = readable_repo(owner, name)
        build = store.get_build(repo["id"], _positive_int(number, "build number"))
        base = f"/{escape(owner)}/{escape(name)}/{build['number']}"
        jobs = store.list_jobs(build["id"])
        job_rows = "".join(
            f"<tr><td><a href='{base}/{j['number']}'>job {j['number']}</a></td>"
            f"<td>{escape(_axis_text(json.loads(j['environment'])) or '-')}</td>"
            f"<td>{_status_label(j['status'])}</td><td>{j['exit_code']}</td>"
            f"<td>{_duration(j['started_at'], j['finished_at'])}</td>"
            f"<td>{escape(j['error'])}</td></tr>" for j in jobs)
        history = "".join(
            f"<tr><td>{_ago(row['created_at'])}</td><td>{row['job_number'] or 'build'}</td>"
            f"<td>{_status_label(row['status'])}</td><td>{escape(row['message'])}</td></tr>"
            for row in store.list_statuses(build["id"]))
        actions = ""
        if may_write(user, repo):
            token = csrf_token()
            if build["status"] in ACTIVE_STATUSES:
                actions = (f"<form class=inline method=post action='{base}/cancel'>"
                           f"<input type=hidden name=csrf value='{token}'>"
                           "<button id=cancel>Cancel</button></form>")
            else:
                actions = (f"<form class=inline method=post action='{base}/restart'>"
                           f"<input type=hidden name=csrf value='{token}'>"
                           "<button id=restart>Restart</button></form>")
        message = escape(build["message"])
        return page(f"{owner}/{name} #{build['number']}", (
            f"<h1><a href='/{escape(owner)}/{escape(name)}'>{escape(owner)}/{escape(name)}</a> "
            f"#{build['number']} {_status_label(build['status'], 'build-status')}</h1>"
            f"<p>{actions}</p><table><tr><th>commit</th><td><code>{escape(build['commit_sha'])}"
            f"</code></td></tr><tr><th>message</th><td><pre>{message}</pre></td></tr>"
            f"<tr><th>branch</th><td>{escape(build['branch'])}</td></tr>"
            f"<tr><th>event</th><td>{escape(build['event'])}</td></tr>"
            f"<tr><th>author</th><td>{escape(build['author'])} "
            f"&lt;{escape(build['author_email'])}&gt;</td></tr>"
            f"<tr><th>created</th><td>{_ago(build['created_at'])}</td></tr>"
            f"<tr><th>duration</th><td>{_duration(build['started_at'], build['finished_at'])}"
            f"</td></tr>{'<tr><th>error</th><td>' + escape(build['error']) + '</td></tr>' if build['error'] else ''}"
            f"</table><h2>Jobs</h2><table><tr><th>job</th><th>matrix</th><th>status</th>"
            f"<th>exit</th><th>duration</th><th>error</th></tr>{job_rows}</table>"
            f"<h2>History</h2><table><tr><th>when</th><th>job</th><th>status</th>"
            f"<th>message</th></tr>{history}</table>"))

    def build_action(owner, name, number, action):
        form = check_csrf()
        repo, user = readable_repo(owner, name)
        if not may_write(user, repo):
            raise Forbidden("you may not change builds of this repository")
        build = store.get_build(repo["id"], _positive_int(number, "build number"))
        if action == "cancel":
            store.cancel_jobs(build["id"], message=f"cancelled by {user['login']} on the web")
        else:
            restart_build(store, repo, build["number"], data_dir=data_dir, max_jobs=max_jobs)
        del form
        bottle.redirect(f"/{owner}/{name}/{build['number']}", 303)

    @app.post("/<owner>/<name>/<number>/cancel", apply=[pages])
    def cancel_page(owner, name, number):
        return build_action(owner, name, number, "cancel")

    @app.post("/<owner>/<name>/<number>/restart", apply=[pages])
    def restart_page(owner, name, number):
        return build_action(owner, name, number, "restart")

    @app.get("/<owner>/<name>/<number>/<job_number>", apply=[pages])
    def job_page(owner, name, number, job_number):
        repo, _ = readable_repo(owner, name)
        build = store.get_build(repo["id"], _positive_int(number, "build number"))
        job = store.get_job(build["id"], _positive_int(job_number, "job number"))
        size = store.log_size(job["id"])
        params = dict(request.query.decode().items())
        end = _int_param(params, "to", size, 0, size)
        start = max(0, end - LOG_PAGE_BYTES)
        # Line numbers of a tail: count the newlines before it, chunk by chunk.
        first_line = 1
        for chunk in store.read_log(job["id"]):
            if start <= 0:
                break
            first_line += chunk[:start].count(b"\n")
            start_in = start - len(chunk)
            if start_in <= 0:
                break
            start = start_in
        start = max(0, end - LOG_PAGE_BYTES)
        data = bytearray()
        for chunk in store.read_log(job["id"], start):
            data += chunk
            if len(data) >= end - start:
                break
        data = bytes(data[:end - start])
        live = job["status"] in ACTIVE_STATUSES and end == size
        if live:
            # Show whole lines; the stream goes on from the end of the last one.
            data = data[:data.rfind(b"\n") + 1]
            end = start + len(data)
        text = data.decode("utf-8", errors="replace")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        rows = "".join(f"<div id='L{first_line + i}'><a href='#L{first_line + i}'>{first_line + i}"
                       f"</a><span>{_ansi_html(line)}</span></div>" for i, line in enumerate(lines))
        base = f"/{escape(owner)}/{escape(name)}/{build['number']}"
        raw = f"/api/repos/{escape(owner)}/{escape(name)}/logs/{build['number']}/{job['number']}"
        earlier = (f"<p><a id=earlier href='?to={start}'>load earlier output</a> "
                   f"(showing bytes {start}-{end} of {size})</p>" if start > 0 else "")
        return page(f"{owner}/{name} #{build['number']} job {job['number']}", (
            f"<h1><a href='{base}'>{escape(owner)}/{escape(name)} #{build['number']}</a> job "
            f"{job['number']} {_status_label(job['status'], 'job-status')}</h1>"
            f"<p>{escape(_axis_text(json.loads(job['environment'])))} <a href='{raw}'>raw log</a>"
            f" <label><input type=checkbox id=follow checked> follow</label></p>{earlier}"
            f"<div class=log id=log data-lines='{first_line + len(lines) - 1}' "
            f"data-open='{0 if text.endswith(chr(10)) or not text else 1}' "
            f"data-start='{start}' "
            f"data-done='{0 if live else 1}' data-stream='{raw}?follow=1&amp;offset={end}'>"
            f"{rows}</div><script>{_LIVE_SCRIPT}</script>"))


def make_app(store, executor=None, *, data_dir=None, max_body=DEFAULT_MAX_BODY,
             max_streams=DEFAULT_HTTP_THREADS - 4, heartbeat=SSE_HEARTBEAT_SECONDS,
             max_jobs=DEFAULT_MAX_JOBS):
    """Build the Bottle WSGI app serving both API dialects over `store`.

    `executor` is optional: jobs run wherever an executor shares the store.
    `max_body` bytes is the largest request body (413 beyond); `max_streams`
    live log streams may be open at once (503 beyond), each holding a server
    thread; `heartbeat` seconds between keep-alive comments on streams.
    The app's ``closing`` event ends open streams (set it before shutdown).
    """
    app = bottle.Bottle()
    app.closing = threading.Event()
    app.store = store
    app.executor = executor
    data_dir = data_dir or store.data_dir
    streams = {"open": 0}
    streams_lock = threading.Lock()
    request = bottle.request
    app.install(_json_errors_plugin)
    app.default_error_handler = _bottle_error_handler

    @app.hook("after_request")
    def release_connection():
        # A streamed body reads on after this, taking a connection back if it must.
        store.release_connection()

    @app.hook("before_request")
    def normalise_request():
        path = request.environ.get("PATH_INFO", "")
        if len(path) > 1 and path.endswith("/"):
            request.environ["PATH_INFO"] = path.rstrip("/") or "/"
        length = request.environ.get("CONTENT_LENGTH") or "0"
        if not length.isdigit():
            raise _error_response(BadRequest("invalid Content-Length"))
        if int(length) > max_body:
            raise _error_response(TooLarge(f"request body larger than {max_body} bytes"))

    # -- request input ------------------------------------------------------

    def read_body():
        """The raw request body, at most `max_body` bytes (413 beyond)."""
        stream = request.environ.get("wsgi.input")
        length = int(request.environ.get("CONTENT_LENGTH") or 0)
        raw = stream.read(min(length, max_body + 1)) if stream is not None and length else b""
        if len(raw) > max_body:
            raise TooLarge(f"request body larger than {max_body} bytes")
        return raw

    def body_params():
        """The request body as a dict: JSON, or a form (Drone's clients send forms)."""
        raw = read_body()
        if not raw.strip():
            return {}
        content_type = (request.content_type or "").split(";")[0].strip().lower()
        if content_type == "application/x-www-form-urlencoded":
            return dict(parse_qsl(raw.decode("utf-8", errors="replace"), keep_blank_values=True))
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise BadRequest(f"malformed JSON body: {exc}") from None
        if not isinstance(data, dict):
            raise BadRequest("the JSON body must be an object")
        return data

    def query_params():
        params = dict(request.query.decode().items())
        for key in _RESERVED_PARAMS:
            params.pop(key, None)
        return params

    def all_params():
        params = query_params()
        params.update(body_params())
        return params

    # -- who is calling, and may they --------------------------------------

    def current_user():
        """The authenticated user (a dict with the token's scope), or None for a
        guest. Bad, unknown or revoked credentials are 401 wherever they appear."""
        if "cirunner.user" in request.environ:
            return request.environ["cirunner.user"]
        header = request.get_header("Authorization")
        secret = _parse_authorization(header) if header is not None else (
            request.query.get("access_token") or None)
        user = None
        if secret is not None:
            user = store.authenticate(secret)
            if user is None:
                raise Unauthorized("invalid or revoked token")
        elif request.get_cookie(SESSION_COOKIE):
            # A signed-in browser: its session names a token, which must still exist.
            session = _read_session(store, request.get_cookie(SESSION_COOKIE))
            user = store.user_for_token(session[0]) if session else None
            if user is not None:
                user["via_cookie"] = True
        request.environ["cirunner.user"] = user
        return user

    def may_read(user, repo):
        return not repo["private"] or (user is not None and (
            user["admin"] or user["login"] == repo["owner"]))

    def require_read(repo):
        user = current_user()
        if not may_read(user, repo):
            if user is None:
                raise Unauthorized("this repository needs a token")
            raise NotFound(f"repository {repo['owner']}/{repo['name']} not found")
        return user

    def require_write(owner, repo=None):
        """Writes need a write-scope token of the owner, or of an admin."""
        user = require_read(repo) if repo is not None else current_user()
        if user is None or user.get("via_cookie"):
            # A session cookie never writes through the API: no cross-site forgery.
            raise Unauthorized("this action needs a token")
        if user["scope"] != "write":
            raise Forbidden("this token is read-only")
        if not (user["admin"] or user["login"] == owner):
            raise Forbidden(f"only {owner} or an admin may change this")
        return user

    def find_repo(owner, name, *, write=False):
        _check_name(owner, "owner")
        _check_name(name, "repository name")
        try:
            repo = store.get_repo(owner, name)
        except NotFound:
            # A guest learns nothing more from a missing repo than from a private one.
            current_user()
            raise
        if write:
            require_write(owner, repo)
        else:
            require_read(repo)
        return repo

    def find_build(repo, number):
        if number == "latest":
            return store.latest_build(repo["id"], query_params().get("branch") or None)
        return store.get_build(repo["id"], _positive_int(number, "build number"))

    def find_build_by_id(repo, build_id):
        build = store.get_build_by_id(_positive_int(build_id, "build id"))
        if build["repo_id"] != repo["id"]:
            raise NotFound(f"build {build_id} not found")
        return build

    def find_job(owner, name, number, job_number, *, write=False):
        repo = find_repo(owner, name, write=write)
        build = find_build(repo, number)
        return repo, build, store.get_job(build["id"], _positive_int(job_number, "job number"))

    def build_response(build, status=200):
        return _json_response(_build_json(build, store.list_jobs(build["id"])), status)

    def who(user):
        return user["login"] if user else "someone"

    # -- meta ---------------------------------------------------------------

    @app.get("/api/version")
    def version():
        return {"version": __version__}

    @app.get("/healthz")
    def health():
        store.data_version()
        return {"status": "ok"}

    @app.get("/api/openapi.json")
    def openapi():
        return _openapi_document()

    # -- repositories -------------------------------------------------------

    @app.get("/api/repos")
    def list_repos():
        user = current_user()
        return _json_response([_repo_json(repo) for repo in store.list_repos()
                               if may_read(user, repo)])

    @app.post("/api/repos/<owner>/<name>")
    def add_repo(owner, name):
        _check_name(owner, "owner")
        _check_name(name, "repository name")
        require_write(owner)
        fields = _repo_fields(all_params(), creating=True)
        url = fields.pop("url")
        fields.setdefault("webhook_secret", secrets.token_urlsafe(24))
        repo = _repo_json(store.create_repo(owner, name, url, **fields))
        # The only time the secret is shown: configure the forge with it now.
        parts = request.urlparts
        repo.update(webhook_secret=fields["webhook_secret"],
                    webhook_url=f"{parts.scheme}://{parts.netloc}/hook")
        return _json_response(repo, 201)

    @app.get("/api/repos/<owner>/<name>")
    def get_repo(owner, name):
        return _repo_json(find_repo(owner, name))

    @app.route("/api/repos/<owner>/<name>", method="PATCH")
    def update_repo(owner, name):
        repo = find_repo(owner, name, write=True)
        return _repo_json(store.update_repo(repo["id"], **_repo_fields(body_params(),
                                                                        creating=False)))

    @app.delete("/api/repos/<owner>/<name>")
    def delete_repo(owner, name):
        repo = find_repo(owner, name, write=True)
        store.delete_repo(repo["id"])
        shutil.rmtree(_mirror_path(data_dir, repo), ignore_errors=True)
        shutil.rmtree(os.path.join(data_dir, "workspaces", owner, name), ignore_errors=True)
        return {"deleted": f"{owner}/{name}"}

    # -- badges -------------------------------------------------------------

    def latest_or_none(repo):
        with contextlib.suppress(NotFound):
            return store.latest_build(repo["id"], query_params().get("branch")
                                      or repo["default_branch"] or None)
        return None

    @app.get("/api/badges/<owner>/<name>/status.svg")
    def badge(owner, name):
        """The latest build's status of a branch (default: the repo's) as an SVG badge."""
        build = latest_or_none(find_repo(owner, name))
        return bottle.HTTPResponse(_badge_svg(build["status"] if build else None), headers={
            "Content-Type": "image/svg+xml", "Cache-Control": "no-cache, max-age=0"})

    @app.get("/api/badges/<owner>/<name>/cc.xml")
    def cc_xml(owner, name):
        """The CCMenu / CCTray feed of the repository's latest build."""
        repo = find_repo(owner, name)
        build = latest_or_none(repo)
        attributes = {"name": f"{repo['owner']}/{repo['name']}", "activity": "Sleeping",
                      "lastBuildStatus": "Unknown", "lastBuildLabel": "", "lastBuildTime": "",
                      "webUrl": f"{request.urlparts.scheme}://{request.urlparts.netloc}"
                                f"/api/repos/{repo['owner']}/{repo['name']}/builds"}
        if build:
            attributes["activity"] = ("Building" if build["status"] in ACTIVE_STATUSES
                                      else "Sleeping")
            attributes["lastBuildStatus"] = _CC_STATUS.get(build["status"], "Unknown")
            attributes["lastBuildLabel"] = str(build["number"])
            stamp = build["finished_at"] or build["started_at"] or build["created_at"]
            attributes["lastBuildTime"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
            attributes["webUrl"] += f"/{build['number']}"
        project = " ".join(f'{key}="{_xml_attribute(value)}"' for key, value in attributes.items())
        body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Projects><Project {project}/></Projects>\n'
        return bottle.HTTPResponse(body, headers={"Content-Type": "application/xml",
                                                  "Cache-Control": "no-cache, max-age=0"})

    # -- secrets ------------------------------------------------------------

    @app.get("/api/repos/<owner>/<name>/secrets")
    def list_secrets(owner, name):
        repo = find_repo(owner, name, write=True)
        return _json_response(store.list_secrets(repo["id"]))

    @app.post("/api/repos/<owner>/<name>/secrets")
    def add_secret(owner, name):
        repo = find_repo(owner, name, write=True)
        params = body_params()
        events = params.get("events")
        if isinstance(events, str):
            events = events.split(",")
        if events is not None and not isinstance(events, list):
            raise BadRequest("events must be a list")
        unknown = set(params) - {"name", "value", "events"}
        if unknown:
            raise BadRequest(f"unknown field {min(unknown)!r}")
        store.set_secret(repo["id"], params.get("name"), params.get("value"), events)
        secret = next(item for item in store.list_secrets(repo["id"])
                      if item["name"] == params["name"])
        return _json_response(secret, 201)

    @app.delete("/api/repos/<owner>/<name>/secrets/<secret>")
    def delete_secret(owner, name, secret):
        repo = find_repo(owner, name, write=True)
        store.delete_secret(repo["id"], secret)
        return {"deleted": secret}

    # -- webhooks -----------------------------------------------------------

    @app.post("/hook")
    @app.post("/api/hook")
    def webhook():
        """A forge's push, tag or pull request: verified, then built."""
        forge, event = _webhook_forge(request.headers)
        if forge is None:
            raise BadRequest("not a webhook: no X-GitHub-Event, X-Gitea-Event, "
                             "X-Forgejo-Event or X-Gitlab-Event header")
        body = read_body()
        payload = None
        full_name = request.query.get("repo")
        if not full_name:
            try:
                payload = json.loads(body)
            except ValueError:
                raise BadRequest("the webhook body is not JSON") from None
            full_name = _webhook_repo_name(forge, payload) if isinstance(payload, dict) else None
            if not full_name:
                raise BadRequest("the payload names no repository (or pass ?repo=OWNER/NAME)")
        owner, _, name = str(full_name).partition("/")
        try:
            repo = store.get_repo(_check_name(owner, "owner"), _check_name(name, "name"))
        except BadRequest:
            raise NotFound(f"repository {full_name} not found") from None
        _verify_webhook(forge, request.headers, body, repo["webhook_secret"])
        if payload is None:
            try:
                payload = json.loads(body)
            except ValueError:
                raise BadRequest("the webhook body is not JSON") from None
        if not isinstance(payload, dict):
            raise BadRequest("the webhook body must be a JSON object")
        if event == "ping" or forge == "gitlab" and event == "System Hook":
            return {"ping": "ok", "repo": f"{repo['owner']}/{repo['name']}"}
        fields = _parse_webhook(forge, event, payload)
        if fields is None:
            return bottle.HTTPResponse(status=204)
        fields = {key: value if key == "timestamp" else _text(value)
                  for key, value in fields.items()}
        if _SKIP_PATTERN.search(fields["message"] or ""):
            return bottle.HTTPResponse(status=204)
        if fields["event"] not in json.loads(repo["events"]):
            return bottle.HTTPResponse(status=204)
        commit = _check_commit(fields.pop("commit"))
        branch = fields.pop("branch")
        event_name = fields.pop("event")
        build = create_build(
            store, repo, branch=branch, commit=commit, event=event_name, data_dir=data_dir,
            max_jobs=max_jobs, pull_ref=fields["ref"] if event_name == EVENT_PULL_REQUEST else "",
            **fields)
        return build_response(build)

    # -- builds (Drone dialect) ---------------------------------------------

    def build_filters(params):
        status = params.get("status") or None
        if status is not None and status not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
        return {"branch": params.get("branch") or None, "status": status}

    @app.get("/api/repos/<owner>/<name>/builds")
    def list_builds(owner, name):
        repo = find_repo(owner, name)
        params = query_params()
        per_page = _int_param(params, "per_page", DEFAULT_PER_PAGE, 1, MAX_PER_PAGE)
        page = _int_param(params, "page", 1, 1, 10 ** 9)
        builds = store.list_builds(repo["id"], offset=(page - 1) * per_page, limit=per_page,
                                   **build_filters(params))
        return _json_response([_build_json(build) for build in builds])

    @app.post("/api/repos/<owner>/<name>/builds")
    def start_build(owner, name):
        repo = find_repo(owner, name, write=True)
        params = all_params()
        variables = params.pop("variables", None) or {}
        if not isinstance(variables, dict):
            raise BadRequest("variables must be an object of NAME: value")
        branch = params.pop("branch", "") or ""
        commit = params.pop("commit", "") or ""
        event = params.pop("event", EVENT_MANUAL) or EVENT_MANUAL
        variables = {**params, **variables}  # any other key is a variable, as in Drone
        build = create_build(store, repo, branch=branch, commit=commit, variables=variables,
                             event=event, data_dir=data_dir, max_jobs=max_jobs)
        return build_response(build, 201)

    @app.get("/api/repos/<owner>/<name>/builds/<number>")
    def get_build(owner, name, number):
        return build_response(find_build(find_repo(owner, name), number))

    @app.post("/api/repos/<owner>/<name>/builds/<number>")
    def restart(owner, name, number):
        repo = find_repo(owner, name, write=True)
        build = find_build(repo, number)
        params = all_params()
        fork = _bool_value(params.pop("fork", "false"), "fork")
        build = restart_build(store, repo, build["number"], fork=fork, variables=params,
                              data_dir=data_dir, max_jobs=max_jobs)
        return build_response(build, 202)

    @app.delete("/api/repos/<owner>/<name>/builds/<number>")
    def cancel_build(owner, name, number):
        repo = find_repo(owner, name, write=True)
        build = find_build(repo, number)
        return build_response(store.cancel_jobs(
            build["id"], message=f"cancelled by {who(current_user())} over the API"))

    @app.delete("/api/repos/<owner>/<name>/builds/<number>/<job_number>")
    @app.delete("/api/repos/<owner>/<name>/logs/<number>/<job_number>")
    def cancel_job(owner, name, number, job_number):
        _, build, job = find_job(owner, name, number, job_number, write=True)
        return build_response(store.cancel_jobs(
            build["id"], job["number"],
            message=f"cancelled by {who(current_user())} over the API"))

    # -- logs ---------------------------------------------------------------

    @app.get("/api/repos/<owner>/<name>/logs/<number>/<job_number>")
    def get_log(owner, name, number, job_number):
        _, _, job = find_job(owner, name, number, job_number)
        params = query_params()
        offset = _int_param(params, "offset", 0)
        follow = params.get("follow", "").lower() in _TRUE_WORDS
        if follow or "text/event-stream" in request.get_header("Accept", ""):
            last_id = request.get_header("Last-Event-ID", "")
            if last_id.isdigit():
                offset = int(last_id)
            with streams_lock:
                if streams["open"] >= max_streams:
                    raise Unavailable("too many open log streams; try again later")
                streams["open"] += 1
            bottle.response.content_type = "text/event-stream; charset=utf-8"
            bottle.response.set_header("Cache-Control", "no-cache")
            bottle.response.set_header("X-Accel-Buffering", "no")
            return log_events(job["id"], offset)
        bottle.response.content_type = "text/plain; charset=utf-8"
        if job["status"] in DONE_STATUSES:
            bottle.response.set_header("Content-Length",
                                       str(max(0, store.log_size(job["id"]) - offset)))
        return store.read_log(job["id"], offset)

    def log_events(job_id, offset):
        """Server-Sent Events: each chunk as a JSON string with its end offset
        as the event id (so EventSource resumes where it stopped), a comment
        line as heartbeat, and an `end` event when the job finishes."""
        try:
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            last_sent = time.monotonic()
            yield b"retry: 2000\n\n"
            while not app.closing.is_set():
                seen = store.log_events_seen()
                job = store.get_job_by_id(job_id)  # read before the log: nothing is missed
                sent = False
                for chunk in store.read_log(job_id, offset):
                    offset += len(chunk)
                    text = decoder.decode(chunk)
                    if text:
                        sent = True
                        yield f"id: {offset}\ndata: {json.dumps(text)}\n\n".encode()
                if job["status"] in DONE_STATUSES:
                    end = {"status": job["status"], "exit_code": job["exit_code"],
                           "error": job["error"]}
                    yield f"event: end\ndata: {json.dumps(end)}\n\n".encode()
                    return
                if sent:
                    last_sent = time.monotonic()
                elif time.monotonic() - last_sent >= heartbeat:
                    yield b": heartbeat\n\n"
                    last_sent = time.monotonic()
                else:
                    store.wait_for_log(min(0.5, heartbeat), seen)
        finally:
            with streams_lock:
                streams["open"] -= 1

    # -- project dialect (/api/v1) ------------------------------------------

    def page_params():
        params = query_params()
        return (_int_param(params, "offset", 0, 0, 10 ** 12),
                _int_param(params, "limit", V1_PAGE_SIZE, 1, MAX_PER_PAGE))

    @app.get("/api/v1/<owner>/<name>/builds")
    def v1_list_builds(owner, name):
        repo = find_repo(owner, name)
        offset, limit = page_params()
        filters = build_filters(query_params())
        builds = store.list_builds(repo["id"], offset=offset, limit=limit, **filters)
        return _paginated([_build_json(build) for build in builds],
                          store.count_builds(repo["id"], **filters), offset, limit)

    @app.get("/api/v1/<owner>/<name>/builds/<build_id>")
    def v1_get_build(owner, name, build_id):
        return build_response(find_build_by_id(find_repo(owner, name), build_id))

    @app.route("/api/v1/<owner>/<name>/builds/<build_id>", method="PATCH")
    def v1_update_build(owner, name, build_id):
        build = find_build_by_id(find_repo(owner, name, write=True), build_id)
        body = body_params()
        fields = _patch_fields(body)
        if "tags" in fields and body.get("merge"):
            existing = json.loads(build["tags"] or "[]")
            fields["tags"] = list(dict.fromkeys(existing + fields["tags"]))
        return build_response(store.update_build(build["id"], **fields))

    @app.delete("/api/v1/<owner>/<name>/builds/<build_id>")
    def v1_delete_build(owner, name, build_id):
        repo = find_repo(owner, name, write=True)
        build = find_build_by_id(repo, build_id)
        store.delete_build(build["id"])
        shutil.rmtree(os.path.join(data_dir, "workspaces", owner, name, str(build["number"])),
                      ignore_errors=True)
        return {"id": build["id"], "number": build["number"], "deleted": True}

    @app.post("/api/v1/<owner>/<name>/builds/<build_id>")
    @app.post("/api/v1/<owner>/<name>/builds/<build_id>/stop")
    def v1_stop_build(owner, name, build_id):
        build = find_build_by_id(find_repo(owner, name, write=True), build_id)
        if build["status"] not in ACTIVE_STATUSES:
            raise Conflict(f"build {build['number']} has already finished ({build['status']})")
        return build_response(store.cancel_jobs(
            build["id"], pending_status=SKIPPED,
            message=f"stopped by {who(current_user())}"))

    @app.get("/api/v1/<owner>/<name>/builds/<build_id>/statuses")
    def v1_statuses(owner, name, build_id):
        build = find_build_by_id(find_repo(owner, name), build_id)
        offset, limit = page_params()
        rows = store.list_statuses(build["id"], offset=offset, limit=limit)
        return _paginated([_status_json(row) for row in rows], store.count_statuses(build["id"]),
                          offset, limit)

    @app.get("/api/v1/<owner>/<name>/builds/<build_id>/statuses/<status_id>")
    def v1_status(owner, name, build_id, status_id):
        build = find_build_by_id(find_repo(owner, name), build_id)
        return _status_json(store.get_status(build["id"], _positive_int(status_id, "status id")))

    @app.get("/api/v1/<owner>/<name>/builds/<build_id>/logs")
    def v1_logs(owner, name, build_id):
        build = find_build_by_id(find_repo(owner, name), build_id)
        jobs = store.list_jobs(build["id"])
        bottle.response.content_type = "text/plain; charset=utf-8"

        def all_logs():
            for job in jobs:
                axis = _axis_text(json.loads(job["environment"] or "{}"))
                yield (f"=== job {job['number']}{' (' + axis + ')' if axis else ''}: "
                       f"{job['status']} ===\n").encode()
                yield from store.read_log(job["id"])
                yield b"\n"

        return all_logs()

    _install_pages(app, store, current_user, may_read, data_dir, max_jobs)
    return app


def _openapi_document():
    """The OpenAPI 3 description of every route (served at /api/openapi.json)."""
    def ref(name):
        return {"$ref": f"#/components/schemas/{name}"}

    def error_responses(*codes):
        return {str(code): {"description": description, "content": {
            "application/json": {"schema": ref("Error")}}}
            for code, description in (
                (400, "bad input"), (401, "no or bad credentials"), (403, "not allowed"),
                (404, "unknown"), (409, "conflict with the current state"),
                (413, "body too large"), (503, "too many live streams"))
            if code in codes}

    def json_body(schema, description="JSON, or a form"):
        return {"required": False, "description": description, "content": {
            "application/json": {"schema": schema},
            "application/x-www-form-urlencoded": {"schema": schema}}}

    def ok(schema, code="200", description="success"):
        return {code: {"description": description,
                       "content": {"application/json": {"schema": schema}}}}

    def text(code="200"):
        return {code: {"description": "text", "content": {
            "text/plain": {"schema": {"type": "string"}}}}}

    def path_param(name, schema=None, description=""):
        return {"name": name, "in": "path", "required": True, "description": description,
                "schema": schema or {"type": "string"}}

    def query_param(name, schema, description=""):
        return {"name": name, "in": "query", "required": False, "description": description,
                "schema": schema}

    name_schema = {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,100}$"}
    repo_params = [path_param("owner", name_schema), path_param("name", name_schema)]
    number = {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "enum": ["latest"]}]}
    positive = {"type": "integer", "minimum": 1}
    build_params = repo_params + [path_param("number", number, "build number or 'latest'")]
    job_params = build_params + [path_param("job", positive, "job number")]
    v1_params = repo_params + [path_param("id", positive, "the build's global id")]
    read_errors = error_responses(400, 401, 404)
    write_errors = error_responses(400, 401, 403, 404, 409, 413)
    status_enum = {"type": "string", "enum": list(STATUSES)}
    repo_fields = {
        "url": {"type": "string"}, "default_branch": {"type": "string"},
        "config_path": {"type": "string"}, "private": {"type": "boolean"},
        "timeout": {"type": "integer", "minimum": 1, "maximum": 10080},
        "max_builds": {"type": "integer", "minimum": 0, "maximum": 1000},
        "events": {"type": "array", "items": {"type": "string", "enum": list(EVENTS)}},
        "webhook_secret": {"type": "string", "maxLength": 256, "writeOnly": True},
        "forge": {"type": "string", "enum": [*FORGES, ""]},
        "forge_url": {"type": "string"}, "forge_project": {"type": "string"},
        "forge_token": {"type": "string", "writeOnly": True}}
    time_field = {"type": "integer", "description": "Unix seconds; 0 when unset"}
    paginated = {"type": "object", "required": ["count", "next", "previous", "results"],
                 "properties": {"count": {"type": "integer"},
                                "next": {"type": ["string", "null"]},
                                "previous": {"type": ["string", "null"]}}}
    schemas = {
        "Error": {"type": "object", "required": ["error", "message", "status"], "properties": {
            "error": {"type": "string"}, "message": {"type": "string"},
            "status": {"type": "integer"}}},
        "Repo": {"type": "object", "required": ["id", "owner", "name", "full_name"],
                 "properties": {
                     "id": {"type": "integer"}, "owner": {"type": "string"},
                     "name": {"type": "string"}, "full_name": {"type": "string"},
                     "clone_url": {"type": "string"}, "default_branch": {"type": "string"},
                     "config_path": {"type": "string"}, "private": {"type": "boolean"},
                     "timeout": {"type": "integer"}, "max_builds": {"type": "integer"},
                     "last_build_number": {"type": "integer"},
                     "events": {"type": "array", "items": {"type": "string"}},
                     "webhook_secret_set": {"type": "boolean"}, "forge": {"type": "string"},
                     "forge_url": {"type": "string"}, "forge_project": {"type": "string"},
                     "forge_token_set": {"type": "boolean"}, "created_at": time_field}},
        "Job": {"type": "object", "required": ["id", "number", "status", "enqueued_at",
                                               "started_at", "finished_at", "exit_code",
                                               "environment"],
                "properties": {
                    "id": {"type": "integer"}, "build_id": {"type": "integer"},
                    "number": {"type": "integer"}, "status": status_enum,
                    "error": {"type": "string"}, "exit_code": {"type": "integer"},
                    "enqueued_at": time_field, "started_at": time_field,
                    "finished_at": time_field,
                    "environment": {"type": "object",
                                    "additionalProperties": {"type": "string"}}}},
        "Build": {"type": "object", "required": [
            "id", "number", "event", "status", "created_at", "enqueued_at", "started_at",
            "finished_at", "commit", "branch", "ref", "remote", "message", "timestamp",
            "author", "author_avatar", "author_email", "link_url"], "properties": {
                "id": {"type": "integer"}, "number": {"type": "integer"},
                "parent": {"type": "integer"}, "event": {"type": "string"},
                "status": status_enum, "error": {"type": "string"},
                "created_at": time_field, "enqueued_at": time_field,
                "started_at": time_field, "finished_at": time_field,
                "commit": {"type": "string"}, "branch": {"type": "string"},
                "ref": {"type": "string"}, "remote": {"type": "string"},
                "message": {"type": "string"}, "timestamp": {"type": "integer"},
                "author": {"type": "string"}, "author_avatar": {"type": "string"},
                "author_email": {"type": "string"}, "link_url": {"type": "string"},
                "description": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "pinned": {"type": "boolean"},
                "variables": {"type": "object", "additionalProperties": {"type": "string"}},
                "report_error": {"type": "string"},
                "jobs": {"type": "array", "items": ref("Job")}}},
        "Status": {"type": "object", "required": ["id", "status", "message", "created_at", "job"],
                   "properties": {"id": {"type": "integer"}, "status": status_enum,
                                  "message": {"type": "string"}, "created_at": time_field,
                                  "job": {"type": ["integer", "null"]}}},
        "Secret": {"type": "object", "required": ["name", "events"], "properties": {
            "name": {"type": "string"}, "events": {"type": "array",
                                                   "items": {"type": "string"}}}},
        "BuildPage": {**paginated, "properties": {**paginated["properties"], "results": {
            "type": "array", "items": ref("Build")}}},
        "StatusPage": {**paginated, "properties": {**paginated["properties"], "results": {
            "type": "array", "items": ref("Status")}}},
    }
    hook = {"post": {
        "summary": "a forge webhook (GitHub, Gitea, Forgejo, GitLab)", "security": [],
        "parameters": [query_param("repo", {"type": "string"}, "OWNER/NAME, if the payload's "
                                                                "name differs")],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"type": "object"}}}},
        "responses": {**ok({"oneOf": [ref("Build"), {"type": "object"}]}),
                      "204": {"description": "no build for this event"},
                      **error_responses(400, 403, 404, 413)}}}
    paths = {
        "/api/version": {"get": {"summary": "server version", "security": [], "responses": ok(
            {"type": "object", "properties": {"version": {"type": "string"}}})}},
        "/healthz": {"get": {"summary": "health check", "security": [], "responses": ok(
            {"type": "object", "properties": {"status": {"type": "string"}}})}},
        "/api/openapi.json": {"get": {"summary": "this document", "security": [],
                                      "responses": ok({"type": "object"})}},
        "/api/repos": {"get": {"summary": "repositories the caller may read",
                               "responses": {**ok({"type": "array", "items": ref("Repo")}),
                                             **error_responses(401)}}},
        "/api/repos/{owner}/{name}": {
            "parameters": repo_params,
            "get": {"summary": "a repository", "responses": {**ok(ref("Repo")), **read_errors}},
            "post": {"summary": "add a repository (the webhook secret is shown this once)",
                     "requestBody": json_body(
                         {"type": "object", "properties": repo_fields, "required": ["url"]}),
                     "responses": {**ok({"allOf": [ref("Repo"), {"type": "object", "properties": {
                         "webhook_secret": {"type": "string"},
                         "webhook_url": {"type": "string"}}}]}, "201"), **write_errors}},
            "patch": {"summary": "change repository settings", "requestBody": json_body(
                {"type": "object", "properties": repo_fields}, "JSON"),
                "responses": {**ok(ref("Repo")), **write_errors}},
            "delete": {"summary": "remove a repository and its builds", "responses": {
                **ok({"type": "object"}), **write_errors}}},
        "/api/repos/{owner}/{name}/builds": {
            "parameters": repo_params,
            "get": {"summary": "builds, newest first", "parameters": [
                query_param("page", positive), query_param("per_page", {
                    "type": "integer", "minimum": 1, "maximum": MAX_PER_PAGE}),
                query_param("branch", {"type": "string"}), query_param("status", status_enum)],
                "responses": {**ok({"type": "array", "items": ref("Build")}), **read_errors}},
            "post": {"summary": "start a build", "requestBody": json_body(
                {"type": "object", "properties": {
                    "branch": {"type": "string"}, "commit": {"type": "string"},
                    "variables": {"type": "object",
                                  "additionalProperties": {"type": "string"}}}}),
                "responses": {**ok(ref("Build"), "201"), **write_errors}}},
        "/api/repos/{owner}/{name}/builds/{number}": {
            "parameters": build_params,
            "get": {"summary": "a build with its jobs", "parameters": [
                query_param("branch", {"type": "string"}, "with 'latest'")],
                "responses": {**ok(ref("Build")), **read_errors}},
            "post": {"summary": "restart a finished build", "parameters": [
                query_param("fork", {"type": "boolean"})],
                "responses": {**ok(ref("Build"), "202"), **write_errors}},
            "delete": {"summary": "cancel the build's active jobs",
                       "responses": {**ok(ref("Build")), **write_errors}}},
        "/api/repos/{owner}/{name}/builds/{number}/{job}": {
            "parameters": job_params,
            "delete": {"summary": "cancel one job",
                       "responses": {**ok(ref("Build")), **write_errors}}},
        "/api/repos/{owner}/{name}/logs/{number}/{job}": {
            "parameters": job_params,
            "get": {"summary": "a job's log (text; Server-Sent Events with follow)",
                    "parameters": [query_param("offset", {"type": "integer", "minimum": 0}),
                                   query_param("follow", {"type": "boolean"})],
                    "responses": {"200": {"description": "the log", "content": {
                        "text/plain": {"schema": {"type": "string"}},
                        "text/event-stream": {"schema": {"type": "string"}}}},
                        **read_errors, **error_responses(503)}},
            "delete": {"summary": "cancel one job",
                       "responses": {**ok(ref("Build")), **write_errors}}},
        "/api/repos/{owner}/{name}/secrets": {
            "parameters": repo_params,
            "get": {"summary": "secret names and events (never values)", "responses": {
                **ok({"type": "array", "items": ref("Secret")}), **write_errors}},
            "post": {"summary": "add or replace a secret", "requestBody": {
                "required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["name", "value"], "properties": {
                        "name": {"type": "string"}, "value": {"type": "string"},
                        "events": {"type": "array", "items": {"type": "string",
                                                              "enum": list(EVENTS)}}}}}}},
                "responses": {**ok(ref("Secret"), "201"), **write_errors}}},
        "/api/repos/{owner}/{name}/secrets/{secret}": {
            "parameters": repo_params + [path_param("secret")],
            "delete": {"summary": "remove a secret", "responses": {
                **ok({"type": "object"}), **write_errors}}},
        "/api/badges/{owner}/{name}/status.svg": {
            "parameters": repo_params,
            "get": {"summary": "the latest build's status as an SVG badge", "parameters": [
                query_param("branch", {"type": "string"})], "responses": {
                "200": {"description": "the badge", "content": {
                    "image/svg+xml": {"schema": {"type": "string"}}}}, **read_errors}}},
        "/api/badges/{owner}/{name}/cc.xml": {
            "parameters": repo_params,
            "get": {"summary": "CCMenu feed of the latest build", "parameters": [
                query_param("branch", {"type": "string"})], "responses": {
                "200": {"description": "the feed", "content": {
                    "application/xml": {"schema": {"type": "string"}}}}, **read_errors}}},
        "/hook": hook,
        "/api/hook": hook,
        "/api/v1/{owner}/{name}/builds": {
            "parameters": repo_params,
            "get": {"summary": "builds, newest first, paginated", "parameters": [
                query_param("offset", {"type": "integer", "minimum": 0}),
                query_param("limit", {"type": "integer", "minimum": 1,
                                      "maximum": MAX_PER_PAGE}),
                query_param("branch", {"type": "string"}), query_param("status", status_enum)],
                "responses": {**ok(ref("BuildPage")), **read_errors}}},
        "/api/v1/{owner}/{name}/builds/{id}": {
            "parameters": v1_params,
            "get": {"summary": "a build", "responses": {**ok(ref("Build")), **read_errors}},
            "patch": {"summary": "change description, tags or pinned", "requestBody": {
                "required": True, "content": {"application/json": {"schema": {
                    "type": "object", "additionalProperties": False, "properties": {
                        "description": {"type": "string", "maxLength": MAX_DESCRIPTION},
                        "tags": {"type": "array", "items": {"type": "string", "minLength": 1}},
                        "merge": {"type": "boolean"}, "pinned": {"type": "boolean"}}}}}},
                "responses": {**ok(ref("Build")), **write_errors}},
            "delete": {"summary": "delete a finished build", "responses": {
                **ok({"type": "object", "properties": {"id": {"type": "integer"},
                                                       "number": {"type": "integer"}}}),
                **write_errors}},
            "post": {"summary": "stop the build", "responses": {
                **ok(ref("Build")), **write_errors}}},
        "/api/v1/{owner}/{name}/builds/{id}/stop": {
            "parameters": v1_params,
            "post": {"summary": "stop the build", "responses": {
                **ok(ref("Build")), **write_errors}}},
        "/api/v1/{owner}/{name}/builds/{id}/statuses": {
            "parameters": v1_params,
            "get": {"summary": "status history, oldest first", "parameters": [
                query_param("offset", {"type": "integer", "minimum": 0}),
                query_param("limit", {"type": "integer", "minimum": 1,
                                      "maximum": MAX_PER_PAGE})],
                "responses": {**ok(ref("StatusPage")), **read_errors}}},
        "/api/v1/{owner}/{name}/builds/{build_id}/statuses/{id}": {
            "parameters": repo_params + [path_param("build_id", positive),
                                         path_param("id", positive, "status id")],
            "get": {"summary": "one status entry", "responses": {
                **ok(ref("Status")), **read_errors}}},
        "/api/v1/{owner}/{name}/builds/{id}/logs": {
            "parameters": v1_params,
            "get": {"summary": "every job's log under a header", "responses": {
                **text(), **read_errors}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "cirunner", "version": __version__,
                 "description": "Drone-style and project-style build APIs. Times are Unix "
                                "seconds in both dialects."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "token": {"type": "apiKey", "in": "header", "name": "Authorization",
                      "description": "'Token <token>' or 'Bearer <token>'"},
            "access_token": {"type": "apiKey", "in": "query", "name": "access_token"}}},
        "security": [{}, {"token": []}, {"access_token": []}],
    }

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


def _follow_build(store, build_id, out, *, poll=0.1):
    """Print the logs of a build's jobs as they grow, each line prefixed with
    its job number, until the build ends. Returns the finished build."""
    offsets, partial = {}, {}
    while True:
        seen = store.log_events_seen()
        build = store.get_build_by_id(build_id)
        jobs = store.list_jobs(build_id)
        for job in jobs:
            offset = offsets.get(job["id"], 0)
            for chunk in store.read_log(job["id"], offset):
                offset += len(chunk)
                lines = (partial.pop(job["id"], b"") + chunk).split(b"\n")
                partial[job["id"]] = lines.pop()
                for line in lines:
                    out.write(f"[{job['number']}] ".encode() + line + b"\n")
            offsets[job["id"]] = offset
            if job["status"] in DONE_STATUSES and partial.get(job["id"]):
                out.write(f"[{job['number']}] ".encode() + partial.pop(job["id"]) + b"\n")
        out.flush()
        if build["status"] in DONE_STATUSES:
            return build
        store.wait_for_log(poll, seen)


def _print_summary(store, build, err):
    for job in store.list_jobs(build["id"]):
        axis = _axis_text(json.loads(job["environment"]))
        detail = f": {job['error']}" if job["error"] else ""
        print(f"job {job['number']}{' (' + axis + ')' if axis else ''}: {job['status']}{detail}",
              file=err)
    detail = f": {build['error']}" if build["error"] else ""
    print(f"build {build['number']}: {build['status']}{detail}", file=err)


def _wait_for_build(store, build, args, stdout, stderr):
    """Stream a build's logs; run its jobs here if no runner shares the store."""
    executor = None
    if build["status"] in ACTIVE_STATUSES and not store.active_runners():
        executor = Executor(store, workers=args.workers)
        executor.start()
    try:
        build = _follow_build(store, build["id"], stdout.buffer)
    finally:
        if executor is not None:
            executor.stop()
    _print_summary(store, build, stderr)
    return 0 if build["status"] == SUCCESS else 1


def _is_quick_request(method, path):
    """Whether a request is a bounded read of the store that the server's loop
    thread may answer itself: API GETs, but never logs, which may be large or
    follow a running job for minutes."""
    return method in ("GET", "HEAD") and path.startswith("/api/") and "/logs" not in path


class _QuickLane:
    """waitress's task dispatcher, except that quick requests (see
    `_is_quick_request`) are answered on the loop thread between two polls
    instead of being handed to a pool thread.

    Python runs one thread at a time. A pool thread answering a 0.3 ms API call
    gives up the interpreter at each SQLite call and socket write, and with ten
    busy connections the threads spent more time passing it around than working:
    560 small requests/s with 32 threads, 1,600 with one, 2,400 answered here
    (wrk, 10 connections, bench/run.py's request). Log downloads, live logs,
    writes (which may fetch from git) and pages still go to the pool, so a slow
    one never holds up the loop.
    """

    def __init__(self, pool):
        self.pool = pool
        self.loop_thread = threading.get_ident()
        self.ready = collections.deque()

    def add_task(self, channel):
        # waitress calls this holding the channel's request lock, so a quick
        # request is only queued here, and answered by run_ready() after the poll.
        # (Read defensively: these are waitress's internals, the same in 2.1-3.0.)
        requests = getattr(channel, "requests", None)
        request = requests[0] if requests else None
        path = getattr(request, "path", None)
        if (isinstance(path, str) and not getattr(request, "error", True)
                and threading.get_ident() == self.loop_thread
                and _is_quick_request(getattr(request, "command", None), path)):
            self.ready.append(channel)
        else:
            self.pool.add_task(channel)

    def run_ready(self):
        while self.ready:
            self.ready.popleft().service()  # service() handles and logs its errors

    def set_thread_count(self, count):
        self.pool.set_thread_count(count)

    def shutdown(self, *args, **kwargs):
        self.ready.clear()
        return self.pool.shutdown(*args, **kwargs)


class _ReadCache:
    """WSGI middleware: answers a repeated quick read (see `_is_quick_request`)
    from memory while the store is unchanged.

    An answer depends on the store, the request and nothing else, so each
    entry is keyed by everything in the request that it can depend on and
    carries SQLite's `data_version` from before it was made. Every request asks
    for the current one on a connection of its own that never writes: any
    commit by any connection, in this process or another, changes it, and the
    entry is made again. Polling an unchanged build (CLIs, dashboards, badges)
    then costs a dict lookup and one pragma instead of four queries, Bottle and
    JSON: with two jobs logging (so entries are voided tens of times a second),
    bench/run.py's small request went from 1,750-2,400/s to 4,700-5,000/s.
    """

    MAX_BYTES = 4 * 1024 * 1024  # all answers kept, together; then it starts afresh
    MAX_BODY = 256 * 1024
    # Also made again after a minute: a hit skips authentication, and with it
    # the token's last-used stamp (at most one a minute, see Store.authenticate).
    MAX_AGE = 60.0

    def __init__(self, app, store_path):
        self.app = app
        self.store_path = store_path
        self._lock = threading.Lock()
        self._connection = None
        self._entries = {}
        self._bytes = 0

    def _data_version(self):
        with self._lock:
            if self._connection is None:
                self._connection = sqlite3.connect(self.store_path, isolation_level=None,
                                                   check_same_thread=False)
            return self._connection.execute("PRAGMA data_version").fetchone()[0]

    def close(self):
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __call__(self, environ, start_response):
        method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
        # Not with cookies: a browser's session also ends with time, not only
        # with a commit.
        if not _is_quick_request(method, path) or "HTTP_COOKIE" in environ:
            return self.app(environ, start_response)
        key = (method, environ.get("SCRIPT_NAME", ""), path, environ.get("QUERY_STRING", ""),
               environ.get("HTTP_AUTHORIZATION"), environ.get("HTTP_HOST"),
               environ.get("wsgi.url_scheme"))
        try:
            version = self._data_version()  # before the answer: a commit during it voids it
        except sqlite3.Error:
            return self.app(environ, start_response)  # the answer itself reports what is wrong
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
            body = b"".join(result)  # quick answers are bounded: never a log
        finally:
            if hasattr(result, "close"):
                result.close()
        if (answer and answer[0].startswith("200 ") and len(body) <= self.MAX_BODY
                and not any(name.lower() == "set-cookie" for name, _ in answer[1])):
            if self._bytes + len(body) > self.MAX_BYTES:
                self._entries, self._bytes = {}, 0
            self._entries[key] = (version, now, answer[0], tuple(answer[1]), body)
            self._bytes += len(body)
        return [body]


def _limit_malloc_arenas():
    """Cap glibc's per-thread malloc arenas for the server process. With one
    arena per HTTP thread, each log download leaves its transient buffers in
    another arena and resident memory creeps up by megabytes per thread."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-8, 2)  # M_ARENA_MAX


# How `serve` re-runs itself when started as `python cirunner.py serve`:
# CPython keeps a script's whole syntax tree (11 MiB for this file) alive until
# the script ends, while an imported module's tree is freed once compiled.
_SERVE_AS_MODULE = (
    "import importlib.util, sys; "
    "spec = importlib.util.spec_from_file_location('cirunner', sys.argv[1]); "
    "module = importlib.util.module_from_spec(spec); sys.modules['cirunner'] = module; "
    "spec.loader.exec_module(module); sys.exit(module.main(sys.argv[2:]))")


def _reexec_as_module():
    """Replace a script-mode `serve` process (same pid) with one that imports
    this file as a module, so the server does not carry the script's syntax
    tree for its whole life. Embedders calling `main()` are left alone."""
    if __name__ != "__main__" or not sys.platform.startswith("linux") or not sys.executable:
        return
    original = getattr(sys, "orig_argv", [])  # keeps the interpreter's own options (-u, -X)
    options = original[1:original.index(sys.argv[0])] if sys.argv[0] in original else []
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *options, "-c", _SERVE_AS_MODULE,
                              os.path.abspath(__file__), *sys.argv[1:]])


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


def _command_serve(args, stdout, stderr):
    if waitress is None:
        raise CIRunnerError("serve needs waitress: pip install waitress")
    _reexec_as_module()
    store = Store.open(args.data)
    executor = Executor(store, workers=args.workers, grace=args.grace,
                        keep_workspaces=args.keep_workspaces,
                        public_url=args.public_url or f"http://{args.host}:{args.port}")
    app = make_app(store, executor, max_streams=max(1, args.threads - 4))
    _limit_malloc_arenas()
    dispatcher = _QuickLane(waitress.task.ThreadedTaskDispatcher())
    dispatcher.set_thread_count(args.threads)
    cached_app = _ReadCache(app, store.path)
    # Small output buffers: a 50 MB log streams through 1 MiB at a time instead
    # of waitress's default 16 MB per response, and stays in memory. Past
    # `outbuf_overflow` waitress moves a buffer to a temporary file: at 256 KiB
    # every log chunk went through one, and reading a 50 MB log took 110-170 ms
    # instead of 52-89 (bench, alternating runs; same RSS growth).
    server = waitress.create_server(cached_app, host=args.host, port=args.port,
                                    threads=args.threads,
                                    _dispatcher=dispatcher, ident="cirunner", asyncore_use_poll=True,
                                    clear_untrusted_proxy_headers=True,
                                    outbuf_high_watermark=1024 * 1024,
                                    outbuf_overflow=1024 * 1024 + LOG_CHUNK_BYTES)
    stopping = threading.Event()

    def on_signal(signum, frame):
        # Only flags: an exception raised here could land inside waitress's
        # socket code, which catches everything, and the signal would be lost.
        if stopping.is_set():
            executor.grace = 0  # a second signal: do not wait for jobs to exit
        stopping.set()
        server.pull_trigger()  # wake the loop from its poll

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _bootstrap_admin(store, stdout)
        executor.start()
        store.release_connection()  # from here, lent out between requests like the pool's
        print(f"cirunner {__version__}: serving http://{args.host}:{server.effective_port}/ "
              f"with {executor.workers} worker(s), data in {os.path.abspath(args.data)}",
              file=stderr, flush=True)
        socket_map = getattr(server, "map", None) or server._map
        while not stopping.is_set():
            waitress.wasyncore.loop(timeout=1.0, use_poll=True, map=socket_map, count=1)
            dispatcher.run_ready()  # the quick requests that this poll completed
        print("cirunner: shutting down: stopping running jobs", file=stderr, flush=True)
    finally:
        app.closing.set()
        executor.stop(reason="server shut down")
        server.close()
        cached_app.close()
        store.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _command_repo(args, stdout, stderr):
    with Store.open(args.data) as store:
        if args.repo_command == "list":
            for repo in store.list_repos():
                print(f"{repo['owner']}/{repo['name']}\t{repo['url']}\t"
                      f"{repo['default_branch'] or '(remote default)'}", file=stdout)
            return 0
        owner, name = _split_full_name(args.full_name)
        if args.repo_command == "add":
            webhook_secret = args.webhook_secret or secrets.token_urlsafe(24)
            params = {"url": args.url, "branch": args.branch or "", "config": args.config or "",
                      "timeout": str(args.timeout), "private": "true" if args.private else "",
                      "webhook_secret": webhook_secret}
            fields = _repo_fields(params, creating=True)
            repo = store.create_repo(owner, name, fields.pop("url"), **fields)
            print(f"added {owner}/{name} ({repo['url']})", file=stdout)
            print(f"webhook: point the forge at {args.public_url.rstrip('/')}/hook "
                  f"(content type application/json) with the secret, shown once:\n"
                  f"{webhook_secret}", file=stdout)
        elif args.repo_command == "update":
            params = {key: value for key, value in (
                ("url", args.url), ("branch", args.branch), ("config", args.config),
                ("timeout", None if args.timeout is None else str(args.timeout)),
                ("private", args.private), ("max_builds", args.max_builds),
                ("events", args.events), ("webhook_secret", args.webhook_secret),
                ("forge", args.forge), ("forge_url", args.forge_url),
                ("forge_token", args.forge_token), ("forge_project", args.forge_project))
                if value is not None}
            repo = store.get_repo(owner, name)
            store.update_repo(repo["id"], **_repo_fields(params, creating=False))
            print(f"updated {owner}/{name}", file=stdout)
        elif args.repo_command == "remove":
            repo = store.get_repo(owner, name)
            store.delete_repo(repo["id"])
            shutil.rmtree(_mirror_path(args.data, repo), ignore_errors=True)
            print(f"removed {owner}/{name}", file=stdout)
        return 0


def _command_user(args, stdout, stderr):
    with Store.open(args.data) as store:
        if args.user_command == "add":
            user = store.create_user(args.login, email=args.email or "", admin=args.admin)
            print(f"added user {user['login']}{' (admin)' if user['admin'] else ''}", file=stdout)
        elif args.user_command == "list":
            for user in store.list_users():
                print(f"{user['login']}\t{'admin' if user['admin'] else 'user'}\t{user['email']}",
                      file=stdout)
        else:
            store.delete_user(args.login)
            print(f"removed user {args.login} and their tokens", file=stdout)
        return 0


def _command_token(args, stdout, stderr):
    with Store.open(args.data) as store:
        if args.token_command == "create":
            token, secret = store.create_token(args.login, name=args.name or "",
                                               scope=args.scope)
            print(f"token {token['id']} for {args.login} ({token['scope']}), shown once:",
                  file=stderr)
            print(secret, file=stdout)
        elif args.token_command == "list":
            for token in store.list_tokens(args.login):
                used = (time.strftime("%Y-%m-%d %H:%M", time.gmtime(token["last_used_at"]))
                        if token["last_used_at"] else "never")
                created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(token["created_at"]))
                print(f"{token['id']}\t{token['login']}\t{token['name'] or '-'}\t"
                      f"{token['scope']}\tcreated {created}\tlast used {used}", file=stdout)
        else:
            store.revoke_token(args.id)
            print(f"revoked token {args.id}", file=stdout)
        return 0


def _command_secret(args, stdout, stderr):
    with Store.open(args.data) as store:
        repo = store.get_repo(*_split_full_name(args.full_name))
        if args.secret_command == "add":
            if (args.value is None) == (args.from_file is None):
                raise BadRequest("give the value with exactly one of --value or --from-file")
            value = args.value
            if args.from_file is not None:
                with open(args.from_file, encoding="utf-8") as handle:
                    value = handle.read()
            events = args.event.split(",") if args.event else None
            store.set_secret(repo["id"], args.name, value, events)
            print(f"secret {args.name} set for {args.full_name}", file=stdout)
        elif args.secret_command == "list":
            for secret in store.list_secrets(repo["id"]):
                print(f"{secret['name']}\t{','.join(secret['events'])}", file=stdout)
        else:
            store.delete_secret(repo["id"], args.name)
            print(f"secret {args.name} removed", file=stdout)
        return 0


def _command_cron(args, stdout, stderr):
    with Store.open(args.data) as store:
        if args.cron_command == "list":
            repo_id = (store.get_repo(*_split_full_name(args.full_name))["id"]
                       if args.full_name else None)
            for cron in store.list_crons(repo_id):
                due = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(cron["next_at"]))
                print(f"{cron['owner']}/{cron['repo_name']}\t{cron['name']}\t"
                      f"{cron['expression']}\t{cron['branch'] or '(default)'}\tnext {due}",
                      file=stdout)
            return 0
        repo = store.get_repo(*_split_full_name(args.full_name))
        if args.cron_command == "add":
            branch = _check_branch(args.branch) if args.branch else ""
            cron = store.add_cron(repo["id"], args.name, args.expression, branch)
            due = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(cron["next_at"]))
            print(f"cron {args.name} added; next build {due}", file=stdout)
        else:
            store.delete_cron(repo["id"], args.name)
            print(f"cron {args.name} removed", file=stdout)
        return 0


def _command_build(args, stdout, stderr):
    variables = _parse_vars(args.var)
    with Store.open(args.data) as store:
        repo = store.get_repo(*_split_full_name(args.full_name))
        build = create_build(store, repo, branch=args.branch or "", commit=args.commit or "",
                             variables=variables)
        print(f"build {build['number']} of {args.full_name}: {build['status']} "
              f"(commit {build['commit_sha'][:12] or '?'}, {len(store.list_jobs(build['id']))} "
              "job(s))", file=stderr, flush=True)
        if build["error"]:
            print(f"cirunner: {build['error']}", file=stderr)
        if args.wait:
            return _wait_for_build(store, build, args, stdout, stderr)
        return 1 if build["status"] == ERROR else 0


def _command_restart(args, stdout, stderr):
    variables = _parse_vars(args.var)
    with Store.open(args.data) as store:
        repo = store.get_repo(*_split_full_name(args.full_name))
        build = restart_build(store, repo, args.number, fork=args.fork, variables=variables)
        print(f"build {build['number']} of {args.full_name}: {build['status']}", file=stderr)
        if args.wait:
            return _wait_for_build(store, build, args, stdout, stderr)
        return 0


def _command_cancel(args, stdout, stderr):
    with Store.open(args.data) as store:
        repo = store.get_repo(*_split_full_name(args.full_name))
        build = store.get_build(repo["id"], args.number)
        build = store.cancel_jobs(build["id"], args.job, message="cancelled from the command line")
        print(f"build {build['number']}: cancel requested ({build['status']})", file=stdout)
        return 0


def _command_logs(args, stdout, stderr):
    with Store.open(args.data) as store:
        repo = store.get_repo(*_split_full_name(args.full_name))
        build = store.get_build(repo["id"], args.number)
        jobs = [store.get_job(build["id"], args.job)] if args.job else store.list_jobs(build["id"])
        for job in jobs:
            if not args.job:
                axis = _axis_text(json.loads(job["environment"]))
                stdout.write(f"--- job {job['number']}{' ' + axis if axis else ''}: "
                             f"{job['status']}\n")
                stdout.flush()
            for chunk in store.read_log(job["id"]):
                stdout.buffer.write(chunk)
            stdout.buffer.flush()
        return 0


def _command_builds(args, stdout, stderr):
    with Store.open(args.data) as store:
        repo = store.get_repo(*_split_full_name(args.full_name))
        for build in store.list_builds(repo["id"], limit=args.limit):
            message = build["message"].splitlines()[0] if build["message"] else ""
            print(f"{build['number']}\t{build['status']}\t{build['branch']}\t"
                  f"{build['commit_sha'][:10]}\t{message}", file=stdout)
        return 0


def _command_exec(args, stdout, stderr):
    directory = os.path.abspath(args.directory)
    filename, text = read_pipeline_file(directory, args.config or "")
    pipeline = parse_pipeline(text, filename)
    with tempfile.TemporaryDirectory(prefix="cirunner-exec-") as data_dir:
        store = Store.open(data_dir)
        executor = Executor(store, workers=1, workspace=directory)
        try:
            name = re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(directory)).strip(".") or "local"
            repo = store.create_repo("local", name[:100], directory)
            fields = {"event": args.event, "branch": args.branch, "pipeline": text,
                      "pipeline_file": filename, "variables": json.dumps(_parse_vars(args.var)),
                      "fail_fast": int(pipeline.fail_fast)}
            build = store.create_build(repo["id"], fields, pipeline.matrix)
            executor.start()
            build = _follow_build(store, build["id"], stdout.buffer)
            _print_summary(store, build, stderr)
            return 0 if build["status"] == SUCCESS else 1
        finally:
            executor.stop()
            store.close()


def _command_matrix(args, stdout, stderr):
    if args.file:
        with open(args.file, encoding="utf-8") as handle:
            filename, text = os.path.basename(args.file), handle.read()
    else:
        filename, text = read_pipeline_file(os.getcwd())
    pipeline = parse_pipeline(text, filename)
    for number, environment in enumerate(pipeline.matrix, start=1):
        print(f"{number}\t{_axis_text(environment) or '(no matrix)'}", file=stdout)
    return 0


def _make_parser(environ):
    def env(name, default):
        return environ.get("CIRUNNER_" + name, default)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", default=env("DATA", DEFAULT_DATA_DIR),
                        help="data directory (env CIRUNNER_DATA, default ./cirunner-data)")
    workers = argparse.ArgumentParser(add_help=False)
    workers.add_argument("--workers", type=int, default=int(env("WORKERS", 0)) or None,
                         help="job worker threads (env CIRUNNER_WORKERS, default: CPUs)")

    parser = argparse.ArgumentParser(prog="cirunner", description="A CI build runner in one file.")
    parser.add_argument("--version", action="version", version=f"cirunner {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    serve = commands.add_parser("serve", parents=[common, workers],
                                help="run the HTTP API and the executor")
    serve.add_argument("--host", default=env("HOST", DEFAULT_HOST),
                       help="address to bind (env CIRUNNER_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=int(env("PORT", DEFAULT_PORT)),
                       help="port (env CIRUNNER_PORT, default 8080; 0 picks a free one)")
    serve.add_argument("--threads", type=int, default=int(env("THREADS", DEFAULT_HTTP_THREADS)),
                       help="HTTP threads, each live log viewer holds one "
                            "(env CIRUNNER_THREADS, default 32)")
    serve.add_argument("--grace", type=float, default=float(env("GRACE", DEFAULT_GRACE_SECONDS)),
                       help="seconds between SIGTERM and SIGKILL of a stopped job "
                            "(env CIRUNNER_GRACE, default 10)")
    serve.add_argument("--public-url", dest="public_url", default=env("PUBLIC_URL", ""),
                       help="this server's address for links in commit statuses "
                            "(env CIRUNNER_PUBLIC_URL; default http://HOST:PORT)")
    serve.add_argument("--keep-workspaces", action="store_true",
                       default=env("KEEP_WORKSPACES", "") in _TRUE_WORDS,
                       help="leave job workspaces on disk after the job")
    serve.set_defaults(handler=_command_serve)

    repo = commands.add_parser("repo", help="add, list or remove repositories")
    repo_commands = repo.add_subparsers(dest="repo_command", metavar="ACTION")
    repo_commands.required = True
    add = repo_commands.add_parser("add", parents=[common], help="add a repository")
    add.add_argument("full_name", metavar="OWNER/NAME")
    add.add_argument("--url", required=True, help="clone URL or local path")
    add.add_argument("--branch", help="default branch (default: the remote's HEAD)")
    add.add_argument("--config", help="pipeline file path (default .cirunner.yml, .drone.yml)")
    add.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_MINUTES,
                     help="job timeout in minutes (default 60)")
    add.add_argument("--private", action="store_true", help="hide from guests")
    add.add_argument("--webhook-secret", dest="webhook_secret",
                     help="secret the forge signs webhooks with (default: generated, shown once)")
    add.add_argument("--public-url", dest="public_url",
                     default=env("PUBLIC_URL", f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"),
                     help="this server's address as the forge sees it (env CIRUNNER_PUBLIC_URL)")
    repo_list = repo_commands.add_parser("list", parents=[common], help="list repositories")
    repo_list.set_defaults(full_name=None)
    update = repo_commands.add_parser("update", parents=[common],
                                      help="change a repository's settings")
    update.add_argument("full_name", metavar="OWNER/NAME")
    update.add_argument("--url")
    update.add_argument("--branch", help="default branch")
    update.add_argument("--config", help="pipeline file path")
    update.add_argument("--timeout", type=int, help="job timeout in minutes")
    update.add_argument("--private", choices=("true", "false"))
    update.add_argument("--max-builds", dest="max_builds", metavar="N",
                        help="most builds running at once (0: no limit)")
    update.add_argument("--events", help=f"comma-separated events to build ({','.join(EVENTS)})")
    update.add_argument("--webhook-secret", dest="webhook_secret")
    update.add_argument("--forge", choices=FORGES + ("",),
                        help="post commit statuses to this kind of forge")
    update.add_argument("--forge-url", dest="forge_url",
                        help="the forge's API base, e.g. https://api.github.com")
    update.add_argument("--forge-token", dest="forge_token", help="an API token of the forge")
    update.add_argument("--forge-project", dest="forge_project",
                        help="OWNER/NAME at the forge if it differs")
    remove = repo_commands.add_parser("remove", parents=[common],
                                      help="remove a repository and its builds")
    remove.add_argument("full_name", metavar="OWNER/NAME")
    repo.set_defaults(handler=_command_repo)

    user = commands.add_parser("user", help="add, list or remove users")
    user_commands = user.add_subparsers(dest="user_command", metavar="ACTION")
    user_commands.required = True
    user_add = user_commands.add_parser("add", parents=[common], help="add a user")
    user_add.add_argument("login")
    user_add.add_argument("--admin", action="store_true", help="may act on every repository")
    user_add.add_argument("--email")
    user_commands.add_parser("list", parents=[common], help="list users")
    user_remove = user_commands.add_parser("remove", parents=[common],
                                           help="remove a user and their tokens")
    user_remove.add_argument("login")
    user.set_defaults(handler=_command_user)

    secret = commands.add_parser("secret", help="add, list or remove repository secrets")
    secret_commands = secret.add_subparsers(dest="secret_command", metavar="ACTION")
    secret_commands.required = True
    secret_add = secret_commands.add_parser("add", parents=[common],
                                            help="add or replace a secret")
    secret_add.add_argument("full_name", metavar="OWNER/NAME")
    secret_add.add_argument("name", metavar="NAME")
    secret_add.add_argument("--value")
    secret_add.add_argument("--from-file", dest="from_file", metavar="FILE")
    secret_add.add_argument("--event", metavar="EVENTS",
                            help="comma-separated events that get it (default "
                                 "push,tag,cron,manual: not pull_request)")
    secret_list = secret_commands.add_parser("list", parents=[common],
                                             help="names and events, never values")
    secret_list.add_argument("full_name", metavar="OWNER/NAME")
    secret_remove = secret_commands.add_parser("remove", parents=[common], help="remove a secret")
    secret_remove.add_argument("full_name", metavar="OWNER/NAME")
    secret_remove.add_argument("name", metavar="NAME")
    secret.set_defaults(handler=_command_secret)

    cron = commands.add_parser("cron", help="add, list or remove build schedules")
    cron_commands = cron.add_subparsers(dest="cron_command", metavar="ACTION")
    cron_commands.required = True
    cron_add = cron_commands.add_parser("add", parents=[common], help="add a schedule (UTC)")
    cron_add.add_argument("full_name", metavar="OWNER/NAME")
    cron_add.add_argument("name", metavar="NAME")
    cron_add.add_argument("expression", metavar="EXPRESSION", help='e.g. "0 3 * * *"')
    cron_add.add_argument("--branch")
    cron_list = cron_commands.add_parser("list", parents=[common], help="list schedules")
    cron_list.add_argument("full_name", metavar="OWNER/NAME", nargs="?")
    cron_remove = cron_commands.add_parser("remove", parents=[common], help="remove a schedule")
    cron_remove.add_argument("full_name", metavar="OWNER/NAME")
    cron_remove.add_argument("name", metavar="NAME")
    cron.set_defaults(handler=_command_cron)

    token = commands.add_parser("token", help="create, list or revoke API tokens")
    token_commands = token.add_subparsers(dest="token_command", metavar="ACTION")
    token_commands.required = True
    token_create = token_commands.add_parser("create", parents=[common],
                                             help="make a token; printed once")
    token_create.add_argument("login")
    token_create.add_argument("--name", help="a label to recognise it by")
    token_create.add_argument("--scope", choices=TOKEN_SCOPES, default="write")
    token_list = token_commands.add_parser("list", parents=[common],
                                           help="tokens (never their secrets)")
    token_list.add_argument("login", nargs="?")
    token_revoke = token_commands.add_parser("revoke", parents=[common], help="revoke a token")
    token_revoke.add_argument("id", type=int, metavar="ID")
    token.set_defaults(handler=_command_token)

    build = commands.add_parser("build", parents=[common, workers], help="start a build")
    build.add_argument("full_name", metavar="OWNER/NAME")
    build.add_argument("--branch", help="branch to build (default: the repository's)")
    build.add_argument("--commit", help="commit SHA to build (default: the branch head)")
    build.add_argument("--var", action="append", metavar="NAME=VALUE",
                       help="variable for the jobs' environment (repeatable)")
    build.add_argument("--wait", action="store_true",
                       help="stream the logs; exit 0 only if the build succeeds")
    build.set_defaults(handler=_command_build)

    builds = commands.add_parser("builds", parents=[common], help="list recent builds")
    builds.add_argument("full_name", metavar="OWNER/NAME")
    builds.add_argument("--limit", type=int, default=DEFAULT_PER_PAGE)
    builds.set_defaults(handler=_command_builds)

    logs = commands.add_parser("logs", parents=[common], help="print a build's logs")
    logs.add_argument("full_name", metavar="OWNER/NAME")
    logs.add_argument("number", type=int, metavar="NUMBER")
    logs.add_argument("job", type=int, nargs="?", metavar="JOB")
    logs.set_defaults(handler=_command_logs)

    cancel = commands.add_parser("cancel", parents=[common], help="cancel a build or one job")
    cancel.add_argument("full_name", metavar="OWNER/NAME")
    cancel.add_argument("number", type=int, metavar="NUMBER")
    cancel.add_argument("job", type=int, nargs="?", metavar="JOB")
    cancel.set_defaults(handler=_command_cancel)

    restart = commands.add_parser("restart", parents=[common, workers],
                                  help="run a finished build again")
    restart.add_argument("full_name", metavar="OWNER/NAME")
    restart.add_argument("number", type=int, metavar="NUMBER")
    restart.add_argument("--fork", action="store_true", help="as a new build number")
    restart.add_argument("--var", action="append", metavar="NAME=VALUE")
    restart.add_argument("--wait", action="store_true")
    restart.set_defaults(handler=_command_restart)

    run = commands.add_parser("exec", help="run a working directory's pipeline once, "
                                           "without a server or store")
    run.add_argument("directory", nargs="?", default=".", metavar="DIR")
    run.add_argument("--config", help="pipeline file (default .cirunner.yml, .drone.yml)")
    run.add_argument("--branch", default="", help="branch for `when` filters")
    run.add_argument("--event", default=EVENT_MANUAL, choices=EVENTS)
    run.add_argument("--var", action="append", metavar="NAME=VALUE")
    run.set_defaults(handler=_command_exec)

    matrix = commands.add_parser("matrix", help="print the jobs a pipeline file expands to")
    matrix.add_argument("file", nargs="?", metavar="FILE")
    matrix.set_defaults(handler=_command_matrix)
    return parser


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
    try:
        return args.handler(args, stdout, stderr)
    except CIRunnerError as error:
        print(f"cirunner: {error.message}", file=stderr)
        return 1
    except (OSError, sqlite3.Error) as error:
        print(f"cirunner: {error}", file=stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run as a script, register under the module name so that `import cirunner`
    # elsewhere in the process gives this same module (as bottle.py does).
    sys.modules.setdefault("cirunner", sys.modules[__name__])
    sys.exit(main())
