#!/usr/bin/env python3
"""Extract the uncompressed ELF vmlinux from an x86 bzImage.

Usage: extract-vmlinux.py BZIMAGE OUTPUT

Written for mirrorpoint's interop harness: scans the bzImage for the magic
bytes of each compressor the kernel supports, tries to decompress from every
candidate offset and keeps the first result that is an ELF file. QEMU boots
an ELF vmlinux directly through its PVH entry point, which skips the
in-guest decompression (slow under TCG).
"""
import bz2
import gzip
import lzma
import os
import shutil
import subprocess
import sys
import zlib

ELF_MAGIC = b"\x7fELF"


def try_gzip(data):
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    return d.decompress(data)


def try_xz(data):
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def try_lzma(data):
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)


def try_bzip2(data):
    return bz2.BZ2Decompressor().decompress(data)


def try_external(cmd):
    def run(data):
        if shutil.which(cmd[0]) is None:
            raise RuntimeError(f"{cmd[0]} not installed")
        # The stream is followed by unrelated bytes; the tool may complain
        # about them after writing the good part, so ignore its exit code.
        p = subprocess.run(cmd, input=data, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, check=False)
        return p.stdout
    return run


# (name, magic, decoder)
FORMATS = [
    ("gzip", b"\x1f\x8b\x08", try_gzip),
    ("xz", b"\xfd7zXZ\x00", try_xz),
    ("zstd", b"\x28\xb5\x2f\xfd", try_external(["zstd", "-dc"])),
    ("lzma", b"\x5d\x00\x00\x00", try_lzma),
    ("bzip2", b"BZh", try_bzip2),
    ("lz4", b"\x02\x21\x4c\x18", try_external(["lz4", "-dc"])),
    ("lzo", b"\x89LZO", try_external(["lzop", "-dc"])),
]


def candidates(data):
    for name, magic, fn in FORMATS:
        start = 0
        while True:
            off = data.find(magic, start)
            if off < 0:
                break
            yield off, name, fn
            start = off + 1


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    src, dst = sys.argv[1], sys.argv[2]
    with open(src, "rb") as f:
        data = f.read()
    if data.startswith(ELF_MAGIC):
        shutil.copyfile(src, dst)
        print(f"{src} is already an ELF file; copied")
        return 0
    # Try offsets in file order: the real payload comes first, magic bytes
    # found later are usually inside the compressed stream.
    tried = []
    for off, name, fn in sorted(candidates(data), key=lambda c: c[0]):
        try:
            out = fn(data[off:])
        except Exception as e:  # noqa: BLE001 - any failure means "not here"
            tried.append(f"{name}@{off}: {e.__class__.__name__}")
            continue
        if out[:4] == ELF_MAGIC:
            with open(dst + ".tmp", "wb") as f:
                f.write(out)
            os.replace(dst + ".tmp", dst)
            print(f"extracted {len(out)} bytes of ELF ({name} at offset {off}) to {dst}")
            return 0
        tried.append(f"{name}@{off}: not ELF")
    print(f"error: no compressed ELF kernel found in {src}; tried: "
          + ", ".join(tried[:20]), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
