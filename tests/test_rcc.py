"""Tests for scripts/extract_gcompris.py and the vendored photo set in data/gcompris."""

import csv
import hashlib
import importlib.util
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "gcompris"


def load_script():
    """Return scripts/extract_gcompris.py imported as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("extract_gcompris", ROOT / "scripts" / "extract_gcompris.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


extract = load_script()


def build_rcc(files):
    """Return the bytes of a version-3 Qt .rcc holding files {path: (bytes, compress)}.

    Nodes are numbered breadth first, so each directory's children are
    contiguous, as rcc lays them out.
    """
    tree = {}
    for path in files:
        parts = path.split("/")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = path

    names, name_offsets = bytearray(), {}

    def name_offset(name):
        if name not in name_offsets:
            name_offsets[name] = len(names)
            encoded = name.encode("utf-16-be")
            # The hash is not checked by read_rcc, so any value will do.
            names.extend(struct.pack(">HI", len(encoded) // 2, 0) + encoded)
        return name_offsets[name]

    data = bytearray()
    nodes = [None]  # index 0 is the root, filled in below
    queue = [(0, "", tree)]
    while queue:
        index, name, children = queue.pop(0)
        first = len(nodes)
        nodes.extend([None] * len(children))
        offset = name_offset(name) if index else 0
        nodes[index] = struct.pack(">iHiiq", offset, 2, len(children), first, 0)
        for child_index, (child, value) in enumerate(sorted(children.items()), start=first):
            if isinstance(value, dict):
                queue.append((child_index, child, value))
                continue
            payload, compress = files[value]
            if compress:
                payload = struct.pack(">I", len(payload)) + zlib.compress(payload)
            data_offset = len(data)
            data.extend(struct.pack(">I", len(payload)) + payload)
            nodes[child_index] = struct.pack(">iHhhiq", name_offset(child), int(compress), 0, 1, data_offset, 0)

    header_size = 24
    data_at = header_size
    names_at = data_at + len(data)
    tree_at = names_at + len(names)
    header = b"qres" + struct.pack(">5i", 3, tree_at, data_at, names_at, 0)
    return header + bytes(data) + bytes(names) + b"".join(nodes)


def test_read_rcc_recovers_paths_and_bytes(tmp_path):
    files = {
        "top.txt": (b"plain text at the root", False),
        "a/b/photo.webp": (bytes(range(256)) * 40, True),
        "a/b/raw.bin": (b"\x00\x01\x02qres\xff", False),
        "a/empty": (b"", False),
        "a/caf\u00e9 \u03b1.txt": ("non-ASCII name".encode(), True),
    }
    path = tmp_path / "synthetic.rcc"
    path.write_bytes(build_rcc(files))
    assert extract.read_rcc(path) == {name: content for name, (content, _) in files.items()}


def test_read_rcc_rejects_wrong_magic(tmp_path):
    path = tmp_path / "bad.rcc"
    path.write_bytes(b"RIFF" + bytes(40))
    with pytest.raises(extract.ExtractError, match="magic"):
        extract.read_rcc(path)


@pytest.mark.parametrize("text, expected", [
    ("Public Domain", "Public Domain"),
    ("Public domain", "Public Domain"),
    ("CC0-1.0", "CC0-1.0"),
    ("CC-BY-SA 4.0", "CC-BY-SA-4.0"),
    ("CC-BY-SA-4.0", "CC-BY-SA-4.0"),
    ("GPLv2+", "GPL-2.0-or-later"),
    ("GPLv3", "GPL-3.0-only"),
    ("", "unstated"),
])
def test_normalise_licence(text, expected):
    assert extract.normalise_licence(text) == expected


@pytest.mark.parametrize("stem, expected", [
    ("hammer3", "hammer"),
    ("fish12", "fish"),
    ("red_panda", "red_panda"),
    ("IndiaGate", "india_gate"),
    ("leaningTowerOfPisa", "leaning_tower_of_pisa"),
    ("chateaudeChambord", "chateau_de_chambord"),
    ("palaisdesPapes", "palais_des_papes"),
    ("greatWallofChina", "great_wall_of_china"),
    ("windmill11", "windmill"),
])
def test_label_for(stem, expected):
    assert extract.label_for(stem) == expected


def test_parse_readme_handles_both_layouts():
    text = (
        "Copyright: A. Author\n"
        "Source: https://commons.wikimedia.org/wiki/File:X.jpg\n"
        "License: Public domain\n"
        "Files:\n"
        "egypt/one.webp\n"
        "egypt/two.webp\n"
        "\n"
        "Files: three.webp\n"
        "License: CC-BY-SA 4.0\n"
        "Copyright: B. Author\n"
        "Comments: cropping\n"
    )
    entries = extract.parse_readme(text, "res")
    assert sorted(entries) == ["res/egypt/one.webp", "res/egypt/two.webp", "res/three.webp"]
    assert entries["res/egypt/two.webp"] == {
        "author": "A. Author",
        "source": "https://commons.wikimedia.org/wiki/File:X.jpg",
        "licence": "Public Domain",
    }
    assert entries["res/three.webp"]["licence"] == "CC-BY-SA-4.0"


def test_vendored_manifest_matches_files():
    with open(DATA / "manifest.csv", newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        assert reader.fieldnames == extract.MANIFEST_COLUMNS
        rows = list(reader)

    assert rows, "empty manifest"
    assert [row["file"] for row in rows] == sorted(row["file"] for row in rows)
    assert {row["licence"] for row in rows} <= {"Public Domain", "CC0-1.0"}
    digests = [row["sha256"] for row in rows]
    assert len(set(digests)) == len(digests), "duplicate sha256 in manifest"
    for row in rows:
        path = DATA / row["file"]
        assert path.is_file(), row["file"]
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"], row["file"]
        assert row["file"].split("/")[0] == row["category"]
        with Image.open(path) as image:
            assert image.size == (int(row["width"]), int(row["height"])), row["file"]
    on_disk = {p.relative_to(DATA).as_posix() for p in DATA.glob("*/*") if p.is_file()}
    assert on_disk == {row["file"] for row in rows}, "files on disk not in the manifest"
