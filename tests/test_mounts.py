"""Reading /etc/fstab and /proc/self/mountinfo: which mount points under the source folder are expected
but empty (``mounts.py``). Written tables, no real mount."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_search.mounts import MountTable, read_mount_table, remember_mounts

pytestmark = pytest.mark.unit

FSTAB = """\
# /etc/fstab: static file system information.
UUID=1234-abcd  /                 ext4  errors=remount-ro  0 1
UUID=5678       none              swap  sw                 0 0
/dev/sdb1       swap              swap  defaults           0 0
nas:/photos     /srv/images/nas   nfs   _netdev,x-systemd.automount  0 0
   # an indented comment
/dev/sdc1       /srv/images/My\\040Trip/  vfat  noauto  0 0
tmpfs           /tmp              tmpfs defaults 0 0
"""

MOUNTINFO = """\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
40 22 0:35 / /tmp rw,nosuid shared:20 - tmpfs tmpfs rw
41 22 0:36 / /srv/images/My\\040Trip rw,relatime shared:21 - vfat /dev/sdc1 rw
"""


def tables(tmp_path: Path, fstab: str = FSTAB, mountinfo: str = MOUNTINFO) -> MountTable:
    (tmp_path / "fstab").write_text(fstab)
    (tmp_path / "mountinfo").write_text(mountinfo)
    return read_mount_table(tmp_path / "fstab", tmp_path / "mountinfo")


def test_fstab_points_escaped_names_and_no_swap(tmp_path) -> None:
    table = tables(tmp_path)
    assert table.expected == {Path("/"), Path("/srv/images/nas"), Path("/srv/images/My Trip"), Path("/tmp")}
    assert table.mounted == {Path("/"), Path("/tmp"), Path("/srv/images/My Trip")}


def test_only_the_expected_points_under_the_folder_with_nothing_mounted(tmp_path) -> None:
    table = tables(tmp_path)
    assert table.unmounted_under(Path("/srv/images")) == [Path("/srv/images/nas")]
    assert table.unmounted_under(Path("/srv/images/nas")) == [Path("/srv/images/nas")]  # the folder itself
    assert table.unmounted_under(Path("/srv/other")) == []
    assert table.unmounted_under(Path("/srv/images-old")) == []  # a name that only begins the same


def test_a_folder_reached_through_a_link_names_the_points_under_its_own_name(tmp_path) -> None:
    real = tmp_path / "disk" / "images"
    (real / "nas").mkdir(parents=True)
    (tmp_path / "images").symlink_to(real)
    table = tables(tmp_path, fstab=f"nas:/photos {real / 'nas'} nfs defaults 0 0\n", mountinfo="")
    assert table.unmounted_under(tmp_path / "images") == [tmp_path / "images" / "nas"]


def test_tables_that_cannot_be_read_expect_nothing(tmp_path) -> None:
    table = read_mount_table(tmp_path / "no-fstab", tmp_path / "no-mountinfo")
    assert table == MountTable(expected=frozenset(), mounted=frozenset())
    assert table.unmounted_under(tmp_path) == []


def test_the_mount_points_seen_under_the_folder_are_remembered_until_their_folder_is_gone(tmp_path) -> None:
    images, record = tmp_path / "images", tmp_path / "processed" / ".mount-points"
    (images / "nas").mkdir(parents=True)
    (images / "usb").mkdir()
    (tmp_path / "processed").mkdir()
    mounted = MountTable(expected=frozenset(), mounted=frozenset({images / "nas", images / "usb", tmp_path / "other"}))
    assert remember_mounts(mounted, images, record).remembered == {images / "nas", images / "usb"}
    nothing = MountTable(expected=frozenset(), mounted=frozenset())
    later = remember_mounts(nothing, images, record)  # another process, after a reboot: read back
    assert later.unmounted_under(images) == [images / "nas", images / "usb"]
    (images / "usb").rmdir()  # taken away on purpose
    assert remember_mounts(nothing, images, record).unmounted_under(images) == [images / "nas"]
    assert remember_mounts(nothing, images, record).remembered == {images / "nas"}


def test_a_record_that_cannot_be_read_or_written_costs_only_the_memory(tmp_path) -> None:
    images = tmp_path / "images"
    (images / "nas").mkdir(parents=True)
    garbled = tmp_path / "garbled"
    garbled.write_text("not json")
    mounted = MountTable(expected=frozenset(), mounted=frozenset({images / "nas"}))
    assert remember_mounts(mounted, images, garbled).remembered == {images / "nas"}
    garbled.write_text("not json")
    assert remember_mounts(MountTable(frozenset(), frozenset()), images, garbled).remembered == set()
    assert garbled.read_text() == "[]\n"  # written again: said once, not at every rescan
    assert remember_mounts(mounted, images, tmp_path / "no-such-folder" / "record").remembered == {images / "nas"}
