#!/usr/bin/env python3
"""Extract the Public Domain and CC0 photos of Debian's gcompris-qt-data into a folder.

Usage:
    python scripts/extract_gcompris.py --out data/gcompris [--deb PATH]

Without --deb the package is fetched with ``apt-get download`` into a temporary
directory. The .deb is unpacked with ``dpkg-deb -x``; the photos are read out of
the Qt resource (.rcc) files with a small standard-library parser, matched to
their README licence entries, and only Public Domain / CC0 photos are kept.
Each kept photo is written byte for byte (WebP) to ``OUT/<category>/<name>``,
together with ``OUT/manifest.csv`` and the data card ``OUT/README.md``.
Output is deterministic: running the script twice gives identical files.

Dependencies: the standard library and Pillow (to read image sizes and to check
that every photo decodes).
"""

import argparse
import collections
import csv
import fnmatch
import hashlib
import io
import os
import posixpath
import re
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from PIL import Image

PACKAGE = "gcompris-qt-data"
VERSION = "3.1-2"
RCC_DIR = "usr/share/gcompris-qt/rcc"

_ACT = "gcompris/src/activities"
# (rcc file, folder inside it, category). Only the full-frame photo folders:
# the category icons (alphabets.webp, numbers.webp), SVG drawings and sounds
# in the same .rcc files are left out because they are not in these folders
# or are not .webp files.
PHOTO_FOLDERS = [
    ("categorization.rcc", f"{_ACT}/categorization/resource/images/fishes", "fishes"),
    ("categorization.rcc", f"{_ACT}/categorization/resource/images/monuments", "monuments"),
    ("categorization.rcc", f"{_ACT}/categorization/resource/images/others", "others"),
    ("categorization.rcc", f"{_ACT}/categorization/resource/images/renewable", "renewable"),
    ("categorization.rcc", f"{_ACT}/categorization/resource/images/tools", "tools"),
    ("erase.rcc", f"{_ACT}/erase/resource", "erase_animals"),
    ("explore_farm_animals.rcc", f"{_ACT}/explore_farm_animals/resource/animals", "farm_animals"),
    ("explore_monuments.rcc", f"{_ACT}/explore_monuments/resource/egypt", "monuments_egypt"),
    ("explore_monuments.rcc", f"{_ACT}/explore_monuments/resource/france", "monuments_france"),
    ("explore_monuments.rcc", f"{_ACT}/explore_monuments/resource/germany", "monuments_germany"),
    ("explore_monuments.rcc", f"{_ACT}/explore_monuments/resource/india", "monuments_india"),
    ("explore_monuments.rcc", f"{_ACT}/explore_monuments/resource/usa", "monuments_usa"),
    ("explore_monuments.rcc", f"{_ACT}/explore_monuments/resource/wonders", "monuments_wonders"),
    ("explore_world_animals.rcc", f"{_ACT}/explore_world_animals/resource/animals", "world_animals"),
]

# Two README entries misspell the file they describe; the Wikimedia sources
# (Schraubenzieher.jpg, Trier_Konstantinbasilika = the Aula Palatina) and the
# photos confirm the match. Without this both photos would have no licence.
README_TYPOS = {
    f"{_ACT}/categorization/resource/images/tools/screDriver.webp":
        f"{_ACT}/categorization/resource/images/tools/screwDriver.webp",
    f"{_ACT}/explore_monuments/resource/germany/audaPalatina.webp":
        f"{_ACT}/explore_monuments/resource/germany/aulaPalatina.webp",
}

KEPT_LICENCES = ("Public Domain", "CC0-1.0")
UNSTATED = "unstated"
MANIFEST_COLUMNS = ["file", "label", "category", "source", "author", "licence",
                    "sha256", "width", "height", "rcc"]

# Qt resource tree node flags (qresource.cpp).
_RCC_COMPRESSED = 0x01
_RCC_DIRECTORY = 0x02
_RCC_COMPRESSED_ZSTD = 0x04
_RCC_NODE_SIZE = 22


