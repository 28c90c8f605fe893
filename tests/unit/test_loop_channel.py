"""LoopChannel: the event loop's end of a child's pipe speaks multiprocessing.Connection's framing."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading

import pytest

from featurebank.engine.processes import LoopChannel

# Around Connection's own thresholds: one write of header + data up to 16 KiB, two above; the
# channel copies header + data into one buffer below 64 KiB; a socket buffer holds ~200 KiB.
SIZES = (0, 1, 16383, 16384, 16385, 65535, 65536, 70_000, 3 * 2**20)


def _payload(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(min(n, 4096))) * (n // 4096) + os.urandom(n % 4096)


async def test_messages_of_any_size_cross_both_ways_with_a_blocking_connection_on_the_other_end():
    """What the channel sends, Connection.recv_bytes reads whole, and what Connection.send_bytes
    writes, the channel reads whole: every size, in order, with the other end in another thread
    (as a child process would be) and messages larger than the socket's buffer."""
    ours, theirs = multiprocessing.Pipe(duplex=True)
    channel = LoopChannel(ours)
    payloads = [_payload(n, seed) for seed, n in enumerate(SIZES)]

    def echo() -> None:  # the child: reads each message and answers it reversed
        for _ in payloads:
            theirs.send_bytes(theirs.recv_bytes()[::-1])

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    try:
        for p in payloads:
            await channel.send([p[: len(p) // 3], p[len(p) // 3 :]])  # in two parts, gathered
            assert bytes(await asyncio.wait_for(channel.receive(), 30)) == p[::-1]
        thread.join(10)
    finally:
        channel.close()
    assert ours.fileno() >= 0  # the Connection's own descriptor stays open after the channel closes


async def test_the_connections_blocking_mode_is_left_alone():
    """Threads still use the Connection around the channel (the ready handshake before, Shutdown
    after): the descriptor must stay blocking, so a plain recv waits rather than raising."""
    ours, theirs = multiprocessing.Pipe(duplex=True)
    channel = LoopChannel(ours)
    theirs.send_bytes(b"x" * 100_000)
    assert bytes(await channel.receive()) == b"x" * 100_000
    assert os.get_blocking(ours.fileno())
    later = threading.Timer(0.2, theirs.send_bytes, (b"after",))
    later.start()
    assert await asyncio.get_running_loop().run_in_executor(None, ours.recv_bytes) == b"after"
    channel.close()


async def test_a_closed_other_end_is_eof_for_a_waiting_read_and_for_a_write():
    ours, theirs = multiprocessing.Pipe(duplex=True)
    channel = LoopChannel(ours)
    reading = asyncio.ensure_future(channel.receive())
    await asyncio.sleep(0.05)
    assert not reading.done()
    theirs.close()
    with pytest.raises(EOFError):
        await asyncio.wait_for(reading, 10)
    with pytest.raises(EOFError):
        for _ in range(50):  # the first write may still be taken by the kernel
            await channel.send([b"y" * 70_000])
    channel.close()


async def test_a_message_cut_short_by_the_other_end_is_eof_not_a_short_message():
    """A child that dies halfway through writing leaves a header promising more than arrives."""
    ours, theirs = multiprocessing.Pipe(duplex=True)
    channel = LoopChannel(ours)
    os.write(theirs.fileno(), (1000).to_bytes(4, "big") + b"z" * 10)
    theirs.close()
    with pytest.raises(EOFError):
        await asyncio.wait_for(channel.receive(), 10)
    channel.close()
