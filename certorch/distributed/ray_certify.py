"""Shard per-example certification over Ray tasks (local by default, or an existing cluster).

    from certorch.distributed.ray_certify import certify_sharded
    for results in certify_sharded(model, x, y, 0.1, stages, timeout=60, workers=2):   # one list per chunk
        ...

Each task runs :func:`certorch.verify.certify_batch` on a chunk of examples and returns its
results as JSON dicts plus counterexamples, so the driver can write them as they arrive. With
``workers <= 1`` and no ``address`` the chunks run in this process (no Ray needed).
"""
from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from certorch.errors import CertorchError
from certorch.verify.pipeline import certify_batch
from certorch.verify.results import VerificationResult


def _certify_chunk(model: nn.Module, x: Tensor, y: Tensor, index: list[int], eps: float, stages, timeout: float,
                   threads: int) -> list[VerificationResult]:
    torch.set_num_threads(max(threads, 1))
    results = certify_batch(model, x, y, eps, stages=stages, timeout=timeout, threads=threads)
    for r, i in zip(results, index):
        r.index = i
    return results


def check_address(address: str, timeout: float = 5.0) -> None:
    """Raise a one-line :class:`CertorchError` unless ``host:port`` accepts a TCP connection."""
    addr = address.removeprefix("ray://")
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise CertorchError(f"Ray address must be HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise CertorchError(f"cannot reach Ray cluster at {address}: {e.strerror or e}") from None


def _ray(workers: int, address: str | None):
    try:
        import ray
    except ImportError:
        raise CertorchError("--workers/--address need Ray: pip install 'certorch[dist]'") from None
    if not ray.is_initialized():
        if address:
            check_address(address)
            try:
                ray.init(address=address, log_to_driver=False)
            except Exception as e:  # noqa: BLE001 - any connection failure is bad input here
                raise CertorchError(f"cannot join Ray cluster at {address}: {str(e).splitlines()[0]}") from None
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


def chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def certify_sharded(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    stages: Sequence[str] | str,
    timeout: float,
    *,
    index: Sequence[int] | None = None,
    workers: int = 1,
    address: str | None = None,
    chunk_size: int = 8,
    threads: int = 1,
) -> Iterator[list[VerificationResult]]:
    """Yield results chunk by chunk (in completion order). ``index[i]``: data-set index of x[i]."""
    if workers < 1:
        raise CertorchError(f"workers must be >= 1, got {workers}")
    index = list(range(x.shape[0])) if index is None else list(index)
    parts = chunks(x.shape[0], max(chunk_size, 1))
    if workers == 1 and not address:
        for p in parts:
            yield _certify_chunk(model, x[p], y[p], [index[i] for i in p], eps, stages, timeout, threads)
        return
    ray = _ray(workers, address)
    task = ray.remote(num_cpus=1)(_certify_chunk)
    model_ref = ray.put(model)
    pending = [task.remote(model_ref, x[p], y[p], [index[i] for i in p], eps, stages, timeout, threads) for p in parts]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def shutdown() -> None:
    """Stop the local Ray runtime started by :func:`certify_sharded` (no-op without Ray)."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()
