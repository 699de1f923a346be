"""A real multi-host Ray cluster on one machine: a network, mount and PID namespace per host.

    sudo .venv/bin/python tests/cluster/nscluster.py try     # build it, run the demo job, tear down
    sudo .venv/bin/python tests/cluster/nscluster.py shell   # build it and wait (Ctrl-C tears down)

Hosts: `head` (Ray head, CPU 0, the S3 server, the annotation file), `worker1..3` (1 CPU each;
worker3 carries the custom resource `gpu_node`, standing for cluster.yaml's GPU node type) and
`client` (the user's laptop: `ray job submit` from there). Each host:
- its own network namespace, with one veth link to a bridge that lives in an extra namespace (the
  "switch"); addresses from a documentation range (TEST-NET-2, else TEST-NET-3) that no interface or
  route of the machine uses, no route out, no NAT: traffic stays between these namespaces;
- its own mount namespace with a private /tmp, HOME (/root) and /dev/shm, bound from a per-host
  folder, so Ray's session dirs, the auth token, object spilling and any stray file stay per host;
  the checkout and the virtual environment stay visible everywhere, as in a container image;
- its own PID namespace, held by a small init (PID 1 there, reaping orphans): Ray's scan for "its"
  processes sees only that host's, and SIGKILL to the init ends the whole host at once.

The machine's own network namespace and interfaces are never touched. Everything is named
`<prefix>-<host>` and removed by name on the way out (finally and atexit), and only processes this
module started are ended (by pid, or by their PID namespace). Needs root, `ip`, `unshare`, `nsenter`
and Linux namespaces; `why_unavailable()` says why not where they are missing.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.path.abspath(sys.executable)).parent  # the venv: on every host's PATH, as an image
RANGES = ("198.51.100.0/24", "203.0.113.0/24")  # TEST-NET-2, TEST-NET-3
HOSTS = ("head", "worker1", "worker2", "worker3", "client")
WORKERS = ("worker1", "worker2", "worker3")
GPU_STANDIN = "gpu_node"  # worker3's custom resource: cluster.yaml's gpu_worker type
RAY_PORT, DASHBOARD_PORT = 6379, 8265
# Settings of every Ray node here, through Ray's documented RAY_<config> variables:
# - a silent node is marked dead after period x threshold (defaults: 5 s x 5, plus a 10 s
#   timeout each, made for real networks, not a test);
# - Ray Train's state of its runs kept (what the tests read of its ranks);
# - no memory monitor: every "host" shares this machine's memory, so each raylet would count
#   the others' use as its own and kill its workers when the machine, not the host, is full.
NODE_ENV = {
    "RAY_health_check_initial_delay_ms": "2000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
    "RAY_memory_monitor_refresh_ms": "0",
    # Ray Train's own record of its runs (ranks, nodes, attempts), read by the tests.
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
}

# PID 1 of a host: makes the private mounts, says "ready", then reaps orphans until killed.
INIT = r"""
import json, os, signal, subprocess, sys, time
folder, keep = sys.argv[1], json.loads(sys.argv[2])
def mount(*args):
    subprocess.run(["mount", *args], check=True)
mount("--make-rprivate", "/")
home = os.path.expanduser("~")
# HOME first: the private /tmp then hides the folder that holds both.
for private, target in ((folder + "/home", home), (folder + "/tmp", "/tmp")):
    for path in keep:  # the checkout and venv stay visible where they live under /tmp or HOME
        if path == target or path.startswith(target + "/"):
            inner = private + path[len(target):]
            os.makedirs(inner, exist_ok=True)
            mount("--rbind", path, inner)
    mount("--rbind", private, target)
mount("-t", "tmpfs", "-o", "size=4g,mode=1777", "tmpfs", "/dev/shm")
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
print("ready", flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(1)
"""


def why_unavailable() -> str | None:
    """None where namespaces can be made here, else one line saying why not."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root (network, mount and PID namespaces)"
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"rsprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    try:
        mounts = subprocess.run(
            ["ip", "netns", "exec", probe, "unshare", "--mount", "--pid", "--fork", "true"],
            capture_output=True,
            text=True,
        )
        if mounts.returncode != 0:
            return f"cannot make mount and PID namespaces: {mounts.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def machine_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the machine's own namespace has an address or a route in."""
    nets = []
    addrs = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True).stdout or "[]")
    for link in addrs:
        for a in link.get("addr_info", []):
            if a.get("family") == "inet":
                nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    routes = json.loads(subprocess.run(["ip", "-j", "route"], capture_output=True).stdout or "[]")
    for r in routes:
        dst = r.get("dst", "")
        if dst and dst != "default":
            nets.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    return nets


