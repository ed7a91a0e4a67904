"""``selora train`` on tiny models and synthetic data: outputs, budget, resume, baselines, config errors."""

from __future__ import annotations

import json

import pytest
import torch

from selora.adapters.config import ConfigError
from selora.adapters.format import load_adapter
from selora.training.train import Trainer, batch_indices, lr_factor, train
from selora.training.config import load_train_config
from selora.cli import main
from selora.models import load_backbone

TINY = {"model": "tiny-vit", "dataset": "synthetic", "batch_size": 16, "val_subset": 32, "progress": False}


def _config(tmp_path, name="run", **kw):
    return load_train_config(overrides={**TINY, "out": str(tmp_path / name), **kw})


def test_twenty_steps_write_a_loadable_adapter_within_the_budget(tmp_path):
    cfg = _config(tmp_path, steps=20, eval_every=10, max_active_blocks=3, lam=0.1, score_lr=0.01)
    result = train(cfg)
    table = load_backbone("tiny-vit").blocks
    adapter = load_adapter(cfg.out, table)
    assert 1 <= len(adapter.blocks) <= 3 == cfg.max_active_blocks
    assert adapter.head_classes == ["class0", "class1", "class2", "class3"]
    assert adapter.gate["max_active_blocks"] == 3 and len(adapter.gate["scores"]) == 12
    assert len(result["active_blocks"]) == len(adapter.blocks)
    load_adapter(tmp_path / "run" / "best", table)
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [10, 20]
    assert (tmp_path / "run" / "checkpoint" / "state.safetensors").is_file()


def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(tmp_path):
    straight = _config(tmp_path, "straight", steps=12, eval_every=6, method="lora", variant="dora", r=2)
    train(straight)
    cut = _config(tmp_path, "cut", steps=12, eval_every=6, method="lora", variant="dora", r=2)
    first = Trainer(cut)
    for _ in range(6):
        first.train_step()
    first.save_checkpoint()  # "interrupted" after step 6
    first.close()
    second = Trainer(cut)
    assert second.resume() and second.step == 6
    assert second.run()["steps"] == 12
    second.close()
    a, b = load_adapter(straight.out), load_adapter(cut.out)
    for block in a.blocks:
        torch.testing.assert_close(a.blocks[block].lora_B, b.blocks[block].lora_B)
        torch.testing.assert_close(a.blocks[block].magnitude, b.blocks[block].magnitude)
    torch.testing.assert_close(a.head_weight, b.head_weight)


def test_resume_refuses_a_changed_setting(tmp_path):
    train(_config(tmp_path, steps=2, eval_every=2, method="lora", r=2))
    other = Trainer(_config(tmp_path, steps=4, eval_every=2, method="lora", r=4))
    with pytest.raises(ConfigError, match=r"settings differ.*\['r'\]"):
        other.resume()
    other.close()


@pytest.mark.parametrize("override, message", [
    ({"r": 0}, "r must be a positive integer"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"method": "magic"}, "method must be one of"),
    ({"warmup_steps": 99, "steps": 10}, r"warmup_steps must be an integer in \[0, steps=10\]"),
    ({"learning_rate": 0.1}, "unknown setting"),
    ({"init_score": 0.05}, "gates start open"),
    ({"penalty_normalization": "max"}, "penalty_normalization must be one of"),
])
def test_bad_config_values_fail_before_training(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(overrides={**TINY, **override})


def test_cli_bad_value_exits_2_without_creating_output(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", "--model", "tiny-vit", "--dataset", "synthetic", "--out", str(out), "--set", "lam=-1"]) == 2
    assert "lam must be >= 0" in capsys.readouterr().err
    assert not out.exists()


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text('model = "tiny-vit"\nr = 8\nlam = 1\nkinds = ["q", "v"]\n')
    cfg = load_train_config(path, ["r=4", "dataset=synthetic"])
    assert (cfg.r, cfg.lam, cfg.dataset, cfg.kinds) == (4, 1.0, "synthetic", ["q", "v"])
    assert cfg.adapter_config().kinds == ("q", "v")
    path.write_text("r = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_train_config(path)


def test_random_blocks_trains_exactly_k_ungated_blocks(tmp_path):
    cfg = _config(tmp_path, steps=2, eval_every=2, method="random_blocks", random_blocks=4, r=2)
    train(cfg)
    adapter = load_adapter(cfg.out)
    assert len(adapter.blocks) == 4 and adapter.gate == {"gated": False}


def test_fixed_blocks_trains_exactly_the_given_blocks(tmp_path):
    chosen = ["vision.1.fc1", "vision.0.q"]
    cfg = _config(tmp_path, steps=2, eval_every=2, method="fixed_blocks", blocks=chosen, r=2)
    train(cfg)
    adapter = load_adapter(cfg.out)
    assert sorted(adapter.blocks) == sorted(chosen) and adapter.gate == {"gated": False}
    with pytest.raises(ConfigError, match="fixed_blocks"):
        _config(tmp_path, method="fixed_blocks")
    with pytest.raises(ConfigError, match="unknown block ids"):
        Trainer(_config(tmp_path, method="fixed_blocks", blocks=["vision.99.q"]))


def test_the_budget_waits_for_the_warm_up_so_every_block_learns_first(tmp_path):
    cfg = _config(tmp_path, steps=6, eval_every=6, max_active_blocks=2, lam=0.0, penalty_warmup_steps=3)
    trainer = Trainer(cfg)
    try:
        trainer.run()
        moved = [b for b in trainer.adapter.block_ids if trainer.adapter.lora_B[b.replace(".", "_")].abs().sum() > 0]
        assert len(moved) == len(trainer.adapter.block_ids) > 2
        assert len(trainer.adapter.active_blocks()) == 2 == len(load_adapter(cfg.out).blocks)
    finally:
        trainer.close()


def test_full_ft_saves_a_backbone_usable_as_weights(tmp_path):
    cfg = _config(tmp_path, steps=3, eval_every=3, method="full_ft", lr=0.05)
    train(cfg)
    tuned = load_backbone("tiny-vit", weights=str(tmp_path / "run" / "backbone.safetensors"))
    base = load_backbone("tiny-vit")
    assert tuned.fingerprint == base.fingerprint
    assert not torch.equal(tuned.model.blocks[0].mlp.fc1.weight, base.model.blocks[0].mlp.fc1.weight)
    assert load_adapter(cfg.out).blocks == {}  # the head only


def test_clip_recipe_writes_a_zero_shot_head(tmp_path):
    cfg = load_train_config(overrides={"model": "tiny-clip", "dataset": "synthetic", "recipe": "clip", "steps": 2,
                                       "eval_every": 2, "batch_size": 8, "val_subset": 16, "r": 2,
                                       "progress": False, "out": str(tmp_path / "clip")})
    train(cfg)
    adapter = load_adapter(cfg.out, load_backbone("tiny-clip").blocks)
    assert adapter.head_classes == ["class0", "class1", "class2", "class3"]
    assert {b.split(".")[0] for b in adapter.gate["scores"]} == {"vision", "text"}


def test_schedule_and_batches():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1) and lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)
    first = torch.cat([batch_indices(10, 4, s, seed=0) for s in range(5)])  # two epochs of 10
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 4, 3, seed=0), first[12:16])


def test_cli_unknown_model_is_a_clean_error(tmp_path, capsys):
    assert main(["train", "--model", "nope", "--dataset", "synthetic", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "ModelError" in capsys.readouterr().err
