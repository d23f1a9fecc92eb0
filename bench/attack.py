#!/usr/bin/env python3
"""The attacks of issue 13 that stalled or bloated the gateway, against one wfastcgi binary,
with the figures BENCHMARKS.md reports ("Attacks"). Stdlib only; it uses tests/apps.

    python3 bench/attack.py BINARY slow             4 heads sent a byte every 100-150 ms
    python3 bench/attack.py BINARY junk             4 streams of GET_VALUES/unknown records, as slowly
    python3 bench/attack.py BINARY silent [K=V]     8 connections that never read 200 MB answers
    python3 bench/attack.py BINARY params [PACE]    3 rounds of 8 x 9000 pairs in 12-byte records
    python3 bench/attack.py BINARY burst N [K=V]    N concurrent 1 s requests, --processes 2
"""
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

APPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "apps")


def record(rtype, rid, content=b""):
    return struct.pack(">BBHHBB", 1, rtype, rid, len(content), 0, 0) + content


def pair(name, value):
    def length(n):
        return bytes([n]) if n < 128 else struct.pack(">I", n | 0x80000000)
    return length(len(name)) + length(len(value)) + name + value


def params_for(app_dir, url="/"):
    path, _, query = url.partition("?")
    return [
        (b"REQUEST_METHOD", b"GET"), (b"SCRIPT_NAME", b""), (b"PATH_INFO", path.encode()),
        (b"QUERY_STRING", query.encode()), (b"REQUEST_URI", url.encode()),
        (b"SERVER_NAME", b"localhost"), (b"SERVER_PORT", b"80"),
        (b"SERVER_PROTOCOL", b"HTTP/1.1"), (b"REMOTE_ADDR", b"127.0.0.1"),
    ]


def request(pairs, rid=1, keep=False):
    stream = b"".join(pair(n, v) for n, v in pairs)
    out = record(1, rid, struct.pack(">HB5x", 1, 1 if keep else 0))
    for i in range(0, len(stream), 65535):
        out += record(4, rid, stream[i:i + 65535])
    return out + record(4, rid) + record(5, rid)


def answered(sock):
    """Reads until END_REQUEST; the body's first bytes, or None."""
    buf = b""
    body = b""
    while True:
        while len(buf) >= 8:
            _, rtype, _, clen, plen, _ = struct.unpack(">BBHHBB", buf[:8])
            if len(buf) < 8 + clen + plen:
                break
            content = buf[8:8 + clen]
            buf = buf[8 + clen + plen:]
            if rtype == 6:
                body += content
            if rtype == 3:
                return body
        try:
            chunk = sock.recv(65536)
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk


def get(port, pairs, timeout, ok_only=False):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(request(pairs))
            body = answered(s)
    except OSError:
        return None
    if ok_only and body is not None and b"Status: 200" not in body:
        return None
    return body