class ExtractError(Exception):
    """A step of the extraction failed; the message says which and why."""


# --------------------------------------------------------------------------- rcc

def read_rcc(path):
    """Return {resource path: file bytes} for every file in a Qt .rcc (format version 3).

    Resource paths are the directory names joined with "/", without a leading
    slash, e.g. "gcompris/src/activities/erase/resource/bee.webp".
    """
    blob = Path(path).read_bytes()
    if blob[:4] != b"qres":
        raise ExtractError(f"{path}: not a Qt resource file (magic {blob[:4]!r}, expected b'qres')")
    if len(blob) < 24:
        raise ExtractError(f"{path}: truncated header")
    version, tree, data, names, _flags = struct.unpack_from(">5i", blob, 4)
    if version != 3:
        raise ExtractError(f"{path}: rcc format version {version}, only version 3 is supported")

    def name_at(offset):
        length, _hash = struct.unpack_from(">HI", blob, names + offset)
        start = names + offset + 6
        return blob[start:start + 2 * length].decode("utf-16-be")

    def payload_at(offset, flags, where):
        (size,) = struct.unpack_from(">I", blob, data + offset)
        raw = blob[data + offset + 4:data + offset + 4 + size]
        if len(raw) != size:
            raise ExtractError(f"{path}: {where}: data runs past the end of the file")
        if flags & _RCC_COMPRESSED_ZSTD:
            raise ExtractError(f"{path}: {where}: zstd-compressed entries are not supported")
        if flags & _RCC_COMPRESSED:
            # qCompress format: big-endian uncompressed length, then a zlib stream.
            (expected,) = struct.unpack_from(">I", raw)
            raw = zlib.decompress(raw[4:])
            if len(raw) != expected:
                raise ExtractError(f"{path}: {where}: inflated to {len(raw)} bytes, expected {expected}")
        return raw

    files = {}
    # Depth-first walk from the root node (index 0, which has no name).
    stack = [(0, "")]
    try:
        while stack:
            index, prefix = stack.pop()
            node = tree + _RCC_NODE_SIZE * index
            name_offset, flags = struct.unpack_from(">iH", blob, node)
            name = name_at(name_offset) if index else ""
            where = posixpath.join(prefix, name)
            if flags & _RCC_DIRECTORY:
                count, first = struct.unpack_from(">ii", blob, node + 6)
                stack.extend((child, where) for child in range(first, first + count))
            else:
                _country, _language, offset = struct.unpack_from(">hhi", blob, node + 6)
                files[where] = payload_at(offset, flags, where)
    except (struct.error, zlib.error, UnicodeDecodeError) as error:
        raise ExtractError(f"{path}: corrupt resource tree or data: {error}") from None
    return files


# ------------------------------------------------------------------------ README

_README_KEYS = ("copyright", "source", "license", "files", "comments")


def parse_readme(text, folder):
    """Return {resource path pattern: {"author", "source", "licence"}} from a GCompris README.

    A README is a list of blank-line separated blocks of "Key: value" lines
    (Copyright, Source, License, Comments, Files) in any order; the file names
    follow "Files:" on the same line and/or on the next lines and may be glob
    patterns relative to the README's folder.
    """
    blocks, block, key = [], {}, None
    for line in text.splitlines() + [""]:
        line = line.strip()
        match = re.match(r"([A-Za-z]+):\s*(.*)$", line)
        field = match.group(1).lower() if match else None
        if not line or (field in _README_KEYS and field in block):
            # A blank line, or a key seen twice without a blank line, ends a block.
            if block:
                blocks.append(block)
            block, key = {}, None
        if not line:
            continue
        if field in _README_KEYS:
            key = field
            block.setdefault(key, []).append(match.group(2))
        elif key is not None:
            block[key].append(line)
        else:
            raise ExtractError(f"README in {folder}: line outside any field: {line!r}")

    entries = {}
    for block in blocks:
        meta = {
            "author": " ".join(" ".join(block.get("copyright", [])).split()),
            "source": " ".join(block.get("source", [])).strip(),
            "licence": normalise_licence(" ".join(block.get("license", []))),
        }
        for name in " ".join(block.get("files", [])).replace(",", " ").split():
            pattern = posixpath.join(folder, name)
            if pattern in entries:
                raise ExtractError(f"README in {folder}: {name} is listed twice")
            entries[pattern] = meta
    return entries


