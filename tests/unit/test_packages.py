"""Package digests beyond dpkg: apk's installed database and rpm's (rpmdb.sqlite read
directly; an older database through `rpm -qa --dump`), so that a renamed packaged binary is
named on Alpine, Fedora, RHEL and SUSE too. The databases are real: apk's written in its
text format, rpm's made by the rpm tool from a package rpmbuild built."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.identity import Identities, Identity
from collector.packages import (
    PackageIndex,
    RpmHeaderError,
    merged_usr,
    parse_apk_installed,
    parse_rpm_dump,
    rpm_dump,
    rpm_header_files,
)
from tests.unit.test_identity import resolve_now

TRUE = Path("/usr/bin/true")
SLEEP = Path("/usr/bin/sleep")


def q1(path: Path) -> str:
    return "Q1" + base64.b64encode(hashlib.sha1(path.read_bytes()).digest()).decode()  # noqa: S324


def apk_root(tmp_path: Path) -> Path:
    """A root with apk's installed database (two packages, as apk writes it)."""
    root = tmp_path / "alpine"
    (root / "lib" / "apk" / "db").mkdir(parents=True)
    sha256_q2 = "Q2" + base64.b64encode(hashlib.sha256(SLEEP.read_bytes()).digest()).decode()
    (root / "lib" / "apk" / "db" / "installed").write_text(
        "C:Q1i4kc7xv2zSmOGRmbYhQvUJ6pENs=\n"
        "P:coreutils\nV:9.5-r1\nA:x86_64\nS:1\nI:2\nT:The basic file utilities\n"
        "o:coreutils\nt:1717000000\nD:so:libc.musl-x86_64.so.1\n"
        "F:usr\nF:usr/bin\n"
        f"R:true\na:0:0:755\nZ:{q1(TRUE)}\n"
        "R:[\na:0:0:755\nZ:Q1notbase64!!\n"  # a checksum that does not decode: skipped
        f"F:usr/share/doc\nR:README\nZ:{q1(TRUE)}\n"  # not executable: not indexed
        "\n"
        "P:busybox\nV:1.36.1-r29\n"
        f"F:bin\nR:sleep\na:0:0:755\nZ:{sha256_q2}\n"
        "R:sh\na:0:0:777\n"  # a link: no checksum
        "\n"
    )
    return root


def test_apk_database_names_copies_by_sha1_and_sha256(tmp_path: Path) -> None:
    root = apk_root(tmp_path)
    index = PackageIndex(root)
    assert index.databases() == ["apk"]
    assert index.algorithms() == {"sha1", "sha256"}
    copy = tmp_path / "kworker"
    shutil.copyfile(TRUE, copy)
    ident, _ = resolve_now(Identities(index), os.getpid(), copy)
    assert ident is not None and ident.original_exe == b"/usr/bin/true"
    sleeper = tmp_path / "s"
    shutil.copyfile(SLEEP, sleeper)
    ident, _ = resolve_now(Identities(index), os.getpid(), sleeper)
    assert ident is not None and ident.original_exe == b"/bin/sleep"
    # the README shares true's digest but is not an executable candidate
    assert index.original_of({"sha1": hashlib.sha1(TRUE.read_bytes()).digest()}, b"") == (  # noqa: S324
        b"/usr/bin/true"
    )


