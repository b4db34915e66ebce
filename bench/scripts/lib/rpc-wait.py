#!/usr/bin/env python3
"""Polls one admin-socket call until a value in its answer matches, over one
connection, and prints the last answer (JSON).

The benchmarks time data movers (resync, rebuild, verify) on the same two
vCPUs the daemons use. Polling by starting the CLI and a JSON reader every
50 ms cost tens of milliseconds of CPU per poll, a large part of a vCPU taken
from what was being timed; one process for the whole wait costs a syscall
pair per poll.

Usage: rpc-wait.py SOCKET METHOD PARAMS_JSON PATH=VALUE [TIMEOUT_S [INTERVAL_S]]
PATH is dot-separated keys and list indices into the result (e.g.
0.legs.0.state); VALUE is compared with str() of what is there (True/False
for booleans). Exits 1 on timeout (printing the last answer) or on an
error answer.
"""
import json
import sys
import time

from admin_rpc import AdminSocket


def dig(value, path):
    for key in path.split("."):
        if isinstance(value, list):
            if not key.lstrip("-").isdigit():
                return None
            idx = int(key)
            value = value[idx] if -len(value) <= idx < len(value) else None
        elif isinstance(value, dict):
            value = value.get(key)
        else:
            return None
    return value


def main():
    if len(sys.argv) < 5 or "=" not in sys.argv[4]:
        sys.exit(__doc__)
    path, method, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    key, want = sys.argv[4].split("=", 1)
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 300.0
    interval = float(sys.argv[6]) if len(sys.argv) > 6 else 0.05
    admin = AdminSocket(path)
    deadline = time.monotonic() + timeout
    while True:
        answer = admin.call(method, params)
        if "error" in answer:
            print(json.dumps(answer["error"]))
            sys.exit(1)
        result = answer.get("result")
        if str(dig(result, key)) == want:
            print(json.dumps(result))
            return
        if time.monotonic() >= deadline:
            print(json.dumps(result))
            sys.exit(1)
        time.sleep(interval)


if __name__ == "__main__":
    main()
