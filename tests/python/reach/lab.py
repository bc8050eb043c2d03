"""A NAT lab of network namespaces: a public side (client, coturn, relay), routers with nftables, a home LAN.

Everything runs inside namespaces this module creates and deletes; no link leads out of them, so no packet
can reach a real network. Needs root, iproute2, nftables, conntrack, coturn and (for mapping) miniupnpd.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shardmarket.chain.devchain import anvil_binary

REPO = Path(__file__).resolve().parents[3]
TOOLS = {
    "ip": "iproute2",
    "nft": "nftables",
    "conntrack": "conntrack",
    "turnserver": "coturn",
    "miniupnpd": "miniupnpd",
    "upnpc": "miniupnpc",
    "unshare": "util-linux",
}

PUBLIC_NET = "10.99.0"  # the "internet": STUN at .1 and .2, relay at .1, top router WAN at .10
CGN_NET = "100.64.0"  # between a carrier-grade NAT (.1) and the home router (.2)
HOME_NET = "10.99.1"  # the home LAN: router .1, node .2
STUN_PORT = 3478
RELAY_PORT = 8400
NODE_PORT = 7300
CHAIN_PORT = 8545


@dataclass(frozen=True)
class Variant:
    """One home network: which port mapping protocols the router offers and what NAT sits above it."""

    name: str
    upnp: bool = False
    pcp: bool = False  # PCP and NAT-PMP (miniupnpd serves both on port 5351)
    cgnat: bool = False  # a carrier-grade NAT between the home router and the public side
    symmetric: bool = False  # endpoint-dependent mapping (random-fully masquerade) on the home router

    @property
    def miniupnpd(self) -> bool:
        return self.upnp or self.pcp


VARIANTS = {
    v.name: v
    for v in [
        Variant("upnp", upnp=True),
        Variant("pcp", pcp=True),
        Variant("none"),
        Variant("double-nat", upnp=True, pcp=True, cgnat=True),
        Variant("symmetric", symmetric=True),
    ]
}


def missing_tools() -> str | None:
    """Why the lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces, nftables)"
    missing = sorted({pkg for tool, pkg in TOOLS.items() if not shutil.which(tool)})
    if missing:
        return f"the NAT lab needs {', '.join(missing)} (make setup installs them as root)"
    if subprocess.run(["unshare", "--net", "true"], check=False, capture_output=True).returncode != 0:
        return "this machine does not allow network namespaces (a container without CAP_SYS_ADMIN?)"
    return None


