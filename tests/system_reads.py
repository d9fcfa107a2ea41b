"""Fail the suite loudly when a test reads a system file that none of the project's install steps provides.

A test that passes here because an earlier project, a developer or another package put files on this
machine fails on CI's fresh machine (it happened: a Tux Paint test counted stamps that the package the
Makefile installs does not ship). So every Python process of a test run -- pytest itself and every
process it starts (``tests/audit_site/sitecustomize.py``) -- records the files it opens and the
directories it lists under the system prefixes below. At the end of the session each recorded file,
and each file in a recorded directory, is looked up in dpkg's file lists:

* a file of a package that the project installs (``APT_PACKAGES`` in the Makefile, ``PACKAGES`` in
  ``launch/local_cluster.sh``) or that those packages depend on is fine;
* so is a file of the base system (Essential, or priority required / important / standard);
* a file of any other package, or a file under ``/usr/share``, ``/opt`` or ``/srv`` that no package
  owns, is reported with the test-visible path and its package, and the session fails.

Off Debian (no dpkg) the check is skipped outside CI and fails under ``CI=true``.
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AUDIT_SITE = Path(__file__).resolve().parent / "audit_site"
WATCHED = ("/usr/share/", "/usr/local/share/", "/opt/", "/srv/", "/etc/")
UNOWNED_IS_A_PROBLEM = ("/usr/share/", "/usr/local/share/", "/opt/", "/srv/")
BASE_PRIORITIES = frozenset({"required", "important", "standard"})
DPKG_INFO = Path("/var/lib/dpkg/info")


def start(tmp_root: Path) -> Path:
    """Record system reads of this process and of every child from now on; return the record folder."""
    out = Path(tempfile.mkdtemp(prefix="system-reads-", dir=tmp_root))
    exclude = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(ROOT)}
    os.environ["SSL_SYSTEM_READS_DIR"] = str(out)
    os.environ["SSL_SYSTEM_READS_PREFIXES"] = os.pathsep.join(WATCHED)
    os.environ["SSL_SYSTEM_READS_EXCLUDE"] = os.pathsep.join(sorted(e.rstrip("/") + "/" for e in exclude))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(AUDIT_SITE), os.environ.get("PYTHONPATH")) if p
    )
    runpy.run_path(str(AUDIT_SITE / "sitecustomize.py"))  # this process too
    return out


def recorded(folder: Path) -> set[str]:
    """Every path the processes wrote into ``folder``."""
    paths: set[str] = set()
    for f in folder.glob("reads.*"):
        paths.update(line for line in f.read_text(encoding="utf-8").splitlines() if line)
    return paths


def visible_files(paths: set[str]) -> set[str]:
    """The recorded files that exist, plus the files directly inside each recorded directory."""
    files: set[str] = set()
    for p in paths:
        if os.path.isdir(p):
            try:
                with os.scandir(p) as it:
                    files.update(e.path for e in it if e.is_file(follow_symlinks=False))
            except OSError:
                continue
        elif os.path.isfile(p):
            files.add(os.path.realpath(p) if os.path.islink(p) else p)
    return files


def owners() -> dict[str, set[str]]:
    """file path -> packages whose dpkg file list names it."""
    table: dict[str, set[str]] = {}
    for lst in DPKG_INFO.glob("*.list"):
        pkg = lst.name[: -len(".list")].split(":", 1)[0]
        for line in lst.read_text(encoding="utf-8", errors="replace").splitlines():
            table.setdefault(line, set()).add(pkg)
    return table


def project_packages(root: Path = ROOT) -> set[str]:
    """The Debian packages the project's own install steps install (Makefile and local_cluster.sh)."""
    pkgs: set[str] = set()
    m = re.search(r"^APT_PACKAGES\s*:?=\s*(.+)$", (root / "Makefile").read_text(), re.MULTILINE)
    if m:
        pkgs.update(m.group(1).split())
    m = re.search(r"^PACKAGES=\(([^)]*)\)", (root / "launch" / "local_cluster.sh").read_text(), re.MULTILINE)
    if m:
        pkgs.update(m.group(1).split())
    return pkgs


def dependency_closure(pkgs: set[str]) -> set[str]:
    """``pkgs`` and everything they depend on (what ``apt-get install --no-install-recommends`` pulls in)."""
    if not pkgs:
        return set()
    proc = subprocess.run(
        [
            "apt-cache",
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            *sorted(pkgs),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    closure = set(pkgs)
    for line in proc.stdout.splitlines():
        name = line.split(":", 1)[1] if ":" in line else line
        name = name.strip().strip("<>").split(":", 1)[0]
        if name:
            closure.add(name)
    return closure


def base_packages() -> set[str]:
    """Packages every Debian machine has: Essential, or priority required / important / standard."""
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Essential}\t${Priority}\n"],
        capture_output=True,
        text=True,
        check=False,
    )
    base = set()
    for line in proc.stdout.splitlines():
        name, essential, priority = [*line.split("\t"), "", ""][:3]
        if essential == "yes" or priority in BASE_PRIORITIES:
            base.add(name)
    return base


def problems(folder: Path) -> list[str]:
    """One line per system file the tests read that no install step of the project provides."""
    files = visible_files(recorded(folder))
    if not files:
        return []
    table = owners()
    allowed = dependency_closure(project_packages()) | base_packages()
    found: dict[str, list[str]] = {}
    for f in sorted(files):
        pkgs = table.get(f)
        if pkgs is None:
            if f.startswith(UNOWNED_IS_A_PROBLEM):
                found.setdefault("(no package)", []).append(f)
        elif not pkgs & allowed:
            found.setdefault(", ".join(sorted(pkgs)), []).append(f)
    lines = []
    for pkg, paths in sorted(found.items()):
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        lines.append(f"{pkg}: {shown}")
    return lines


def available() -> bool:
    """dpkg's database and apt-cache are there (Debian/Ubuntu)."""
    return (
        DPKG_INFO.is_dir()
        and shutil.which("apt-cache") is not None
        and shutil.which("dpkg-query") is not None
    )
