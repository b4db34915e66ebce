"""One JSON-RPC connection to a daemon's admin socket (newline-delimited
JSON-RPC 2.0), for the benchmark helpers that poll the daemon while
something is being timed: one process and one connection for the whole
wait, instead of starting the CLI per call."""
import json
import socket
import sys


class AdminSocket:
    def __init__(self, path, timeout_s=30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A daemon that stops answering fails the wait instead of hanging
        # the benchmark (socket.timeout out of call()).
        self.sock.settimeout(timeout_s)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")
        self.next_id = 0

    def call(self, method, params):
        """The whole answer: a dict with "result" or "error"."""
        self.next_id += 1
        req = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        line = self.reader.readline()
        if not line:
            sys.exit("the daemon closed the admin socket")
        return json.loads(line)
