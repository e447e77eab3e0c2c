"""Fetch a dataset's standard files from its public mirror and verify their md5 checksums.

  certorch download mnist --data-dir data          # writes data/mnist/*.gz
  certorch download cifar10                        # into $CERTORCH_DATA or ~/.cache/certorch/datasets

Files are written atomically and only after their checksum matches; files already present
with the right checksum are not fetched again. ``--base-url`` points at another mirror.
"""
from __future__ import annotations

import argparse

NAME = "download"
HELP = "fetch a dataset's standard files (md5-verified) into the data directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="mnist, fashion-mnist or cifar10")
    p.add_argument("--base-url", default=None, help="mirror to fetch from (default: the dataset's usual mirror)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per network request")


def run(args: argparse.Namespace) -> int:
    from certorch.data import download

    folder = download(args.dataset, getattr(args, "data_dir", None), base_url=args.base_url, timeout=args.timeout)
    print(f"{args.dataset}: files verified in {folder}")
    return 0
