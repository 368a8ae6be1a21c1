"""`python -m services NAME`: run one service, configured from STYLEBLEND_* variables."""

from __future__ import annotations

import argparse
import logging

from services.common.config import ServiceConfig
from services.common.server import serve_until_terminated
from services.graph import SERVICES, serve_one


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services", description=__doc__)
    parser.add_argument("service", choices=SERVICES)
    args = parser.parse_args()
    config = ServiceConfig()
    logging.basicConfig(
        level=config.log_level, format=f"%(asctime)s {args.service} %(levelname)s %(message)s"
    )
    serve_until_terminated(serve_one(args.service), config.grace_s)


if __name__ == "__main__":
    main()
