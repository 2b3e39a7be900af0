"""Bind host buffers to a NUMA node (CXL memory appears as a node without CPUs).

Uses the ``mbind``/``get_mempolicy`` system calls through ctypes, so libnuma is not needed.
The binding must happen before the pages are first touched: pages are placed at first touch.
"""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

from memtrain.errors import MemtrainError

NODE_ROOT = Path("/sys/devices/system/node")
MPOL_BIND = 2
MPOL_MF_STRICT = 1
MPOL_F_NODE = 1
MPOL_F_ADDR = 2
_SYSCALLS = {  # machine -> (mbind, get_mempolicy)
    "x86_64": (237, 239),
    "aarch64": (235, 236),
}


def numa_nodes(root: Path = NODE_ROOT) -> list[int]:
    """NUMA nodes the kernel reports (empty where the machine has no NUMA sysfs)."""
    if not root.is_dir():
        return []
    out = []
    for entry in root.iterdir():
        name = entry.name
        if name.startswith("node") and name[4:].isdigit():
            out.append(int(name[4:]))
    return sorted(out)


def check_node(node: int, root: Path = NODE_ROOT) -> None:
    """Raise a clear error unless ``node`` exists."""
    nodes = numa_nodes(root)
    if node not in nodes:
        shown = ", ".join(map(str, nodes)) or "none"
        raise MemtrainError(
            f"NUMA node {node} does not exist on this machine (nodes: {shown}); "
            "set the CXL tier's numa_node to one of them"
        )


def _syscall_numbers() -> tuple[int, int]:
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise MemtrainError(
            f"binding memory to a NUMA node is not supported on {platform.machine()}"
        )
    return numbers


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def bind(address: int, length: int, node: int) -> None:
    """``mbind(address, length, MPOL_BIND, {node})``; address must be page aligned."""
    check_node(node)
    mbind, _ = _syscall_numbers()
    bits = 8 * ctypes.sizeof(ctypes.c_ulong)
    mask = (ctypes.c_ulong * (node // bits + 1))()
    mask[node // bits] = 1 << (node % bits)
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(
        ctypes.c_long(mbind),
        ctypes.c_void_p(address),
        ctypes.c_ulong(length),
        ctypes.c_int(MPOL_BIND),
        mask,
        ctypes.c_ulong(len(mask) * bits + 1),
        ctypes.c_uint(MPOL_MF_STRICT),
    )
    if result != 0:
        errno = ctypes.get_errno()
        raise MemtrainError(
            f"mbind to NUMA node {node} failed ({os.strerror(errno)}); "
            "check the node has memory and that the process may bind to it"
        )


def node_of(address: int) -> int:
    """The NUMA node the page at ``address`` lives on (it must have been touched)."""
    _, get_mempolicy = _syscall_numbers()
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    node = ctypes.c_int(-1)
    result = libc.syscall(
        ctypes.c_long(get_mempolicy),
        ctypes.byref(node),
        ctypes.c_void_p(0),
        ctypes.c_ulong(0),
        ctypes.c_void_p(address),
        ctypes.c_ulong(MPOL_F_NODE | MPOL_F_ADDR),
    )
    if result != 0:
        raise MemtrainError(f"get_mempolicy failed ({os.strerror(ctypes.get_errno())})")
    return node.value
