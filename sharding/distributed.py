"""Multi-process JAX start-up: one process per host, joined into one global device set.

Every host process calls :func:`initialize` before it touches a device; afterwards
``jax.devices()`` lists the devices of all hosts, and a mesh built over them (``make_mesh``) spans
the cluster. Process 0 runs the coordinator; the others connect to it.

    port = free_port(my_address)                # process 0 only, sent to the others
    initialize(Coordinator(f"{my_address}:{port}", num_processes=4, process_id=rank))

On CPU (tests) each process can be given several virtual devices (``cpu_devices``), so two
processes x four devices stand in for two hosts x four chips.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import jax


@dataclass(frozen=True)
class Coordinator:
    """Where the processes of one multi-process JAX program meet.

    Attributes:
        address: ``host:port`` of process 0's coordinator service, reachable from every host.
        num_processes: processes in the program (one per host).
        process_id: this process's index in ``[0, num_processes)``.
    """

    address: str
    num_processes: int
    process_id: int

    def __post_init__(self) -> None:
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise ValueError(
                f"process_id {self.process_id} is not in [0, num_processes={self.num_processes})"
            )
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"coordinator address {self.address!r} is not of the form host:port")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (for the coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def initialize(
    coordinator: Coordinator,
    cpu_devices: int | None = None,
    initialization_timeout_s: int = 300,
) -> None:
    """Join this process to the multi-process JAX program; call before any device is used.

    Args:
        coordinator: where to meet and which process this is.
        cpu_devices: give this process that many virtual CPU devices (testing without
            accelerators); ``None`` keeps the host's own devices.
        initialization_timeout_s: how long to wait for every process to connect.

    The coordinator service binds to the coordinator's own address only (not every interface),
    so on one machine it stays on loopback.
    """
    if cpu_devices is not None:
        # Must precede backend start-up; it overrides --xla_force_host_platform_device_count.
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    jax.distributed.initialize(
        coordinator_address=coordinator.address,
        num_processes=coordinator.num_processes,
        process_id=coordinator.process_id,
        coordinator_bind_address=(coordinator.address if coordinator.process_id == 0 else None),
        initialization_timeout=initialization_timeout_s,
    )
