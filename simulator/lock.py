"""One writer per dataset: a lease lock, and the staging folder that belongs to its holder.

    <output>/.moralsim-locks/<folder>/<generation:08d>.json       the lock: the highest generation holds it
    <output>/.moralsim-staging/<folder>/writer-<generation:08d>/  that holder's staging (runs, checkpoints)

The protocol needs one atomic operation from the store, create-if-absent (`Store.create_exclusive`: link(2) on a
local or shared folder, a PutObject with `If-None-Match: *` on S3):

    take     list the generations. If the highest one is live, refuse with one line (DatasetLockedError). Otherwise
             create generation + 1 if absent: of two drivers racing for that number one wins, and the other then
             finds a live holder. Older generations are deleted; the highest is never deleted, so numbers only grow.
    live     not released, renewed within its lease, and, when it was taken on this machine (same host, boot and pid
             namespace), its pid still runs. A dead or expired holder is taken over, with a warning naming it.
    renew    a thread rewrites the holder's own generation every lease / 4. A holder that finds a higher generation
             has lost the lock: it stops before its next commit (LockLostError).
    release  the holder marks its own generation released.
A holder only ever writes its own generation, so one that was taken over and wakes up cannot overwrite its
successor, and its staging folder is its own, so it cannot mix files into its successor's runs either. Leases
compare the holder's clock with the reader's: machines sharing a dataset need clocks within a lease of each other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.errors import DatasetLockedError, LockLostError
from simulator.storage import Store, redact

log = logging.getLogger("moralsim.lock")

LOCKS = ".moralsim-locks"
STAGING = ".moralsim-staging"
LEASE_S = 120.0  # a holder not heard of for this long is taken over; it renews every LEASE_S / 4
LEASE_ENV = "MORALSIM_LOCK_LEASE_S"


def lease_seconds() -> float:
    value = os.environ.get(LEASE_ENV)
    return float(value) if value else LEASE_S


def machine_id() -> str:
    """This machine as a pid namespace: host name, boot id and pid namespace (a pid means nothing elsewhere)."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    return "|".join(parts)


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a killed child nobody has reaped yet still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def why_free(holder: dict[str, Any], now: float | None = None) -> str | None:
    """Why the lock described by holder can be taken ("released", "its process is gone", "its lease expired ..."),
    or None when its holder is live."""
    if holder.get("released"):
        return "released"
    now = time.time() if now is None else now
    if holder.get("machine") == machine_id() and not pid_running(int(holder["pid"])):
        return "its process is gone"
    silent = now - float(holder["renewed"])
    if silent > float(holder["lease_s"]):
        return f"its lease expired: not renewed for {silent:.0f} s (lease {float(holder['lease_s']):.0f} s)"
    return None