def test_apk_lines_in_any_order_and_merged_usr(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    into: dict[str, dict[bytes, bytes | tuple[bytes, ...]]] = {}
    text = f"P:a\nF:bin\nR:true\nZ:{q1(TRUE)}\nZ:{q1(SLEEP)}\n\nR:orphan\nZ:{q1(SLEEP)}\n"
    parse_apk_installed(text.encode(), merged_usr(root), into)
    sha1_true = hashlib.sha1(TRUE.read_bytes()).digest()  # noqa: S324
    # a second Z for one R is ignored, and an R before any F is a top-level file
    assert into == {"sha1": {sha1_true: b"/usr/bin/true"}}


@pytest.fixture(scope="module")
def rpm_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A root whose rpm database (sqlite, as rpm 4.16+ makes it) has one package, built with
    rpmbuild: /usr/bin/tinytool (a script) and /usr/libexec/tiny/tinybin (a copy of true)."""
    for tool in ("rpm", "rpmbuild"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run 'sudo make setup' (it installs rpm)")
    top = tmp_path_factory.mktemp("rpmbuild")
    (top / "SOURCES").mkdir()
    (top / "SOURCES" / "tinytool").write_text("#!/bin/sh\necho tiny\n")
    shutil.copyfile(TRUE, top / "SOURCES" / "tinybin")
    spec = top / "tiny.spec"
    spec.write_text(
        "Name: tinytool\nVersion: 1.0\nRelease: 1\nSummary: A tiny tool\nLicense: MIT\n"
        "%global debug_package %{nil}\n%global __os_install_post %{nil}\n"
        "%description\nA tiny tool.\n%install\n"
        "mkdir -p %{buildroot}/usr/bin %{buildroot}/usr/libexec/tiny\n"
        "install -m 755 %{_sourcedir}/tinytool %{buildroot}/usr/bin/tinytool\n"
        "install -m 755 %{_sourcedir}/tinybin %{buildroot}/usr/libexec/tiny/tinybin\n"
        "%files\n/usr/bin/tinytool\n/usr/libexec/tiny/tinybin\n"
    )
    subprocess.run(
        ["rpmbuild", "--quiet", "--define", f"_topdir {top}", "-bb", str(spec)],
        check=True,
        capture_output=True,
    )
    [package] = (top / "RPMS").rglob("*.rpm")
    root = tmp_path_factory.mktemp("fedora")
    rpm = ["rpm", "--root", str(root), "--dbpath", "/usr/lib/sysimage/rpm"]
    subprocess.run([*rpm, "--initdb"], check=True, capture_output=True)
    subprocess.run(
        [*rpm, "-i", "--justdb", "--nodeps", "--noscripts", str(package)],
        check=True,
        capture_output=True,
    )
    yield root


def test_rpm_sqlite_database_names_copies_by_sha256(tmp_path: Path, rpm_root: Path) -> None:
    index = PackageIndex(rpm_root, dump=_no_dump)
    assert index.databases() == ["rpm"]
    assert index.algorithms() == {"sha256"}
    copy = tmp_path / "helper"
    shutil.copyfile(TRUE, copy)
    ident, _ = resolve_now(Identities(index), os.getpid(), copy)
    digest = hashlib.sha256(TRUE.read_bytes()).hexdigest()
    assert ident == Identity(digest, b"/usr/libexec/tiny/tinybin", "")
    script = hashlib.sha256(b"#!/bin/sh\necho tiny\n").digest()
    assert index.original_of({"sha256": script}, b"/tmp/x") == b"/usr/bin/tinytool"
    assert index.original_of({"md5": b"\0" * 16}, b"/tmp/x") == b""


def _no_dump(_root: Path, _db: Path) -> bytes:
    raise AssertionError("an sqlite database is read directly, not through rpm")


def test_rpm_dump_of_the_same_database_gives_the_same_index(rpm_root: Path) -> None:
    """An rpm database sqlite3 cannot read (Berkeley DB, ndb) is read through the rpm tool;
    its real output, parsed, names the same files."""
    dbdir = rpm_root / "usr" / "lib" / "sysimage" / "rpm"
    text = rpm_dump(rpm_root, dbdir)
    into: dict[str, dict[bytes, bytes | tuple[bytes, ...]]] = {}
    parse_rpm_dump(text, {}, into)
    direct = PackageIndex(rpm_root, dump=_no_dump)
    assert into == {a: dict(t) for a, t in direct._current().items()}


def test_an_older_rpm_database_is_read_through_the_tool(tmp_path: Path, rpm_root: Path) -> None:
    root = tmp_path / "rhel8"
    (root / "var" / "lib" / "rpm").mkdir(parents=True)
    (root / "var" / "lib" / "rpm" / "Packages").write_bytes(b"\0" * 4096)  # a Berkeley DB
    dumped = rpm_dump(rpm_root, rpm_root / "usr" / "lib" / "sysimage" / "rpm")
    asked: list[tuple[Path, Path]] = []

    def dump(r: Path, db: Path) -> bytes:
        asked.append((r, db))
        return dumped

    index = PackageIndex(root, dump=dump)
    assert index.databases() == ["rpm"]
    assert index.original_of({"sha256": hashlib.sha256(TRUE.read_bytes()).digest()}, b"") == (
        b"/usr/libexec/tiny/tinybin"
    )
    assert asked == [(root, root / "var" / "lib" / "rpm")]


def test_rpm_dump_lines_with_spaces_zeros_and_old_md5() -> None:
    md5 = "0" * 31 + "1"
    text = (
        f"/usr/bin/my tool 20 1 {'ab' * 32} 0100755 root root 0 0 0 X\n"
        f"/usr/bin 0 1 {'0' * 64} 040755 root root 0 0 0 X\n"
        f"/usr/sbin/old 9 1 {md5} 0100755 root root 0 0 0 X\n"
        "/usr/bin/short 1 2 3\n"
        f"/usr/share/doc/x 9 1 {'cd' * 32} 0100644 root root 0 1 0 X\n"
    ).encode()
    into: dict[str, dict[bytes, bytes | tuple[bytes, ...]]] = {}
    parse_rpm_dump(text, {}, into)
    assert into == {
        "sha256": {bytes.fromhex("ab" * 32): b"/usr/bin/my tool"},
        "md5": {bytes.fromhex(md5): b"/usr/sbin/old"},
    }


def test_a_failing_rpm_tool_leaves_the_index_empty_and_logs(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "var" / "lib" / "rpm").mkdir(parents=True)
    (root / "var" / "lib" / "rpm" / "Packages.db").write_bytes(b"x")

    def dump(_r: Path, _db: Path) -> bytes:
        raise OSError("rpm -qa --dump failed: error: cannot open Packages index")

    index = PackageIndex(root, dump=dump)
    assert index.available()
    assert index.algorithms() == frozenset()
    assert index.original_of({"sha256": b"\0" * 32}, b"") == b""


def test_every_truncation_of_a_real_rpm_header_is_handled(rpm_root: Path) -> None:
    db = sqlite3.connect(rpm_root / "usr" / "lib" / "sysimage" / "rpm" / "rpmdb.sqlite")
    [(blob,)] = db.execute("SELECT blob FROM Packages").fetchall()
    db.close()
    algorithm, files = rpm_header_files(bytes(blob))
    assert algorithm == "sha256"
    assert {p for p, _ in files} == {b"/usr/bin/tinytool", b"/usr/libexec/tiny/tinybin"}
    for n in range(0, len(blob), 7):
        with pytest.raises(RpmHeaderError):
            rpm_header_files(bytes(blob[:n]))
    corrupt = bytearray(blob)
    corrupt[0:4] = (1 << 20).to_bytes(4, "big")
    with pytest.raises(RpmHeaderError):
        rpm_header_files(bytes(corrupt))


def test_a_host_with_all_three_databases_uses_each(tmp_path: Path, rpm_root: Path) -> None:
    root = apk_root(tmp_path)
    shutil.copytree(rpm_root / "usr" / "lib" / "sysimage", root / "usr" / "lib" / "sysimage")
    (root / "var" / "lib" / "dpkg" / "info").mkdir(parents=True)
    md5 = hashlib.md5(SLEEP.read_bytes()).hexdigest()  # noqa: S324
    (root / "var" / "lib" / "dpkg" / "info" / "coreutils.md5sums").write_text(
        f"{md5}  usr/bin/sleep\n"
    )
    index = PackageIndex(root)
    assert index.databases() == ["dpkg", "apk", "rpm"]
    assert index.algorithms() == {"md5", "sha1", "sha256"}
    assert index.original(bytes.fromhex(md5), b"") == b"/usr/bin/sleep"
