"""rayseg.netif: the interface gloo and NCCL talk on, and the one line when they cannot connect."""

from __future__ import annotations

from rayseg import netif

INTERFACES = {
    "lo": ["127.0.0.1", "::1", "00:00:00:00:00:00"],
    "eth0": ["198.51.100.11", "fe80::1%eth0", "02:fc:00:00:00:01"],
    "eth1": ["203.0.113.7", "2001:db8::7"],
}


def test_interface_of_finds_the_address_on_any_interface():
    assert netif.interface_of("198.51.100.11", INTERFACES) == "eth0"
    assert netif.interface_of("2001:db8::7", INTERFACES) == "eth1"
    assert netif.interface_of("127.0.0.1", INTERFACES) == "lo"
    assert netif.interface_of("198.51.100.12", INTERFACES) is None


def test_socket_settings_name_the_node_address_interface_unless_the_user_did():
    assert netif.socket_settings("203.0.113.7", INTERFACES, {}) == {
        "GLOO_SOCKET_IFNAME": "eth1",
        "NCCL_SOCKET_IFNAME": "eth1",
    }
    user = {"GLOO_SOCKET_IFNAME": "bond0"}
    assert netif.socket_settings("203.0.113.7", INTERFACES, user) == {"NCCL_SOCKET_IFNAME": "eth1"}
    # An address no interface holds (NAT, a proxy): leave the choice to gloo.
    assert netif.socket_settings("192.0.2.99", INTERFACES, {}) == {}


def test_pin_socket_interface_uses_rays_node_address(monkeypatch):
    import ray

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "198.51.100.11")
    monkeypatch.setattr(netif, "local_interfaces", lambda: INTERFACES)
    environ = {"NCCL_SOCKET_IFNAME": "ib0"}
    netif.pin_socket_interface(environ)
    assert environ == {"NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "eth0"}


def test_local_interfaces_hold_the_loopback_address():
    assert netif.interface_of("127.0.0.1", netif.local_interfaces()) is not None


def test_collective_failure_says_what_to_set():
    gloo = (
        "ray::execute._setup_torch_process_group() (pid=147, ip=198.51.100.11)\n"
        "RuntimeError: Gloo connectFullMesh failed with [.../pair.cc:152] timed out connecting: "
        "SO_ERROR: Connection refused, remote=[127.0.0.1]:8607"
    )
    line = netif.collective_failure(gloo)
    assert "\n" not in line
    assert "peer advertised 127.0.0.1, a loopback address" in line
    assert "GLOO_SOCKET_IFNAME" in line and "NCCL_SOCKET_IFNAME" in line
    assert "loopback" not in netif.collective_failure(gloo.replace("127.0.0.1", "10.0.0.2"))
    assert "NCCL could not connect" in netif.collective_failure(
        "NCCL error: Bootstrap : no socket interface found"
    )
    assert netif.collective_failure("RuntimeError: CUDA out of memory") is None
