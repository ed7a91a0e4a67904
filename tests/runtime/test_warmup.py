"""Start-up warm-up: every kernel specialisation and row bucket a batch can need, run once."""

from __future__ import annotations

from selora.kernels import triton_lora
from selora.kernels.config import KernelConfig
from selora.runtime.warmup import VARIANTS, warm_up


def test_torch_backend_has_nothing_to_warm(tiny_vit):
    assert warm_up(tiny_vit, 4, KernelConfig.resolve("cpu", "torch")) == 0


def test_warm_up_meets_every_kernel_key_of_the_batches(tiny_vit, monkeypatch):
    keys, real_plan = [], triton_lora.plan

    def plan(*args, **kwargs):  # records the kernel key of every fused launch
        y, launches = real_plan(*args, **kwargs)
        keys.extend(triton_lora.tune_key(launch) for launch in launches if launch.name == "lora_linear")
        return y, launches

    monkeypatch.setattr(triton_lora, "plan", plan)
    assert warm_up(tiny_vit, 2, KernelConfig.resolve("cpu", "triton"), force=True) == len(VARIANTS) * 2
    fields = [dict(f.split("=") for f in k.split(" ")[2:]) for k in keys]  # N, K, out, split, dora, base
    assert {(f["split"], f["dora"]) for f in fields} == {("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")}
    assert len({k.split(" ")[1] for k in keys}) == 2  # the row buckets of batches of 1 and 2 images
    assert len(keys) == len(VARIANTS) * 2 * len(tiny_vit.meta["adapted_layers"])  # every adapted layer, every run


def test_warm_up_also_runs_at_the_stored_adapters_sizes(tiny_vit, monkeypatch):
    """An adapter trained at 48 px runs its rows at 48 px (37 tokens, not 17): other row buckets,
    which the warm-up compiles too; the base's own size is not run twice."""
    rows, real_plan = [], triton_lora.plan

    def plan(x, *args, **kwargs):
        rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return real_plan(x, *args, **kwargs)

    monkeypatch.setattr(triton_lora, "plan", plan)
    runs = warm_up(tiny_vit, 1, KernelConfig.resolve("cpu", "triton"), force=True, sizes=[(48, 48), (32, 32), [48, 48]])
    assert runs == 2 * len(VARIANTS)  # one image at 32 px and one at 48 px, per variant
    assert set(rows) == {17, 37}
    assert tuple(tiny_vit.model.patch_embed.img_size) == (32, 32)  # and the base is back at its size
