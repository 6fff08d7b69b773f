"""Run `pvehook release <vmid> --deferred <generation>` once, some seconds from now,
outside of the hook's process and of the Proxmox task that ran it.

qemu-server runs no hook when a start fails after pre-start, and the restart that a
reboot promises may never come: the devices then have to go back by themselves. On a
node systemd is PID 1 (qemu-server itself puts every VM into a systemd scope, PVE::Systemd
enter_systemd_scope): a transient timer made with `systemd-run --on-active` outlives the
hook, the task and a restart of pvedaemon, is listed by `systemctl list-timers
'pvehook-*'`, and its job logs to the journal. Without systemd (a rescue shell, the test
guest) a detached process waits instead: double fork, its own session, stdio on
/dev/null and every other descriptor closed, because Proxmox reads the hook's output
until every writer has closed it, and an inherited device lock would block the next
start for as long as the process sleeps.

No subprocess module: pre-start imports this, and its import budget is tight (README,
Performance).
"""

from __future__ import annotations

import os
import select
import sys
import time

from .paths import Root

UNIT_PREFIX = "pvehook-release"
# systemd-run only asks PID 1 to create two units; when PID 1 does not answer, the
# detached process takes over.
SYSTEMD_RUN_TIMEOUT_S = 15.0


def job_argv(vmid: int, generation: str) -> list[str]:
    # -P: do not put the working directory first on sys.path (a file named like a
    # module there must not run as root).
    return [sys.executable, "-P", "-m", "pvehook.cli", "release", str(vmid),
            "--deferred", generation]


def job_env(root: Root, timeouts) -> dict[str, str]:
    """What the job needs to act on the same tree with the same deadlines."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8"}
    # The pvehook that runs now, also when it is a source tree and not the package.
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    elif os.path.basename(here) not in ("dist-packages", "site-packages"):
        env["PYTHONPATH"] = here
    if str(root.path) != "/":
        env["PVEHOOK_ROOT"] = str(root.path)
    for name, value in timeouts._asdict().items():
        if value is not None:
            env[f"PVEHOOK_TIMEOUT_{name.upper()}"] = repr(float(value))
    return env


def _which(name: str) -> str | None:
    for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep):
        path = os.path.join(d or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


class Later:
    """The real one; tests/fakesys.py's FakeLater keeps the jobs for a test to run."""

    def __init__(self, root: Root):
        self.root = root

    def release_after(self, ctx, vmid: int, generation: str, delay: float) -> str:
        """Schedule the job; returns how ("systemd timer <unit>" or "process <pid>")."""
        argv = job_argv(vmid, generation)
        env = job_env(ctx.root, ctx.timeouts)
        problem = None
        # sd_booted(): /run/systemd/system exists only when systemd is PID 1.
        if self.root.run("systemd", "system").is_dir():
            tool = _which("systemd-run")
            if tool is None:
                problem = "systemd-run not found"
            else:
                # One generation can have two pending releases (its start's, its
                # reboot's) and a release can schedule itself again: a unit name each.
                unit = f"{UNIT_PREFIX}-{vmid}-{generation}-{time.monotonic_ns():x}"
                problem = _systemd_run(tool, unit, vmid, argv, env, delay)
                if problem is None:
                    return f"systemd timer {unit}.timer"
        pid = _detached(argv, env, delay)
        return f"process {pid}" + (f" ({problem})" if problem else "")


def systemd_run_argv(tool: str, unit: str, vmid: int, argv: list[str], env: dict[str, str],
                     delay: float) -> list[str]:
    seconds = max(1, int(delay + 0.999))
    return [
        tool, f"--unit={unit}", f"--description=pvehook: give back VM {vmid}'s devices"
        " if it is not running", f"--on-active={seconds}s",
        # A timer's default accuracy is a minute; the bound is in seconds.
        "--timer-property=AccuracySec=1s", "--timer-property=RemainAfterElapse=no",
        "--collect", "--quiet",
        # The job writes its lines to syslog itself (the same journal); stdout would
        # show each one twice.
        "--property=StandardOutput=null",
        *[f"--setenv={k}={v}" for k, v in sorted(env.items())],
        "--", *argv]


def _systemd_run(tool: str, unit: str, vmid: int, argv: list[str], env: dict[str, str],
                 delay: float) -> str | None:
    """Run systemd-run with a deadline; None when it made the timer, else why not."""
    cmd = systemd_run_argv(tool, unit, vmid, argv, env, delay)
    r, w = os.pipe()
    try:
        pid = os.posix_spawn(tool, cmd, {**os.environ}, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, w, 1), (os.POSIX_SPAWN_DUP2, w, 2),
            (os.POSIX_SPAWN_CLOSE, r)])
    except OSError as e:
        os.close(r)
        os.close(w)
        return f"systemd-run: {e.strerror}"
    os.close(w)
    out = b""
    deadline = time.monotonic() + SYSTEMD_RUN_TIMEOUT_S
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([r], [], [], left)[0]:
                break
            chunk = os.read(r, 4096)
            if not chunk:
                break
            out += chunk
    finally:
        os.close(r)
    # Its output closed; now its exit, within what is left of the deadline.
    pidfd = os.pidfd_open(pid)
    try:
        exited = select.select([pidfd], [], [], max(deadline - time.monotonic(), 0))[0]
    finally:
        os.close(pidfd)
    if not exited:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return f"systemd-run gave no answer within {SYSTEMD_RUN_TIMEOUT_S:g} s"
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        text = " ".join(out.decode(errors="replace").split())
        return f"systemd-run failed (exit {code}): {text or 'no message'}"
    return None


def _detached(argv: list[str], env: dict[str, str], delay: float) -> int:
    """Start a process that sleeps `delay` seconds, then execs argv; returns its pid.

    The intermediate child exits at once (we reap it), so the sleeper is nobody's child
    here and no zombie is left in the hook or in Proxmox.
    """
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked process
        try:
            os.close(r)
            os.setsid()  # out of the task's session and process group
            grandchild = os.fork()
            if grandchild:
                os.write(w, str(grandchild).encode())
                os._exit(0)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            # The device locks and the task's pipes: none of them may outlive the hook.
            os.closerange(3, 1 << 16)
            os.chdir("/")
            time.sleep(delay)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    os.close(w)
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    os.waitpid(child, 0)
    if not data:
        raise OSError("could not start a detached process")
    return int(data)
