"""Where the server computes: on a thread of the HTTP process, or in a compute process of its own.

The HTTP layer (``serving.app``) talks to one of two implementations of the same small interface:
``recommend``, ``similar``, ``reload`` (all awaitable), ``info`` (the served bundle) and ``alive``.

* :class:`LocalCompute`: the :class:`~serving.batching.Batcher`'s compute thread inside the HTTP
  process. Simple, and what in-process tests use.
* :class:`ComputeProcess` (``funnel serve`` default): the same Batcher and Funnel in a child
  process (``python -m serving.compute``), connected by a socket pair. Why: in one process the
  event loop (HTTP parsing, validation, JSON) and the compute thread share one GIL. Profiled at 64
  clients, the compute thread spent ~24% of its time waiting to get the GIL back after every torch
  or numpy call that released it, and the event loop held it for ~40% of the server's CPU; the two
  could never use two cores. Apart, each has a core and its own GIL; a request costs one pickled
  message each way (tens of microseconds). The bundle is loaded, verified and frozen
  (``gc.freeze``) in the child only; a reload is verified by the child on a thread of its own while
  it keeps serving, and swapped between batches, so a batch never mixes bundles here either.

The wire format between the two is private to this module (length-prefixed pickles over a socket
pair the parent created; both ends are this code): nothing from outside is ever unpickled.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from serving.batching import BatchConfig, Batcher
from serving.bundle import BundleError
from serving.funnel import Funnel, FunnelConfig, RecommendRequest, RequestError
from serving.metrics import GcState, gc_state

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
READY_TIMEOUT_S = 600.0  # loading verifies every checksum and runs a smoke request: big bundles take a while


class ComputeDied(RuntimeError):
    """The compute process is gone: nothing can be answered until the server restarts."""


def freeze_heap() -> None:
    """Exempt every object alive now from the cyclic garbage collector's scans (``gc.freeze``).

    Why: a loaded server holds ~400,000 GC-tracked objects (torch, FastAPI, pydantic, the bundle's
    programs); every full collection walked them all with the GIL held, 230-300 ms on this machine,
    triggered every few seconds by request garbage: the stalls behind the 64-client p99. Frozen, a
    full collection takes ~0.01 ms.
    """
    gc.collect()
    gc.freeze()


def release_and_freeze(retired: weakref.ref[Any], attempts: int = 10, pause_s: float = 0.2) -> bool:
    """After a reload: collect the retired bundle, then freeze the heap again.

    Frozen objects are never collected, and a bundle's programs hold reference cycles, so the old
    bundle must be gone before the next freeze; requests still running on it keep it alive for up to
    a batch, hence the pauses. Each attempt is one full collection (~0.3 s with the GIL held). False:
    still alive after every attempt; the heap stays unfrozen (slower collections, nothing leaked).
    """
    gc.unfreeze()
    for _ in range(attempts):
        time.sleep(pause_s)
        gc.collect()
        if retired() is None:
            gc.freeze()
            return True
    return False


def similar(funnel: Funnel, item_id: str, k: int) -> dict[str, Any]:
    """``funnel.similar`` for an id as it comes in a URL; KeyError: no such item."""
    key: str | int = item_id
    if funnel.items.ids.is_int:
        try:
            key = int(item_id)
        except ValueError:
            raise KeyError(item_id) from None
    return funnel.similar(key, k)


class Serves(Protocol):
    funnel: Funnel


def swap_bundle(owner: Serves, path: str, config: FunnelConfig) -> tuple[dict[str, Any], bool]:
    """A reload: load and verify the bundle at ``path`` (BundleError: refused, ``owner`` untouched),
    make it ``owner.funnel``, collect the one it replaced and freeze the heap again.

    Returns the new bundle's info and whether the old one was collected (False: requests still held
    it; the heap stays unfrozen and it is freed later). Blocking: run it off the event loop. Only a
    weak reference to the old bundle is kept here, or it could never be collected.
    """
    new = Funnel.load(path, config)
    retired, version = weakref.ref(owner.funnel), owner.funnel.version
    owner.funnel = new
    info = new.info
    del new
    released = release_and_freeze(retired)
    if not released:
        log.warning("bundle %s still in use after the reload: heap left unfrozen", version)
    return info, released


# -- in the HTTP process ------------------------------------------------------------------------------
class LocalCompute:
    """The Batcher's compute thread in this process."""

    def __init__(self, funnel: Funnel, batching: BatchConfig | None = None) -> None:
        self.funnel = funnel
        self.batcher = Batcher(batching)

    @property
    def info(self) -> dict[str, Any]:
        return self.funnel.info

    @property
    def alive(self) -> bool:
        return True

    async def start(self) -> None:
        self.batcher.start()
        freeze_heap()

    async def close(self) -> None:
        self.batcher.close()

    async def recommend(self, request: RecommendRequest, arrived: float) -> dict[str, Any]:
        return await asyncio.wrap_future(self.batcher.submit(self.funnel, request, arrived))

    async def similar(self, item_id: str, k: int) -> dict[str, Any]:
        funnel = self.funnel
        return await asyncio.wrap_future(self.batcher.call(lambda: similar(funnel, item_id, k)))

    async def gc_states(self) -> dict[str, GcState]:
        return {"http": gc_state()}

    async def reload(self, path: str, config: FunnelConfig) -> tuple[dict[str, Any], bool]:
        return await asyncio.to_thread(swap_bundle, self, path, config)


