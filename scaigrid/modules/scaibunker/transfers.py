"""Storage's own thread pool (`Transfers`) and the pumps that move object bytes between the event loop and minio.

minio is blocking, so each object request runs its S3 calls in a slot of this pool, never in the loop's default
executor, which aiohttp's DNS resolver shares with the rest of the process. An upload's body reaches minio's
put_object through a bounded `Pipe`; a download is read from S3 by a `Pump`. Neither holds a whole object in memory.
"""

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

import urllib3
from aiohttp import web
from minio.error import InvalidResponseError, S3Error, ServerError

from scaigrid import errors
from scaigrid.appkeys import SETTINGS, TRANSFERS

logger = logging.getLogger(__name__)

# A download's chunks: large ones cost fewer thread hand-overs and event-loop writes per byte; one read ahead keeps
# S3 being read while the client is written to. 8 MiB x 1 was the fastest of 2x4, 4x2, 8x1 and 8x2 in
# bench/storage.py, at about the same memory (bench/RESULTS.md).
DOWNLOAD_CHUNK_BYTES = 8 * 1024 * 1024
DOWNLOAD_DEPTH = 1
# How long an ended download waits for its S3 read thread once that read has been cut; should it still run (it
# never has), it is left to end by itself, its slot of the pool taken until it does.
PUMP_STOP_WAIT_S = 5.0

P = ParamSpec("P")
T = TypeVar("T")