def _sh(argv: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


_counter = itertools.count()


class Lab:
    """Namespaces `pub`, `rtr`, `lan` (and `cgn` for double NAT); use as a context manager, it always tears down."""

    def __init__(self, variant: Variant | str, relay_rate_mbit: float = 80.0) -> None:
        self.relay_rate_mbit = relay_rate_mbit
        self.variant = VARIANTS[variant] if isinstance(variant, str) else variant
        self.tag = f"sm{os.getpid() % 100000}x{next(_counter)}"
        self.names = {role: f"{self.tag}-{role}" for role in ("pub", "rtr", "lan", "cgn")}
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.procs: list[subprocess.Popen] = []
        self.created: list[str] = []
        self.miniupnpd: subprocess.Popen | None = None
        self.relay: subprocess.Popen | None = None

    # ---- addresses the tests use
    stun_servers = (f"{PUBLIC_NET}.1:{STUN_PORT}", f"{PUBLIC_NET}.2:{STUN_PORT}")
    relay_url = f"http://{PUBLIC_NET}.1:{RELAY_PORT}"
    node_ip = f"{HOME_NET}.2"
    public_ip = f"{PUBLIC_NET}.10"

    def ns(self, role: str) -> str:
        return self.names[role]

    # ---- running things inside a namespace
    def argv_in(self, role: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role), *argv]

    def run_in(self, role: str, argv: list[str], check: bool = True, timeout: float = 30, env: dict | None = None, **kw):
        """Run `argv` to completion inside namespace `role` (`env` on top of the lab's); raises with its stderr when it
        fails and check is set."""
        return _sh(self.argv_in(role, argv), check=check, timeout=timeout, cwd=REPO, env=self.env() | (env or {}), **kw)

    def spawn_in(self, role: str, argv: list[str], log: str | None = None, env: dict | None = None, **kw) -> subprocess.Popen:
        """Start a long-running process inside `role` (`env` on top of the lab's); it is killed at teardown. Output goes
        to <lab dir>/<log>."""
        with open(self.dir / (log or f"{Path(argv[0]).name}-{len(self.procs)}.log"), "w") as out:
            kw.setdefault("stdout", out)
            kw.setdefault("stderr", subprocess.STDOUT if kw["stdout"] is out else out)
            environ = self.env() | (env or {})
            proc = subprocess.Popen(self.argv_in(role, argv), cwd=REPO, env=environ, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def python_in(self, role: str, args: list[str], **kw):
        return self.run_in(role, [sys.executable, *args], **kw)

    def env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONPATH=str(REPO), SHARDMARKET_HOME=str(self.dir / "home"))
        env["SHARDMARKET_REACH_STUN_SERVERS"] = ",".join(self.stun_servers)
        env["SHARDMARKET_REACH_RELAYS"] = self.relay_url
        return env

    def log(self, name: str) -> str:
        path = self.dir / name
        return path.read_text(errors="replace") if path.exists() else ""

    # ---- building the lab
    def __enter__(self) -> Lab:
        try:
            self.build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def build(self) -> None:
        v = self.variant
        roles = ["pub", "rtr", "lan"] + (["cgn"] if v.cgnat else [])
        for role in roles:
            _sh(["ip", "netns", "add", self.ns(role)])
            self.created.append(self.ns(role))
            self.run_in(role, ["ip", "link", "set", "lo", "up"])
        top = "cgn" if v.cgnat else "rtr"
        self._link("pub", "eth0", [f"{PUBLIC_NET}.1/24", f"{PUBLIC_NET}.2/24"], top, "wan0", [f"{PUBLIC_NET}.10/24"])
        self.run_in(top, ["ip", "route", "add", "default", "via", f"{PUBLIC_NET}.1"])
        if v.cgnat:
            self._link("cgn", "in0", [f"{CGN_NET}.1/24"], "rtr", "wan0", [f"{CGN_NET}.2/24"])
            self.run_in("rtr", ["ip", "route", "add", "default", "via", f"{CGN_NET}.1"])
            self._nat("cgn", "in0", symmetric=False)
        self._link("rtr", "lan0", [f"{HOME_NET}.1/24"], "lan", "eth0", [f"{HOME_NET}.2/24"])
        self.run_in("lan", ["ip", "route", "add", "default", "via", f"{HOME_NET}.1"])
        self._nat("rtr", "lan0", symmetric=v.symmetric)
        self.start_coturn()
        self.start_relay()
        if v.miniupnpd:
            self.start_miniupnpd()
        self.close_wan()

    def _link(self, a: str, a_if: str, a_addrs: list[str], b: str, b_if: str, b_addrs: list[str]) -> None:
        _sh(["ip", "link", "add", a_if, "netns", self.ns(a), "type", "veth", "peer", "name", b_if, "netns", self.ns(b)])
        for role, ifname, addrs in ((a, a_if, a_addrs), (b, b_if, b_addrs)):
            for addr in addrs:
                self.run_in(role, ["ip", "addr", "add", addr, "dev", ifname])
            self.run_in(role, ["ip", "link", "set", ifname, "up"])

    def _nat(self, role: str, lan_if: str, symmetric: bool) -> None:
        """Masquerade, forward LAN->WAN and replies only, and the chains miniupnpd fills (they must pre-exist)."""
        self.run_in(role, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        masquerade = "masquerade random,fully-random" if symmetric else "masquerade"
        rules = f"""
table inet filter {{
    chain input {{ type filter hook input priority 0; policy accept; }}
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "{lan_if}" accept
        jump miniupnpd
    }}
    chain miniupnpd {{ }}
    chain prerouting {{ type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        jump postrouting_miniupnpd
        oifname "wan0" {masquerade}
    }}
    chain prerouting_miniupnpd {{ }}
    chain postrouting_miniupnpd {{ }}
}}
"""
        self.run_in(role, ["nft", "-f", "-"], input=rules)

    def close_wan(self) -> None:
        """After start-up (miniupnpd's STUN self-test needs inbound packets), drop new inbound on every WAN."""
        for role in ("rtr", "cgn"):
            if self.ns(role) in self.created:
                self.run_in(
                    role, ["nft", "add", "rule", "inet", "filter", "input", "iifname", "wan0", "ct", "state", "new", "drop"]
                )
                self.run_in(role, ["conntrack", "-F"], check=False)

    def start_coturn(self) -> None:
        ips = [s.split(":")[0] for s in self.stun_servers]
        argv = [
            "turnserver",
            "-n",
            "--stun-only",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--simple-log",
            "--log-file=stdout",
            f"--pidfile={self.dir}/turnserver.pid",
            f"--listening-port={STUN_PORT}",
            *(f"--listening-ip={ip}" for ip in ips),
        ]
        self.spawn_in("pub", argv, log="coturn.log")
        self._wait_for(lambda: all(self._listening("pub", "-lun", f"{ip}:{STUN_PORT}") for ip in ips), "coturn")

    def start_relay(self) -> None:
        """An opted-in public node serving as relay and verifier on the public side."""
        argv = [
            sys.executable,
            "-m",
            "shardmarket",
            "node",
            "relay",
            "--public-host",
            f"{PUBLIC_NET}.1",
            "--host",
            f"{PUBLIC_NET}.1",
            "--port",
            str(RELAY_PORT),
            "--rate-mbit",
            str(self.relay_rate_mbit),
        ]
        self.relay = self.spawn_in("pub", argv, log="relay.log")
        self._wait_for(lambda: self._listening("pub", "-ltn", f"{PUBLIC_NET}.1:{RELAY_PORT}"), "relay")

    def restart_relay(self) -> None:
        """Stop the relay and start it again: every node it relayed loses its public port."""
        self.stop(self.relay)
        self.start_relay()

    def start_chain(self, state: Path) -> str:
        """anvil on the public side, from a saved chain state (contracts deployed, accounts funded); its RPC URL."""
        argv = [anvil_binary(), "--host", f"{PUBLIC_NET}.1", "--port", str(CHAIN_PORT), "--chain-id", "31337"]
        argv += ["--block-base-fee-per-gas", "0", "--load-state", str(state)]
        self.spawn_in("pub", argv, log="anvil.log")
        self._wait_for(lambda: self._listening("pub", "-ltn", f"{PUBLIC_NET}.1:{CHAIN_PORT}"), "anvil")
        return f"http://{PUBLIC_NET}.1:{CHAIN_PORT}"

    def start_miniupnpd(self) -> None:
        """Debian's miniupnpd on the home router, /dev/console bound to /dev/null (it logs there, slowly)."""
        v = self.variant
        conf = self.dir / "miniupnpd.conf"
        conf.write_text(f"""ext_ifname=wan0
listening_ip=lan0
http_port=5000
enable_upnp={"yes" if v.upnp else "no"}
enable_natpmp={"yes" if v.pcp else "no"}
ext_perform_stun=yes
ext_stun_host={PUBLIC_NET}.1
ext_stun_port={STUN_PORT}
ipv6_disable=yes
secure_mode=yes
system_uptime=no
min_lifetime=2
max_lifetime=86400
lease_file={self.dir}/upnp.leases
uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b
allow 1024-65535 {HOME_NET}.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
""")
        script = f"mount --bind /dev/null /dev/console && exec miniupnpd -d -f {conf} -P {self.dir}/miniupnpd.pid"
        self.miniupnpd = self.spawn_in(
            "rtr", ["unshare", "-m", "--propagation", "private", "sh", "-c", script], log="miniupnpd.log"
        )
        probes = ([("-lun", f"{HOME_NET}.1:5351")] if v.pcp else []) + ([("-ltn", ":5000")] if v.upnp else [])
        self._wait_for(
            lambda: self.miniupnpd.poll() is None and all(self._listening("rtr", f, a) for f, a in probes),
            "miniupnpd",
            alive=self.miniupnpd,
        )

    def stop_router(self) -> None:
        """Stop miniupnpd and flush its chains, as a router reboot would forget every mapping."""
        self.stop(self.miniupnpd)
        for chain in ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd"):
            self.run_in("rtr", ["nft", "flush", "chain", "inet", "filter", chain])
        self.run_in("rtr", ["conntrack", "-F"], check=False)

    def start_router(self) -> None:
        """Start miniupnpd again (its STUN self-test needs the WAN open while it starts)."""
        self.run_in("rtr", ["nft", "delete", "rule", "inet", "filter", "input", "handle", self._wan_drop_handle("rtr")])
        self.start_miniupnpd()
        self.close_wan()

    def _wan_drop_handle(self, role: str) -> str:
        listing = self.run_in(role, ["nft", "-a", "list", "chain", "inet", "filter", "input"]).stdout
        line = next(line for line in listing.splitlines() if "ct state new drop" in line)
        return line.rsplit("handle", 1)[1].strip()

    def _listening(self, role: str, flags: str, addr: str) -> bool:
        out = self.run_in(role, ["ss", "-H", flags], check=False).stdout
        return any(addr in line for line in out.splitlines())

    def _wait_for(self, ready, what: str, timeout: float = 15, alive: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if alive is not None and alive.poll() is not None:
                raise RuntimeError(f"{what} exited ({alive.returncode}) at start-up; see {self.dir}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not come up within {timeout:.0f} s; see its log in {self.dir}")
            time.sleep(0.05)

    # ---- tear-down
    def stop(self, proc: subprocess.Popen | None, timeout: float = 5) -> None:
        """SIGTERM a process group this lab started, then SIGKILL it if it lingers."""
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def teardown(self) -> None:
        """Kill every process started here, delete the namespaces (and with them the veths), remove files."""
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                self.stop(proc)
        for name in reversed(self.created):
            leftover = _sh(["ip", "netns", "pids", name], check=False).stdout.split()
            for pid in leftover:  # only processes inside namespaces this lab created
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            _sh(["ip", "netns", "del", name], check=False)
        self.created.clear()
        if not os.environ.get("SHARDMARKET_LAB_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)