# -- the compute process, seen from the HTTP process ----------------------------------------------------
def _frame(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def _recv(sock: socket.socket) -> Any:
    """The next message (blocking); None when the other end closed."""
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    payload = _recv_exactly(sock, _HEADER.unpack(header)[0])
    return None if payload is None else pickle.loads(payload)


class ComputeProcess:
    """A child process (``python -m serving.compute``) that loads the bundle and computes the answers.

    :meth:`launch` starts it and blocks until it has loaded and verified the bundle (BundleError
    with the child's reason otherwise), before any HTTP socket is bound. The asyncio side
    (:meth:`start`, in the server's lifespan) sends each request as one message and resolves the
    request's future when the answer comes back.
    """

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket, info: dict[str, Any]) -> None:
        self.proc = proc
        self._sock = sock
        self._info = info
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._dead = False
        self._closing = False

    @classmethod
    def launch(
        cls, bundle: str | os.PathLike[str], config: FunnelConfig, batching: BatchConfig,
        timeout_s: float = READY_TIMEOUT_S,
    ) -> ComputeProcess:  # fmt: skip
        parent, child = socket.socketpair()
        spec = {"config": dataclasses.asdict(config), "batching": dataclasses.asdict(batching)}
        command = [sys.executable, "-m", "serving.compute", "--fd", str(child.fileno()),
                   "--bundle", str(bundle), "--spec", json.dumps(spec)]  # fmt: skip
        proc = subprocess.Popen(command, pass_fds=[child.fileno()])
        child.close()
        parent.settimeout(timeout_s)
        try:
            first = _recv(parent)
        except TimeoutError:
            proc.kill()
            raise BundleError(
                f"{bundle}: the compute process did not load it within {timeout_s:.0f} s"
            ) from None
        finally:
            parent.settimeout(None)
        if first is None or first[0] != "ready":
            proc.wait(timeout=30)
            reason = first[1] if first else f"the compute process exited with code {proc.returncode}"
            raise BundleError(reason)
        return cls(proc, parent, first[1])

    @property
    def info(self) -> dict[str, Any]:
        return self._info

    @property
    def alive(self) -> bool:
        return not self._dead and self.proc.poll() is None

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_connection(sock=self._sock)
        self._reader_task = asyncio.create_task(self._read(reader))
        freeze_heap()

    async def close(self, timeout_s: float = 30.0) -> None:
        self._closing = True
        if self._writer is not None and self.alive:
            self._writer.write(_frame(("stop",)))
            await self._writer.drain()
        try:
            await asyncio.to_thread(self.proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                header = await reader.readexactly(_HEADER.size)
                message = pickle.loads(await reader.readexactly(_HEADER.unpack(header)[0]))
                future = self._pending.pop(message[0], None)
                if future is None or future.done():
                    continue
                status, value = message[1], message[2]
                if status == "ok":
                    future.set_result(value)
                elif status == "request_error":
                    future.set_exception(RequestError(*value))
                elif status == "unknown_item":
                    future.set_exception(KeyError(value))
                elif status == "refused":
                    future.set_exception(BundleError(value))
                else:
                    future.set_exception(RuntimeError(value))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._dead = True
            if not self._closing:
                log.error("the compute process exited (code %s): failing %d pending requests",
                          self.proc.poll(), len(self._pending))  # fmt: skip
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ComputeDied("the compute process exited"))
            self._pending.clear()

    def _ask(self, kind: str, *args: Any) -> asyncio.Future[Any]:
        if not self.alive or self._writer is None:
            raise ComputeDied("the compute process is not running")
        self._next_id += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        self._writer.write(_frame((kind, self._next_id, *args)))
        return future

    async def recommend(self, request: RecommendRequest, arrived: float) -> dict[str, Any]:
        return await self._ask("recommend", request, arrived)

    async def similar(self, item_id: str, k: int) -> dict[str, Any]:
        return await self._ask("similar", item_id, k)

    @property
    def in_flight(self) -> int:
        """Messages sent and not yet answered."""
        return len(self._pending)

    async def gc_state(self) -> GcState:
        """The child's collector figures (its stalls are the requests')."""
        return await self._ask("gc")

    async def reload(self, path: str, config: FunnelConfig) -> tuple[dict[str, Any], bool]:
        self._info, released = await self._ask("reload", path)
        return self._info, released


