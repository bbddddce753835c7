"""The Ray session a sweep (or a parallel retrain) runs on: a private local Ray, or a cluster.

Joining a cluster is checked first, in one line and at once, where Ray itself would retry for
minutes: nothing listening, a service that is not Ray, a cluster that refuses this process's
authentication token. Then the cluster must have the per-trial CPUs/GPUs, or trials would wait
forever.

The authentication check calls Ray's GCS through Ray's private client
(`oialr_tune.tuning._internals.ping_gcs`): Ray has no public call that checks credentials without
``ray.init``'s retry loop.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import ray
from ray.exceptions import AuthenticationError, RpcError

from oialr_tune.errors import UserError
from oialr_tune.space import Resources
from oialr_tune.tuning._internals import ping_gcs, quiet_token_setup_warning

__all__ = ["check_address", "check_cluster_fits", "slots", "start_ray", "stop_ray"]


def check_address(address: str) -> None:
    """Fail fast, in one line, when no Ray cluster answers at an address (Ray itself retries for
    minutes). ``auto`` is checked by Ray quickly; ``host:port`` and ``ray://host:port`` get a TCP
    connect and then an HTTP/2 handshake with short timeouts: Ray's GCS and its client server speak
    gRPC, which answers the HTTP/2 preface with a SETTINGS frame at once, so a different service
    on that port (a typo, a stale port) is told apart without Ray's retry loop."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"--address: expected auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        conn = socket.create_connection((host or "127.0.0.1", int(port)), timeout=3)
    except OSError as e:  # refused, unreachable, unknown host, or no answer within the timeout
        raise UserError(f"--address: no Ray cluster reachable at {address} ({e.strerror or e})") from None
    with conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return  # a TLS cluster answers only a TLS handshake; let Ray try
        try:
            conn.settimeout(3)
            conn.sendall(_HTTP2_PREFACE)
            head = conn.recv(9)
        except TimeoutError:
            raise UserError(f"--address: {address} accepts connections but does not answer like Ray (gRPC)") from None
        except OSError as e:
            raise UserError(
                f"--address: {address} dropped the connection ({e.strerror or e}); not a Ray cluster"
            ) from None
    if len(head) < 4 or head[3] != 0x04:  # byte 3 of an HTTP/2 frame header is its type; 4 = SETTINGS
        raise UserError(f"--address: {address} is not a Ray cluster (it does not speak gRPC)")
    if not address.startswith("ray://"):
        _check_auth(address, f"{host or '127.0.0.1'}:{port}")


def _check_auth(address: str, gcs_address: str) -> None:
    """Fail fast, in one line, when the server is not a Ray GCS or refuses this process's credentials.

    Any gRPC server passes the HTTP/2 handshake; against one that is not Ray's GCS, ``ray.init``
    waits for ever and ignores SIGTERM. One call to the GCS, with a 5 s deadline, tells them apart.
    It also checks authentication: a cluster started with ``ray start`` uses tokens (Ray >= 2.52); a
    driver without the cluster's token is refused, and ``ray.init`` then retries for about 20 s,
    logging a warning per retry, before a generic "Failed to connect". The call carries the
    credentials ``ray.init`` would send (``RAY_AUTH_MODE``, then ``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and is refused at once with an AuthenticationError.
    """
    try:
        _ping_gcs(gcs_address, timeout_ms=5000)
    except AuthenticationError:
        sources = "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            raise UserError(
                f"--address: the Ray cluster at {address} requires token authentication: set RAY_AUTH_MODE=token "
                f"and give this process the cluster's token ({sources})"
            ) from None
        raise UserError(
            f"--address: the Ray cluster at {address} refused this process's authentication token; "
            f"use the head node's token ({sources})"
        ) from None
    except RpcError as e:  # no answer within the deadline, or a gRPC error: not Ray's GCS
        raise UserError(f"--address: {address} speaks HTTP/2 but is not a Ray cluster ({e})") from None
    except Exception:  # anything else: ray.init says what it says
        return


