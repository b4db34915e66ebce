#!/usr/bin/env python3
"""Keeps `mirror_verify` running back to back on one mirror while a host
benchmark runs, and counts the passes that finished.

One process on one admin-socket connection for the whole run: polling by
spawning the CLI (and a JSON reader) a few times a second took a tenth of a
vCPU on this 2-vCPU machine and showed up as the verify's cost to the host.

Usage: verify-loop.py SOCKET MIRROR RATE_BPS PASSES_FILE
(runs until killed; appends a line "pass" to PASSES_FILE per finished pass)
"""
import json
import socket
import sys
import time

POLL_S = 0.1


def main():
    path, mirror, rate, passes_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    reader = sock.makefile("rb")
    next_id = 0

    def call(method, params):
        nonlocal next_id
        next_id += 1
        req = {"jsonrpc": "2.0", "id": next_id, "method": method, "params": params}
        sock.sendall(json.dumps(req).encode() + b"\n")
        line = reader.readline()
        if not line:
            sys.exit("verify-loop: the daemon closed the admin socket")
        return json.loads(line)

    while True:
        call("mirror_verify", {"name": mirror, "rate": rate})  # refused while one runs: fine
        while True:
            time.sleep(POLL_S)
            job = call("mirror_verify_get", {"name": mirror}).get("result") or {}
            if not job.get("active", False):
                break
        if job.get("state") == "finished":
            with open(passes_file, "a") as f:
                f.write("pass\n")


if __name__ == "__main__":
    main()