class ComputeProcesses:
    """``funnel serve``'s compute: one or more :class:`ComputeProcess`, each holding the whole bundle.

    A request goes to the process with the fewest requests in flight (ties in turn), so each one
    batches its share. Why more than one: a compute process runs its batches on one thread, and the
    models release the GIL only op by op (a second thread in the same process waits for it after
    every op; ``--torch-threads 2`` halved throughput), so on the 25K-item benchmark bundle one
    process was busy a whole core at 64 clients while about half of the second core was idle (the
    HTTP process and the load generator use the rest). Measured there, two processes against one:
    64 clients 1,105-1,214 vs 869-950 requests/s, median 49-55 vs 68-73 ms, but p99 87-97 vs 82-90 ms
    (four busy processes on two cores widen the tail); 16 clients no better (batches halve). So one
    is the default: more are for throughput, and for machines with cores to spare. The cost is
    memory: every process loads the bundle.

    A reload is verified by the first process, then by the others together; if one of them refuses
    a bundle the first accepted, every process is put back on the previous bundle and the reload is
    refused. Between the first swap and the last, requests may be answered from either bundle (each
    answer names its bundle); a batch never mixes them.
    """

    def __init__(self, members: list[ComputeProcess]) -> None:
        if not members:
            raise ValueError("at least one compute process")
        self.members = members
        self._turn = 0

    @classmethod
    def launch(
        cls, bundle: str | os.PathLike[str], config: FunnelConfig, batching: BatchConfig, processes: int = 1
    ) -> ComputeProcesses:
        """Start ``processes`` compute processes together; each loads and verifies the bundle."""
        if processes < 1:
            raise ValueError(f"processes: {processes} (must be >= 1)")
        with ThreadPoolExecutor(processes) as pool:
            launches = [
                pool.submit(ComputeProcess.launch, bundle, config, batching) for _ in range(processes)
            ]
        members: list[ComputeProcess] = []
        refused: BaseException | None = None
        for launched in launches:
            try:
                members.append(launched.result())
            except BaseException as e:  # noqa: BLE001 - stop the others first, then raise the first
                refused = refused or e
        if refused is not None:
            for member in members:
                member.proc.kill()
                member.proc.wait()
            raise refused
        return cls(members)

    def _names(self) -> list[str]:
        return ["compute"] if len(self.members) == 1 else [f"compute{i}" for i in range(len(self.members))]

    @property
    def info(self) -> dict[str, Any]:
        return self.members[0].info

    @property
    def alive(self) -> bool:
        return all(m.alive for m in self.members)

    async def start(self) -> None:
        for member in self.members:
            await member.start()

    async def close(self) -> None:
        await asyncio.gather(*(m.close() for m in self.members))

    def _next(self) -> ComputeProcess:
        self._turn = (self._turn + 1) % len(self.members)
        turn = self.members[self._turn :] + self.members[: self._turn]
        return min(turn, key=lambda m: m.in_flight)

    async def recommend(self, request: RecommendRequest, arrived: float) -> dict[str, Any]:
        return await self._next().recommend(request, arrived)

    async def similar(self, item_id: str, k: int) -> dict[str, Any]:
        return await self._next().similar(item_id, k)

    async def gc_states(self) -> dict[str, GcState]:
        """The collector figures of the HTTP process and of every compute process."""
        states = {"http": gc_state()}
        for name, member in zip(self._names(), self.members, strict=True):
            if member.alive:
                states[name] = await member.gc_state()
        return states

    async def reload(self, path: str, config: FunnelConfig) -> tuple[dict[str, Any], bool]:
        first, rest = self.members[0], self.members[1:]
        previous = first.info["path"]
        info, released = await first.reload(path, config)  # BundleError: refused, nothing changed
        results = await asyncio.gather(*(m.reload(path, config) for m in rest), return_exceptions=True)
        accepted = [(m, r) for m, r in zip(rest, results, strict=True) if not isinstance(r, BaseException)]
        if len(accepted) < len(rest):
            failed = next(r for r in results if isinstance(r, BaseException))
            swapped = [first, *(m for m, _ in accepted)]
            await asyncio.gather(*(m.reload(previous, config) for m in swapped), return_exceptions=True)
            raise BundleError(
                f"a compute process refused it after another had accepted it ({failed}); "
                f"every process is back on {previous}"
            )
        return info, released and all(r[1] for _, r in accepted)