def _ping_gcs(gcs_address: str, timeout_ms: int) -> None:
    """One call to the GCS at `gcs_address` with this process's credentials (Ray's private client:
    see the module notes). Raises AuthenticationError when refused, RpcError when no GCS answers."""
    with _stderr_silenced():  # Ray's C++ client logs the refusal on fd 2 itself
        ping_gcs(gcs_address, timeout_ms)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the duration (Ray's C++ logging bypasses sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# The HTTP/2 client connection preface followed by an empty SETTINGS frame.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def start_ray(address: str | None, verbose: int) -> bool:
    """Connect to (or start) Ray; returns True if this call started it (and should stop it).

    An already initialized Ray (a notebook, the test session) is used as is.
    """
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "logging_level": logging.INFO if verbose >= 2 else logging.WARNING,
        "log_to_driver": verbose >= 2,  # trial output stays in the trials' log files
    }
    if address is None:
        if verbose < 2:
            # Ray logs a warning about its token authentication on every local start; for a private
            # instance that this command starts and stops itself, it is noise.
            quiet_token_setup_warning()
        # "local": always a fresh instance, never a cluster some other process started with `ray start`.
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, **kwargs)
        return True
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError) as e:  # ValueError: ray:// without the ray[client] extra
        raise UserError(f"--address: {str(e).splitlines()[0]}") from None
    return True


def stop_ray() -> None:
    """Disconnect from (or stop) the Ray this process started.

    Ray Tune's objects that hold Ray object references can sit in reference cycles; one the garbage
    collector frees after ``ray.shutdown`` makes Ray's core worker end the whole process ("The core
    worker has already been shutdown", exit 1, unflushed output lost). Collecting first frees them
    while Ray is up: a second sweep in the same process (compare, a notebook) then starts clean.
    """
    gc.collect()
    ray.shutdown()


# What the Tune trial of a multi-worker trial holds itself beside its Ray Train workers (worker.make_trainable).
TRIAL_CPU = 0.01


def _trial_cpus(r: Resources, trial: bool) -> float:
    """The CPUs one trial (`trial`) or one retrain run holds: its workers', and a multi-worker trial's own."""
    return r.cpu * r.workers + (TRIAL_CPU if trial and r.workers > 1 else 0)


def check_cluster_fits(r: Resources, *, trial: bool = True) -> None:
    """A trial (`trial`) or retrain run asking for more than the cluster has would wait forever: refuse it now.

    (A trial of N workers at ``cpu: 1`` on N CPUs does not fit: its Tune trial holds 0.01 CPU more.)
    """
    have = ray.cluster_resources()
    each = f" x {r.workers} workers" if r.workers > 1 else ""
    if _trial_cpus(r, trial) > have.get("CPU", 0):
        plus = f" (+ {TRIAL_CPU} for the trial itself)" if trial and r.workers > 1 else ""
        raise UserError(f"resources.cpu: {r.cpu} per trial{each}{plus} but the Ray cluster has "
                        f"{have.get('CPU', 0)} CPU(s)")
    if r.gpu * r.workers > have.get("GPU", 0):
        raise UserError(f"resources.gpu: {r.gpu} per trial{each} but the Ray cluster has {have.get('GPU', 0)} GPU(s)")


def slots(resources: Resources, have: Mapping[str, float]) -> int:
    """How many trials fit at once on a cluster with resources `have` (``ray.cluster_resources()``).

    Passed to Ray as ``max_concurrent_trials`` when the space leaves ``budget.max_concurrent`` unset.
    With any searcher but its own random/grid one, Ray otherwise keeps at most *one* trial pending
    (``TUNE_MAX_PENDING_TRIALS_PG``), so trial workers start one after another, each waiting until
    the previous trial runs; with the limit they start together, and the searcher proposes no config
    that could not run yet.
    """
    n = resources.workers  # a multi-worker trial holds n workers' resources (and its own TRIAL_CPU)
    fits = [have.get("CPU", 0) / _trial_cpus(resources, trial=True)] if resources.cpu > 0 else []
    if resources.gpu > 0:
        fits.append(have.get("GPU", 0) / (n * resources.gpu))
    return max(1, int(min(fits, default=1) + 1e-9))

