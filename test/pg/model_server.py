#!/usr/bin/env python3
"""
model_server.py DIR PORT_FILE LOG_FILE [--cut-after N] [--no-range]

A local stand-in for Hugging Face's resolve/main URLs, for
test/pg/demo_download.sh: serves the files of DIR on 127.0.0.1 (a free
port, written to PORT_FILE), with the headers the demo's download relies
on: Content-Length, an ETag and X-Linked-Etag holding the file's SHA-256 in
quotes (as Hugging Face sends for large files), and byte ranges
("Range: bytes=N-") unless --no-range.

--cut-after N: the first GET of pytorch_model.bin announces the full length
but sends only N bytes, then closes the connection (an interrupted
download).  Every request is appended to LOG_FILE as "METHOD PATH RANGE".
Only the standard library.
"""

import hashlib
import http.server
import os
import sys


def main():
    directory, port_file, log_file = sys.argv[1:4]
    cut_after = None
    ranges = True
    args = sys.argv[4:]
    while args:
        a = args.pop(0)
        if a == "--cut-after":
            cut_after = int(args.pop(0))
        elif a == "--no-range":
            ranges = False
        else:
            sys.exit(__doc__)
    digests = {}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            digests[name] = hashlib.sha256(f.read()).hexdigest()
    state = {"cut": cut_after}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def respond(self, body):
            name = self.path.rsplit("/", 1)[-1]
            with open(log_file, "a") as log:
                log.write("%s %s %s\n" % (self.command, self.path,
                                          self.headers.get("Range", "-")))
            if name not in digests:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            with open(os.path.join(directory, name), "rb") as f:
                data = f.read()
            start = 0
            rng = self.headers.get("Range")
            if ranges and rng and rng.startswith("bytes=") and rng.endswith("-"):
                start = int(rng[6:-1])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", "bytes */%d" % len(data))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(data) - 1, len(data)))
            else:
                self.send_response(200)
            if ranges:
                self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("ETag", '"%s"' % digests[name])
            self.send_header("X-Linked-Etag", '"%s"' % digests[name])
            self.end_headers()
            if not body:
                return
            part = data[start:]
            if name == "pytorch_model.bin" and state["cut"] is not None:
                part = part[:state["cut"]]
                state["cut"] = None
                self.wfile.write(part)
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(part)

        def do_HEAD(self):
            self.respond(False)

        def do_GET(self):
            self.respond(True)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(port_file + ".tmp", port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
