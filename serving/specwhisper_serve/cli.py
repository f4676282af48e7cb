"""``specwhisper-serve``: start the real ``tritonserver`` on an exported model repository."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from specwhisper_serve.tritonserver import TritonServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specwhisper-serve", description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log-file", type=Path, help="server log (default: inherit this terminal)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the models to load")
    args = parser.parse_args(argv)
    if not (args.repository / "specwhisper" / "config.pbtxt").is_file():
        message = f"no exported model in {args.repository}; run specwhisper-export first"
        print(f"specwhisper-serve: error: {message}", file=sys.stderr)
        return 2
    server = TritonServer(
        args.repository.resolve(), args.grpc_port, args.http_port, args.metrics_port, log_file=args.log_file
    )
    server.start(timeout=args.timeout)
    print(f"tritonserver ready: gRPC {server.grpc_url}, metrics {server.metrics_url}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
