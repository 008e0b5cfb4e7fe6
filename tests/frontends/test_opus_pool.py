"""The agent's Opus encoding in worker processes: the same bytes as in-process, and a dead worker ends only
its own streams."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from personaplex.ogg import OpusPageWriter, parse_pages
from personaplex.frontends.opus_pool import OpusEncoderPool, OpusWorkerError, PooledPageWriter


def voice_like(seed: int, frames: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(1920 * frames) / 24_000
    pcm = (0.2 * np.sin(2 * np.pi * (180 + 40 * seed) * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    return list(pcm.reshape(frames, 1920))


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def test_pages_equal_the_in_process_writer_byte_for_byte():
    async def main():
        pool = OpusEncoderPool(2)
        await pool.start()
        try:
            writers = [pool.open() for _ in range(3)]  # round robin: two share a worker
            assert all(isinstance(w, PooledPageWriter) for w in writers)
            local = [OpusPageWriter() for _ in range(3)]
            streams = [voice_like(seed, 12) for seed in range(3)]
            for frame in range(12):  # interleaved, as conversations are
                got = await asyncio.gather(*(w.encode(s[frame]) for w, s in zip(writers, streams)))
                for pages, writer, stream in zip(got, local, streams):
                    assert pages == writer.append(stream[frame])
            for writer, reference in zip(writers, local):
                end = writer.finish()
                assert end == reference.finish() and parse_pages(end)[0].eos
                assert writer.finish() is None  # once
                writer.close()
        finally:
            await pool.close()
        assert pool.alive == 0

    run(main())


def test_a_dead_worker_ends_only_its_streams_and_new_streams_avoid_it():
    async def main():
        pool = OpusEncoderPool(2)
        await pool.start()
        try:
            first, second = pool.open(), pool.open()
            assert first._worker is not second._worker
            frames = voice_like(0, 3)
            await asyncio.gather(first.encode(frames[0]), second.encode(frames[0]))
            first._worker.process.kill()
            first._worker.process.join(5)
            with pytest.raises(OpusWorkerError, match="stopped"):
                await first.encode(frames[1])
            assert pool.alive == 1
            assert await second.encode(frames[1])  # the other worker's stream goes on
            third = pool.open()
            assert third._worker is second._worker
            assert await third.encode(frames[0])
            second._worker.process.kill()
            second._worker.process.join(5)
            with pytest.raises(OpusWorkerError):
                await second.encode(frames[2])
            fallback = pool.open()  # no worker left: this process encodes
            assert isinstance(fallback, OpusPageWriter)
            assert await fallback.encode(frames[0])
        finally:
            await pool.close()

    run(main())


def test_a_pool_needs_a_worker():
    with pytest.raises(ValueError, match="at least one worker"):
        OpusEncoderPool(0)


def test_workers_outlive_a_terminals_ctrl_c():
    """Ctrl-C reaches the whole process group; the server stops its workers itself, after telling its callers."""
    import os
    import signal

    async def main():
        pool = OpusEncoderPool(1)
        await pool.start()
        try:
            writer = pool.open()
            frames = voice_like(0, 2)
            await writer.encode(frames[0])
            os.kill(writer._worker.process.pid, signal.SIGINT)
            await asyncio.sleep(0.3)
            assert await writer.encode(frames[1]) and pool.alive == 1
        finally:
            await pool.close()

    run(main())
