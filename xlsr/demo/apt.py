"""Debian package look-ups (dpkg, apt-cache) and installing what the demo corpus needs (apt-get)."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import subprocess
import time
from typing import Sequence

logger = logging.getLogger(__name__)


def dpkg_installed(package: str) -> bool:
    """Whether a Debian package is installed (False if dpkg is absent)."""
    if shutil.which("dpkg-query") is None:
        return False
    res = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package],
        capture_output=True, text=True, check=False,
    )
    return res.returncode == 0 and res.stdout.strip().endswith("install ok installed")


def missing_packages(packages: Sequence[str]) -> list[str]:
    """The packages of ``packages`` that are not installed."""
    return [p for p in packages if not dpkg_installed(p)]


def package_files(package: str) -> list[pathlib.Path]:
    """Files installed by a Debian package (``dpkg -L``)."""
    res = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"dpkg -L {package} failed: {res.stderr.strip()}")
    return [pathlib.Path(line) for line in res.stdout.splitlines() if line.strip()]


def apt_candidate(package: str) -> bool:
    """Whether apt can install ``package`` (has a candidate version)."""
    if shutil.which("apt-cache") is None:
        return False
    res = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True, check=False)
    for line in res.stdout.splitlines():
        line = line.strip()
        if line.startswith("Candidate:"):
            return line.split(":", 1)[1].strip() not in ("", "(none)")
    return False


def install_packages(packages: Sequence[str], *, install: bool) -> None:
    """Install the missing ones of ``packages`` with apt-get (needs root), or raise ``RuntimeError`` saying how to."""
    missing = missing_packages(packages)
    if not missing:
        return
    cmd = "apt-get update && apt-get install -y --no-install-recommends " + " ".join(missing)
    if not install:
        raise RuntimeError(
            "The demo corpus needs these Debian packages, which are not installed: "
            f"{' '.join(missing)}.\nInstall them with:\n    sudo {cmd}\n"
            "(or call build_demo_corpus(install=True) as root)."
        )
    if shutil.which("apt-get") is None:
        raise RuntimeError(
            "The demo corpus needs these Debian packages: " + " ".join(missing)
            + ", but apt-get was not found (is this a Debian/Ubuntu system?)."
        )
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        raise RuntimeError(
            "The demo corpus needs these Debian packages, which are not installed: "
            f"{' '.join(missing)}.\nInstalling them needs root; run:\n    sudo {cmd}\n"
            "and then call build_demo_corpus() again."
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    logger.info("installing Debian packages: %s", " ".join(missing))
    t0 = time.perf_counter()
    for args in (["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]):
        res = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(args)}` failed (exit {res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
            )
    still = missing_packages(missing)
    if still:
        raise RuntimeError(f"apt-get reported success but these are still missing: {' '.join(still)}")
    logger.info("installed %d package(s) in %.1f s", len(missing), time.perf_counter() - t0)
