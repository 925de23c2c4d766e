"""Static checks of systemd/image-search.service with systemd-analyze (no systemd needs to run).

Skipped when systemd-analyze is not installed, unless IMAGE_SEARCH_TESTS_REQUIRE_SYSTEMD=1 (set by
.ci/run): then a missing systemd-analyze is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "image-search.service"
MAX_EXPOSURE = 2.5
# Where the host keeps its vendor units (merged /usr or not).
SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if os.environ.get("IMAGE_SEARCH_TESTS_REQUIRE_SYSTEMD") == "1":
            pytest.fail("IMAGE_SEARCH_TESTS_REQUIRE_SYSTEMD=1 but systemd-analyze is not installed "
                        "(apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return exe


def unit_settings() -> list[tuple[str, str]]:
    """(key, value) of every assignment in the unit, comments and sections skipped."""
    out = []
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.append((key.strip(), value.strip()))
    return out


def setting(key: str) -> list[str]:
    return [v for k, v in unit_settings() if k == key]


def test_unit_essentials():
    assert setting("Type") == ["notify"]
    assert setting("NotifyAccess") == ["main"]
    assert setting("WatchdogSec") and setting("WatchdogSec")[-1] not in ("", "0", "infinity")
    assert setting("Restart") == ["on-failure"]
    assert setting("User") == ["image-search"]
    assert setting("CapabilityBoundingSet") == [""]
    # PrivateDevices=yes hides the GPU; MemoryDenyWriteExecute breaks PyTorch's JIT.
    assert setting("PrivateDevices") in ([], ["no"]), "PrivateDevices would hide the GPU"
    assert setting("MemoryDenyWriteExecute") in ([], ["no"]), "breaks PyTorch JIT"
    assert any(v.startswith("char-nvidia-frontend") for v in setting("DeviceAllow"))
    assert any(v.startswith("char-nvidia-uvm") for v in setting("DeviceAllow"))
    exec_start = setting("ExecStart")
    assert len(exec_start) == 1 and exec_start[0].split()[1:3] == ["serve", "--config"]


def test_systemd_analyze_verify(systemd_analyze, tmp_path):
    """`systemd-analyze verify` on the unit file exactly as shipped.

    verify checks that ExecStart's binary exists and is executable, and the installed path
    (/opt/image-search/.venv/bin/image-search) does not exist on a test machine. So the check
    runs with --root=<fake root>: the unchanged unit in <root>/etc/systemd/system, a stub
    executable at the ExecStart path inside <root>, and a copy of the host's vendor units (so
    that sysinit.target, network-online.target... resolve). Nothing in the unit is rewritten.
    """
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    vendor = next((d for d in SYSTEM_UNIT_DIRS if d.is_dir() and not d.is_symlink()), None)
    assert vendor is not None, "no vendor unit directory on this machine"
    shutil.copytree(vendor, root / "usr/lib/systemd/system", symlinks=True)
    binary = setting("ExecStart")[0].split()[0].lstrip("-@:+!")
    stub = root / binary.lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)

    res = subprocess.run(
        [systemd_analyze, "verify", f"--root={root}", UNIT.name],
        capture_output=True, text=True, timeout=120,
    )
    output = res.stdout + res.stderr
    # verify exits 0 even for unknown keys and unparsable values (it only warns), so any line
    # that mentions our unit counts as a finding.
    findings = [line for line in output.splitlines() if UNIT.name in line or str(root) in line]
    assert res.returncode == 0, output
    assert findings == [], "\n".join(findings)


def test_systemd_analyze_verify_catches_mistakes(systemd_analyze, tmp_path):
    """The verify check above is not vacuous: a typo'd key is reported on a line naming the unit."""
    bad = tmp_path / UNIT.name
    bad.write_text(UNIT.read_text().replace("WatchdogSec=", "WatchdogSecs=", 1))
    res = subprocess.run([systemd_analyze, "verify", str(bad)], capture_output=True, text=True, timeout=120)
    assert any("WatchdogSecs" in line and UNIT.name in line for line in (res.stdout + res.stderr).splitlines())


def test_systemd_analyze_security_exposure(systemd_analyze):
    res = subprocess.run(
        [systemd_analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=120,
    )
    output = res.stdout + res.stderr
    assert res.returncode == 0, output
    match = re.search(r"Overall exposure level for \S+:\s*([0-9]+(?:\.[0-9]+)?)", output)
    assert match, output
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, output
