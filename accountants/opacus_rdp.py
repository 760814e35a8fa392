"""Opacus' RDP analysis of the sampled Gaussian mechanism (Mironov, Talwar & Zhang 2019), without torch.

``import opacus`` loads torch and Opacus' privacy engine (about 2 s); its RDP analysis module,
``opacus/accountants/analysis/rdp.py``, needs only numpy and scipy. It is loaded here from
Opacus' installed files on its own, so that accounting (and ``dptrain epsilon``) starts without
torch. If the file is not where Opacus keeps it, the package is imported the usual way.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def _load() -> ModuleType:
    spec = importlib.util.find_spec("opacus")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "accountants" / "analysis" / "rdp.py"
        if path.is_file():
            file_spec = importlib.util.spec_from_file_location("accountants._opacus_rdp_analysis", path)
            if file_spec is not None and file_spec.loader is not None:
                module = importlib.util.module_from_spec(file_spec)
                file_spec.loader.exec_module(module)
                return module
    from opacus.accountants.analysis import rdp

    return rdp


rdp = _load()
