"""Runs the benchmark scenarios against the gateway and its peers and writes a Markdown table.

`bench/run` sets things up (venv, release build, driver) and calls this; see bench/README.md.
Each scenario runs for every server in turn, round after round (the order rotates each round),
each run with a freshly started server, so the peak RSS is that of the scenario alone.
Medians over the rounds are reported for rates and latencies; the peak RSS is the largest seen.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket as socketlib
import statistics
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20
GIB = 1 << 30


# ---------------------------------------------------------------------------------------------
# Servers


class Server:
    """One server under test.

    `spawn` servers get requests on fd 0 from the driver (IIS's way); `connect` servers listen
    on a Unix socket (or, `tcp`, on 127.0.0.1), and the driver makes one connection per request
    (nginx's default; uWSGI closes the connection after each response anyway). Unix sockets for
    most: no Nagle delays (flup sets no TCP_NODELAY) and the same kind of socket as the spawn
    mode's socketpair; the TCP rows are the issue's "bound TCP socket, both sides the same".
    """

    def __init__(self, name, mode, pair, command, tcp=False):
        self.name = name
        self.mode = mode  # "spawn" or "connect"
        # Whose row the "ours / peer" ratios of this row compare with (None: this is ours).
        self.pair = pair
        # (paths, app_dir, address) -> (argv, extra environment); address is `unix:/path` or
        # `127.0.0.1:PORT`.
        self._command = command
        self.tcp = tcp

    def command(self, paths, app_dir, address=None):
        return self._command(paths, app_dir, address)


def unix_path(address):
    """uWSGI and flup take a socket path without the `unix:` of `--bind`."""
    return address[len("unix:"):] if address.startswith("unix:") else address


def ours_listening(p, app, address):
    return ([p.gateway, "serve", "--bind", address, "--app-dir", app, "--venv", p.venv,
             "--threads", "1"], {})


def uwsgi(p, app, address):
    return ([p.uwsgi, "--fastcgi-socket", unix_path(address), "--wsgi-file",
             os.path.join(p.peers, "uwsgi_app.py"), "--home", p.venv, "--disable-logging"],
            {"BENCH_APP_DIR": app})


def servers():
    return {
        "floor": Server(
            "floor (Rust, no Python)", "spawn", "ours", lambda p, app, sock: ([p.floor], {})
        ),
        "ours": Server(
            "wfastcgi (fd 0)",
            "spawn",
            None,
            lambda p, app, sock: ([p.gateway, "--venv", p.venv], {}),
        ),
        "wfastcgi.py": Server(
            "wfastcgi.py 3.0.0 (fd 0)",
            "spawn",
            "ours",
            lambda p, app, sock: ([p.python, os.path.join(p.peers, "wfastcgi_linux.py")], {}),
        ),
        "floor-unix": Server(
            "floor (Rust, no Python), unix",
            "connect",
            "ours-unix",
            lambda p, app, address: ([p.floor, "--bind", address], {}),
        ),
        "ours-unix": Server("wfastcgi serve, unix", "connect", None, ours_listening),
        "flup": Server(
            "flup (threaded), unix",
            "connect",
            "ours-unix",
            lambda p, app, address: (
                [p.python, os.path.join(p.peers, "flup_server.py"), app, unix_path(address)], {}
            ),
        ),
        "uwsgi": Server("uWSGI (1 process), unix", "connect", "ours-unix", uwsgi),
        "ceiling-unix": Server(
            "ceiling (blocking accept loop, fixed answer), unix",
            "connect",
            "ours-unix",
            lambda p, app, address: ([p.ceiling, address], {}),
        ),
        "ceiling-tcp": Server(
            "ceiling (blocking accept loop, fixed answer), TCP",
            "connect",
            "ours-tcp",
            lambda p, app, address: ([p.ceiling, address], {}),
            tcp=True,
        ),
        "floor-tcp": Server(
            "floor (Rust, no Python), TCP",
            "connect",
            "ours-tcp",
            lambda p, app, address: ([p.floor, "--bind", address], {}),
            tcp=True,
        ),
        "ours-tcp": Server("wfastcgi serve, TCP", "connect", None, ours_listening, tcp=True),
        "uwsgi-tcp": Server("uWSGI (1 process), TCP", "connect", "ours-tcp", uwsgi, tcp=True),
    }


# ---------------------------------------------------------------------------------------------
# Scenarios


class Scenario:
    def __init__(self, key, title, app, args, servers, metric, processes=1, skip=None,
                 caps=None, file_size=None):
        self.key = key
        self.title = title
        self.app = app
        self.args = args  # driver arguments: method, path, body, checks, length of the run
        self.servers = servers
        self.metric = metric  # "rps", "up" or "down": what the throughput ratio compares
        self.processes = processes
        self.skip = skip or {}  # server -> why it is not run
        self.caps = caps or {}  # server -> (max seconds, why)
        self.file_size = file_size  # the sparse file the file_wrapper app sends


def file_app(paths):
    """The file_wrapper app's module: the same file paths, made the same way."""
    sys.path.insert(0, os.path.join(paths.apps, "file_wrapper"))
    try:
        import files
    finally:
        sys.path.pop(0)
    return files


def prepare_file(paths, size):
    """Makes the file_wrapper app's sparse file and reads it once, so the page cache holds it
    before the first run: otherwise whichever server runs first pays for filling it."""
    path = file_app(paths).sparse_file(size)
    block = bytearray(1 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(block):
            pass
    return path


def scenarios(opts):
    everyone = ["ours", "wfastcgi.py", "ours-unix", "flup", "uwsgi"]
    timed = ["--duration", str(opts.duration), "--warmup", "2"]
    big = ["--requests", str(opts.big_requests), "--duration", str(opts.big_duration),
           "--warmup", "1", "--warmup-query", "size=0"]
    one = ["--requests", "1", "--warmup", "1", "--warmup-query", "size=0"]
    wfastcgi_py_buffers = (
        "wfastcgi.py buffers the whole body with `bytes +=` per record (quadratic): "
        "not run at 1 GiB"
    )
    return [
        Scenario("hello", "hello GET (query string)", "hello",
                 ["--path", "/hello", "--query", "name=world", "--check", "hello",
                  "--expect-length", "14"] + timed,
                 ["floor", "ours", "wfastcgi.py", "ceiling-unix", "floor-unix", "ours-unix", "flup",
                  "uwsgi", "ceiling-tcp", "floor-tcp", "ours-tcp", "uwsgi-tcp"],
                 "rps"),
        Scenario("hello-2", "hello GET, 2 processes", "hello",
                 ["--path", "/hello", "--query", "name=world", "--check", "hello"] + timed,
                 ["floor", "ours", "wfastcgi.py"], "rps", processes=2),
        Scenario("django", "Django template view `/`", "django",
                 ["--path", "/", "--check", "contains", "--contains",
                  "wfastcgi Django example"] + timed,
                 everyone, "rps"),
        Scenario("echo-1m", "POST 1 MiB, echo + sha256", "echo",
                 ["--method", "POST", "--path", "/echo", "--body-bytes", str(MIB),
                  "--check", "echo"] + timed,
                 everyone, "up"),
        Scenario("upload-100m", "POST 100 MiB, echo + sha256", "echo",
                 ["--method", "POST", "--path", "/echo", "--body-bytes", str(100 * MIB),
                  "--check", "echo"] + big,
                 everyone, "up",
                 caps={"wfastcgi.py": (opts.slow_cap,
                                       "stopped at --max-seconds %g" % opts.slow_cap)}),
        Scenario("download-100m", "GET 100 MiB streamed (64 KiB chunks)", "stream",
                 ["--path", "/stream", "--query", "size=%d" % (100 * MIB), "--check", "pattern",
                  "--expect-length", str(100 * MIB)] + big,
                 everyone, "down"),
        Scenario("upload-1g", "POST 1 GiB, echo + sha256", "echo",
                 ["--method", "POST", "--path", "/echo", "--body-bytes", str(GIB),
                  "--check", "echo"] + one,
                 everyone, "up", skip={"wfastcgi.py": wfastcgi_py_buffers}),
        Scenario("download-1g", "GET 1 GiB streamed (64 KiB chunks)", "stream",
                 ["--path", "/stream", "--query", "size=%d" % GIB, "--check", "pattern",
                  "--expect-length", str(GIB)] + one,
                 everyone, "down"),
        Scenario("file-1g", "GET 1 GiB file, wsgi.file_wrapper (sparse file)", "file_wrapper",
                 ["--path", "/file", "--query", "size=%d" % GIB, "--check", "zeros",
                  "--expect-length", str(GIB)] + one,
                 everyone, "down", file_size=GIB),
    ]


# ---------------------------------------------------------------------------------------------
# Running


class Paths:
    def __init__(self, args):
        self.root = os.path.abspath(args.root)
        self.venv = os.path.abspath(args.venv)
        self.python = os.path.join(self.venv, "bin", "python")
        self.uwsgi = os.path.join(self.venv, "bin", "uwsgi")
        self.gateway = os.path.abspath(args.gateway)
        self.floor = os.path.abspath(args.floor)
        self.ceiling = os.path.abspath(args.ceiling)
        self.driver = os.path.abspath(args.driver)
        self.peers = os.path.join(self.root, "bench", "peers")
        self.apps = os.path.join(self.root, "bench", "apps")


def free_port():
    """A port nothing listens on now (the server binds it a moment later)."""
    with socketlib.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(process, timeout=10):
    """SIGINT (uWSGI's and flup's way to stop; the gateway takes it too), then SIGKILL."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_one(paths, scenario, key, server, opts, workdir, log):
    app_dir = os.path.join(paths.apps, scenario.app)
    args = [paths.driver]
    max_seconds = opts.max_seconds
    if key in scenario.caps:
        max_seconds = scenario.caps[key][0]
    common = ["--label", "%s/%s" % (scenario.key, key), "--app-dir", app_dir,
              "--max-seconds", str(max_seconds)] + scenario.args
    # Pinned: process i and the client thread that drives it share CPU i (see --pin).
    cpus = sorted(os.sched_getaffinity(0)) if opts.pin == "pairs" else []
    if cpus and server.mode == "connect":
        cpus = cpus[:1]  # one listening process: it and its client on the first CPU
    if cpus:
        common += ["--cpus", ",".join(map(str, cpus))]
    process = None
    if server.mode == "spawn":
        argv, extra = server.command(paths, app_dir)
        args += ["spawn"] + common + ["--processes", str(scenario.processes), "--"] + argv
        env = dict(os.environ, **extra)
    else:
        if server.tcp:
            address = "127.0.0.1:%d" % free_port()
        else:
            socket = os.path.join(workdir, "%s.sock" % key)
            if os.path.exists(socket):
                os.unlink(socket)
            address = "unix:" + socket
        argv, extra = server.command(paths, app_dir, address)
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env=dict(os.environ, **extra), cwd=app_dir,
            # Before exec, so every thread the server starts inherits it.
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        args += ["connect"] + common + ["--addr", address, "--per-request",
                                        "--pid", str(process.pid)]
        env = dict(os.environ)
    try:
        done = subprocess.run(args, stdout=subprocess.PIPE, stderr=log, env=env,
                              timeout=max_seconds + 120)
    finally:
        if process is not None:
            stop(process)
    if done.returncode != 0 or not done.stdout.strip():
        return {"failures": 1, "requests": 0,
                "errors": [{"count": 1, "message": "driver exited %d" % done.returncode}]}
    return json.loads(done.stdout)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs):
    ok_runs = [r for r in runs if r.get("requests")]
    rss = [r.get("peak_rss_mib") for r in runs if r.get("peak_rss_mib") is not None]
    errors = {}
    for r in runs:
        for e in r.get("errors", []):
            errors[e["message"]] = errors.get(e["message"], 0) + e["count"]
    return {
        "runs": len(runs),
        "requests": sum(r.get("requests", 0) for r in runs),
        "failures": sum(r.get("failures", 0) for r in runs),
        "timed_out": sum(1 for r in runs if r.get("timed_out")),
        "rps": median([r.get("rps") for r in ok_runs]),
        "p50_ms": median([r.get("p50_ms") for r in ok_runs]),
        "p99_ms": median([r.get("p99_ms") for r in ok_runs]),
        "up": median([r.get("mib_s_up") for r in ok_runs]),
        "down": median([r.get("mib_s_down") for r in ok_runs]),
        "rss": max(rss) if rss else None,
        "errors": errors,
        # How far apart the rounds were: (max - min) / median, per throughput metric.
        "spread": {
            metric: spread([r.get(field) for r in ok_runs])
            for metric, field in (("rps", "rps"), ("up", "mib_s_up"), ("down", "mib_s_down"))
        },
    }


def spread(values):
    values = [v for v in values if v]
    if len(values) < 2:
        return None
    return (max(values) - min(values)) / statistics.median(values)


# ---------------------------------------------------------------------------------------------
# Report


def fmt(value):
    """Rates: thousands separated, 3 significant digits below 100."""
    if value is None:
        return "—"
    if value >= 100:
        return "{:,.0f}".format(value)
    return "%.3g" % value


def fmt_ms(value):
    """Latencies in ms: µs resolution below 1 ms, fewer decimals above."""
    if value is None:
        return "—"
    if value < 1:
        return "%.3f" % value
    if value < 10:
        return "%.2f" % value
    if value < 100:
        return "%.1f" % value
    return "{:,.0f}".format(value)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "—"
    return "%.2f×" % (a / b)


def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "%d × %s, Linux %s" % (os.cpu_count() or 0, model, platform.release())


def versions(paths):
    script = (
        "import sys, importlib.metadata as m\n"
        "out = ['Python ' + sys.version.split()[0]]\n"
        "for n in ('wfastcgi', 'flup', 'uWSGI', 'Django'):\n"
        "    out.append(n + ' ' + m.version(n))\n"
        "print(', '.join(out))\n"
    )
    done = subprocess.run([paths.python, "-c", script], stdout=subprocess.PIPE, text=True)
    return done.stdout.strip()


def app_cost_ns(paths, app="hello", extra=()):
    done = subprocess.run(
        [paths.python, os.path.join(paths.peers, "app_cost.py"),
         os.path.join(paths.apps, app)] + list(extra),
        stdout=subprocess.PIPE, text=True, cwd=os.path.join(paths.apps, app),
    )
    try:
        return json.loads(done.stdout)["ns_per_call"]
    except (ValueError, KeyError):
        return None


def report(paths, opts, results, table_servers, scenario_list, cost_ns, started, app_costs):
    lines = []
    lines.append("Command: `%s`  " % opts.command)
    lines.append("Machine: %s  " % machine())
    lines.append("Date: %s  " % started.strftime("%Y-%m-%d %H:%M UTC"))
    lines.append("Software: %s  " % versions(paths))
    lines.append(
        "Runs: %d round(s), servers alternating within each round, a fresh server per run; "
        "timed scenarios %g s per run, 100 MiB scenarios %d request(s) (at most %g s), "
        "1 GiB scenarios 1 request. Medians over rounds; peak RSS is the largest VmHWM seen. "
        "%s"
        % (opts.rounds, opts.duration, opts.big_requests, opts.big_duration,
           "CPU pinning: each server process shares one CPU with the client thread that drives "
           "it (the 2-process runs use both CPUs)." if opts.pin == "pairs" else
           "No CPU pinning.")
    )
    lines.append("")
    lines.append(
        "| scenario | server | req/s | p50 ms | p99 ms | MiB/s | spread | peak RSS MiB "
        "| failures | ours/peer throughput | ours/peer RSS |"
    )
    lines.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    notes = []
    for scenario in scenario_list:
        for key in scenario.servers:
            server = table_servers[key]
            if key in scenario.skip:
                lines.append("| %s | %s | not run | | | | | | | | |"
                             % (scenario.title, server.name))
                notes.append("%s, %s: %s." % (scenario.title, server.name, scenario.skip[key]))
                continue
            s = results.get((scenario.key, key))
            if s is None:
                continue
            thr = s[scenario.metric]
            mib = s["up"] if scenario.metric == "up" else s["down"]
            ours_ratio = rss_ratio = ""
            if server.pair:
                ours = results.get((scenario.key, server.pair))
                if ours:
                    ours_ratio = ratio(ours[scenario.metric], thr)
                    rss_ratio = ratio(ours["rss"], s["rss"])
            failures = str(s["failures"])
            if s["timed_out"]:
                failures += " (%d/%d runs stopped)" % (s["timed_out"], s["runs"])
            spread_value = s["spread"][scenario.metric]
            lines.append(
                "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                    scenario.title, server.name, fmt(s["rps"]), fmt_ms(s["p50_ms"]),
                    fmt_ms(s["p99_ms"]), fmt(mib) if scenario.metric != "rps" else "",
                    "" if spread_value is None else "%.0f%%" % (100 * spread_value),
                    fmt(s["rss"]), failures, ours_ratio, rss_ratio,
                )
            )
            if key in scenario.caps and s["timed_out"]:
                notes.append("%s, %s: %s." % (scenario.title, server.name, scenario.caps[key][1]))
            for message, count in sorted(s["errors"].items()):
                notes.append("%s, %s: %d × %s" % (scenario.title, server.name, count, message))

    lines.append("")
    lines.append(
        "Ratios: the gateway's row over this row, in the same transport (fd 0 rows against "
        "`wfastcgi (fd 0)`, unix rows against `wfastcgi serve, unix`, TCP rows against "
        "`wfastcgi serve, TCP`); throughput is req/s, or "
        "MiB/s for the transfer scenarios. Above 1× the gateway is faster; for RSS, below 1× "
        "it uses less. Spread: (largest − smallest) / median of that throughput over the rounds."
    )
    cost_lines = []
    for floor_key, ours_key, how in (("floor", "ours", "over fd 0"),
                                     ("floor-unix", "ours-unix", "on a unix socket"),
                                     ("floor-tcp", "ours-tcp", "on TCP")):
        floor = results.get(("hello", floor_key))
        ours = results.get(("hello", ours_key))
        if not (floor and ours and floor["p50_ms"] and ours["p50_ms"] and cost_ns):
            continue
        # Medians of the latency rather than 1 / req/s: a single stall of the shared machine
        # moves the mean of a short run a lot, the median hardly at all.
        floor_us = floor["p50_ms"] * 1000
        ours_us = ours["p50_ms"] * 1000
        overhead = ours_us - cost_ns / 1000
        cost_lines.append(
            "- %s: floor %.1f µs, gateway %.1f µs; the gateway's overhead beyond the app, "
            "%.1f µs, is **%.2f× the floor**." % (how, floor_us, ours_us, overhead,
                                                  overhead / floor_us)
        )
    if cost_lines:
        lines.append("")
        lines.append(
            "Per-request cost of hello, one request at a time, p50 round trip (the driver's "
            "side included). The hello app itself, called in a Python loop with a minimal "
            "environ, costs %.2f µs." % (cost_ns / 1000)
        )
        lines.append("")
        lines.extend(cost_lines)
        lines.append("")
        lines.append(
            "The floor (examples/native_responder.rs) is the gateway's own transport code with "
            "a Rust responder instead of Python: over fd 0 the same `direct.rs` driver, on a "
            "listening socket the same acceptor (`acceptor.rs`: the worker accepts and serves "
            "with that driver) and, behind it, the same tokio connection and job queue."
        )
    bound_lines = []
    for scenario in scenario_list:
        app_ns = app_costs.get(scenario.key)
        peer = results.get((scenario.key, "wfastcgi.py"))
        ours = results.get((scenario.key, "ours"))
        if not (app_ns and peer and peer["rps"] and ours and ours["rps"]):
            continue
        peer_us = 1e6 / peer["rps"]
        bound_lines.append(
            "- %s: the app alone %.0f µs per call; wfastcgi.py %.0f µs per request, the gateway "
            "(fd 0) %.0f µs; so even a server that cost nothing could be at most **%.2f×** "
            "wfastcgi.py here (the gateway: %.2f×)."
            % (scenario.title, app_ns / 1000, peer_us, 1e6 / ours["rps"],
               peer_us / (app_ns / 1000), ours["rps"] / peer["rps"])
        )
    if bound_lines:
        lines.append("")
        lines.append(
            "What the application alone costs (the same app called in a Python loop with a "
            "minimal environ, `bench/peers/app_cost.py`), against the time per request (1 / req/s):"
        )
        lines.append("")
        lines.extend(bound_lines)
    if notes:
        lines.append("")
        lines.append("Notes and failures:")
        lines.append("")
        lines.extend("- " + n for n in notes)
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True)
    parser.add_argument("--venv", required=True)
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--floor", required=True)
    parser.add_argument("--ceiling", required=True)
    parser.add_argument("--driver", required=True)
    parser.add_argument("--command", default="bench/run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0,
                        help="seconds per run of the timed scenarios")
    parser.add_argument("--big-requests", type=int, default=3,
                        help="requests per run of the 100 MiB scenarios")
    parser.add_argument("--big-duration", type=float, default=8.0,
                        help="no new 100 MiB request after this many seconds")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="hard limit of one run's measured part")
    parser.add_argument("--slow-cap", type=float, default=12.0,
                        help="hard limit for wfastcgi.py's 100 MiB upload (it takes ~1 min)")
    parser.add_argument(
        "--pin", choices=["pairs", "none"], default="pairs",
        help="pairs (default): each server process and the client thread driving it share one "
             "CPU (process i on CPU i); none: leave placement to the scheduler. On a 2-vCPU VM "
             "a wake-up across CPUs costs tens of µs, and unpinned hello runs of the same "
             "server vary 3-4x with where the threads land",
    )
    parser.add_argument("--only", default="", help="comma-separated scenario keys")
    parser.add_argument("--servers", default="", help="comma-separated server keys")
    parser.add_argument("--output", required=True, help="Markdown file to write")
    parser.add_argument("--json", help="file for every run's raw report")
    parser.add_argument("--log", required=True, help="file for the servers' and driver's stderr")
    opts = parser.parse_args()

    paths = Paths(opts)
    table_servers = servers()
    scenario_list = scenarios(opts)
    if opts.only:
        wanted = opts.only.split(",")
        unknown = set(wanted) - {s.key for s in scenario_list}
        if unknown:
            sys.exit("unknown scenario(s): %s" % ", ".join(sorted(unknown)))
        scenario_list = [s for s in scenario_list if s.key in wanted]
    if opts.servers:
        keep = opts.servers.split(",")
        for s in scenario_list:
            s.servers = [k for k in s.servers if k in keep]

    started = datetime.datetime.now(datetime.timezone.utc)
    workdir = tempfile.mkdtemp(prefix="wfastcgi-bench-")
    raw = {}
    sizes = [s.file_size for s in scenario_list if s.file_size]
    for size in sizes:
        prepare_file(paths, size)
    try:
        with open(opts.log, "wb") as log:
            for round_no in range(opts.rounds):
                for scenario in scenario_list:
                    keys = [k for k in scenario.servers if k not in scenario.skip]
                    # Rotate the order each round, so no server always runs first or last.
                    shift = round_no % max(len(keys), 1)
                    for key in keys[shift:] + keys[:shift]:
                        t0 = time.monotonic()
                        result = run_one(paths, scenario, key, table_servers[key], opts,
                                         workdir, log)
                        raw.setdefault((scenario.key, key), []).append(result)
                        mib = {"up": "mib_s_up", "down": "mib_s_down"}.get(scenario.metric)
                        print(
                            "round %d/%d  %-14s %-12s %9s req/s  p50 %8s ms  %s rss %5s MiB  "
                            "failures %d  (%.1f s)" % (
                                round_no + 1, opts.rounds, scenario.key, key,
                                fmt(result.get("rps")), fmt_ms(result.get("p50_ms")),
                                "%7s MiB/s " % fmt(result.get(mib)) if mib else "",
                                fmt(result.get("peak_rss_mib")), result.get("failures", 0),
                                time.monotonic() - t0,
                            ),
                            file=sys.stderr, flush=True,
                        )
    finally:
        if sizes:
            for size in sizes + [0]:  # 0: the file of the warm-up requests
                path = file_app(paths).sparse_path(size)
                if os.path.exists(path):
                    os.unlink(path)
        if opts.json:
            with open(opts.json, "w") as f:
                json.dump([{"scenario": s, "server": k, "runs": r} for (s, k), r in raw.items()],
                          f, indent=1)
    print("computing the app's own cost (python timeit)...", file=sys.stderr, flush=True)
    cost = app_cost_ns(paths)
    # The scenarios the gateway's time is mostly the application's: what the app alone costs
    # bounds the ratio any server can reach against wfastcgi.py.
    app_costs = {
        "django": app_cost_ns(paths, "django", ["--path", "/"]),
        "echo-1m": app_cost_ns(paths, "echo", ["--path", "/echo", "--body-bytes", str(MIB)]),
    }
    results = {key: summarize(runs) for key, runs in raw.items()}
    text = report(paths, opts, results, table_servers, scenario_list, cost, started, app_costs)
    with open(opts.output, "w") as f:
        f.write(text)
    print(text)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
