"""A compact soft actor-critic (Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and
Applications", Alg. 1 with automatic entropy tuning) for small online hyper-policies.

Continuous actions in [−1, 1]^A (tanh-squashed Gaussian policy), two Q critics with
Polyak-averaged targets, target entropy −A. Sized for a controller that acts a few dozen to a
few hundred times per training run: MLPs of one hidden width, a ring replay buffer, all
randomness from one seeded generator (the global torch RNG is left alone).

Soft Bellman target (their Eq. 3 with the clipped double-Q trick):
    y = r + γ (1 − d) (min_j Q'_j(s', a') − α log π(a'|s')),   a' ~ π(·|s').
Policy loss: E[α log π(a|s) − min_j Q_j(s, a)];  temperature loss: −log α · E[log π + H_target].
"""
from __future__ import annotations

import contextlib
import copy
import math
import secrets
from typing import Any, Iterator

import torch
from torch import nn

_LOG_STD_MIN, _LOG_STD_MAX = -5.0, 2.0


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny MLPs: intra-op threads only add synchronisation (and contend with training)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _mlp(inp: int, out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


class SoftActorCritic:
    """SAC agent: :meth:`act`, :meth:`store`, :meth:`update`; ``state_dict`` holds nets, optimisers, buffer, RNG."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 64, lr: float = 3e-4, gamma: float = 0.9,
                 tau: float = 0.05, batch_size: int = 32, buffer_size: int = 4096, initial_alpha: float = 0.1,
                 seed: int | None = None) -> None:
        if obs_dim < 1 or act_dim < 1:
            raise ValueError(f"SoftActorCritic: obs_dim and act_dim must be >= 1, got {obs_dim}, {act_dim}")
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.gamma, self.tau, self.batch_size = float(gamma), float(tau), int(batch_size)
        self.generator = torch.Generator()
        # seed=None: 63 bits from the OS's entropy (torch.seed() would re-seed the global generator)
        self.generator.manual_seed(int(seed) if seed is not None else secrets.randbits(63))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2 ** 62, (), generator=self.generator)))
            self.actor = _mlp(obs_dim, 2 * act_dim, hidden)
            self.q1, self.q2 = _mlp(obs_dim + act_dim, 1, hidden), _mlp(obs_dim + act_dim, 1, hidden)
        self.q1_target, self.q2_target = copy.deepcopy(self.q1), copy.deepcopy(self.q2)
        for p in list(self.q1_target.parameters()) + list(self.q2_target.parameters()):
            p.requires_grad_(False)
        self.log_alpha = torch.full((), math.log(initial_alpha), requires_grad=True)
        self.target_entropy = -float(act_dim)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.critic_opt = torch.optim.Adam(list(self.q1.parameters()) + list(self.q2.parameters()), lr=lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=lr)
        self.buffer = {"obs": torch.zeros(buffer_size, obs_dim), "act": torch.zeros(buffer_size, act_dim),
                       "rew": torch.zeros(buffer_size), "next": torch.zeros(buffer_size, obs_dim),
                       "done": torch.zeros(buffer_size)}
        self.size, self.pos, self.updates = 0, 0, 0

    # ------------------------------------------------------------------ policy
    def _sample(self, obs: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Action in [−1, 1]^A and its log-density (tanh change of variables)."""
        mean, log_std = self.actor(obs).chunk(2, dim=-1)
        log_std = log_std.clamp(_LOG_STD_MIN, _LOG_STD_MAX)
        if deterministic:
            u = mean
        else:
            u = mean + log_std.exp() * torch.randn(mean.shape, generator=self.generator)
        a = torch.tanh(u)
        gauss = -0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
        logp = (gauss - torch.log1p(-a.pow(2) + 1e-6)).sum(-1)
        return a, logp

    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        obs = torch.as_tensor(obs, dtype=torch.float32).reshape(1, self.obs_dim)
        if not bool(torch.isfinite(obs).all()):
            raise ValueError("SoftActorCritic.act: the observation has non-finite entries")
        with torch.no_grad(), _one_thread():
            return self._sample(obs, deterministic)[0][0]

    @property
    def alpha(self) -> float:
        return self.log_alpha.detach().exp().item()

    # ------------------------------------------------------------------ learning
    def store(self, obs: torch.Tensor, act: torch.Tensor, reward: float, next_obs: torch.Tensor,
              done: bool = False) -> None:
        i = self.pos
        self.buffer["obs"][i] = torch.as_tensor(obs, dtype=torch.float32)
        self.buffer["act"][i] = torch.as_tensor(act, dtype=torch.float32)
        self.buffer["rew"][i] = float(reward)
        self.buffer["next"][i] = torch.as_tensor(next_obs, dtype=torch.float32)
        self.buffer["done"][i] = float(done)
        cap = self.buffer["rew"].shape[0]
        self.pos, self.size = (i + 1) % cap, min(self.size + 1, cap)

    def update(self, n_updates: int = 1) -> dict[str, float]:
        """``n_updates`` gradient steps on minibatches from the buffer (none until it holds 2 transitions)."""
        if self.size < 2:
            return {}
        with _one_thread():
            return self._update(n_updates)

    def _update(self, n_updates: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for _ in range(n_updates):
            idx = torch.randint(0, self.size, (min(self.batch_size, self.size),), generator=self.generator)
            b = {k: v[idx] for k, v in self.buffer.items()}
            alpha = self.log_alpha.exp().detach()
            with torch.no_grad():
                a2, logp2 = self._sample(b["next"])
                sa2 = torch.cat([b["next"], a2], -1)
                q_next = torch.min(self.q1_target(sa2), self.q2_target(sa2)).squeeze(-1) - alpha * logp2
                y = b["rew"] + self.gamma * (1 - b["done"]) * q_next
            sa = torch.cat([b["obs"], b["act"]], -1)
            critic_loss = ((self.q1(sa).squeeze(-1) - y) ** 2).mean() + ((self.q2(sa).squeeze(-1) - y) ** 2).mean()
            self.critic_opt.zero_grad()
            critic_loss.backward()
            self.critic_opt.step()
            a, logp = self._sample(b["obs"])
            sa_pi = torch.cat([b["obs"], a], -1)
            actor_loss = (alpha * logp - torch.min(self.q1(sa_pi), self.q2(sa_pi)).squeeze(-1)).mean()
            self.actor_opt.zero_grad()
            actor_loss.backward()
            self.actor_opt.step()
            alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
            self.alpha_opt.zero_grad()
            alpha_loss.backward()
            self.alpha_opt.step()
            with torch.no_grad():
                for net, target in ((self.q1, self.q1_target), (self.q2, self.q2_target)):
                    for p, pt in zip(net.parameters(), target.parameters()):
                        pt.mul_(1 - self.tau).add_(self.tau * p)
            self.updates += 1
            out = {"critic_loss": critic_loss.item(), "actor_loss": actor_loss.item(), "alpha": self.alpha}
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        nets = ("actor", "q1", "q2", "q1_target", "q2_target", "actor_opt", "critic_opt", "alpha_opt")
        return {**{k: copy.deepcopy(getattr(self, k).state_dict()) for k in nets}, "log_alpha": self.log_alpha.detach().clone(),
                "buffer": {k: v.clone() for k, v in self.buffer.items()}, "size": self.size, "pos": self.pos,
                "updates": self.updates, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("actor", "q1", "q2", "q1_target", "q2_target", "actor_opt", "critic_opt", "alpha_opt"):
            getattr(self, k).load_state_dict(state[k])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.buffer = {k: v.clone() for k, v in state["buffer"].items()}
        self.size, self.pos, self.updates = int(state["size"]), int(state["pos"]), int(state["updates"])
        self.generator.set_state(state["generator"])
