"""The ASGI benchmark: the FastAPI example behind nginx, served by the gateway as ASGI, by
uvicorn (HTTP behind nginx's proxy_pass), and by the gateway as WSGI through a2wsgi.

`bench/run --asgi` sets things up (venv, release build) and calls this; see bench/README.md.
Each run starts a fresh server and a fresh nginx, so the peak RSS is that of the run alone. The
load comes from ApacheBench (`ab -k`, keep-alive to nginx); nginx keeps its upstream
connections alive too (FCGI_KEEP_CONN, HTTP/1.1 keepalive), 1 worker. The server runs on one
CPU, nginx and ab on the other.
"""

import argparse
import csv
import datetime
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "fastapi_app")
PEERS = os.path.join(ROOT, "bench", "peers")

SCENARIOS = {
    "hello": ("FastAPI hello", "/hello", "Hello, World!\n"),
    "sleep": ("FastAPI `await asyncio.sleep(0.1)`", "/sleep?seconds=0.1", '{"slept":0.1}'),
}

SERVERS = {
    "asgi": "wfastcgi serve, ASGI",
    "uvicorn": "uvicorn (uvloop, httptools)",
    "a2wsgi": "wfastcgi serve, WSGI via a2wsgi",
}


def web_config(folder, handler, python_path):
    with open(os.path.join(folder, "web.config"), "w", encoding="utf-8") as f:
        f.write(
            '<?xml version="1.0" encoding="utf-8"?>\n<configuration>\n  <appSettings>\n'
            f'    <add key="WSGI_HANDLER" value="{handler}" />\n'
            f'    <add key="PYTHONPATH" value="{python_path}" />\n'
            '    <add key="WSGI_RESTART_FILE_REGEX" value="" />\n'
            "  </appSettings>\n</configuration>\n")


def server_command(opts, name, folder, sock):
    """argv and nginx's location block for `name` listening on the Unix socket `sock`."""
    if name == "uvicorn":
        argv = [os.path.join(opts.venv, "bin", "uvicorn"), "main:app", "--uds", sock,
                "--workers", str(opts.processes), "--loop", "uvloop", "--http", "httptools",
                "--no-access-log", "--log-level", "warning", "--app-dir", EXAMPLE]
        location = ("proxy_pass http://app; proxy_http_version 1.1; "
                    'proxy_set_header Connection ""; proxy_set_header Host $host;')
        return argv, location, "server unix:%s; keepalive 128;" % sock
    if name == "asgi":
        web_config(folder, "main.app", EXAMPLE)
        threads = []
    else:
        web_config(folder, "fastapi_wsgi.application", EXAMPLE + ":" + PEERS)
        threads = ["--threads", str(opts.wsgi_threads)]
    processes = ["--processes", str(opts.processes)] if opts.processes > 1 else []
    argv = [opts.gateway, "serve", "--bind", "unix:" + sock, "--app-dir", folder,
            "--venv", opts.venv] + threads + processes
    location = ("fastcgi_pass app; fastcgi_keep_conn on; "
                "include %s;" % os.path.join(folder, "fastcgi_params"))
    with open(os.path.join(folder, "fastcgi_params"), "w", encoding="utf-8") as f:
        for name_, value in [("REQUEST_METHOD", "$request_method"),
                             ("REQUEST_URI", "$request_uri"),
                             ("QUERY_STRING", "$query_string"),
                             ("CONTENT_TYPE", "$content_type"),
                             ("CONTENT_LENGTH", "$content_length"),
                             ("SCRIPT_NAME", "$fastcgi_script_name"),
                             ("SERVER_PROTOCOL", "$server_protocol"),
                             ("SERVER_NAME", "$server_name"),
                             ("SERVER_PORT", "$server_port"),
                             ("REMOTE_ADDR", "$remote_addr"),
                             ("HTTP_HOST", "$host")]:
            f.write(f"fastcgi_param {name_} {value};\n")
    return argv, location, "server unix:%s; keepalive 128;" % sock


