#!/usr/bin/env python3
"""Keeps `mirror_verify` running back to back on one mirror while a host
benchmark runs, and counts the passes that finished.

One process on one admin-socket connection for the whole run: polling by
spawning the CLI (and a JSON reader) a few times a second took a tenth of a
vCPU on this 2-vCPU machine and showed up as the verify's cost to the host.

Usage: verify-loop.py SOCKET MIRROR RATE_BPS PASSES_FILE
(runs until killed; appends a line "pass" to PASSES_FILE per finished pass)
"""
import sys
import time

from admin_rpc import AdminSocket

POLL_S = 0.1


def main():
    path, mirror, rate, passes_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    admin = AdminSocket(path)
    while True:
        admin.call("mirror_verify", {"name": mirror, "rate": rate})  # refused while one runs: fine
        while True:
            time.sleep(POLL_S)
            job = admin.call("mirror_verify_get", {"name": mirror}).get("result") or {}
            if not job.get("active", False):
                break
        if job.get("state") == "finished":
            with open(passes_file, "a") as f:
                f.write("pass\n")


if __name__ == "__main__":
    main()
