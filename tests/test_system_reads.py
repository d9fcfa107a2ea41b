"""The suite's check that tests read only system files the project's own install steps provide."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests import system_reads
from tests.components import skip_or_fail
from tests.conftest import python_env

FMNIST_LABELS = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
STAMPS = "/usr/share/tuxpaint/stamps/animals/birds"


def _read_in_child(folder: Path, code: str) -> None:
    env = python_env(SSL_SYSTEM_READS_DIR=str(folder))  # this test's own record, not the session's
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)


def _require_dpkg() -> None:
    if not system_reads.available():
        skip_or_fail("dpkg's database and apt-cache (Debian) are needed to check system reads")


def test_files_of_the_project_packages_pass(tmp_path: Path) -> None:
    _require_dpkg()
    if not (os.path.isfile(FMNIST_LABELS) and os.path.isdir(STAMPS)):
        skip_or_fail("make system-deps installs dataset-fashion-mnist and tuxpaint-stamps-default")
    _read_in_child(tmp_path, f"import os; open({FMNIST_LABELS!r}, 'rb').read(8); os.listdir({STAMPS!r})")
    assert FMNIST_LABELS in system_reads.recorded(tmp_path)
    assert system_reads.problems(tmp_path) == []


def test_a_file_of_a_package_no_install_step_provides_is_reported(tmp_path: Path) -> None:
    _require_dpkg()
    allowed = system_reads.dependency_closure(system_reads.project_packages()) | system_reads.base_packages()
    foreign = next(
        (
            (path, pkgs)
            for path, pkgs in sorted(system_reads.owners().items())
            if path.startswith("/usr/share/") and not pkgs & allowed and os.path.isfile(path)
        ),
        None,
    )
    if foreign is None:
        skip_or_fail("every package on this machine is provided by the project or the base system")
    path, pkgs = foreign
    _read_in_child(tmp_path, f"open({path!r}, 'rb').read(1)")
    report = system_reads.problems(tmp_path)
    assert len(report) == 1 and path in report[0] and sorted(pkgs)[0] in report[0], report


def test_a_listed_directory_counts_every_file_in_it(tmp_path: Path) -> None:
    """A test that lists a folder depends on every file it sees there, even the ones it never opens."""
    _require_dpkg()
    data = tmp_path / "opt-like"
    data.mkdir()
    (data / "a.txt").write_text("a")
    assert system_reads.visible_files({str(data)}) == {str(data / "a.txt")}
    assert system_reads.visible_files({str(data / "missing")}) == set()