def nginx_config(folder, port, upstream, location):
    run = os.path.join(folder, "nginx")
    os.makedirs(run, exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""
    path = os.path.join(run, "nginx.conf")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"""{user}
worker_processes 1;
daemon off;
pid {run}/nginx.pid;
error_log {run}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {run}/body;
    fastcgi_temp_path {run}/fastcgi;
    proxy_temp_path {run}/proxy;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    keepalive_requests 1000000;
    upstream app {{ {upstream} }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ {location} }}
    }}
}}
""")
    return run, path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpu):
    return (lambda: os.sched_setaffinity(0, [cpu])) if cpu is not None else None


def tree(pid):
    """pid and its descendants."""
    found = [pid]
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                text=True).stdout.split():
        found += tree(int(child))
    return found


def peak_rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rollup_mib(pid, field):
    """A field of /proc/PID/smaps_rollup. `Private_Dirty`: memory written by this process alone
    (its heap, its objects), what each further process adds whatever else runs; clean pages
    (code, read-only data) are shared with every process that maps the same file. `Pss`: the
    process's share of all its pages, so the sum over processes is the memory they use."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def wait_answer(url, expected, limit=60):
    import urllib.request
    deadline = time.monotonic() + limit
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.read().decode() == expected:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer {expected!r} from {url}")
        time.sleep(0.1)


def stop(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ab(opts, url, clients, cpu, folder):
    """One timed ab run: req/s, p50 and p99 in ms, failed requests, requests done."""
    percentiles = os.path.join(folder, "ab.csv")
    argv = ["ab", "-q", "-k", "-c", str(clients), "-t", str(opts.duration), "-n", "10000000",
            "-s", "30", "-e", percentiles, url]
    out = subprocess.run(argv, capture_output=True, text=True, preexec_fn=pinned(cpu))
    text = out.stdout + out.stderr

    def number(label):
        m = re.search(label + r":\s+([\d.]+)", text)
        return float(m.group(1)) if m else 0.0

    table = {}
    if os.path.exists(percentiles):
        with open(percentiles, encoding="utf-8") as f:
            for row in list(csv.reader(f))[1:]:
                table[int(float(row[0]))] = float(row[1])
    # ab's CSV reads past its samples for the top percentiles of a run of under 100 requests
    # (it writes 0 there); its text table, in whole ms, does not.
    for percent in (50, 99):
        if not table.get(percent):
            m = re.search(r"^\s+%d%%\s+(\d+)" % percent, text, re.M)
            table[percent] = float(m.group(1)) if m else None
    # ab counts a 503 both as non-2xx and as a failure (its length differs from the first
    # answer's): the larger of the two is the number of bad answers.
    failed = int(max(number("Failed requests"), number("Non-2xx responses")))
    requests = int(number("Complete requests"))
    # Only good answers count: a server that refuses fast would otherwise look fast.
    good = number("Requests per second") * (requests - failed) / requests if requests else 0.0
    return {"rps": good, "p50": table.get(50), "p99": table.get(99), "failed": failed,
            "requests": requests, "ab": text if out.returncode else ""}


def run_one(opts, scenario, server, clients, log):
    _, path, expected = SCENARIOS[scenario]
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = (cpus[-1], cpus[0]) if opts.pin and len(cpus) > 1 else (None, None)
    with tempfile.TemporaryDirectory(prefix="wfastcgi-asgi-bench-") as folder:
        sock = os.path.join(folder, "app.sock")
        argv, location, upstream = server_command(opts, server, folder, sock)
        app = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                               preexec_fn=pinned(server_cpu))
        port = free_port()
        run, conf = nginx_config(folder, port, upstream, location)
        nginx = subprocess.Popen(["nginx", "-p", run, "-c", conf], stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=log, preexec_fn=pinned(client_cpu))
        try:
            url = f"http://127.0.0.1:{port}{path}"
            wait_answer(url, expected)
            result = ab(opts, url, clients, client_cpu, folder)
            pids = tree(app.pid)
            result["rss"] = [round(peak_rss_mib(pid), 1) for pid in pids]
            result["dirty"] = [round(rollup_mib(pid, "Private_Dirty"), 1) for pid in pids]
            result["pss"] = round(sum(rollup_mib(pid, "Pss") for pid in pids), 1)
        finally:
            stop(nginx)
            stop(app)
    return result


def fmt(value, digits=0):
    return "–" if value is None else f"{value:,.{digits}f}"


def machine():
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu})"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--venv", required=True)
    parser.add_argument("--duration", type=int, default=5, help="seconds per timed run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--clients", default="1,10,100")
    parser.add_argument("--only", default="hello,sleep")
    parser.add_argument("--servers", default="asgi,uvicorn,a2wsgi")
    parser.add_argument("--wsgi-threads", type=int, default=100,
                        help="the gateway's --threads for a2wsgi, which blocks a thread per "
                             "request in flight (the ASGI rows run with the default)")
    parser.add_argument("--processes", type=int, default=1,
                        help="worker processes of each server (--processes, uvicorn --workers)")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "results-asgi.md"))
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "results-asgi.json"))
    parser.add_argument("--log", default=os.path.join(ROOT, "bench", "servers-asgi.log"))
    parser.add_argument("--command", default="bench/run --asgi")
    opts = parser.parse_args()
    clients = [int(c) for c in opts.clients.split(",")]
    servers = opts.servers.split(",")
    started = datetime.datetime.now(datetime.timezone.utc)
    runs = {}
    with open(opts.log, "w", encoding="utf-8") as log:
        for round_ in range(opts.rounds):
            for scenario in opts.only.split(","):
                for count in clients:
                    # The order rotates each round.
                    order = servers[round_ % len(servers):] + servers[:round_ % len(servers)]
                    for server in order:
                        result = run_one(opts, scenario, server, count, log)
                        runs.setdefault(f"{scenario}/{count}/{server}", []).append(result)
                        print(f"{scenario:6} c={count:<3} {SERVERS[server]:34} "
                              f"{result['rps']:9.1f} req/s  p99 {fmt(result['p99'], 1)} ms  "
                              f"failed {result['failed']}  rss {result['rss']}  "
                              f"private dirty {result['dirty']}  pss {result['pss']}",
                              file=sys.stderr, flush=True)
    with open(opts.json, "w", encoding="utf-8") as f:
        json.dump(runs, f, indent=1)

    lines = [f"`{opts.command}`, {started:%Y-%m-%d %H:%M} UTC, {machine()}; "
             f"{opts.rounds} round(s) of {opts.duration} s per run (medians), "
             f"`ab -k` through nginx (1 worker), the server on one CPU and nginx with ab on "
             f"the other; a2wsgi runs with `--threads {opts.wsgi_threads}`, the ASGI gateway with "
             f"its defaults; {opts.processes} worker process(es) each (`--processes`, uvicorn "
             f"`--workers`), a supervisor or master beside them when more than one. PSS sums every "
             f"process of a server (supervisor or master included). Good req/s counts 2xx answers of the right length only; bad "
             f"answers are summed over the rounds; p50/p99 are over all answers.", "",
             "| endpoint | clients | server | good req/s | p50 ms | p99 ms | bad answers | "
             "peak RSS MiB per process | private dirty MiB per process | PSS MiB, all processes |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
    for scenario in opts.only.split(","):
        for count in clients:
            for server in servers:
                results = runs.get(f"{scenario}/{count}/{server}", [])
                if not results:
                    continue
                rps = statistics.median(r["rps"] for r in results)
                p50 = [r["p50"] for r in results if r["p50"] is not None]
                p99 = [r["p99"] for r in results if r["p99"] is not None]
                rss = max((r["rss"] for r in results), key=sum)
                dirty = max((r.get("dirty", []) for r in results), key=sum)
                pss = max(r.get("pss", 0.0) for r in results)
                lines.append(
                    f"| {SCENARIOS[scenario][0]} | {count} | {SERVERS[server]} | {fmt(rps)} | "
                    f"{fmt(statistics.median(p50) if p50 else None, 1)} | "
                    f"{fmt(statistics.median(p99) if p99 else None, 1)} | "
                    f"{sum(r['failed'] for r in results)} | "
                    f"{' + '.join(fmt(x, 1) for x in rss)} | "
                    f"{' + '.join(fmt(x, 1) for x in dirty)} | {fmt(pss, 1)} |")
    table = "\n".join(lines) + "\n"
    with open(opts.output, "w", encoding="utf-8") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
