"""The worker-process protocol: every measurement runs in a fresh child process of bench.py.

A child is ``python benchmarks/bench.py --<kind>-worker '<JSON spec>'`` (bench.py sets up the import path, so the
child finds these modules and xlsr from any working directory). It answers with one JSON object per line on
stdout: one-shot children (matmul ceiling, MFU) print their result last and exit (``run_child``,
``last_reply``); a workload worker (``--worker``, ``worker_main``, driven by ``Worker``) builds one
implementation on one workload (impls.py), warms up and prints ``{"ready": true}`` (classification: with
``"check_loss"``, the eval-mode loss of the shared weights before any step), then answers commands on
stdin, one line each:

    run      -> {"time": wall s, "cpu": CPU s} of one repetition
    profile  -> self CPU seconds per op group of one repetition (op_profile.py)
    stop     -> {"peak_rss_mb", "rss_start_mb", "rss_built_mb"}, then it exits

Also here: the environment every worker gets (``--env``), and the process memory readings.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from impls import make_runner
from op_profile import profile_step

BENCH = Path(__file__).resolve().with_name("bench.py")
ROOT = BENCH.parent.parent

INHERITED_SETTINGS = ("THP_MEM_ALLOC_ENABLE", "MALLOC_", "GLIBC_TUNABLES", "OMP_", "KMP_", "LD_PRELOAD")


# ---------------------------------------------------------------------------------------------------- parent side
def child_command(flag: str, spec: dict) -> list[str]:
    """The command line of a child: bench.py with a hidden worker flag and its JSON spec."""
    return [sys.executable, str(BENCH), flag, json.dumps(spec)]


def run_child(flag: str, spec: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a one-shot child to its end, stdout and stderr captured (read its result with ``last_reply``)."""
    return subprocess.run(child_command(flag, spec), capture_output=True, text=True, cwd=str(ROOT), env=env)


def last_reply(stdout: str) -> dict:
    """The JSON object on the last line of a child's output (libraries may print before it)."""
    return json.loads(stdout.strip().splitlines()[-1])


class Worker:
    """A running workload worker (``worker_main`` in a child process), driven one command line at a time."""

    def __init__(self, spec: dict, env: dict | None = None):
        self.spec = spec
        self.proc = subprocess.Popen(
            child_command("--worker", spec),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(ROOT),
            env=env,
        )

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"worker {self.spec['impl']}/{self.spec['workload']} died (exit {self.proc.returncode})")
        return json.loads(line)

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def request(self, command: str) -> dict:
        """Send one command and wait for its answer."""
        self.send(command)
        return self.read()

    def finish(self) -> dict:
        """Stop the worker; its memory readings."""
        result = self.request("stop")
        self.proc.wait()
        return result

    def kill(self) -> None:
        """End the worker if it still runs (after an error)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def environment_settings(settings: list[str]) -> list[str]:
    """The worker settings that change speed or memory: inherited ones (e.g. from the shell) and ``--env``."""
    given = {item.partition("=")[0] for item in settings}
    inherited = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(INHERITED_SETTINGS) and k not in given]
    return inherited + list(settings)


def worker_env(settings: list[str]) -> dict:
    """This process's environment plus ``--env KEY=VALUE`` settings (the same for every implementation)."""
    env = dict(os.environ)
    for item in settings:
        key, _, value = item.partition("=")
        env[key] = value
    return env


# ---------------------------------------------------------------------------------------------------- child side
def reply(result: dict) -> None:
    """Answer the parent: one JSON line on stdout."""
    print(json.dumps(result), flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def current_rss_mb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def worker_main(spec: dict) -> None:
    """Child process: build, warm up, then run one repetition per 'run' line on stdin; 'stop' reports memory."""
    import torch

    torch.set_num_threads(spec["threads"])
    rss_start = current_rss_mb()
    inputs = torch.load(spec["inputs"], weights_only=True)
    runner = make_runner(spec["impl"], spec, inputs)
    rss_built = current_rss_mb()
    ready = {"ready": True}
    if spec["kind"] == "classify":  # the loss of the shared weights, before any step changes them
        ready["check_loss"] = runner.check_loss()
    for _ in range(spec["warmup"]):
        runner.step()
    reply(ready)
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            reply(runner.step())
        elif command == "profile":
            reply(profile_step(runner))
        elif command == "stop":
            break
    reply({"peak_rss_mb": peak_rss_mb(), "rss_start_mb": rss_start, "rss_built_mb": rss_built})