def choose_range(taken: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """The first documentation range that no address or route of the machine overlaps."""
    for candidate in map(ipaddress.ip_network, RANGES):
        if not any(candidate.overlaps(t) for t in taken):
            return candidate
    raise RuntimeError(
        f"the machine uses both test ranges {RANGES} (addresses or routes); "
        "refusing to build a namespace cluster that could shadow them"
    )


@dataclass
class Host:
    name: str
    address: str
    netns: str
    folder: Path
    init: subprocess.Popen | None = None
    pid: int = 0  # the init's pid, seen from the machine


@dataclass
class NsCluster:
    """The hosts; `up()` builds them and starts Ray and S3, `down()` removes everything."""

    prefix: str = field(default_factory=lambda: f"rs{uuid.uuid4().hex[:6]}")
    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rsns-")))
    extra_ray_env: dict[str, str] = field(default_factory=dict)
    hosts: dict[str, Host] = field(default_factory=dict)
    network: ipaddress.IPv4Network | None = None
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    s3_port: int = 0
    s3_secret: str = field(
        default_factory=lambda: f"ns-secret-{uuid.uuid4().hex}"
    )  # moto takes any
    bucket: str = "rayseg"
    started: list[subprocess.Popen] = field(default_factory=list)
    _down: bool = False

    # ---- building ----------------------------------------------------------------------------

    @property
    def switch(self) -> str:
        return f"{self.prefix}-switch"

    @property
    def head(self) -> Host:
        return self.hosts["head"]

    @property
    def dashboard(self) -> str:
        return f"http://{self.head.address}:{DASHBOARD_PORT}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.head.address}:{self.s3_port}"

    def up(self, *, ray: bool = True) -> NsCluster:
        atexit.register(self.down)
        try:
            self.network = choose_range(machine_networks())
            self._make_switch()
            addresses = list(self.network.hosts())
            for i, name in enumerate(HOSTS):
                self._make_host(name, str(addresses[9 + i]))
            if ray:
                self.start_s3()
                self.start_ray()
        except BaseException:
            self.down()
            raise
        return self

    def _make_switch(self) -> None:
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")

    def _make_host(self, name: str, address: str) -> None:
        netns = f"{self.prefix}-{name}"
        folder = self.folder / name
        for sub in ("tmp", "home"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / "tmp").chmod(0o1777)
        host = self.hosts[name] = Host(name, address, netns, folder)
        ip("netns", "add", netns)
        port = f"p-{name}"[:15]  # the switch's end; the host's end is its eth0
        ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
           "netns", netns)  # fmt: skip
        ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "addr", "add", f"{address}/{self.network.prefixlen}", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        self._start_init(host)

    def _start_init(self, host: Host) -> None:
        """The host's PID 1 in its network namespace, with its private mounts."""
        folder = host.folder
        keep = image_paths()
        host.init = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--pid", "--fork",
             "--mount-proc", "--propagation", "private",
             sys.executable, "-c", INIT, str(folder), json.dumps(keep)],
            stdout=subprocess.PIPE,
            stderr=open(folder / "init.log", "ab"),  # noqa: SIM115 - the init's own
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        line = host.init.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"host {host.name} did not start (init said {line!r})")
        host.pid = init_pid(host.init.pid)

    # ---- running commands on a host -----------------------------------------------------------

    def env(self, host: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A clean host environment: the venv first on PATH, the host's HOME; nothing of ours."""
        env = {
            "PATH": f"{BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": os.path.expanduser("~"),
            "LANG": "C.UTF-8",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
        }
        return {**env, **(extra or {})}

    def command(self, host: str, argv: list[str], cwd: str | Path = ROOT) -> list[str]:
        h = self.hosts[host]
        return ["nsenter", "-t", str(h.pid), "-n", "-m", "-p", f"--wd={cwd}", "--", *argv]

    def run(
        self,
        host: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        timeout: float = 300,
        check: bool = True,
        cwd: str | Path = ROOT,
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            self.command(host, argv, cwd),
            env=self.env(host, env),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{host}$ {' '.join(argv)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def popen(self, host: str, argv: list[str], *, env=None, log: Path | None = None):
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            self.command(host, argv),
            env=self.env(host, env),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started.append(proc)
        return proc

    def python(self, host: str, code: str, *args: str, timeout: float = 120, env=None) -> object:
        """Run `code` with the venv's python on `host`; its last stdout line, parsed as JSON."""
        result = self.run(host, [sys.executable, "-c", code, *args], timeout=timeout, env=env)
        return json.loads(result.stdout.strip().splitlines()[-1])

    # ---- services -----------------------------------------------------------------------------

    def s3_env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": self.s3_secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.s3_endpoint,
        }

    def start_s3(self) -> None:
        """moto's S3 server on the head's address, on a port free there; one bucket."""
        self.s3_port = int(
            self.python(
                "head",
                "import socket,json; s=socket.socket(); s.bind((__import__('sys').argv[1],0));"
                "print(json.dumps(s.getsockname()[1]))",
                self.head.address,
            )
        )
        self.popen(
            "head",
            [str(BIN / "moto_server"), "-H", self.head.address, "-p", str(self.s3_port)],
            log=self.folder / "s3.log",
        )
        self.python(
            "head",
            "import boto3,json,sys,time\n"
            "for _ in range(100):\n"
            "    try:\n"
            "        boto3.client('s3').create_bucket(Bucket=sys.argv[1]); break\n"
            "    except Exception:\n"
            "        time.sleep(0.2)\n"
            "else:\n"
            "    raise SystemExit('no S3 server')\n"
            "print(json.dumps(True))",
            self.bucket,
            env=self.s3_env(),
        )

    def token_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token"}

    def write_token(self, host: str) -> None:
        folder = self.hosts[host].folder / "home" / ".ray"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "auth_token").write_text(self.token)

    def start_ray(self) -> None:
        """Head (CPU 0, token auth, AWS settings as an instance profile would give), 3 workers."""
        for name in ("head", *WORKERS, "client"):
            self.write_token(name)
        head_env = {**self.token_env(), **self.s3_env(), **NODE_ENV, **self.extra_ray_env}
        self.run(
            "head",
            ["ray", "start", "--head", "--node-ip-address", self.head.address,
             "--port", str(RAY_PORT), "--num-cpus", "0", "--dashboard-host", "0.0.0.0",
             "--dashboard-port", str(DASHBOARD_PORT), "--object-store-memory", str(150 << 20),
             "--disable-usage-stats"],
            env=head_env,
            timeout=180,
        )  # fmt: skip
        for name in WORKERS:
            self.start_worker(name)
        self.wait_for_nodes(1 + len(WORKERS))

    def start_worker(self, name: str) -> None:
        """`ray start` on a worker host: 1 CPU; worker3 has the GPU stand-in resource.

        Workers get no AWS_* settings: whatever they read from S3 reaches them from the driver.
        """
        resources = ["--resources", json.dumps({GPU_STANDIN: 1})] if name == "worker3" else []
        self.run(
            name,
            ["ray", "start", "--address", f"{self.head.address}:{RAY_PORT}",
             "--node-ip-address", self.hosts[name].address, "--num-cpus", "1",
             "--object-store-memory", str(150 << 20), "--disable-usage-stats", *resources],
            env={**self.token_env(), **NODE_ENV, **self.extra_ray_env},
            timeout=180,
        )  # fmt: skip

    def nodes(self) -> list[dict]:
        """Ray's node table (state API through the head's dashboard), read from the client."""
        return self.python(
            "client",
            "import json, sys\n"
            "from ray.util.state import list_nodes\n"
            "print(json.dumps([{'ip': n.node_ip, 'state': n.state, 'resources': n.resources_total}"
            " for n in list_nodes(address=sys.argv[1])]))",
            self.dashboard,
            env=self.token_env(),
        )

    def wait_for_nodes(self, count: int, *, timeout: float = 120) -> None:
        code = (
            "import json, sys, time\n"
            "from ray.util.state import list_nodes\n"
            "deadline = time.monotonic() + float(sys.argv[3])\n"
            "while True:\n"
            "    alive = [n for n in list_nodes(address=sys.argv[1]) if n.state == 'ALIVE']\n"
            "    if len(alive) >= int(sys.argv[2]) or time.monotonic() > deadline: break\n"
            "    time.sleep(1)\n"
            "print(json.dumps(len(alive)))"
        )
        alive = self.python(
            "client", code, self.dashboard, str(count), str(timeout),
            env=self.token_env(), timeout=timeout + 60,
        )  # fmt: skip
        if alive < count:
            raise RuntimeError(f"{alive} of {count} Ray nodes came up")

    # ---- faults -------------------------------------------------------------------------------

    def kill_host(self, name: str) -> None:
        """SIGKILL every process on the host: its init, and with it its whole PID namespace."""
        host = self.hosts[name]
        os.kill(host.pid, signal.SIGKILL)
        if host.init is not None:
            host.init.wait(timeout=30)

    def revive(self, name: str) -> None:
        """A killed worker host back: a fresh init (empty process table) and `ray start`."""
        host = self.hosts[name]
        self._start_init(host)
        self.start_worker(name)

    def cut_link(self, name: str) -> None:
        """The host's cable pulled: its port on the switch goes down."""
        ip("-n", self.switch, "link", "set", f"p-{name}"[:15], "down")

    def restore_link(self, name: str) -> None:
        ip("-n", self.switch, "link", "set", f"p-{name}"[:15], "up")

    def listing(self, host: str, path: str) -> list[str]:
        """Every file under `path` as the host sees it (its private /tmp or HOME)."""
        return self.python(
            host,
            "import json, os, sys\n"
            "found = []\n"
            "for top, dirs, files in os.walk(sys.argv[1]):\n"
            "    found += [os.path.join(top, f) for f in files]\n"
            "print(json.dumps(sorted(found)))",
            path,
        )

    # ---- tearing down -------------------------------------------------------------------------

    def down(self) -> None:
        """Kill every host's PID namespace, delete every namespace by name, remove the folder."""
        if self._down:
            return
        self._down = True
        for proc in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for host in self.hosts.values():
            if host.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(host.pid, signal.SIGKILL)
            if host.init is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    host.init.wait(timeout=30)
        for proc in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for name in [*(h.netns for h in self.hosts.values()), self.switch]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(self.folder, ignore_errors=True)
        atexit.unregister(self.down)

    def leftovers(self) -> list[str]:
        """Namespaces of this cluster still present (empty after down())."""
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [n.split()[0] for n in names.splitlines() if n.startswith(f"{self.prefix}-")]


def image_paths() -> list[str]:
    """What every host sees as the machine has it (a cluster image): checkout, venv, Python."""
    return sorted({str(ROOT), str(BIN.parent), os.path.realpath(sys.prefix), sys.base_prefix})


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def init_pid(unshare_pid: int, *, timeout: float = 10) -> int:
    """The pid (as the machine sees it) of the child that `unshare --fork` started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{unshare_pid}/task").glob("*"):
            children = (task / "children").read_text().split()
            if children:
                return int(children[0])
        time.sleep(0.05)
    raise RuntimeError(f"unshare {unshare_pid} started no init")


@contextlib.contextmanager
def cluster(**kwargs) -> Iterator[NsCluster]:
    c = NsCluster(**kwargs)
    try:
        yield c.up()
    finally:
        c.down()


def main(argv: list[str]) -> int:
    why = why_unavailable()
    if why:
        print(f"nscluster: {why}", file=sys.stderr)
        return 2
    what = argv[0] if argv else "try"
    with cluster() as c:
        print("hosts: " + ", ".join(f"{h.name} {h.address}" for h in c.hosts.values()))
        print(f"dashboard and job API: {c.dashboard} (from the client host); S3: {c.s3_endpoint}")
        if what == "shell":
            print(f"enter a host: nsenter -t PID -n -m -p  (pids: "
                  f"{ {h.name: h.pid for h in c.hosts.values()} }); Ctrl-C tears down")  # fmt: skip
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
            return 0
        from demo_job import run_demo_job

        return run_demo_job(c)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
