"""Joining Ray: the one place moralsim calls `ray.init` (the driver's tasks, the LLM actors).

`connect(address)` fails fast with a ClusterError that names the address when no Ray cluster answers there, instead
of Ray's own behaviour (minutes of GCS retries at 0%):
    1. a TCP connect to host:port (refused, unreachable or unresolvable fails at once; a silent host after 5 s),
    2. a gRPC handshake and one read-only GCS call, GetClusterId (an open port that is no Ray GCS fails within
       10 s, instead of Ray's 20 retries a second apart),
    3. ray.init itself; its ConnectionError / RuntimeError become ClusterError.
Without an address a local Ray is started, as before. "auto" (and RAY_ADDRESS) are left to Ray, which refuses
quickly when it finds no cluster. Ray is imported lazily: importing this module never imports ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from typing import Any

from simulator.errors import ClusterError

log = logging.getLogger("moralsim.cluster")

GCS_PORT = 6379  # `ray start --head` default
CLIENT_PORT = 10001  # Ray client server (ray://) default
PROBE_SECONDS = 5.0  # the TCP connect
GRPC_SECONDS = 10.0  # the gRPC handshake and the GCS probe each; the whole check stays within timeout_s
GCS_PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"


def is_connected() -> bool:
    """Whether Ray is initialised in this process (without importing ray when nothing has)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def split_address(address: str) -> tuple[str, int]:
    """host and port of 'host:port', 'ray://host[:port]', '[v6]:port' (Ray's default ports when none is given)."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    rest = rest.split("/", 1)[0]
    default = CLIENT_PORT if scheme else GCS_PORT
    if rest.startswith("["):  # [::1]:6379
        host, _, tail = rest[1:].partition("]")
        port_text = tail.lstrip(":")
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
    else:
        host, port_text = rest, ""
    if not host:
        raise ClusterError(f"bad Ray address {address!r}: expected host:port (e.g. 10.0.0.5:6379), ray://host:10001 "
                           f"or auto")
    if not port_text:
        return host, default
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ClusterError(f"bad Ray address {address!r}: the port {port_text!r} is not a number in 1..65535")
    return host, int(port_text)


def _how_to() -> str:
    return (f"Start one on that machine with `ray start --head` and pass its address (host:{GCS_PORT} by default; "
            f"`auto` on a node of the cluster), or leave out --ray_address to run on a local Ray that moralsim starts "
            f"itself")


def check_reachable(address: str, timeout_s: float = 30.0, probe_s: float = PROBE_SECONDS) -> None:
    """Raise ClusterError unless something at address answers like a Ray GCS / client server within timeout_s."""
    t0 = time.monotonic()
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=min(probe_s, timeout_s)):
            pass
    except OSError as e:
        if isinstance(e, socket.gaierror):
            reason = f"cannot resolve host {host!r}: {e.strerror or e}"
        elif isinstance(e, TimeoutError):
            reason = f"no answer from {host}:{port} within {min(probe_s, timeout_s):g} s"
        else:
            reason = f"{host}:{port}: {e.strerror or e}"
        raise ClusterError(f"no Ray cluster answered at {address!r} ({reason}). {_how_to()}.") from None
    try:
        import grpc
    except ImportError:  # pragma: no cover - ray depends on grpcio
        return
    left = min(GRPC_SECONDS, max(1.0, timeout_s - (time.monotonic() - t0)))
    # Ray's own channels ignore http_proxy unless RAY_grpc_enable_http_proxy is set (ray_constants.GLOBAL_GRPC_OPTIONS)
    proxy = int(os.environ.get("RAY_grpc_enable_http_proxy", "0").lower() in ("1", "true"))  # noqa: SIM112
    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                                    options=[("grpc.enable_http_proxy", proxy)])
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=left)
        except grpc.FutureTimeoutError:
            raise ClusterError(
                f"no Ray cluster answered at {address!r}: {host}:{port} accepts connections but did not answer as a "
                f"Ray server within {left:.0f} s (the head node's GCS listens on {GCS_PORT} by default, the client "
                f"server for ray:// on {CLIENT_PORT}). {_how_to()}."
            ) from None
        if "://" in address:  # the Ray client server: answering gRPC is as far as this check goes
            return
        try:  # an empty GetClusterIdRequest: what Ray's own GcsClient asks first
            channel.unary_unary(GCS_PROBE_METHOD)(b"", timeout=left)
        except grpc.RpcError as e:
            code = e.code() if callable(getattr(e, "code", None)) else None
            if code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):  # a GCS wanting a token
                detail = e.details() if callable(getattr(e, "details", None)) else str(e)
                raise ClusterError(
                    f"no Ray cluster answered at {address!r}: {host}:{port} answers, but not as a Ray GCS "
                    f"({getattr(code, 'name', code)}: {detail}). {_how_to()}."
                ) from None
    finally:
        channel.close()


def connect(
    address: str | None = None,
    num_cpus: int | None = None,
    timeout_s: float = 30.0,
    *,
    include_dashboard: bool = False,
    log_to_driver: bool = True,
    **init_kwargs: Any,
) -> None:
    """Initialise Ray once per process: join the cluster at address, or start a local one (address None).

    Does nothing when Ray is already initialised. num_cpus applies to a local Ray only (Ray refuses it when joining
    a cluster). Raises ClusterError, naming the address, when no cluster answers within about timeout_s.
    """
    if is_connected():
        return
    address = address or None
    if address is not None and address not in ("auto", "local"):
        check_reachable(address, timeout_s)
    import ray

    kwargs: dict[str, Any] = {"include_dashboard": include_dashboard, "log_to_driver": log_to_driver, **init_kwargs}
    if address is not None:
        kwargs["address"] = address
    if num_cpus and address in (None, "local"):
        kwargs["num_cpus"] = num_cpus
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError) as e:
        if address is None:
            raise
        what = "no Ray cluster found" if address == "auto" else f"could not join the Ray cluster at {address!r}"
        raise ClusterError(f"{what}: {e}. {_how_to()}.") from e
    log.debug("Ray initialised (%s)", address or "local")


# ── one dataset on a cluster ────────────────────────────────────────────────────────────────────────────────────


PROBES = ".moralsim-staging/.probes"


def _write_probe(output: str, token: str) -> str:
    """Runs on one node: write the probe `<output>/.moralsim-staging/.probes/<token>-<node>` through the output's
    store (a folder or a filesystem URI) there; returns the node's id (a Ray task body)."""
    import ray

    from simulator.storage import Store

    node = str(ray.get_runtime_context().get_node_id())
    store = Store.open(output)
    folder = store.path(PROBES)
    store.makedirs(folder)
    store.write_bytes(f"{folder}/{token}-{node}", node.encode())
    return node


