import pytest
import torch

from selora.adapters.config import AdapterConfig, ConfigError
from selora.adapters.gates import active_mask, gate_values, score_penalty


def test_indicator_is_hard_forward_identity_backward():
    s = torch.tensor([0.05, 0.1, 0.3], requires_grad=True)
    g = gate_values(s, tau=0.1)
    assert g.tolist() == [0.0, 1.0, 1.0]
    (g * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert s.grad.tolist() == [1.0, 2.0, 3.0]  # straight through, closed gates included


def test_budget_keeps_top_k_open_scores():
    s = torch.tensor([0.5, 0.2, 0.05, 0.9, 0.3])
    assert active_mask(s, 0.1, max_active=2).tolist() == [True, False, False, True, False]
    assert active_mask(s, 0.1, max_active=10).tolist() == [True, True, False, True, True]
    assert active_mask(s, 0.1, max_active=0).sum() == 0


@pytest.mark.parametrize("kind,expected", [("l1", 2 * (0.2 + 0.5)), ("l2", 2 * (0.04 + 0.25)), ("hinge", 2 * 0.4)])
def test_penalties(kind, expected):
    s = torch.tensor([-0.2, 0.5])
    assert score_penalty(s, kind, lam=2.0, tau=0.1).item() == pytest.approx(expected)


@pytest.mark.parametrize("bad", [
    {"variant": "ia3"}, {"regularizer": "l0"}, {"r": 0}, {"lora_alpha": -1.0}, {"lam": -0.1},
    {"tau": 0.5, "init_score": 0.1}, {"kinds": ("q", "mlp")}, {"max_active_blocks": -1},
])
def test_bad_config_values_are_rejected(bad):
    with pytest.raises(ConfigError):
        AdapterConfig(**bad)