def normalise_licence(text):
    """Return an SPDX-style licence identifier for a README licence string.

    "Public domain" -> "Public Domain", "CC0" -> "CC0-1.0", "CC-BY-SA 4.0" ->
    "CC-BY-SA-4.0", "GPLv2+" -> "GPL-2.0-or-later"; "unstated" when empty.
    """
    token = re.sub(r"[\s_]+", "-", text.strip()).upper()
    if not token:
        return UNSTATED
    if token in ("PUBLIC-DOMAIN", "PD"):
        return "Public Domain"
    if token in ("CC0", "CC0-1.0"):
        return "CC0-1.0"
    gpl = re.fullmatch(r"GPL-?V?(\d)(?:\.0)?(\+)?", token)
    if gpl:
        return f"GPL-{gpl.group(1)}.0-{'or-later' if gpl.group(2) else 'only'}"
    return token


def readme_entries(files):
    """Return {resource path pattern: metadata} from every README in one .rcc's files.

    Known misspelt file names (README_TYPOS) are corrected.
    """
    entries = {}
    for path in sorted(files):
        if posixpath.basename(path) == "README":
            text = files[path].decode("utf-8")
            for pattern, meta in parse_readme(text, posixpath.dirname(path)).items():
                entries[README_TYPOS.get(pattern, pattern)] = meta
    return entries


def lookup(entries, path):
    """Return the README metadata whose file pattern matches a resource path, or None."""
    if path in entries:
        return entries[path]
    for pattern in sorted(entries):
        if fnmatch.fnmatchcase(path, pattern):
            return entries[pattern]
    return None


# ------------------------------------------------------------------------ labels

_PARTICLE = re.compile(r"(?<=[a-z]{3})(of|de|du|des)$")


def label_for(stem):
    """Return a snake_case class name for a file stem ("hammer3" -> "hammer").

    Trailing digits are dropped, camelCase is split into words, and the
    particles GCompris glues to the previous word ("chateaudeChambord",
    "statueofLiberty") are split off.
    """
    words = []
    for word in re.split(r"[\s_\-.]+|(?<=[a-z])(?=[A-Z])", re.sub(r"\d+$", "", stem)):
        if not word:
            continue
        if words and words[-1].islower() and word[:1].isupper():
            # The previous word was followed by a capital: split a glued particle.
            head = _PARTICLE.split(words.pop())
            words.extend(part for part in head if part)
        words.append(word.lower())
    return "_".join(words)


# ------------------------------------------------------------------------ package