# -- the compute process itself ----------------------------------------------------------------------
class _Child:
    """Reads requests from the socket, runs them on its Batcher, writes each answer when it is done."""

    def __init__(
        self, sock: socket.socket, funnel: Funnel, config: FunnelConfig, batching: BatchConfig
    ) -> None:
        self.sock = sock
        self.funnel = funnel
        self.config = config
        self.batcher = Batcher(batching)
        self._send_lock = threading.Lock()

    def send(self, message: Any) -> None:
        frame = _frame(message)
        with self._send_lock:  # answers come from the compute thread and the reload thread
            self.sock.sendall(frame)

    def _answer(self, request_id: int, future: Future[Any]) -> None:
        try:
            self.send((request_id, "ok", future.result()))
        except RequestError as e:
            self.send((request_id, "request_error", (e.field, e.message)))
        except KeyError as e:
            self.send((request_id, "unknown_item", e.args[0] if e.args else ""))
        except OSError:
            pass  # the HTTP process is gone; the read loop ends too
        except Exception as e:  # noqa: BLE001 - the request gets the error, the process keeps serving
            self.send((request_id, "error", f"{type(e).__name__}: {e}"))

    def _reload(self, request_id: int, path: str) -> None:
        # one at a time: the HTTP process sends the next reload only after this one's answer
        try:
            self.send((request_id, "ok", swap_bundle(self, path, self.config)))
        except BundleError as e:
            self.send((request_id, "refused", str(e)))

    def serve(self) -> None:
        self.batcher.start()
        freeze_heap()
        self.send(("ready", self.funnel.info))
        while True:
            message = _recv(self.sock)
            if message is None or message[0] == "stop":
                break
            kind, request_id = message[0], message[1]
            if kind == "recommend":
                future = self.batcher.submit(self.funnel, message[2], message[3])
            elif kind == "similar":
                # bound in the lambda, not in a local of this loop: that would keep a bundle retired
                # by a later reload alive
                future = self.batcher.call(lambda f=self.funnel, i=message[2], n=message[3]: similar(f, i, n))
            elif kind == "gc":
                self.send((request_id, "ok", gc_state()))
                continue
            elif kind == "reload":
                threading.Thread(target=self._reload, args=(request_id, message[2]), daemon=True).start()
                continue
            else:
                self.send((request_id, "error", f"unknown message {kind!r}"))
                continue
            future.add_done_callback(lambda f, i=request_id: self._answer(i, f))
            del future, message
        self.batcher.close()


def child_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="funnel's compute process (started by `funnel serve`)")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--spec", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s compute: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    sock = socket.socket(fileno=args.fd)
    spec = json.loads(args.spec)
    config = FunnelConfig(**spec["config"])
    batching = BatchConfig(**spec["batching"])
    import faiss
    import torch

    torch.set_num_threads(batching.threads)
    faiss.omp_set_num_threads(batching.threads)
    try:
        funnel = Funnel.load(args.bundle, config)
    except BundleError as e:
        sock.sendall(_frame(("failed", str(e))))
        return 1
    child = _Child(sock, funnel, config, batching)
    del funnel  # held here, the first bundle could never be collected after a reload
    child.serve()
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
