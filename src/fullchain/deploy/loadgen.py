"""A closed-loop HTTP load generator, run in its own process so it never shares the server's interpreter.

`concurrency` clients each send one request, wait for the answer, and send the next, for `seconds` after a
warm-up; the payloads rotate through a JSON list. Prints (and `run_load` returns) throughput of successful
answers, p50/p99 latency in milliseconds and the count of every HTTP status (and transport error).
The client is aiohttp: httpx's connection pool (what the tests use) tops out near 100 requests/s at 64
connections here, so it would measure itself rather than the server.

    python -m fullchain.deploy.loadgen URL PAYLOADS.json --concurrency 64 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np


async def _drive(url: str, bodies: list[bytes], concurrency: int, seconds: float, warmup_s: float,
                 headers: dict[str, str]) -> dict:
    import aiohttp  # only this process needs it

    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    headers = {"content-type": "application/json", **headers}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:
        start = time.perf_counter()
        measure_from, stop_at = start + warmup_s, start + warmup_s + seconds

        async def worker(k: int) -> None:
            i = k
            while (now := time.perf_counter()) < stop_at:
                body = bodies[i % len(bodies)]
                i += concurrency
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        status = str(response.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    status = type(exc).__name__
                if now >= measure_from:
                    statuses[status] += 1
                    if status == "200":
                        latencies.append(time.perf_counter() - now)

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "requests": sum(statuses.values()),
        "throughput_rps": len(latencies) / seconds,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "statuses": dict(statuses),
    }


def run_load(url: str, payloads: Path, concurrency: int, seconds: float, warmup_s: float = 0.5,
             token: str | None = None) -> dict:
    """Drive `url` from a separate process and return its measurements."""
    cmd = [sys.executable, "-m", "fullchain.deploy.loadgen", url, str(payloads), "--concurrency", str(concurrency),
           "--seconds", str(seconds), "--warmup", str(warmup_s)] + (["--token", token] if token else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup_s + 120)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("payloads", type=Path, help="JSON list of request bodies")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--token")
    args = parser.parse_args(argv)
    bodies = [json.dumps(b).encode() for b in json.loads(args.payloads.read_text())]
    headers = {"authorization": f"Bearer {args.token}"} if args.token else {}
    result = asyncio.run(_drive(args.url, bodies, args.concurrency, args.seconds, args.warmup, headers))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