def run(command, what, cwd=None):
    """Return the stdout of a command; raise ExtractError with its stderr if it fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=cwd)
    except FileNotFoundError:
        raise ExtractError(f"{what}: {command[0]} not found (a Debian/Ubuntu system is needed)") from None
    if done.returncode != 0:
        raise ExtractError(f"{what} failed (exit {done.returncode}): {' '.join(command)}\n"
                           f"{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def download_deb(directory):
    """Return the path of gcompris-qt-data VERSION downloaded with apt-get into directory."""
    spec = f"{PACKAGE}={VERSION}"
    try:
        # apt-get download always saves into the current directory.
        run(["apt-get", "download", spec], f"apt-get download {spec}", cwd=directory)
    except ExtractError as error:
        raise ExtractError(f"{error}\n(Hint: run 'apt-get update' first, or pass --deb PATH.)") from None
    debs = sorted(Path(directory).glob(f"{PACKAGE}_*.deb"))
    if len(debs) != 1:
        raise ExtractError(f"apt-get download left {len(debs)} {PACKAGE} .deb files in {directory}")
    return debs[0]


def unpack_deb(deb, directory):
    """Return the rcc folder of the package after checking it and unpacking it into directory."""
    fields = run(["dpkg-deb", "-f", str(deb), "Package", "Version"], f"dpkg-deb -f {deb}")
    info = dict(line.split(": ", 1) for line in fields.splitlines() if ": " in line)
    if (info.get("Package"), info.get("Version")) != (PACKAGE, VERSION):
        raise ExtractError(f"{deb} is {info.get('Package')} {info.get('Version')}, "
                           f"expected {PACKAGE} {VERSION}")
    run(["dpkg-deb", "-x", str(deb), str(directory)], f"dpkg-deb -x {deb}")
    rcc_dir = Path(directory) / RCC_DIR
    if not rcc_dir.is_dir():
        raise ExtractError(f"{deb} has no {RCC_DIR}")
    return rcc_dir


# ------------------------------------------------------------------------ select

def collect(rcc_dir):
    """Return (kept, seen, dropped, orphans) for the photo folders of the .rcc files in rcc_dir.

    kept: photo records sorted by file (the manifest fields plus "data", the
    bytes); seen: Counter of the licences of all candidate photos; dropped:
    (rcc path, reason) pairs; orphans: README .webp entries in the photo
    folders that name no photo.
    """
    candidates, dropped, seen, orphans = [], [], collections.Counter(), []
    by_rcc = collections.defaultdict(list)
    for rcc_name, folder, category in PHOTO_FOLDERS:
        by_rcc[rcc_name].append((folder, category))
    for rcc_name in sorted(by_rcc):
        files = read_rcc(rcc_dir / rcc_name)
        entries = readme_entries(files)
        for folder, category in by_rcc[rcc_name]:
            photos = sorted(p for p in files
                            if posixpath.dirname(p) == folder and p.endswith(".webp"))
            if not photos:
                raise ExtractError(f"{rcc_name}: no .webp photos in {folder}")
            orphans += [f"{rcc_name}:/{pattern}" for pattern in sorted(entries)
                        if posixpath.dirname(pattern) == folder and pattern.endswith(".webp")
                        and not any(fnmatch.fnmatchcase(p, pattern) for p in photos)]
            for path in photos:
                where = f"{rcc_name}:/{path}"
                meta = lookup(entries, path) or {"author": "", "source": "", "licence": UNSTATED}
                seen[meta["licence"]] += 1
                if meta["licence"] not in KEPT_LICENCES:
                    dropped.append((where, f"licence {meta['licence']}"))
                    continue
                name = posixpath.basename(path)
                width, height = decoded_size(files[path], where)
                candidates.append({
                    "file": f"{category}/{name}",
                    "label": label_for(posixpath.splitext(name)[0]),
                    "category": category,
                    "source": meta["source"],
                    "author": meta["author"],
                    "licence": meta["licence"],
                    "sha256": hashlib.sha256(files[path]).hexdigest(),
                    "width": width,
                    "height": height,
                    "rcc": where,
                    "data": files[path],
                })
    kept, duplicates = deduplicate(candidates)
    return kept, seen, dropped + duplicates, orphans


def deduplicate(records):
    """Return (kept records sorted by file, (rcc path, reason) for each duplicate dropped).

    Records with the same bytes, or the same source URL (one photograph in two
    sizes, e.g. the small categorization copy of a monument), are kept once:
    the largest in pixels, ties broken by file name.
    """
    best_first = sorted(records, key=lambda r: (-r["width"] * r["height"], r["file"]))
    kept, dropped, by_hash, by_source = [], [], {}, {}
    for record in best_first:
        twin = by_hash.get(record["sha256"]) or by_source.get(record["source"])
        if twin is not None:
            same = "bytes" if twin["sha256"] == record["sha256"] else "source"
            dropped.append((record["rcc"], f"same {same} as {twin['file']}"))
            continue
        kept.append(record)
        by_hash[record["sha256"]] = record
        if record["source"]:
            by_source[record["source"]] = record
    kept.sort(key=lambda r: r["file"])
    dropped.sort()
    return kept, dropped


def decoded_size(data, where):
    """Return (width, height) of an image after checking that Pillow fully decodes it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.size
    except Exception as error:  # Pillow raises several unrelated types for bad data
        raise ExtractError(f"{where}: Pillow cannot decode it: {error}") from None