class Gateway:
    def __init__(self, binary, handler, settings=(), args=()):
        self.dir = tempfile.mkdtemp(prefix="attack")
        adds = "".join(f'<add key="{k}" value="{v}"/>' for k, v in
                       [("WSGI_HANDLER", handler), ("PYTHONPATH", APPS),
                        ("WSGI_LOG", self.dir + "/log"), *settings])
        with open(self.dir + "/web.config", "w") as f:
            f.write(f"<configuration><appSettings>{adds}</appSettings></configuration>")
        self.proc = subprocess.Popen([binary, "serve", "--bind", "127.0.0.1:0", "--app-dir",
                                      self.dir, *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port = None
        for _ in range(600):
            log = self.log()
            if "listening on 127.0.0.1:" in log and "loaded" in log:
                self.port = int(log.split("listening on 127.0.0.1:")[1].split()[0])
                break
            time.sleep(0.05)
        if "--processes" in args:
            while self.log().count("ready (pid") < 2:
                time.sleep(0.05)
        time.sleep(0.3)

    def log(self):
        try:
            with open(self.dir + "/log") as f:
                return f.read()
        except OSError:
            return ""

    def rss(self, pid=None):
        with open(f"/proc/{pid or self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024

    def stop(self):
        import re
        self.proc.kill()
        self.proc.wait()
        # Workers the old binary leaves behind a killed supervisor.
        for pid in re.findall(r"ready \(pid (\d+)\)", self.log()):
            try:
                os.kill(int(pid), 9)
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def trickle(port, data, stop, pause):
    try:
        s = socket.create_connection(("127.0.0.1", port))
        for i in range(len(data)):
            if stop.is_set():
                break
            s.sendall(data[i:i + 1])
            time.sleep(pause())
    except OSError:
        pass


def probe(g, label, n=20, timeout=5):
    plain = params_for(g.dir)
    ok = 0
    started = time.time()
    for _ in range(n):
        if get(g.port, plain, timeout, ok_only=True) is not None:
            ok += 1
    print(f"{label}: {ok}/{n} plain requests answered 200 ({n - ok} stalled past {timeout}s), "
          f"{time.time() - started:.1f}s", flush=True)


def slow(binary, junk=False):
    """Item 1: 4 slow connections (= --threads 4), one byte every 100-150 ms."""
    g = Gateway(binary, "hello.app", args=["--threads", "4"])
    stop = threading.Event()
    if junk:
        gv = record(9, 0, pair(b"FCGI_MAX_CONNS", b""))
        data = (gv + record(99 % 256, 0, b"12345678")) * 2000
    else:
        data = request(params_for(g.dir) + [(b"HTTP_X_PAD", b"p" * 3000)])
    import random
    threads = [threading.Thread(target=trickle, args=(g.port, data, stop,
                                                      lambda: random.uniform(0.1, 0.15)))
               for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1)
    probe(g, "junk records" if junk else "slow heads")
    stop.set()
    g.stop()


def silent(binary, settings=()):
    """Item 2: 8 connections ask for 200 MB and never read."""
    g = Gateway(binary, "stream.app", settings=settings, args=["--threads", "4"])
    socks = []
    big = params_for(g.dir, "/?n=3200&size=65536")
    for _ in range(8):
        s = socket.create_connection(("127.0.0.1", g.port))
        s.sendall(request(big))
        socks.append(s)
    started = time.time()
    time.sleep(0.5)
    probe(g, "8 silent readers", n=5, timeout=5)
    small = params_for(g.dir, "/?n=1&size=5")
    while time.time() - started < 150:
        if get(g.port, small, 2, ok_only=True) is not None:
            print(f"8 silent readers: service back {time.time() - started:.0f}s after the attack",
                  flush=True)
            break
    else:
        print("8 silent readers: service not back after 150s", flush=True)
    print("   log:", g.log().count("WSGI_SEND_TIMEOUT"), "send time-out lines", flush=True)
    for s in socks:
        s.close()
    g.stop()


def tiny_params(binary, pace=0.0):
    """Item 3: 3 rounds of 8 connections x 9 000 pairs, each pair a 12-byte record in its own
    write."""
    g = Gateway(binary, "hello.app", args=["--threads", "4"])
    print(f"tiny params: RSS at start {g.rss()} MB", flush=True)
    base = params_for(g.dir)
    pairs = [(b"%c" % (65 + i % 26), b"%c" % (97 + i % 26)) for i in range(9000)]

    def one():
        s = socket.create_connection(("127.0.0.1", g.port))
        s.sendall(record(1, 1, struct.pack(">HB5x", 1, 0)))
        for n, v in base:
            s.sendall(record(4, 1, pair(n, v)))
        for n, v in pairs:
            s.sendall(record(4, 1, pair(n, v)))
            if pace:
                time.sleep(pace)
        s.sendall(record(4, 1) + record(5, 1))
        answered(s)
        s.close()
    for round_ in range(3):
        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(0.5)
        print(f"tiny params: after round {round_ + 1} (8 x 9000 x 12-byte records = "
              f"{8 * 9000 * 12 // 1024} KiB): RSS {g.rss()} MB", flush=True)
    g.stop()


def burst(binary, n, settings=()):
    """Item 5: --processes 2, n concurrent 1 s requests."""
    g = Gateway(binary, "concurrency.sleepy", settings=settings, args=["--processes", "2"])
    results = []
    lock = threading.Lock()

    def one():
        body = get(g.port, params_for(g.dir, "/?sleep=1"), 60)
        with lock:
            results.append(body)
    started = time.time()
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = {}
    for body in results:
        if body is None:
            key = "no answer"
        elif b"Status: 503" in body:
            key = "503"
        else:
            key = "pid " + body.split(b"\r\n\r\n")[-1].decode()
        counts[key] = counts.get(key, 0) + 1
    print(f"burst of {n}: {time.time() - started:.1f}s, {json.dumps(counts)}", flush=True)
    g.stop()


if __name__ == "__main__":
    binary, attack = sys.argv[1], sys.argv[2]
    if attack == "slow":
        slow(binary)
    elif attack == "junk":
        slow(binary, junk=True)
    elif attack == "silent":
        silent(binary, settings=[tuple(a.split("=")) for a in sys.argv[3:]])
    elif attack == "params":  # PACE: seconds between records, so they are read one by one
        tiny_params(binary, float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
    elif attack == "burst":
        burst(binary, int(sys.argv[3]), settings=[tuple(a.split("=")) for a in sys.argv[4:]])
