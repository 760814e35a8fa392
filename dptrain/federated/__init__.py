"""Federated DP training: DP-FedAvg, DP-LoRA, FFA-LoRA and FedSVD, simulated or on torch.distributed."""
from .comm import DistributedComm, LocalComm
from .config import ALGORITHMS, DP_UNITS, FederatedConfig
from .server import clip_update, fedsvd_refactor_model
from .trainer import FederatedReport, FederatedTraining, RoundResult, make_federated

__all__ = ["make_federated", "FederatedTraining", "FederatedConfig", "FederatedReport", "RoundResult",
           "LocalComm", "DistributedComm", "ALGORITHMS", "DP_UNITS", "clip_update", "fedsvd_refactor_model"]