# ------------------------------------------------------------------------ output

def write_atomic(path, data):
    """Return True if path was (re)written with data, False if it already held exactly data."""
    path = Path(path)
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise
    return True


def manifest_bytes(kept):
    """Return manifest.csv as bytes (UTF-8, "\\n" line ends, rows sorted by file)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, MANIFEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(kept)
    return text.getvalue().encode("utf-8")


def span(values):
    """Return "min-max" of numbers, or the single value when they are all equal."""
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def card_bytes(kept, seen, dropped, deb_sha256):
    """Return the data card README.md as bytes."""
    by_category = collections.Counter(r["category"] for r in kept)
    by_licence = collections.Counter(r["licence"] for r in kept)
    by_reason = collections.Counter(reason.removeprefix("licence ") for _, reason in dropped
                                    if reason.startswith("licence "))
    duplicates = [(where, reason) for where, reason in dropped if reason.startswith("same ")]
    total = sum(len(r["data"]) for r in kept)
    widths = [r["width"] for r in kept]
    heights = [r["height"] for r in kept]
    small = [r for r in kept
             if r["category"] in ("fishes", "monuments", "others", "renewable", "tools")]
    small_long = max(max(r["width"], r["height"]) for r in small)
    small_short = [min(r["width"], r["height"]) for r in small]
    lines = [
        "# GCompris photos (default image set)",
        "",
        f"{len(kept)} photographs ({total / 1e6:.1f} MB, WebP, bytes unchanged) taken from the Debian",
        f"package `{PACKAGE}` version {VERSION} (Debian 12 \"bookworm\", `main`), .deb sha256",
        f"`{deb_sha256}`.",
        "GCompris is the KDE educational suite; each photo's author, source (mostly Wikimedia",
        "Commons) and licence come from the `README` next to it inside the package's Qt resource",
        "files (`usr/share/gcompris-qt/rcc/*.rcc`).",
        "",
        "`manifest.csv` has one row per file: `file`, `label` (class name from the file name),",
        "`category`, `source`, `author`, `licence`, `sha256`, `width`, `height`, and `rcc` (the",
        "`.rcc` file and resource path it came from).",
        f"There are {len({r['label'] for r in kept})} distinct labels.",
        "",
        "## Selection",
        "",
        "- Full-frame photos only: the `.webp` files of the photo folders of `categorization.rcc`",
        "  (fishes, monuments, others, renewable, tools), `explore_monuments.rcc` (one folder per",
        "  country plus wonders), `explore_world_animals.rcc`, `explore_farm_animals.rcc` and",
        "  `erase.rcc`. Category icons (`alphabets.webp`, `numbers.webp`), SVG drawings, sounds and",
        "  the other activities' images (e.g. `details.rcc`, `paintings.rcc`) are not used.",
        f"- Licence filter: only photos whose README licence is {' or '.join(KEPT_LICENCES)}",
        "  (licence strings normalised, e.g. `Public domain` -> `Public Domain`).",
        "- README typos: two entries misspell their file (`screDriver.webp` for",
        "  `screwDriver.webp`, `germany/audaPalatina.webp` for `germany/aulaPalatina.webp`); they",
        "  are matched to those photos (both Public Domain).",
        "- Duplicates are kept once, the largest copy: same bytes, or the same source URL (one",
        "  photograph at two sizes, the small one in `monuments`).",
        "",
        f"Licences of the {sum(seen.values())} candidate photos: "
        + ", ".join(f"{name} {count}" for name, count in sorted(seen.items(), key=lambda i: (-i[1], i[0])))
        + ".",
        "Dropped for their licence: "
        + (", ".join(f"{name} {count}" for name, count in sorted(by_reason.items())) or "none")
        + ".",
        "Dropped as duplicates: "
        + (", ".join(f"`{where.split(':/')[0]}:.../{posixpath.basename(where)}` ({reason})"
                     for where, reason in duplicates) or "none")
        + ".",
        "",
        "## Counts",
        "",
        "| category | photos | width (px) | height (px) |",
        "|---|---:|---|---|",
    ]
    for category in sorted(by_category):
        rows = [r for r in kept if r["category"] == category]
        w = [r["width"] for r in rows]
        h = [r["height"] for r in rows]
        lines.append(f"| {category} | {len(rows)} | {span(w)} | {span(h)} |")
    lines += [
        f"| **total** | **{len(kept)}** | {span(widths)} | {span(heights)} |",
        "",
        "| licence | photos |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {count} |" for name, count in sorted(by_licence.items())]
    lines += [
        "",
        "## Caveats",
        "",
        "- The `categorization` photos (fishes, monuments, others, renewable, tools) are small",
        f"  (long side at most {small_long} px, short side {span(small_short)} px): they need",
        "  upscaling to 224 px.",
        "- `fish1`...`fish28` carry no species name: their label is `fish`.",
        "- Labels come from the file names, not from ImageNet; only some match an ImageNet class.",
        "- Public Domain claims are the GCompris authors' reading of the Wikimedia pages.",
        "",
        "## Regenerate",
        "",
        "```",
        "python scripts/extract_gcompris.py --out data/gcompris",
        "```",
        "",
        f"This runs `apt-get download {PACKAGE}={VERSION}` (needs `apt-get update` and the Debian",
        "archive; or pass `--deb PATH` to an already downloaded .deb), `dpkg-deb -x`, parses the",
        ".rcc files and READMEs, and rewrites this folder, including this card. The output is",
        "deterministic.",
        "",
    ]
    return "\n".join(lines).encode("utf-8")


def remove_stale(out, keep):
    """Return the photos removed from out's category folders because they are no longer kept."""
    removed = []
    for category in sorted({category for _, _, category in PHOTO_FOLDERS}):
        for path in sorted((out / category).glob("*.webp")):
            if path.relative_to(out).as_posix() not in keep:
                path.unlink()
                removed.append(path)
    return removed


