"""make_private's argument checks (dptrain.privacy_config)."""
from __future__ import annotations

import numpy as np
import pytest
from torch import nn

import dptrain


@pytest.mark.parametrize("kwargs, name", [(dict(eps="3"), "eps"), (dict(eps=3, delta="1e-5"), "delta"),
                                          (dict(eps=None, noise_multiplier=[1.0]), "noise_multiplier")])
def test_a_number_given_as_another_type_is_a_clear_error(kwargs, name):
    """make_private(model, eps="3") raised TypeError: '>' not supported between 'str' and 'int'."""
    with pytest.raises(dptrain.PrivacyConfigError, match=f"make_private: {name} must be a number, got"):
        dptrain.make_private(nn.Linear(2, 2), **kwargs)


def test_numpy_numbers_are_accepted():
    dptrain.make_private(nn.Linear(2, 2), eps=np.float32(3.0), delta=np.float64(1e-5))
