"""Clients' random streams: every client (and the server) has its own, also on CUDA devices."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

import mechanisms.rng as rng
from dptrain.federated.client import Client, client_seed
from dptrain.federated.config import FederatedConfig


def test_client_seeds_are_distinct_and_not_neighbours():
    seeds = {(s, k, stream): client_seed(s, k, stream) for s in (0, 1, 2, 1234) for k in range(-1, 40)
             for stream in (0, 1)}
    assert len(set(seeds.values())) == len(seeds)
    assert seeds == {key: client_seed(*key) for key in seeds}  # the same on every rank
    assert all(0 <= v < 1 << 62 for v in seeds.values())
    # they were seed·1000003 + 2k + stream + 1: client k + 1's seed was client k's + 2
    assert client_seed(1234, 3, 1) - client_seed(1234, 2, 1) != 2


def test_clients_on_cuda_devices_do_not_share_a_noise_stream(monkeypatch):
    """With 3 ranks and seed=1234, client 3m+2 on cuda:2 and client 3m+3 on cuda:0 seeded their CUDA noise
    generators with the same number (seed + 2k + 2 + Σ ord("cuda:r")): identical local noise."""
    seen: list[int] = []

    class Recorder:  # stands in for torch.Generator(device="cuda:r"): no GPU needed
        def __init__(self, device=None) -> None:
            assert torch.device(device).type == "cuda"

        def manual_seed(self, s: int) -> "Recorder":
            seen.append(int(s))
            return self

    world, data = 3, TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    config = FederatedConfig(dp="example", seed=1234, eps=None, noise_multiplier=1.0)
    clients = [Client(k, data, config, noise_multiplier=1.0) for k in range(12)]
    with monkeypatch.context() as m:
        m.setattr(rng.torch, "Generator", Recorder)
        for k, client in enumerate(clients):
            assert client.mechanism is not None
            client.mechanism._rng.streams(f"cuda:{k % world}")
    assert len(seen) == len(clients) and len(set(seen)) == len(seen), seen