@dataclass
class DatasetLock:
    """The lock of one dataset, held by this driver; passed to Ray tasks (without its renewal thread), which check
    it before they commit a run."""

    output: str
    folder: str
    generation: int
    token: str
    lease_s: float
    _lost: str | None = field(default=None, repr=False)
    _stop: threading.Event | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_stop": None, "_thread": None}

    @property
    def store(self) -> Store:
        return Store.open(self.output)

    @property
    def where(self) -> str:
        return self.store.display(self.store.path(self.folder))

    @property
    def staging(self) -> str:
        """This holder's staging folder: nobody else writes there."""
        return self.store.path(STAGING, self.folder, f"writer-{self.generation:08d}")

    @staticmethod
    def folder_path(store: Store, folder: str) -> str:
        return store.path(LOCKS, folder)

    def _path(self, generation: int) -> str:
        return f"{self.folder_path(self.store, self.folder)}/{generation:08d}.json"

    # -- taking -----------------------------------------------------------------------------------------------
    @classmethod
    def take(cls, output: str | os.PathLike[str], folder: str, lease_s: float | None = None) -> DatasetLock:
        """The dataset's lock, or DatasetLockedError naming its live holder. Starts the renewal thread."""
        store = Store.open(output)
        lock = cls(os.fspath(output), folder, 0, uuid.uuid4().hex, lease_s or lease_seconds())
        if not store.atomic_create:
            log.warning("%s: this filesystem has no atomic create through pyarrow, so the dataset lock is advisory: "
                        "two drivers started at the same moment may both write", lock.where)
        for _ in range(20):  # each pass either ends or saw another driver move the lock on
            top, holder = lock._top()
            if holder is not None and holder.get("token") == lock.token:  # a reply lost after our create succeeded
                return lock._held(top, None)
            reason = None
            if holder is not None:
                reason = why_free(holder)
                if reason is None:
                    raise DatasetLockedError(
                        f"{lock.where} is being written by pid {holder['pid']} on host {holder['host']} since "
                        f"{_when(float(holder['since']))}; wait for it or stop it")
            now = time.time()
            doc = {"generation": top + 1, "token": lock.token, "pid": os.getpid(), "host": socket.gethostname(),
                   "machine": machine_id(), "since": now, "renewed": now, "lease_s": lock.lease_s, "released": False,
                   "command": [redact(a) for a in sys.argv]}
            if store.create_exclusive(lock._path(top + 1), json.dumps(doc, indent=1).encode()):
                return lock._held(top + 1, (holder, reason) if holder is not None and reason != "released" else None)
        raise DatasetLockedError(f"{lock.where}: the lock kept changing hands; another driver is starting on it")

    def _top(self) -> tuple[int, dict[str, Any] | None]:
        """The highest generation and what it says (None when there is none). Retries a generation deleted or
        being written between the listing and the read."""
        store, folder = self.store, self.folder_path(self.store, self.folder)
        for _ in range(10):
            gens = sorted(int(n[:-5]) for n in store.names(folder) if n.endswith(".json") and n[:-5].isdigit())
            if not gens:
                return 0, None
            try:
                return gens[-1], store.read_json(self._path(gens[-1]))
            except (OSError, ValueError):
                time.sleep(0.05)
        raise DatasetLockedError(f"{self.where}: its lock {store.display(self._path(gens[-1]))} cannot be read; if no "
                                 "driver is writing this dataset, delete that file")

    def _held(self, generation: int, taken_from: tuple[dict[str, Any], str | None] | None) -> DatasetLock:
        self.generation = generation
        if taken_from is not None:
            holder, reason = taken_from
            log.warning("%s: taking over the lock of pid %s on host %s (since %s): %s", self.where, holder["pid"],
                        holder["host"], _when(float(holder["since"])), reason)
        store = self.store
        for name in store.names(self.folder_path(store, self.folder)):
            if name.endswith(".json") and name[:-5].isdigit() and int(name[:-5]) < generation:
                with contextlib.suppress(OSError):  # another driver cleaning up too
                    store.delete_file(f"{self.folder_path(store, self.folder)}/{name}")
        log.debug("%s: lock generation %d taken (lease %.0f s)", self.where, generation, self.lease_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"moralsim-lock-{self.folder}", daemon=True)
        self._thread.start()
        return self

    # -- holding ----------------------------------------------------------------------------------------------
    def _mine(self) -> dict[str, Any]:
        """This holder's lock document, or LockLostError when another driver holds the lock now."""
        top, holder = self._top()
        if top != self.generation or holder is None or holder.get("token") != self.token:
            who = (f"pid {holder['pid']} on host {holder['host']} since {_when(float(holder['since']))}"
                   if holder and top != self.generation else "another driver")
            raise LockLostError(f"{self.where}: this driver lost its lock to {who} (its lease of {self.lease_s:.0f} s "
                                "had run out, so it was taken for dead); it stops before writing more")
        if holder.get("released"):
            raise LockLostError(f"{self.where}: this driver's lock was already released")
        return holder

    def renew(self) -> None:
        doc = self._mine()
        doc["renewed"] = time.time()
        self.store.write_json(self._path(self.generation), doc, indent=1)

    def _renew_loop(self) -> None:
        assert self._stop is not None
        while not self._stop.wait(self.lease_s / 4):
            try:
                self.renew()
            except LockLostError as e:
                self._lost = str(e)
                log.error("%s", e)
                return
            except OSError as e:  # the store did not answer: try again, the lease has room for it
                log.warning("%s: could not renew the lock: %s", self.where, e)

    def check(self) -> None:
        """LockLostError if the renewal thread found the lock taken over (no I/O)."""
        if self._lost:
            raise LockLostError(self._lost)

    def verify(self) -> None:
        """LockLostError unless this driver still holds the lock, read from the store (before each commit)."""
        self.check()
        self._mine()

    def release(self) -> None:
        """Stop renewing and mark the lock released, if this driver still holds it."""
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._thread = self._stop = None
        try:
            doc = self._mine()
        except (LockLostError, OSError, DatasetLockedError):
            return
        doc["released"] = True
        doc["renewed"] = time.time()
        self.store.write_json(self._path(self.generation), doc, indent=1)

    def __enter__(self) -> DatasetLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