def check_shared_output(output: str | os.PathLike[str], timeout_s: float = 60.0,
                        probe: Any = None) -> list[str]:
    """Check that every alive node writes where this driver reads: each node writes a probe into `output` (a folder,
    as an absolute path, or a filesystem URI such as s3://bucket/prefix), and the driver must find every one of
    them. Fails fast with a ClusterError naming the nodes whose writes it cannot see (their records would land on
    their own disks, outside the dataset) or that cannot write there at all (no credentials, no route).

    Returns the node ids checked. `probe` replaces the task body (tests simulate a node with its own disk).
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from simulator.storage import Store, is_uri, redact

    where = os.fspath(output) if is_uri(output) else os.path.abspath(os.fspath(output))
    store = Store.open(where)
    folder = store.path(PROBES)
    token = uuid.uuid4().hex
    body = ray.remote(num_cpus=0, max_retries=0)(probe or _write_probe)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    refs = [body.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(where, token)
            for n in nodes]
    written, failed = [], []
    for n, ref in zip(nodes, refs, strict=True):
        try:
            written.append(ray.get(ref, timeout=timeout_s))
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(f"the nodes did not answer the output check within {timeout_s:.0f} s") from None
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            failed.append(f"node {n[:12]}: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
    if failed:
        raise ClusterError(f"--output {redact(os.fspath(output))!r}: {len(failed)} of {len(nodes)} Ray nodes cannot write "
                           f"there ({'; '.join(failed)})")
    missing = [n for n in written if not store.exists(f"{folder}/{token}-{n}")]
    for n in written:
        with contextlib.suppress(OSError):
            store.delete_file(f"{folder}/{token}-{n}")
    if missing:
        raise ClusterError(
            f"--output {redact(os.fspath(output))!r} is not shared: {len(missing)} of {len(nodes)} Ray nodes wrote their probe "
            f"file where this driver cannot read it (nodes {', '.join(m[:12] for m in missing)}). Their records would "
            "land on their own disks. Use a folder every node mounts at the same path (NFS, a shared volume), or an "
            "object store URI such as s3://bucket/prefix."
        )
    log.info("output %s is shared by all %d nodes", redact(os.fspath(output)), len(nodes))
    return list(written)
