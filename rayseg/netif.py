"""Which network interface training workers talk on: the one that holds the node's Ray address.

gloo (and NCCL's socket transport) pick an interface from the hostname when none is named. Where
the hostname resolves to a loopback address (Debian and Ubuntu's `127.0.1.1` entry, many
containers) each rank advertises 127.0.0.1 to its peers, and a process group across hosts cannot
form. Ray already knows the address other hosts reach this node at (`ray start
--node-ip-address`, or the one it detected): `pin_socket_interface` runs in every Ray Train worker
process (a runtime_env worker_process_setup_hook) and names that address's interface in
GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME, unless the user set them.

`collective_failure` turns the failure to form a process group into one line saying what to set.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping, MutableMapping

SOCKET_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
SETUP_HOOK = "rayseg.netif.pin_socket_interface"  # importable on every worker (installed/uploaded)


def interface_of(address: str, interfaces: Mapping[str, list[str]]) -> str | None:
    """The name of the interface holding `address` (None if no interface holds it).

    `interfaces` maps names to their addresses (psutil.net_if_addrs' shape, addresses only).
    """
    wanted = ipaddress.ip_address(address)
    for name, addresses in interfaces.items():
        for text in addresses:
            try:
                if ipaddress.ip_address(text.split("%", 1)[0]) == wanted:
                    return name
            except ValueError:  # a MAC address, or another family's notation
                continue
    return None


def local_interfaces() -> dict[str, list[str]]:
    import psutil

    return {name: [a.address for a in addrs] for name, addrs in psutil.net_if_addrs().items()}


def socket_settings(
    address: str, interfaces: Mapping[str, list[str]], environ: Mapping[str, str]
) -> dict[str, str]:
    """The socket variables to set: the interface of `address` for each one the user left unset."""
    name = interface_of(address, interfaces)
    if name is None:
        return {}
    return {var: name for var in SOCKET_VARIABLES if not environ.get(var)}


def pin_socket_interface(environ: MutableMapping[str, str] | None = None) -> None:
    """Ray worker_process_setup_hook: gloo and NCCL talk on the interface of the node's address."""
    import ray

    environ = os.environ if environ is None else environ
    try:
        address, interfaces = ray.util.get_node_ip_address(), local_interfaces()
    except Exception:  # a hook that raises ends the worker: keep gloo's own choice instead
        return
    environ.update(socket_settings(address, interfaces, environ))


# gloo: "Gloo connectFullMesh failed ... Connection refused, remote=[127.0.0.1]:24470";
# NCCL: "NCCL error ... socket" / "Bootstrap : no socket interface found".
_GLOO = re.compile(r"Gloo connectFullMesh failed.*?remote=\[([^\]]+)\]", re.S)
_NCCL = re.compile(r"NCCL[^\n]*(?:no socket interface|Socket|socket)")


def collective_failure(text: str) -> str | None:
    """One line for a process group that could not form (None if `text` is another failure)."""
    what = None
    if match := _GLOO.search(text):
        peer = match.group(1)
        loopback = _is_loopback(peer)
        what = f"gloo could not connect training workers (a peer advertised {peer}" + (
            ", a loopback address other hosts cannot reach)" if loopback else ")"
        )
    elif _NCCL.search(text):
        what = "NCCL could not connect training workers over sockets"
    if what is None:
        return None
    return (
        f"{what}; set GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME with GPUs) on every node to the "
        "network interface of the address Ray uses there (`ray start --node-ip-address`), or "
        "unset it to let rayseg choose that interface"
    )


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False