class Transfer:
    """One object request's slot of the pool: its blocking S3 calls, one after the other."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        self._executor = executor
        self._call: Future[Any] | None = None

    def run(self, call: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> "asyncio.Future[T]":
        self._call = self._executor.submit(call, *args, **kwargs)
        return asyncio.wrap_future(self._call)

    def ended(self, release: Callable[[], None]) -> None:
        """Calls `release` now, or once a call still running (a read stalled in S3) has returned."""
        if self._call is None:
            release()
        else:
            self._call.add_done_callback(lambda _: release())  # at once if it is done


class Transfers:
    """Storage's own threads for minio's blocking calls, sized by STORAGE_MAX_TRANSFERS.

    Each object request holds a slot, and runs at most one call at a time in it: a call never waits for a thread.
    A request finding every slot taken is refused (STORAGE_BUSY) rather than queued behind transfers that may last
    minutes. A slot is free again once its request has ended and its last call has returned.
    """

    def __init__(self, size: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="storage")
        self._free = size
        self._lock = threading.Lock()  # a call ending after its request frees the slot from the pool's thread

    @contextlib.contextmanager
    def transfer(self) -> Iterator[Transfer]:
        with self._lock:
            if self._free == 0:
                raise errors.storage_busy()
            self._free -= 1
        transfer = Transfer(self._executor)
        try:
            yield transfer
        finally:
            transfer.ended(self._release)

    def _release(self) -> None:
        with self._lock:
            self._free += 1

    def close(self) -> None:
        # Not waiting: a read stalled in S3 ends at minio's read timeout, and the interpreter joins it at exit.
        self._executor.shutdown(wait=False, cancel_futures=True)


async def transfers_ctx(app: web.Application) -> AsyncIterator[None]:
    """Opens the storage pool with the app (cleanup_ctx) in every process serving the object routes."""
    app[TRANSFERS] = Transfers(app[SETTINGS].storage.max_transfers)
    yield
    app[TRANSFERS].close()


@contextlib.contextmanager
def s3_errors() -> Iterator[None]:
    """Translates what minio raises into the documented codes."""
    try:
        yield
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchObject"):
            raise errors.storage_object_not_found() from None
        if exc.code == "InvalidRange":
            raise errors.storage_range_not_satisfiable() from None
        logger.warning("object store refused: %s", exc.code, extra={"event": "storage_s3_error", "s3_code": exc.code})
        raise errors.storage_backend_error(f"the object store answered {exc.code}") from None
    except (ServerError, InvalidResponseError) as exc:
        logger.warning("object store failed: %s", exc, extra={"event": "storage_s3_error"})
        raise errors.storage_backend_error("the object store answered with an error") from None
    except (urllib3.exceptions.HTTPError, ConnectionError) as exc:
        logger.warning("object store unreachable: %s", exc, extra={"event": "storage_s3_unreachable"})
        raise errors.storage_unavailable() from None


class Pipe:
    """Request body blocks handed from the event loop to minio's put_object in its thread, as a file to read().

    At most `depth` blocks wait in between, so a slow S3 slows the client down instead of filling memory.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(depth)
        self._failure: BaseException | None = None
        self._pending = b""
        self._eof = False

    async def put(self, block: bytes | None, upload: "asyncio.Future[Any]") -> None:
        """Queues a block (None: end of body); returns early, raising, if the upload ends before taking it."""
        if not self._queue.full():
            self._queue.put_nowait(block)
            return
        putter = asyncio.ensure_future(self._queue.put(block))
        await asyncio.wait((putter, upload), return_when=asyncio.FIRST_COMPLETED)
        if not putter.done():
            putter.cancel()
            with s3_errors():
                upload.result()  # raises what stopped the upload
            if block is not None:  # minio has its `length` bytes; the end-of-body marker is all it left unread
                raise errors.storage_backend_error("the object store stopped reading the upload")

    def fail(self, failure: BaseException) -> None:
        """Makes the reader raise: minio then aborts the multipart upload, so nothing is stored."""
        self._failure = failure
        if not self._queue.full():  # wakes a reader waiting on an empty queue; a full one is read soon anyway
            self._queue.put_nowait(None)

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (fewer only at the end), blocking the calling thread; one join, never a re-copy."""
        blocks = [self._pending] if self._pending else []
        have = len(self._pending)
        self._pending = b""
        while (size < 0 or have < size) and not self._eof:
            block = asyncio.run_coroutine_threadsafe(self._queue.get(), self._loop).result()
            if self._failure is not None:
                raise self._failure
            if block is None:
                self._eof = True
                break
            blocks.append(block)
            have += len(block)
        if size >= 0 and have > size:
            last = blocks[-1]
            keep = len(last) - (have - size)
            blocks[-1], self._pending = last[:keep], last[keep:]
        return b"".join(blocks)


def close_response(source: Any) -> None:
    """Closes a minio response (a urllib3 one) and gives its connection back."""
    source.close()
    source.release_conn()


class Pump:
    """An S3 response read by a thread into a bounded queue: S3 is read on while the client is being written to.
    The thread closes the response when it ends."""

    def __init__(self, source: Any, transfer: Transfer, depth: int) -> None:
        self._source, self._loop = source, asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes | Exception | None] = asyncio.Queue(depth)
        self._stopped = False
        self._closed = False
        self._close_lock = threading.Lock()  # the thread closing `source` and close() cutting its reads never overlap
        self._thread = transfer.run(self._run)

    def _put(self, item: bytes | Exception | None) -> None:
        asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop).result()

    def _run(self) -> None:
        item: Exception | None = None
        try:
            while not self._stopped:
                chunk = self._source.read(DOWNLOAD_CHUNK_BYTES)
                # Stopped during the read: close() may have given up waiting, and nobody takes from the queue.
                if not chunk or self._stopped:
                    break
                self._put(chunk)
        except Exception as exc:  # handed to the event loop, which decides what it means
            item = exc
        finally:
            # Closed by its reader: closing it from the event loop while a read is blocked in it blocks the loop too.
            with self._close_lock:
                close_response(self._source)
                self._closed = True
        if not self._stopped:
            self._put(item)

    async def chunks(self) -> AsyncIterator[bytes]:
        while (item := await self._queue.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item

    async def close(self) -> None:
        """Stops the thread, which may be waiting for room in the queue or for S3 (a stalled S3 holds a read for
        minio's read timeout, minutes), and waits PUMP_STOP_WAIT_S at most for it to end."""
        self._stopped = True
        with self._close_lock:
            if not self._closed:
                # The download is over, so whatever S3 still sends is unwanted: shutting the socket's reading side
                # makes a read blocked in it return at once (closing the socket from this thread would not).
                with contextlib.suppress(OSError, ValueError, RuntimeError):  # no socket to shut: wait, bounded
                    self._source.shutdown()
        deadline_s = self._loop.time() + PUMP_STOP_WAIT_S
        while not self._thread.done():
            if self._loop.time() >= deadline_s:
                logger.warning("an S3 read did not stop within %g s; left to end by itself", PUMP_STOP_WAIT_S,
                               extra={"event": "storage_read_abandoned"})
                return
            while not self._queue.empty():
                self._queue.get_nowait()
            await asyncio.wait((self._thread,), timeout=0.05)
        self._thread.exception()
