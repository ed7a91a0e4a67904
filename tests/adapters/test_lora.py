import torch

from selora.adapters import AdapterConfig, GatedAdapter, attached, inject
from tests.helpers import make_adapter


def _embed(bb, x, adapter=None):
    if adapter is None:
        return bb.encode_image(x)
    with attached(bb, adapter):
        return bb.encode_image(x)


def test_ste_gradient_reaches_scores(tiny_vit):
    inject(tiny_vit)
    adapter = make_adapter(tiny_vit).train()
    x = torch.randn(2, 3, 32, 32)
    with attached(tiny_vit, adapter):
        tiny_vit.encode_image(x).pow(2).sum().backward()
    assert adapter.scores.grad is not None and adapter.scores.grad.abs().sum() > 0


def test_larger_lambda_leaves_fewer_blocks(tiny_vit):
    inject(tiny_vit)
    x = torch.randn(4, 3, 32, 32)
    target = torch.randn(4, tiny_vit.embed_dim)
    active = {}
    for lam in (0.0, 0.4, 1.0):
        torch.manual_seed(0)
        adapter = GatedAdapter(AdapterConfig(r=4, lam=lam), tiny_vit.blocks, tiny_vit.model).train()
        opt = torch.optim.SGD(adapter.parameters(), lr=0.05)
        with attached(tiny_vit, adapter):
            for _ in range(5):
                opt.zero_grad()
                loss = (tiny_vit.encode_image(x) - target).pow(2).mean() + adapter.penalty()
                loss.backward()
                opt.step()
        active[lam] = len(adapter.active_blocks())
    assert active[0.0] == len(tiny_vit.blocks)
    assert active[0.0] >= active[0.4] >= active[1.0]
    assert active[1.0] < active[0.0]


def test_all_gates_off_equals_base_exactly(tiny_clip):
    inject(tiny_clip)
    x = torch.randn(2, 3, 32, 32)
    adapter = make_adapter(tiny_clip, active=[])
    with torch.no_grad():
        assert torch.equal(_embed(tiny_clip, x, adapter), _embed(tiny_clip, x))
        assert not torch.equal(_embed(tiny_clip, x, make_adapter(tiny_clip)), _embed(tiny_clip, x))


def test_dora_with_zero_b_and_initial_magnitude_equals_base(tiny_vit):
    inject(tiny_vit)
    x = torch.randn(2, 3, 32, 32)
    adapter = GatedAdapter(AdapterConfig(variant="dora", r=4), tiny_vit.blocks, tiny_vit.model).eval()
    with torch.no_grad():
        torch.testing.assert_close(_embed(tiny_vit, x, adapter), _embed(tiny_vit, x), atol=1e-6, rtol=0)


def test_plain_lora_has_no_scores_and_every_block(tiny_vit):
    adapter = GatedAdapter(AdapterConfig(gated=False), tiny_vit.blocks, tiny_vit.model)
    assert adapter.scores is None and adapter.active_blocks() == list(tiny_vit.blocks)
    assert adapter.penalty().item() == 0.0


def test_budget_limits_active_blocks(tiny_vit):
    adapter = GatedAdapter(AdapterConfig(max_active_blocks=3), tiny_vit.blocks, tiny_vit.model)
    with torch.no_grad():
        adapter.scores.copy_(torch.linspace(0.2, 0.9, len(adapter.block_ids)))
    assert adapter.active_blocks() == adapter.block_ids[-3:]
    assert adapter.gates().sum().item() == 3


def test_inject_is_idempotent_and_wraps_copies(tiny_vit):
    import copy
    import dataclasses

    from selora.adapters import AdaptedLinear

    layers = inject(tiny_vit)
    assert inject(tiny_vit) is layers and all(isinstance(m, AdaptedLinear) for m in layers.values())
    fresh = dataclasses.replace(tiny_vit, model=copy.deepcopy(tiny_vit.model))
    for site, layer in layers.items():  # unwrap the copy: it shares ``meta`` but not modules
        parent, _, child = site.rpartition(".")
        setattr(fresh.model.get_submodule(parent), child, fresh.model.get_submodule(site).base)
    copied = inject(fresh)
    assert copied is not layers and all(fresh.model.get_submodule(s) is m for s, m in copied.items())
