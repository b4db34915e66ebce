#!/usr/bin/env python3
"""Resolve kernel module names to files, dependencies first.

Usage: modules.py MODULES_DIR NAME...

MODULES_DIR is lib/modules/KVER of an unpacked kernel with a modules.dep
(setup.sh makes one with busybox depmod). Prints one path per line, relative
to MODULES_DIR, in an order that can be loaded with insmod (every module
after the modules it depends on), each module once. A name may use '-' or
'_' interchangeably, as modprobe allows. A name that is built into the
kernel (modules.builtin) is skipped. An unknown name is an error.
"""
import os
import sys


def norm(name):
    return name.replace("-", "_")


def modname(path):
    base = os.path.basename(path)
    for ext in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    return norm(base)


def main():
    if len(sys.argv) < 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    mdir = sys.argv[1]
    deps = {}
    path_of = {}
    with open(os.path.join(mdir, "modules.dep")) as f:
        for line in f:
            if ":" not in line:
                continue
            mod, rest = line.split(":", 1)
            mod = mod.strip()
            deps[mod] = rest.split()
            path_of[modname(mod)] = mod
    builtin = set()
    try:
        with open(os.path.join(mdir, "modules.builtin")) as f:
            builtin = {modname(line.strip()) for line in f if line.strip()}
    except FileNotFoundError:
        pass

    out, seen = [], set()

    def visit(path, stack):
        if path in seen:
            return
        if path in stack:
            raise SystemExit(f"error: dependency cycle at {path}")
        for d in deps.get(path, []):
            visit(d, stack | {path})
        seen.add(path)
        out.append(path)

    for name in sys.argv[2:]:
        n = norm(name)
        if n in path_of:
            visit(path_of[n], frozenset())
        elif n in builtin:
            continue
        else:
            print(f"error: kernel module '{name}' not found in {mdir}/modules.dep",
                  file=sys.stderr)
            return 1
    for p in out:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
