"""Where a LiteLLM proxy's ``config.yaml`` lives and how a new text of it goes live.

A LiteLLM proxy that runs without a database reads its config only when it starts,
so a change is live once the file holds the new text *and* the proxy has been
restarted (or whatever the operator's reload command does). ``wait_healthy`` then
tells when the restarted proxy serves the expected model groups.

The contract every backend keeps (``ConfigBackend``):

- ``current()``: the text that is live, or goes live at the next reload: the file
  (``FileReloadBackend``), the file at the branch's head (``GitBackend``).
- ``apply(text, action_id=, description=, expect=)``: make ``text`` the config and
  make it live: write it atomically (git: and commit, and push), then run the reload
  command. Idempotent: when ``current()`` already is ``text`` nothing is written or
  committed (``Change.changed`` is False), a push that did not happen is made, and the
  reload runs again (``reload_unchanged``, default True: a process killed between
  the write and the reload must still make the text live when it applies again).
  ``expect`` is the text the change was planned against: if ``current()`` is
  neither ``expect`` nor ``text``, someone else changed the config and
  ``ConflictError`` is raised before anything is touched.
- ``rollback(text, ...)``: the same, for putting a previous text (the plan's base)
  back; git records it as a new commit, never by rewriting history.
- ``reload()``: run the reload command alone (None when there is none).

Every failure raises a ``BackendError`` whose message names what failed (the
command, its exit status and the tail of its stderr).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import httpx

__all__ = [
    "PREVIOUS_SUFFIX",
    "BackendError",
    "Change",
    "ConfigBackend",
    "ConflictError",
    "FileReloadBackend",
    "GitBackend",
    "ProxyUnhealthy",
    "ReloadError",
    "ReloadResult",
    "previous_path",
    "run_reload",
    "wait_healthy",
    "write_atomically",
]

PREVIOUS_SUFFIX = ".finopsd-prev"
TAIL_CHARS = 2000
NEW_FILE_MODE = 0o644

Step = Literal["apply", "rollback"]


class BackendError(RuntimeError):
    """Writing, committing, pushing or reloading the config failed."""


class ConflictError(BackendError):
    """The live config is neither what the change was planned against nor its result."""


class ReloadError(BackendError):
    """The reload command failed or timed out."""

    def __init__(
        self,
        command: str,
        *,
        returncode: int | None,
        stdout_tail: str,
        stderr_tail: str,
        timed_out: bool,
        timeout_s: float,
    ) -> None:
        if timed_out:
            what = f"timed out after {timeout_s:g}s"
        else:
            what = f"exited with status {returncode}"
        tail = stderr_tail.strip() or stdout_tail.strip() or "(no output)"
        super().__init__(f"reload command `{command}` {what}: {tail}")
        self.command = command
        self.returncode = returncode
        self.stdout_tail = stdout_tail
        self.stderr_tail = stderr_tail
        self.timed_out = timed_out


class ProxyUnhealthy(BackendError):
    """The proxy did not come up serving what was expected in time."""

    def __init__(self, message: str, *, missing: set[str], problem: str) -> None:
        super().__init__(message)
        self.missing = missing
        self.problem = problem


@dataclass(frozen=True)
class ReloadResult:
    """A reload command that succeeded."""

    command: str
    returncode: int
    stdout_tail: str
    stderr_tail: str
    duration_s: float


@dataclass(frozen=True)
class Change:
    """What ``apply`` or ``rollback`` did."""

    backend: str
    step: Step
    action_id: str
    path: str  # the config file
    previous_text: str  # current() before
    text: str  # current() after
    changed: bool  # False: the text was already live (nothing written or committed)
    revision: str | None = None  # the git commit holding ``text``
    pushed: bool = False
    reload: ReloadResult | None = None

    def as_dict(self) -> dict[str, Any]:
        """For the audit: the texts as SHA-256, the rest as is."""
        return {
            "backend": self.backend,
            "step": self.step,
            "action_id": self.action_id,
            "path": self.path,
            "previous_sha256": _sha256(self.previous_text),
            "sha256": _sha256(self.text),
            "changed": self.changed,
            "revision": self.revision,
            "pushed": self.pushed,
            "reload": None
            if self.reload is None
            else {
                "command": self.reload.command,
                "returncode": self.reload.returncode,
                "duration_s": round(self.reload.duration_s, 3),
            },
        }


@runtime_checkable
class ConfigBackend(Protocol):
    """Where a config lives; see the module docstring for the contract."""

    name: str

    def current(self) -> str: ...

    def apply(
        self, text: str, *, action_id: str, description: str, expect: str | None = None
    ) -> Change: ...

    def rollback(
        self, text: str, *, action_id: str, description: str, expect: str | None = None
    ) -> Change: ...

    def reload(self) -> ReloadResult | None: ...


# -- files ----------------------------------------------------------------------------------


def previous_path(path: str | os.PathLike[str]) -> Path:
    """Where ``write_atomically`` keeps the text a write replaced: ``<path>.finopsd-prev``."""
    target = Path(os.path.realpath(path))
    return target.with_name(target.name + PREVIOUS_SUFFIX)


def write_atomically(
    path: str | os.PathLike[str], text: str, *, keep_previous: bool = True
) -> str | None:
    """Replace the file at ``path`` with ``text`` (UTF-8, newlines as given) so that a
    reader, or a crash at any instant, sees the old text or the new one, never a mix.

    A temporary file in the same directory is written, fsynced, given the old file's
    mode (and owner, where permitted; 0644 for a new file) and renamed over the file;
    then the directory is fsynced. A symbolic link is followed: its target is
    replaced. With ``keep_previous`` the replaced text is first written, the same
    way, to ``<path>.finopsd-prev`` (one version: the last one replaced). A file that
    already holds ``text`` is left alone (and so is its previous version). Returns the
    text the file held before (None: there was no file)."""
    target = Path(os.path.realpath(path))
    data = text.encode("utf-8")
    try:
        old = target.read_bytes()
        st: os.stat_result | None = target.stat()
    except FileNotFoundError:
        old, st = None, None
    if old == data:
        return text
    if keep_previous and old is not None and st is not None:
        _replace_file(previous_path(target), old, st.st_mode & 0o7777, st)
    mode = st.st_mode & 0o7777 if st is not None else NEW_FILE_MODE
    _replace_file(target, data, mode, st)
    return old.decode("utf-8", "replace") if old is not None else None


def _replace_file(target: Path, data: bytes, mode: int, like: os.stat_result | None) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if like is not None and (like.st_uid, like.st_gid) != (os.getuid(), os.getgid()):
                with contextlib.suppress(PermissionError):
                    os.fchown(f.fileno(), like.st_uid, like.st_gid)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def run_reload(
    command: Sequence[str] | str,
    timeout_s: float,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> ReloadResult:
    """Run a reload command: a list runs without a shell, a string through ``/bin/sh``.
    Its output is captured; a non-zero exit or a run past ``timeout_s`` (the command's
    whole process group is then killed) raises ``ReloadError``."""
    shell = isinstance(command, str)
    shown = command if isinstance(command, str) else shlex.join(command)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            command if shell else list(command),
            shell=shell,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as e:
        raise ReloadError(
            shown,
            returncode=None,
            stdout_tail="",
            stderr_tail=str(e),
            timed_out=False,
            timeout_s=timeout_s,
        ) from e
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise ReloadError(
            shown,
            returncode=None,
            stdout_tail=_tail(out),
            stderr_tail=_tail(err),
            timed_out=True,
            timeout_s=timeout_s,
        ) from None
    if proc.returncode != 0:
        raise ReloadError(
            shown,
            returncode=proc.returncode,
            stdout_tail=_tail(out),
            stderr_tail=_tail(err),
            timed_out=False,
            timeout_s=timeout_s,
        )
    return ReloadResult(shown, 0, _tail(out), _tail(err), time.monotonic() - started)


class FileReloadBackend:
    """A config file on this machine and a command that makes it live (e.g.
    ``["systemctl", "restart", "litellm"]`` or ``"docker restart litellm"``).

    Writes are atomic (``write_atomically``) and keep the replaced text in
    ``<path>.finopsd-prev``; a rollback writes the text it is given (the plan's base),
    not that file, which a later change may have replaced. The reload command runs
    with ``FINOPSD_CONFIG_PATH`` set to the file's path."""

    name = "file"

    def __init__(
        self,
        config_path: str | os.PathLike[str],
        reload_command: Sequence[str] | str | None = None,
        timeout_s: float = 60.0,
        *,
        keep_previous: bool = True,
        reload_unchanged: bool = True,
    ) -> None:
        self.config_path = Path(config_path)
        self.reload_command = reload_command
        self.timeout_s = timeout_s
        self.keep_previous = keep_previous
        self.reload_unchanged = reload_unchanged

    def current(self) -> str:
        try:
            return _read(self.config_path)
        except (OSError, UnicodeDecodeError) as e:
            raise BackendError(f"cannot read {self.config_path}: {e}") from e

    def previous(self) -> str | None:
        """The text the last write replaced (None: none kept)."""
        try:
            return _read(previous_path(self.config_path))
        except FileNotFoundError:
            return None

    def apply(
        self, text: str, *, action_id: str, description: str, expect: str | None = None
    ) -> Change:
        return self._write("apply", text, action_id, expect)

    def rollback(
        self, text: str, *, action_id: str, description: str, expect: str | None = None
    ) -> Change:
        return self._write("rollback", text, action_id, expect)

    def reload(self) -> ReloadResult | None:
        if self.reload_command is None:
            return None
        return run_reload(
            self.reload_command,
            self.timeout_s,
            env={"FINOPSD_CONFIG_PATH": str(self.config_path)},
        )

    def _write(self, step: Step, text: str, action_id: str, expect: str | None) -> Change:
        before = self.current()
        _check_conflict(before, text, expect, str(self.config_path))
        changed = before != text
        if changed:
            try:
                write_atomically(self.config_path, text, keep_previous=self.keep_previous)
            except OSError as e:
                raise BackendError(f"cannot write {self.config_path}: {e}") from e
        result = self.reload() if changed or self.reload_unchanged else None
        return Change(
            backend=self.name,
            step=step,
            action_id=action_id,
            path=str(self.config_path),
            previous_text=before,
            text=text,
            changed=changed,
            reload=result,
        )


# -- git ------------------------------------------------------------------------------------

ACTION_TRAILER = "Finopsd-Action"
STEP_TRAILER = "Finopsd-Step"


class GitBackend:
    """A config file in a git repository (GitOps: a deployer rolls out what is pushed).

    ``apply`` writes the file in the working tree, commits it on ``branch`` (which must
    be checked out) as ``author`` with a message that carries the action id and the
    step (trailers ``Finopsd-Action: <id>`` and ``Finopsd-Step: apply|rollback``), pushes
    ``branch`` to ``remote`` if one is given, then runs the reload command if one is
    given. ``current()`` is the file at the branch's head. Before a change the branch is
    fast-forwarded to the remote's (a branch that has diverged is an error, never
    merged or rebased). A rollback is a new commit with the old text. Uncommitted
    edits of the file by someone else stop a change; the file holding exactly the text
    being applied (finopsd was stopped between its write and its commit) does not.
    ``find_commit`` tells a restarted process whether its commit landed."""

    name = "git"

    def __init__(
        self,
        repo_dir: str | os.PathLike[str],
        config_relpath: str,
        branch: str = "main",
        remote: str | None = None,
        author: tuple[str, str] = ("finopsd", "finopsd@localhost"),
        *,
        reload_command: Sequence[str] | str | None = None,
        timeout_s: float = 60.0,
        reload_unchanged: bool = True,
        git: str = "git",
    ) -> None:
        self.repo_dir = Path(repo_dir)
        self.config_relpath = config_relpath
        self.branch = branch
        self.remote = remote
        self.author = author
        self.reload_command = reload_command
        self.timeout_s = timeout_s
        self.reload_unchanged = reload_unchanged
        self.git_bin = git

    @property
    def path(self) -> Path:
        return self.repo_dir / self.config_relpath

    def current(self) -> str:
        """The file at the branch's head ('' when the branch or the file is not there)."""
        ref = f"refs/heads/{self.branch}"
        if self._git("rev-parse", "--verify", "-q", ref, check=False).returncode != 0:
            return ""  # no commit on the branch yet
        spec = f"{ref}:{self.config_relpath}"
        if self._git("cat-file", "-e", spec, check=False).returncode != 0:
            return ""
        return self._git("cat-file", "blob", spec).stdout

    def apply(
        self, text: str, *, action_id: str, description: str, expect: str | None = None
    ) -> Change:
        return self._change("apply", text, action_id, description, expect)

    def rollback(
        self, text: str, *, action_id: str, description: str, expect: str | None = None
    ) -> Change:
        return self._change("rollback", text, action_id, description, expect)

    def reload(self) -> ReloadResult | None:
        if self.reload_command is None:
            return None
        return run_reload(
            self.reload_command,
            self.timeout_s,
            env={"FINOPSD_CONFIG_PATH": str(self.path)},
            cwd=self.repo_dir,
        )

    def find_commit(self, action_id: str, step: Step | None = None) -> str | None:
        """The newest commit on ``branch`` whose message carries ``action_id`` (and
        ``step``, if given) in its trailers; None if there is none."""
        out = self._git(
            "log",
            "--format=%H%x00%B%x1e",
            "--fixed-strings",
            f"--grep={ACTION_TRAILER}: {action_id}",
            f"refs/heads/{self.branch}",
            "--",
            check=False,
        )
        if out.returncode != 0:
            return None
        for record in out.stdout.split("\x1e"):
            sha, _, body = record.strip("\n").partition("\x00")
            lines = {ln.strip() for ln in body.splitlines()}
            if f"{ACTION_TRAILER}: {action_id}" not in lines:
                continue
            if step is not None and f"{STEP_TRAILER}: {step}" not in lines:
                continue
            return sha.strip()
        return None

    # internals

    def _change(
        self, step: Step, text: str, action_id: str, description: str, expect: str | None
    ) -> Change:
        self._check_branch()
        self._sync()
        before = self.current()
        _check_conflict(before, text, expect, f"{self.config_relpath} on {self.branch}")
        changed = before != text
        if changed:
            self._commit(step, before, text, action_id, description)
        revision = self._git("rev-parse", f"refs/heads/{self.branch}").stdout.strip()
        pushed = False
        if self.remote is not None:
            self._git(
                "push", "--quiet", self.remote, f"refs/heads/{self.branch}:refs/heads/{self.branch}"
            )
            pushed = True
        result = self.reload() if changed or self.reload_unchanged else None
        return Change(
            backend=self.name,
            step=step,
            action_id=action_id,
            path=str(self.path),
            previous_text=before,
            text=text,
            changed=changed,
            revision=revision,
            pushed=pushed,
            reload=result,
        )

    def _commit(self, step: Step, head: str, text: str, action_id: str, description: str) -> None:
        try:
            worktree = _read(self.path)
        except FileNotFoundError:
            worktree = None
        if worktree is not None and worktree not in (head, text):
            raise BackendError(
                f"{self.path} has uncommitted changes by someone else; commit or discard "
                "them before finopsd changes it"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_atomically(self.path, text, keep_previous=False)
        except OSError as e:
            raise BackendError(f"cannot write {self.path}: {e}") from e
        subject = " ".join(description.split()) or f"{step} {action_id}"
        message = f"finopsd: {subject}\n\n{ACTION_TRAILER}: {action_id}\n{STEP_TRAILER}: {step}\n"
        try:
            self._git("add", "--", self.config_relpath)
            self._git("commit", "--quiet", "-m", message, "--", self.config_relpath)
        except BackendError:
            # leave the working tree and the index as the branch has them
            with contextlib.suppress(BackendError, OSError):
                self._git("reset", "--quiet", "--", self.config_relpath)
                if worktree is None:
                    self.path.unlink()
                else:
                    write_atomically(self.path, worktree, keep_previous=False)
            raise

    def _check_branch(self) -> None:
        out = self._git("symbolic-ref", "--quiet", "--short", "HEAD", check=False)
        checked_out = out.stdout.strip()
        if out.returncode != 0 or checked_out != self.branch:
            raise BackendError(
                f"{self.repo_dir} has {checked_out or 'a detached HEAD'} checked out, not "
                f"{self.branch!r}: finopsd commits only to the branch it is configured for"
            )

    def _sync(self) -> None:
        if self.remote is None:
            return
        fetch = self._git("fetch", "--quiet", self.remote, f"refs/heads/{self.branch}", check=False)
        if fetch.returncode != 0:
            if "couldn't find remote ref" in fetch.stderr:
                return  # the remote has no such branch yet: the first push creates it
            raise BackendError(
                f"`git fetch {self.remote} {self.branch}` in {self.repo_dir} exited with status "
                f"{fetch.returncode}: {_tail(fetch.stderr).strip()}"
            )
        self._git("merge", "--quiet", "--ff-only", "FETCH_HEAD")

    def _git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        name, email = self.author
        cmd = [
            self.git_bin,
            "-C",
            str(self.repo_dir),
            "-c",
            f"user.name={name}",
            "-c",
            f"user.email={email}",
            *args,
        ]
        env = {
            **os.environ,
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_AUTHOR_NAME": name,
            "GIT_AUTHOR_EMAIL": email,
            "GIT_COMMITTER_NAME": name,
            "GIT_COMMITTER_EMAIL": email,
        }
        try:
            raw = subprocess.run(
                cmd, capture_output=True, env=env, stdin=subprocess.DEVNULL, timeout=self.timeout_s
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BackendError(f"`{shlex.join(cmd)}` failed: {e}") from e
        # decoded here, not by subprocess: text mode would turn CRLF files into LF
        out = subprocess.CompletedProcess(
            cmd,
            raw.returncode,
            raw.stdout.decode("utf-8", "replace"),
            raw.stderr.decode("utf-8", "replace"),
        )
        if check and out.returncode != 0:
            raise BackendError(
                f"`git {shlex.join(args)}` in {self.repo_dir} exited with status "
                f"{out.returncode}: {_tail(out.stderr).strip() or _tail(out.stdout).strip()}"
            )
        return out


# -- the proxy's health ---------------------------------------------------------------------


def wait_healthy(
    base_url: str,
    master_key: str | None,
    expect_models: set[str] | frozenset[str],
    timeout_s: float = 120.0,
    *,
    interval_s: float = 1.0,
    readiness: bool = True,
    check: Callable[[list[dict[str, Any]]], bool] | None = None,
    transport: httpx.BaseTransport | None = None,
) -> list[dict[str, Any]]:
    """Wait until the LiteLLM proxy at ``base_url`` is up and serves ``expect_models``.

    Polls ``GET /health/liveliness`` (and ``/health/readiness`` with ``readiness``),
    both unauthenticated, until they answer 200, then ``GET /v1/model/info`` with
    ``Authorization: Bearer <master_key>``; returns its ``data`` (one entry per
    deployment: ``model_name``, ``litellm_params`` without secrets, ``model_info``) once
    every expected model group is among the ``model_name``s and ``check(data)`` (if
    given: e.g. that the new weights are loaded, so an old process still running does
    not pass) is true. Raises ``ProxyUnhealthy`` after ``timeout_s`` naming what was
    still missing, and at once when the key is refused (401/403)."""
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {master_key}"} if master_key else {}
    problem = "no answer yet"
    missing: set[str] = set(expect_models)
    with httpx.Client(
        base_url=base_url.rstrip("/"), timeout=max(min(timeout_s, 10.0), 0.1), transport=transport
    ) as client:
        while True:
            try:
                problem = ""
                probes = ["/health/liveliness", *(["/health/readiness"] if readiness else [])]
                for probe in probes:
                    r = client.get(probe)
                    if r.status_code != 200:
                        problem = f"GET {probe}: HTTP {r.status_code}"
                        break
                if not problem:
                    r = client.get("/v1/model/info", headers=headers)
                    if r.status_code in (401, 403):
                        raise ProxyUnhealthy(
                            f"the LiteLLM proxy at {base_url} refused the master key on "
                            f"GET /v1/model/info (HTTP {r.status_code})",
                            missing=missing,
                            problem=f"HTTP {r.status_code}",
                        )
                    if r.status_code != 200:
                        problem = f"GET /v1/model/info: HTTP {r.status_code}"
                    else:
                        data = list(r.json().get("data") or [])
                        served = {str(d.get("model_name")) for d in data}
                        missing = set(expect_models) - served
                        if missing:
                            problem = f"model groups not served: {sorted(missing)}"
                        elif check is not None and not check(data):
                            problem = "the served deployments do not pass the check"
                        else:
                            return data
            except (httpx.HTTPError, ValueError, AttributeError) as e:
                problem = f"{type(e).__name__}: {e}"
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProxyUnhealthy(
                    f"the LiteLLM proxy at {base_url} was not healthy within {timeout_s:g}s: "
                    f"{problem}",
                    missing=missing,
                    problem=problem,
                )
            time.sleep(min(interval_s, left))


# -- helpers --------------------------------------------------------------------------------


def _check_conflict(live: str, text: str, expect: str | None, where: str) -> None:
    if expect is not None and live not in (expect, text):
        raise ConflictError(
            f"{where} changed since the change was planned (it is neither the text planned "
            "against nor the text to write); plan again"
        )


def _tail(s: str | bytes | None) -> str:
    if s is None:
        return ""
    if isinstance(s, bytes):
        s = s.decode("utf-8", "replace")
    return s[-TAIL_CHARS:]


def _read(path: Path) -> str:
    """A file's text as it is (no newline translation)."""
    return path.read_bytes().decode("utf-8")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
