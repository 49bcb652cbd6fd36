"""Spawning gloo ranks for the tests: ``run_ranks`` starts ``worker(rank, *args)`` in ``nprocs`` processes and
waits for them, killing them and failing the test if they run past ``timeout`` seconds (a rank stuck in a
collective would otherwise hang the suite)."""

import datetime

import pytest
import torch.multiprocessing as mp


def run_ranks(worker, args: tuple, nprocs: int, timeout: float) -> None:
    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    while not ctx.join(timeout=2):
        if datetime.datetime.now() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {nprocs} ranks did not finish in {timeout:.0f} s")
