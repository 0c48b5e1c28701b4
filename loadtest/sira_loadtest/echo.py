"""A do-nothing gRPC server: the ceiling of what one grpc.aio process can answer.

`python -m sira_loadtest.echo --port N [--loop uvloop]` serves `/sira.bench.Echo/Echo`, a unary
method that takes any bytes and returns an empty message, with no interceptor,
no auth and no parsing. It prints `echo listening on HOST:PORT` when ready and
stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
import uvloop

ECHO_SERVICE = "sira.bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
READY_PREFIX = "echo listening on"
DESCRIPTION = "Echo gRPC server: the ceiling of what one grpc.aio process can answer."


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return b""


async def start_echo_server(host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Start the echo server; -> (server, bound port). The caller stops it."""
    server = grpc.aio.server()
    # No (de)serializers: the handler sees and returns raw bytes.
    handler = grpc.method_handlers_generic_handler(
        ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    return server, bound


async def serve(host: str, port: int) -> None:
    server, bound = await start_echo_server(host, port)
    print(f"{READY_PREFIX} {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sira_loadtest.echo", description=DESCRIPTION)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop (sira-server runs on uvloop unless SIRA_EVENT_LOOP=asyncio)",
    )
    args = parser.parse_args(argv)
    factory = uvloop.new_event_loop if args.loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
