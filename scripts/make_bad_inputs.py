#!/usr/bin/env python3
"""Writes tests/fixtures/bad_inputs/: small hostile image files for the bad-input
corpus test (tests/http_bad_inputs.rs). Standard library only; derived from the
committed fixture images, so re-running gives the same bytes.

    python3 scripts/make_bad_inputs.py
"""
import struct
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "bad_inputs"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, rows: bytes, declared=None) -> bytes:
    """An 8-bit grayscale PNG; `declared` overrides the size the header claims."""
    w, h = declared or (width, height)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def gray_rows(width: int, height: int) -> bytes:
    return b"".join(b"\x00" + bytes((x * 7 + y * 13) % 256 for x in range(width)) for y in range(height))


def garble(data: bytes, start: int, end: int) -> bytes:
    """XORs data[start:end] with 0x5A: headers intact, payload broken."""
    mid = bytes(b ^ 0x5A for b in data[start:end])
    return data[:start] + mid + data[end:]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    jpg = (FIXTURES / "images" / "exif_rotated.jpg").read_bytes()
    gif = (FIXTURES / "images" / "palette.gif").read_bytes()
    webp = (FIXTURES / "preprocess" / "inputs" / "anim.webp").read_bytes()
    good_png = png(20, 14, gray_rows(20, 14))
    files = {
        # A valid 20x14 PNG, the base of the PNG cases.
        "ok.png": good_png,
        # Truncated: the first half of a valid file.
        "truncated.png": good_png[: len(good_png) // 2],
        "truncated.jpg": jpg[: len(jpg) // 2],
        "truncated.gif": gif[: len(gif) // 2],
        "truncated.webp": webp[: len(webp) // 2],
        # Corrupt: headers intact, compressed payload garbled.
        "corrupt.png": garble(good_png, 41, len(good_png) - 12),
        "corrupt.jpg": garble(jpg, 20, len(jpg) - 2),
        "corrupt.gif": garble(gif, 800, len(gif) - 1),
        "corrupt.webp": garble(webp, 60, len(webp)),
        # Decompression bombs: tiny files whose headers declare huge images.
        "bomb_100000x100000.png": png(1, 1, gray_rows(1, 1), declared=(100_000, 100_000)),
        "bomb_65535x65535.gif": gif[:6] + struct.pack("<HH", 65535, 65535) + gif[10:],
        "bomb_20000x20000.webp": webp[:24] + (19999).to_bytes(3, "little") * 2 + webp[30:],
        "bomb_60000x60000.jpg": sof_patched(jpg, 60000, 60000),
        # Degenerate but valid sizes.
        "tiny_1x1.png": png(1, 1, gray_rows(1, 1)),
        "strip_1x10000.png": png(1, 10000, gray_rows(1, 10000)),
        # Not a supported raster image.
        "vector.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
                      b'<rect width="64" height="64" fill="red"/></svg>\n',
        "text.txt": b"this is plain text, not an image\n",
    }
    for name, data in files.items():
        (OUT / name).write_bytes(data)
    print(f"wrote {len(files)} files to {OUT.relative_to(ROOT)}")


def sof_patched(jpg: bytes, width: int, height: int) -> bytes:
    """A JPEG whose SOF0/SOF2 frame header claims width x height."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = jpg.find(marker)
        if at >= 0:
            return jpg[: at + 5] + struct.pack(">HH", height, width) + jpg[at + 9:]
    raise SystemExit("no SOF marker")


if __name__ == "__main__":
    main()
