"""`python -m services NAME`: run one service, configured from STYLEBLEND_* variables."""

from __future__ import annotations

import argparse

from services.common import logs
from services.common.config import GatewayConfig, ServiceConfig
from services.common.errors import StyleBlendError
from services.common.server import PortInUse, serve_until_terminated
from services.graph import SERVICES, serve_one, start_studio


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services", description=__doc__)
    parser.add_argument("service", choices=SERVICES)
    args = parser.parse_args()
    config = ServiceConfig()
    logs.configure(args.service, config.log_level, config.log_format)
    try:
        running = serve_one(args.service)
    except (PortInUse, StyleBlendError) as error:  # a person's mistake: say it, no traceback
        raise SystemExit(f"error: {error}") from None
    try:
        studio = start_studio(GatewayConfig(), running.port) if args.service == "gateway" else None
    except PortInUse as error:
        running.stop(0)
        raise SystemExit(f"error: {error}") from None
    try:
        serve_until_terminated(running, config.grace_s)
    finally:
        if studio is not None:  # after the gRPC grace, so bridged sessions get it too
            studio.stop()


if __name__ == "__main__":
    main()
