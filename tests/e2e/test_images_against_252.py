"""Images, the real 252 decides: two pools made alike (a directory tree, a bare ext4 raw image,
a GPT raw image with a root partition, a raw file that is no image, a hidden and a read-only
one, a loop block device; and on btrfs with quota, with a subvolume), one for 252 (bind-mounted over /var/lib/machines in its mount namespace) and one for
ours (--image-root), and the same questions and changes to both. Times of day are each pool's
own and are taken out."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sdbus.sd_bus_internals import SdBus

from tests.helpers.client import IMAGE as IMG
from tests.helpers.client import MANAGER as MGR
from tests.helpers.client import MANAGER_PATH as M
from tests.helpers.client import PROPERTIES as PROPS
from tests.helpers.client import connect, outcome
from tests.helpers.images import Pool, make_node, make_tree
from tests.helpers.real252 import (
    REAL_MACHINED,
    difference,
    host_dirs,
    map_strings,
    side_by_side,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, mounts)")

NAMES = ["tree", "bare", "gpt", "junk", ".hidden", "ro", "sub", "blk"]  # sub: btrfs; blk: plain
TIMES = ("CreationTimestamp", "ModificationTimestamp")


def make_images(pool: Pool, kind: str) -> None:
    if kind == "btrfs":  # the pool a btrfs with quota, and a subvolume image in it
        pool.btrfs(quota=True)
        subprocess.run(["btrfs", "subvolume", "create", str(pool.pool / "sub")], check=True,
                       capture_output=True)
        (pool.pool / "sub/etc").mkdir()
        (pool.pool / "sub/etc/hostname").write_text("subhost\n")
        subprocess.run(["btrfs", "quota", "rescan", "-w", str(pool.pool)], check=True,
                       capture_output=True)
    pool.directory("tree", machine_id="0123456789abcdef0123456789abcdef")
    pool.bare_raw("bare")
    pool.gpt_raw("gpt")
    (pool.pool / "junk.raw").write_bytes(b"\0" * 65536)
    pool.directory(".hidden")
    ro = pool.bare_raw("ro")
    os.chmod(ro, 0o444)
    if kind == "plain":  # a block device image: a symlink to a loop device in the pool
        backing = pool.root / "blk.img"
        subprocess.run(["truncate", "-s", "16M", str(backing)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(pool.tree_source("blk")),
                        str(backing)], check=True)
        (pool.pool / "blk").symlink_to(pool.loop_device(backing))


@dataclass
class Pair:
    conns: dict[str, SdBus]
    env: dict[str, dict[str, str]]
    root: str  # ours' --image-root
    pools: dict[str, Path]  # each daemon's /var/lib/machines, as the host sees it


@pytest.fixture(scope="module", params=["plain", "btrfs"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    if not os.path.exists(REAL_MACHINED):
        pytest.fail(f"{REAL_MACHINED} is missing: the set-up installs systemd-container")
    pools = {"real": Pool(), "ours": Pool()}
    try:
        for p in pools.values():
            make_images(p, request.param)
        with host_dirs(), side_by_side("--scope-backend=cgroupfs",
                                       f"--image-root={pools['ours'].root}",
                                       pool=pools["real"].pool) as two:
            assert two.real_bus is not None
            buses = {"real": two.real_bus, "ours": two.ours_bus}
            yield Pair({who: connect(b) for who, b in buses.items()},
                       {who: b.env() for who, b in buses.items()}, str(pools["ours"].root),
                       {who: p.pool for who, p in pools.items()})
    finally:
        for p in pools.values():
            p.cleanup()


def plain(pair: Pair, who: str, value: Any) -> Any:
    """`value` without ours' pool root and each pool's own times."""
    root = pair.root if who == "ours" else ""
    return map_strings(value, lambda v: v.removeprefix(root), drop_keys=TIMES)


def both(pair: Pair, path: str, iface: str, member: str, sig: str = "",
         *args: Any) -> dict[str, Any]:
    return {who: plain(pair, who, outcome(conn, path, iface, member, sig, *args))
            for who, conn in pair.conns.items()}


def test_questions(pair: Pair) -> None:
    differ = []

    def check(answers: dict[str, Any], what: str) -> None:
        if answers["real"] != answers["ours"]:
            differ.append(difference(what, answers["real"], answers["ours"]))

    # name, type, read-only, (times), usage, path
    check({who: (kind, sorted((i[0], i[1], i[2], i[5], i[6]) for i in value[0]))
           for who, (kind, value) in both(pair, M, MGR, "ListImages").items()}, "ListImages")
    for name in NAMES:
        check(both(pair, M, MGR, "GetImage", "s", name), f"GetImage {name}")
        for member in ("GetImageHostname", "GetImageMachineID", "GetImageMachineInfo",
                       "GetImageOSRelease"):
            check(both(pair, M, MGR, member, "s", name), f"{member} {name}")
        path = f"{M}/image/{name.replace('.', '_2e')}"
        check(both(pair, path, PROPS, "GetAll", "s", IMG), f"GetAll {name}")
    assert not differ, "\n".join(differ)


def machinectl(pair: Pair, who: str, *args: str) -> str:
    out = subprocess.run(["machinectl", "--no-pager", *args], env=pair.env[who],
                         capture_output=True, text=True, timeout=60)
    text = f"rc={out.returncode}\n{out.stdout}\n{out.stderr}"
    if who == "ours":
        text = text.replace(pair.root, "")
    text = re.sub(r"\w{3} \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+(; [^\n]* ago)?", "TIME", text)
    return re.sub(r'"(created|modified)":\d+', "TIME", text)


@pytest.mark.parametrize("verb", [
    ["list-images"], ["list-images", "--all"], ["list-images", "--output=json"],
    *[["image-status", n] for n in NAMES], *[["show-image", n] for n in NAMES],
])
def test_machinectl(pair: Pair, verb: list[str]) -> None:
    assert machinectl(pair, "real", *verb) == machinectl(pair, "ours", *verb)


def test_changes(pair: Pair) -> None:
    differ = []
    for member, sig, args in [
            ("MarkImageReadOnly", "sb", ("bare", True)), ("GetImage", "s", ("bare",)),
            ("RenameImage", "ss", ("bare", "bare2")),  # read-only images can be renamed
            ("CloneImage", "ssb", ("bare2", "bare3", False)),
            ("GetImageOSRelease", "s", ("bare3",)),
            ("MarkImageReadOnly", "sb", ("bare2", False)),
            ("RemoveImage", "s", ("ro",)), ("RemoveImage", "s", ("bare3",)),
            ("CloneImage", "ssb", ("gpt", "gpt2", True)),
            ("GetImageHostname", "s", ("gpt2",)),
            ("RenameImage", "ss", ("tree", "gpt2")),
            ("CleanPool", "s", ("hidden",)), ("GetImage", "s", (".hidden",)),
            ("RemoveImage", "s", ("gpt2",)), ("RemoveImage", "s", ("junk",)),
            ("SetImageLimit", "st", ("sub", 1 << 30)), ("CloneImage", "ssb", ("sub", "sub2", False)),
            ("SetPoolLimit", "t", (1 << 31,)), ("RemoveImage", "s", ("sub2",))]:
        answers = both(pair, M, MGR, member, sig, *args)
        if answers["real"] != answers["ours"]:
            differ.append(difference(f"{member} {args}", answers["real"], answers["ours"]))
    for path, iface in ((f"{M}/image/sub", IMG), (M, MGR)):  # the limits set above
        answers = both(pair, path, PROPS, "GetAll", "s", iface)
        if answers["real"] != answers["ours"]:
            differ.append(difference(f"GetAll {path}", answers["real"], answers["ours"]))
    listing = {who: sorted(i[:3] for i in outcome(conn, M, MGR, "ListImages")[1][0])
               for who, conn in pair.conns.items()}
    assert listing["real"] == listing["ours"], listing
    assert not differ, "\n".join(differ)


def test_side_files(pair: Pair) -> None:
    """An image's .nspawn settings and .roothash next to it go with it: renamed, copied by a
    clone, removed with it, as 252 does."""
    for pool in pair.pools.values():
        for side in ("tree.nspawn", "gpt.nspawn", "gpt.roothash"):
            (pool / side).write_text(f"{side}\n")
    differ = []
    for member, sig, args in [("RenameImage", "ss", ("tree", "treeR")),
                              ("CloneImage", "ssb", ("gpt", "gptC", False)),
                              ("RenameImage", "ss", ("gptC", "gptD")),
                              ("RemoveImage", "s", ("gpt",))]:
        answers = both(pair, M, MGR, member, sig, *args)
        if answers["real"] != answers["ours"]:
            differ.append(difference(f"{member} {args}", answers["real"], answers["ours"]))
    left = {who: sorted((f.name, f.read_text() if f.is_file() and f.suffix != ".raw" else "")
                        for f in pool.iterdir())
            for who, pool in pair.pools.items()}
    assert left["real"] == left["ours"], left
    assert not differ, "\n".join(differ)


def same_metadata(pair: Pair, *names: str) -> None:
    for name in names:
        for member in ("GetImageHostname", "GetImageMachineID", "GetImageMachineInfo",
                       "GetImageOSRelease"):
            answers = both(pair, M, MGR, member, "s", name)
            assert answers["real"] == answers["ours"], \
                difference(f"{member} {name}", answers["real"], answers["ours"])


def remove_all(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# Contents of an image's /etc files that both must read alike (252's env-file parser, hostname
# clean-up, machine-id rules): for each, a directory image and a raw image of that tree.
HEX = "0123456789abcdef0123456789abcdef"
METADATA = [
    {"os-release": b"ID=foo # trailing\nNAME=\"quoted\" # c\nF=a\"b\"c\nB=\"x \\n y\"\n"
                   b"D=\"multi\nline\"\n1KEY=a\nK-Y=d\nexport EX=1\n",
     "hostname": b"Foo_Bar\n", "machine-id": HEX.encode() + b"\n\n"},
    {"os-release": b"ID=\xff\n", "machine-info": b"K\xff=1\nID=ok\n",
     "hostname": b"a..b.\n", "machine-id": HEX.encode()},
    {"os-release": b"ID=a\x00b\n", "machine-info": b"PRETTY='p q'\n",
     "hostname": b"# c\n\n-lead\n", "machine-id": b" " + HEX.encode() + b"\n"},
    {"os-release": None, "hostname": b"two words" + b"x" * 70 + b"\n",
     "machine-id": HEX.encode() + b" \n"},  # /etc/os-release a directory: not /usr/lib's
    # not regular files (a FIFO is left out: 252 would wait on it for good)
    {"os-release": "socket", "hostname": "null", "machine-id": "zero", "machine-info": "socket"},
    {"os-release": "zero", "hostname": None, "machine-info": "null"},
    {"os-release": "loop", "hostname": "loop"},
    {"hostname": "loop", "machine-info": "loop"},  # os-release fine: the rest passed over
    {"hostname": b"x" * (1 << 20) + b"\n"},  # a line of read_line()'s limit: no host name
    {"hostname": b"y" * ((1 << 20) - 1) + b"\n"},
]


@pytest.mark.parametrize("files", METADATA, ids=range(len(METADATA)))
def test_metadata_read_as_252(pair: Pair, files: dict[str, bytes | str | None]) -> None:
    tag = f"md{METADATA.index(files)}"
    made: list[Path] = []
    for pool in pair.pools.values():
        tree = pool.parent / f"src-{tag}"
        made.append(tree)
        make_tree(tree)
        (tree / "etc/os-release").unlink()
        for name, content in files.items():
            (tree / "etc" / name).unlink(missing_ok=True)
            if isinstance(content, bytes):
                (tree / "etc" / name).write_bytes(content)
            else:
                make_node(tree / "etc" / name, content or "dir")
        subprocess.run(["cp", "-a", str(tree), str(pool / tag)], check=True)
        raw = pool / f"{tag}r.raw"
        made += [pool / tag, raw]
        subprocess.run(["truncate", "-s", "8M", str(raw)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(raw)], check=True)
    try:
        same_metadata(pair, tag, f"{tag}r")
    finally:
        remove_all(made)


def test_a_raw_image_without_os_release(pair: Pair) -> None:
    """No os-release at all: 252 refuses the raw image (ENOMEDIUM), not the directory."""
    made = []
    for pool in pair.pools.values():
        tree = pool.parent / "src-noos"
        make_tree(tree)
        (tree / "etc/os-release").unlink()
        (tree / "usr/lib/os-release").unlink()
        raw = pool / "noosr.raw"
        subprocess.run(["truncate", "-s", "8M", str(raw)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(raw)], check=True)
        subprocess.run(["cp", "-a", str(tree), str(pool / "noosd")], check=True)
        made += [tree, raw, pool / "noosd"]
    try:
        same_metadata(pair, "noosd", "noosr")
    finally:
        remove_all(made)


def test_entries_that_do_not_stat(pair: Pair) -> None:
    """Only a missing entry is passed over: a symlink through a file fails GetImage, a symlink
    loop fails ListImages."""
    for pool in pair.pools.values():
        (pool / "notdir").symlink_to("junk.raw/x")
    try:
        differ = []
        answers = both(pair, M, MGR, "GetImage", "s", "notdir")
        if answers["real"] != answers["ours"]:
            differ.append(difference("GetImage notdir", answers["real"], answers["ours"]))
        for pool in pair.pools.values():
            (pool / "selfloop").symlink_to("selfloop")
        answers = both(pair, M, MGR, "ListImages")
        assert answers["real"][0] == "error", answers["real"]
        if answers["real"] != answers["ours"]:
            differ.append(difference("ListImages", answers["real"], answers["ours"]))
        assert not differ, "\n".join(differ)
    finally:
        for pool in pair.pools.values():
            for name in ("notdir", "selfloop"):
                (pool / name).unlink(missing_ok=True)


def test_names_that_are_not_utf8_to_systemd_are_passed_over(pair: Pair) -> None:
    """utf8_is_valid() refuses non-characters (U+FFFE, U+FDD0...) as well as bytes that are
    not UTF-8: such entries are no images, and ListImages goes on without them."""
    names = [b"nc\xef\xbf\xbe", b"nc\xef\xb7\x90", b"bad\xff"]
    for pool in pair.pools.values():
        for name in names:
            os.mkdir(os.path.join(os.fsencode(pool), name))
    try:
        answers = both(pair, M, MGR, "ListImages")
        assert answers["real"][0] == "ok" == answers["ours"][0], answers
        listed = {who: sorted(image[0] for image in answer[1][0])
                  for who, answer in answers.items()}
        assert listed["real"] == listed["ours"], listed
        assert not any(name.startswith(("nc", "bad")) for name in listed["ours"]), listed
    finally:
        for pool in pair.pools.values():
            for name in names:
                os.rmdir(os.path.join(os.fsencode(pool), name))


GENERIC = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
ROOT_AARCH64 = "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"
# Disks with 16 MiB partitions: (partition table, [(type, GPT attributes, host name of the
# ext4 in it, or None for no file system)]).
LAYOUTS: dict[str, tuple[str, list[tuple[str, str, str | None]]]] = {
    "twogeneric": ("gpt", [(GENERIC, "", "one"), (GENERIC, "", "two")]),
    "armroot": ("gpt", [(ROOT_AARCH64, "", "arm")]),
    "armgeneric": ("gpt", [(GENERIC, "", "gen"), (ROOT_AARCH64, "", "arm")]),
    "noauto": ("gpt", [(ROOT_X86_64, "GUID:63", "noauto")]),
    "noautoplus": ("gpt", [(ROOT_X86_64, "GUID:63", "first"), (ROOT_X86_64, "", "second")]),
    "nofs": ("gpt", [(ROOT_X86_64, "", None)]),
    "dos": ("dos", [("83", "", "dos")]),
}


def make_disk(path: Path, work: Path, label: str,
              parts: list[tuple[str, str, str | None]]) -> None:
    sectors = 32768
    subprocess.run(["truncate", "-s", f"{2 + 16 * len(parts)}M", str(path)], check=True)
    script = f"label: {label}\n" + "".join(
        f"start={2048 + i * sectors}, size={sectors}, type={kind}"
        + (f', attrs="{attrs}"' if attrs else "") + "\n"
        for i, (kind, attrs, _host) in enumerate(parts))
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True,
                   capture_output=True)
    for i, (_kind, _attrs, host) in enumerate(parts):
        offset = (2048 + i * sectors) * 512
        if host is None:
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(os.urandom(1 << 20))
            continue
        tree = make_tree(work / f"{path.stem}-{i}", hostname=f"{host}host")
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), "-E", f"offset={offset}",
                        str(path), "16M"], check=True)


def test_partition_tables_read_as_252(pair: Pair) -> None:
    """Which partition 252's dissect takes, and its errors, for disks of several layouts."""
    made: list[Path] = []
    for pool in pair.pools.values():
        work = pool.parent / "src-disks"
        work.mkdir()
        made.append(work)
        for name, (label, parts) in LAYOUTS.items():
            made.append(pool / f"pt{name}.raw")
            make_disk(pool / f"pt{name}.raw", work, label, parts)
    try:
        differ = []
        for name in LAYOUTS:
            answers = both(pair, M, MGR, "GetImageHostname", "s", f"pt{name}")
            if answers["real"] != answers["ours"]:
                differ.append(difference(name, answers["real"], answers["ours"]))
        assert not differ, "\n".join(differ)
    finally:
        remove_all(made)
