"""Python `websockets` on both sides of wsgate.

`py_case.py serve PORT`   runs the backend: echoes, pings the client on "ping-me", closes with
                          4001 on "close-me", and prints the close codes clients send it.
`py_case.py client URL CA` runs the client checks and prints one JSON line per step.
"""

import asyncio
import json
import ssl
import sys

import websockets


def say(**kw):
    print(json.dumps(kw), flush=True)


async def handler(ws):
    try:
        async for msg in ws:
            if msg == "ping-me":
                waiter = await ws.ping(b"from-backend")
                await asyncio.wait_for(waiter, 5)
                await ws.send("pong-ok")
            elif msg == "close-me":
                await ws.close(4001, "server says bye")
                return
            else:
                await ws.send(msg)
    except websockets.ConnectionClosed:
        pass
    finally:
        if ws.close_code is not None:
            say(event="closed", code=ws.close_code, reason=ws.close_reason)


async def serve(port):
    async with websockets.serve(handler, "127.0.0.1", port, max_size=None, ping_interval=None):
        say(event="ready")
        await asyncio.Future()


async def client(url, ca):
    ctx = ssl.create_default_context(cafile=ca)
    opts = dict(ssl=ctx, max_size=None, ping_interval=None, open_timeout=10)

    async with websockets.connect(url, **opts) as ws:
        big = bytes(range(256)) * (4 * 1024 * 1024 // 256)
        await ws.send(big)
        echoed = await asyncio.wait_for(ws.recv(), 20)
        say(step="4 MiB binary message echoed", ok=echoed == big, saw=len(echoed))
        text = "ü" * 300_000
        await ws.send(text)
        say(step="600 KB text message echoed", ok=await ws.recv() == text)
        waiter = await ws.ping(b"from-client")
        latency = await asyncio.wait_for(waiter, 5)
        say(step="client ping answered by the backend", ok=latency >= 0)
        await ws.send("ping-me")
        say(step="backend ping answered by the client", ok=await asyncio.wait_for(ws.recv(), 10) == "pong-ok")

    async with websockets.connect(url, **opts) as ws:
        await ws.send("close-me")
        try:
            await asyncio.wait_for(ws.recv(), 10)
            say(step="backend close 4001 reaches the client", ok=False, saw="a message")
        except websockets.ConnectionClosed as e:
            rcvd = e.rcvd
            say(step="backend close 4001 reaches the client", ok=rcvd is not None and rcvd.code == 4001
                and rcvd.reason == "server says bye", saw=str(rcvd))

    ws = await websockets.connect(url, **opts)
    await ws.close(4000, "client bye")
    say(step="client close 4000 completes", ok=ws.close_code == 4000, saw=ws.close_code)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(serve(int(sys.argv[2])))
    else:
        asyncio.run(client(sys.argv[2], sys.argv[3]))
