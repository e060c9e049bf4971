"""One asyncio loop per process, in a background thread, shared by libvirt and QMP.

libvirt's event implementation can be registered only once per process and
must be registered before a connection opens, so hvext runs one loop in a
daemon thread, registers ``libvirtaio`` on it, and runs every coroutine (QMP
sessions, agent channels, libvirt event waits) there. Synchronous code (the
CLI, tests) calls :func:`run`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import libvirtaio

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def loop() -> asyncio.AbstractEventLoop:
    """The shared loop, started (with libvirt's event implementation) on first use."""
    global _loop
    with _lock:
        if _loop is None:
            new_loop = asyncio.new_event_loop()
            ready = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(new_loop)
                libvirtaio.virEventRegisterAsyncIOImpl(loop=new_loop)
                new_loop.call_soon(ready.set)
                new_loop.run_forever()

            threading.Thread(target=serve, name="hvext-aio", daemon=True).start()
            ready.wait()
            _loop = new_loop
        return _loop


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run *coro* on the shared loop and wait for its result (from any other thread)."""
    the_loop = loop()
    if threading.current_thread().name == "hvext-aio":
        coro.close()
        raise RuntimeError("hvext.aio.run called from the loop thread; await instead")
    future = asyncio.run_coroutine_threadsafe(coro, the_loop)
    try:
        return future.result(timeout)
    except TimeoutError:
        future.cancel()
        raise
