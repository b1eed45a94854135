"""A flooding tenant in its own process: LOOPS concurrent loops of Generate over ADAPTERS.

    python -m tests.support.flood_client TARGET KEY LOOPS MAX_TOKENS ADAPTER [ADAPTER ...]

Prints "flooding" once the first request was served, then floods until SIGTERM (or stdin
closes), and prints one JSON line of counts ({"ok": n, "refused": n, "other": n}) at the end.
Run apart from the gateway under test so that the flood's client work does not share the
gateway's event loop and GIL (as it would not in production).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections import Counter

from lora_gateway import devtools, errors
from lora_gateway.client import AsyncGatewayClient, GenerateOptions


async def flood(target: str, key: str, loops: int, max_tokens: int, adapters: list[str]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.read(1) else None)
    counts: Counter[str] = Counter()
    announced = asyncio.Event()
    prompt = devtools.SAMPLE_PROMPTS[1]

    async def one(client: AsyncGatewayClient, offset: int) -> None:
        i = offset
        while not stop.is_set():
            try:
                await client.generate(
                    adapters[i % len(adapters)], prompt, GenerateOptions(max_tokens=max_tokens)
                )
                counts["ok"] += 1
                if not announced.is_set():
                    announced.set()
                    print("flooding", flush=True)
            except errors.ResourceExhausted:
                counts["refused"] += 1
                await asyncio.sleep(0.01)
            except errors.GatewayError:
                counts["other"] += 1
                await asyncio.sleep(0.01)
            i += 1

    clients = [AsyncGatewayClient(target, key, max_retries=0) for _ in range(loops)]
    try:
        await asyncio.gather(*(one(c, i) for i, c in enumerate(clients)))
    finally:
        for client in clients:
            await client.close()
    print(json.dumps(dict(counts)), flush=True)


if __name__ == "__main__":
    target, key, loops, max_tokens, *names = sys.argv[1:]
    asyncio.run(flood(target, key, int(loops), int(max_tokens), names))
