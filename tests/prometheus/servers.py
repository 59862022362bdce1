"""Start Debian's real Prometheus and node_exporter on 127.0.0.1 for a test, and query them.

Why real servers: what an SRE team runs is node_exporter's textfile collector on each node, scraped
by Prometheus, which evaluates the alert rules. A foldhpc ``.prom`` file that the textfile collector
rejects (a timestamp, a duplicate series, a bad name), or a rule that promtool's unit tests accept
but that never fires on what the collector really serves, is only caught by running the pair.

Nothing here is mocked: the binaries are Debian's (``apt-get install prometheus
prometheus-node-exporter``; ``.ci/run`` does it as root). Each server gets a free port (a socket
bound to port 0 picks it; a start that loses the port to a race is retried on another), a log file
and a work directory of its own, and is ended by its PID (terminate, wait, kill) — never by name, so
a Prometheus someone else runs on this machine is not touched.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = Path("/usr/bin/prometheus")
NODE_EXPORTER = Path("/usr/bin/prometheus-node-exporter")
#: the alert rules foldhpc ships (group ``foldhpc``); the servers load exactly this file
RULES_FILE = ROOT / "configs" / "prometheus" / "foldhpc-alerts.yml"
#: env: ``1`` turns a skip for missing binaries into a failure (set by .ci/run as root)
REQUIRE_ENV = "FOLDHPC_REQUIRE_PROMETHEUS"

#: how often Prometheus scrapes node_exporter and evaluates the rules: 1 s keeps the test short
SCRAPE_INTERVAL_S = 1
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
PORT_ATTEMPTS = 3

T = TypeVar("T")


class ServerError(RuntimeError):
    """A server did not come up (the message has its command line and the tail of its log)."""


def missing_binaries() -> list[str]:
    """The server binaries that are not installed here (empty: both are)."""
    return [str(p) for p in (PROMETHEUS, NODE_EXPORTER) if not os.access(p, os.X_OK)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's choice for port 0).

    It is free only until someone else binds it; :func:`_start` retries on another port when the
    server's log says the address was taken in between."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``url``: (HTTP status, body). An HTTP error status is returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())


@dataclass
class Server:
    """One server process this module started; :meth:`stop` ends it by its PID."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; idempotent."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) ignored SIGTERM for %.0f s: killing it", self.name, self.proc.pid, timeout)
            self.proc.kill()
            self.proc.wait(timeout)


def _start(name: str, argv_for: Callable[[int], list[str]], ready_path: str, work_dir: Path,
           timeout: float = START_TIMEOUT_S) -> Server:
    """Start ``argv_for(port)`` on a free port and wait until GET ``ready_path`` answers 200.

    Raises :class:`ServerError` with the log's tail if the process exits or is not ready in time."""
    last_error = ""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        argv = argv_for(port)
        log_path = work_dir / f"{name}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = Server(name, argv, proc, port, log_path)
        deadline = time.monotonic() + timeout
        while True:
            rc = proc.poll()
            if rc is not None:
                tail = server.log_tail()
                if "address already in use" in tail and attempt < PORT_ATTEMPTS:
                    log.info("%s lost port %d to a race (attempt %d): retrying on another", name, port, attempt)
                    last_error = tail
                    break
                raise ServerError(f"{name} exited with code {rc} before it was ready\n"
                                  f"command: {' '.join(argv)}\nlog tail ({log_path}):\n{tail}")
            try:
                status, _ = http_get(server.url + ready_path, timeout=2.0)
                if status == 200:
                    log.info("%s ready on %s (pid %d)", name, server.url, proc.pid)
                    return server
                last_error = f"HTTP {status}"
            except OSError as e:  # not listening yet
                last_error = str(e)
            if time.monotonic() > deadline:
                server.stop()
                raise ServerError(f"{name} not ready at {server.url}{ready_path} within {timeout:.0f} s "
                                  f"(last: {last_error})\ncommand: {' '.join(argv)}\n"
                                  f"log tail ({log_path}):\n{server.log_tail()}")
            time.sleep(0.1)
    raise ServerError(f"{name}: no free port after {PORT_ATTEMPTS} attempts; last log:\n{last_error}")


def start_node_exporter(textfile_dir: Path, work_dir: Path) -> Server:
    """node_exporter serving only the textfile collector of ``textfile_dir`` (every other collector
    off: the test reads nothing else, and the defaults cost a scrape hundreds of milliseconds)."""
    def argv(port: int) -> list[str]:
        return [str(NODE_EXPORTER), f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
                "--collector.textfile", f"--collector.textfile.directory={textfile_dir}"]

    return _start("node_exporter", argv, "/metrics", work_dir)