# ------------------------------------------------------------------------ main

def main(argv=None):
    """Return the process exit status after extracting the photo set."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder, e.g. data/gcompris")
    parser.add_argument("--deb", type=Path, help=f"a downloaded {PACKAGE}_{VERSION}_all.deb "
                        "(default: apt-get download it into a temporary folder)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="gcompris-") as work:
            deb = args.deb if args.deb else download_deb(work)
            if not Path(deb).is_file():
                raise ExtractError(f"{deb}: no such file")
            deb_sha256 = hashlib.sha256(Path(deb).read_bytes()).hexdigest()
            kept, seen, dropped, orphans = collect(unpack_deb(deb, Path(work) / "root"))
    except ExtractError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    out = args.out
    written = sum(write_atomic(out / r["file"], r["data"]) for r in kept)
    written += write_atomic(out / "manifest.csv", manifest_bytes(kept))
    written += write_atomic(out / "README.md", card_bytes(kept, seen, dropped, deb_sha256))
    removed = remove_stale(out, {r["file"] for r in kept})

    print(f"{PACKAGE} {VERSION}: {sum(seen.values())} candidate photos, "
          f"{len(kept)} kept, {len(dropped)} dropped")
    print("licences seen: " + ", ".join(f"{k} {v}" for k, v in sorted(seen.items())))
    for where, reason in dropped:
        print(f"  dropped {where}: {reason}")
    for where in orphans:
        print(f"  warning: README entry {where} names no photo")
    print("kept by category: " + ", ".join(
        f"{k} {v}" for k, v in sorted(collections.Counter(r["category"] for r in kept).items())))
    print(f"{sum(len(r['data']) for r in kept)} bytes of photos; {written} files written, "
          f"{len(removed)} stale photos removed; {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
