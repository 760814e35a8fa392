"""The compact soft actor-critic: learns a one-step bandit, actions in [−1, 1], state round-trips."""
from __future__ import annotations

import torch

from mechanisms.sac import SoftActorCritic


def test_sac_learns_the_best_action_of_a_bandit():
    # reward −(a − 0.5)², done after one step: the soft-optimal mean action is 0.5
    torch.manual_seed(123)  # the agent must not depend on the global RNG: reseed it and check below
    agent = SoftActorCritic(obs_dim=2, act_dim=1, seed=0, gamma=0.0, batch_size=64, lr=3e-3)
    obs = torch.tensor([1.0, 0.0])
    for _ in range(100):
        a = agent.act(obs)
        assert -1 <= float(a) <= 1
        agent.store(obs, a, -float((a - 0.5) ** 2) * 10, obs, done=True)
        agent.update(6)
    assert abs(float(agent.act(obs, deterministic=True)) - 0.5) < 0.2


def test_sac_is_seeded_and_state_round_trips():
    a, b = SoftActorCritic(3, 2, seed=4), SoftActorCritic(3, 2, seed=4)
    obs = torch.ones(3)
    assert torch.equal(a.act(obs), b.act(obs))
    for _ in range(5):
        a.store(obs, a.act(obs), 1.0, obs)
    a.update(3)
    c = SoftActorCritic(3, 2, seed=99)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.act(obs), a.act(obs))
    c.update(1), a.update(1)
    assert torch.equal(c.act(obs, deterministic=True), a.act(obs, deterministic=True))


def test_an_unseeded_agent_leaves_the_global_rng_alone():
    """seed=None called torch.seed(), which re-seeded torch's global generator from the OS: after
    torch.manual_seed(0), the user's initialisation and dropout were no longer reproducible."""
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = SoftActorCritic(4, 2, seed=None)
    assert torch.equal(torch.get_rng_state(), state)
    b = SoftActorCritic(4, 2, seed=None)
    obs = torch.ones(4)
    assert not torch.equal(a.act(obs), b.act(obs))  # still seeded from fresh entropy
    assert torch.equal(torch.get_rng_state(), state)