def write_prometheus_config(work_dir: Path, target: str, rule_files: Sequence[Path]) -> Path:
    """prometheus.yml: scrape ``target`` (host:port) and evaluate the rules every second.

    JSON is valid YAML, so the file is written with :mod:`json` (no YAML writer needed)."""
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
                   "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": "node", "static_configs": [{"targets": [target]}]}],
    }
    path = work_dir / "prometheus.yml"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def start_prometheus(work_dir: Path, target: str, rule_files: Sequence[Path]) -> Server:
    """Prometheus with its config and TSDB in ``work_dir``, scraping ``target``."""
    config = write_prometheus_config(work_dir, target, rule_files)
    tsdb = work_dir / "tsdb"
    tsdb.mkdir(exist_ok=True)

    def argv(port: int) -> list[str]:
        return [str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tsdb}",
                f"--web.listen-address=127.0.0.1:{port}"]

    return _start("prometheus", argv, "/-/ready", work_dir)


class PrometheusAPI:
    """The few calls of Prometheus's HTTP API (``/api/v1``) a test needs, over urllib."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def get(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``: its ``data``; RuntimeError with Prometheus's error otherwise."""
        url = f"{self.base_url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_get(url)
        try:
            doc = json.loads(body)
        except ValueError:
            raise RuntimeError(f"GET {url}: HTTP {status}, not JSON: {body[:200]!r}") from None
        if status != 200 or doc.get("status") != "success":
            raise RuntimeError(f"GET {url}: HTTP {status}: {doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query: the vector's samples (``{"metric": {...}, "value": [t, "v"]}``)."""
        data = self.get("query", query=expr)
        if data["resultType"] != "vector":
            raise RuntimeError(f"query {expr!r}: a {data['resultType']}, not a vector")
        result: list[dict[str, Any]] = data["result"]
        return result

    def values(self, expr: str) -> dict[str, float]:
        """Instant query as {``run`` label (or the whole label set): value}."""
        out: dict[str, float] = {}
        for sample in self.query(expr):
            labels = sample["metric"]
            out[labels.get("run", json.dumps(labels, sort_keys=True))] = float(sample["value"][1])
        return out

    def alerts(self) -> list[dict[str, Any]]:
        """Every active (pending or firing) alert: ``labels``, ``annotations``, ``state``, ``activeAt``."""
        alerts: list[dict[str, Any]] = self.get("alerts")["alerts"]
        return alerts

    def alert_states(self, name: str, **labels: str) -> list[str]:
        """States of the active alerts ``name`` whose labels include ``labels`` (empty: none active)."""
        return [a["state"] for a in self.alerts()
                if a["labels"].get("alertname") == name and all(a["labels"].get(k) == v for k, v in labels.items())]

    def rule_names(self) -> set[str]:
        """Names of the alerting rules Prometheus loaded."""
        return {r["name"] for g in self.get("rules", type="alert")["groups"] for r in g["rules"]}

    def targets_health(self) -> list[tuple[str, str]]:
        """(scrape URL, health) of each active target; health "up" once a scrape succeeded."""
        return [(t["scrapeUrl"], t["health"]) for t in self.get("targets")["activeTargets"]]


def poll(fetch: Callable[[], T], done: Callable[[T], bool], what: str, timeout: float,
         interval: float = 0.25) -> T:
    """Call ``fetch`` until ``done(value)``; return that value. After ``timeout`` s raise TimeoutError
    naming ``what`` and the value last seen (so a failure says how far it got)."""
    deadline = time.monotonic() + timeout
    last: Any = "(nothing fetched)"
    while True:
        try:
            value = fetch()
            if done(value):
                return value
            last = value
        except (OSError, RuntimeError) as e:  # a server briefly not answering is "not yet"
            last = f"error: {e}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not seen within {timeout:.0f} s; last seen: {last!r}")
        time.sleep(interval)


@dataclass
class Stack:
    """node_exporter + Prometheus scraping it, started by :func:`running_stack`."""

    node_exporter: Server
    prometheus: Server
    api: PrometheusAPI
    textfile_dir: Path
    rule_files: list[Path]

    def logs(self) -> str:
        """Both servers' log tails, for a failing assertion's message."""
        return (f"--- node_exporter log:\n{self.node_exporter.log_tail()}\n"
                f"--- prometheus log:\n{self.prometheus.log_tail()}")


@contextmanager
def running_stack(work_dir: Path, textfile_dir: Path, rule_files: Sequence[Path] | None = None) -> Iterator[Stack]:
    """node_exporter reading ``textfile_dir`` and Prometheus scraping it and evaluating ``rule_files``
    (default: foldhpc's :data:`RULES_FILE`); both stopped by PID on exit, also when the start fails
    half-way. Returns once node_exporter's target is up in Prometheus (one scrape succeeded)."""
    rules = [RULES_FILE] if rule_files is None else list(rule_files)
    work_dir.mkdir(parents=True, exist_ok=True)
    textfile_dir.mkdir(parents=True, exist_ok=True)
    started: list[Server] = []
    try:
        node = start_node_exporter(textfile_dir, work_dir)
        started.append(node)
        prom = start_prometheus(work_dir, f"127.0.0.1:{node.port}", rules)
        started.append(prom)
        stack = Stack(node, prom, PrometheusAPI(prom.url), textfile_dir, rules)
        poll(stack.api.targets_health, lambda t: bool(t) and all(h == "up" for _, h in t),
             "node_exporter target up in Prometheus", timeout=15)
        yield stack
    finally:
        for server in reversed(started):
            server.stop()
