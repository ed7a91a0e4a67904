"""``selora eval`` metrics: k-NN against a brute-force reference, retrieval, end-to-end accuracy."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from selora.training.evaluate import (
    adapter_from_sparse, evaluate, format_table, knn_predict, retrieval_recall,
)
from selora.adapters.format import load_adapter
from selora.training.train import backbone_state, train
from selora.training.config import load_train_config
from selora.cli import main
from selora.models import load_backbone


def brute_force_knn(train, train_labels, test, num_classes, k=20, t=0.07):
    """One query at a time, plain Python: cosine, sort, weighted vote."""
    preds = []
    for q in test:
        sims = [(float(q @ x / (q.norm() * x.norm())), int(y)) for x, y in zip(train, train_labels)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, y in sims[:k]:
            votes[y] += math.exp(s / t)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_agrees_with_brute_force(k):
    gen = torch.Generator().manual_seed(k)
    centers = torch.randn(5, 16, generator=gen)
    labels = torch.randint(0, 5, (200,), generator=gen)
    train = centers[labels] + 3.0 * torch.randn(200, 16, generator=gen)
    test_labels = torch.randint(0, 5, (60,), generator=gen)
    test = centers[test_labels] + 3.0 * torch.randn(60, 16, generator=gen)
    fast = knn_predict(train, labels, test, 5, k=k, chunk=7)
    assert torch.equal(fast, brute_force_knn(train, labels, test, 5, k=k))
    assert 0.3 < float((fast == test_labels).float().mean()) < 1.0  # a non-trivial case


def test_retrieval_recall_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    img, txt = torch.randn(30, 8, generator=gen), torch.randn(30, 8, generator=gen)
    txt[:10] = img[:10] + 0.1 * txt[:10]  # the first ten pairs are easy
    ids = torch.arange(30)
    r = retrieval_recall(img, txt, ids, ids, ks=(1, 5))
    sim = torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(txt, dim=1).T
    for k in (1, 5):
        i2t = sum(int(i in sorted(range(30), key=lambda j: -float(sim[i, j]))[:k]) for i in range(30)) / 30
        t2i = sum(int(j in sorted(range(30), key=lambda i: -float(sim[i, j]))[:k]) for j in range(30)) / 30
        assert r[f"image_to_text_R@{k}"] == pytest.approx(i2t) and r[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert 10 / 30 <= r["image_to_text_R@1"] < 1.0
    assert retrieval_recall(torch.eye(3), torch.eye(3), torch.arange(3), torch.arange(3))["image_to_text_R@1"] == 1.0


def test_linear_probe_on_separable_synthetic_set_is_near_perfect(tmp_path, capsys):
    out, weights = tmp_path / "probe", str(tmp_path / "tiny.safetensors")
    save_file(backbone_state(load_backbone("tiny-vit")), weights)  # tiny-vit is random: fix one base
    cfg = load_train_config(overrides={"model": "tiny-vit", "weights": weights, "dataset": "synthetic",
                                       "method": "linear_probe", "steps": 30, "eval_every": 30, "batch_size": 32,
                                       "lr": 0.1, "val_subset": 32, "progress": False, "out": str(out)})
    train(cfg)
    backbone = load_backbone("tiny-vit", weights)
    adapter = adapter_from_sparse(load_adapter(out, backbone.blocks), backbone)
    result = evaluate(backbone, adapter, "synthetic", "synthetic", 32, knn_train=None, knn_test=None)
    assert result["id_top1"] >= 0.97
    assert result["retention_before"] == result["retention_after"]  # a head-only adapter changes no embedding
    assert main(["eval", str(out), "--weights", weights, "--dataset", "synthetic", "--retention", "none",
                 "--json", str(tmp_path / "r.json")]) == 0
    assert "id_top1" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["id_top1"] >= 0.97


def test_saved_adapter_reproduces_the_trained_embeddings(tmp_path):
    out = tmp_path / "sel"
    cfg = load_train_config(overrides={"model": "tiny-vit", "dataset": "synthetic", "steps": 6, "eval_every": 6,
                                       "batch_size": 8, "val_subset": 8, "lr": 0.5, "lam": 0.0,
                                       "progress": False, "out": str(out)})
    from selora.adapters.inject import attached
    from selora.training.train import Trainer

    trainer = Trainer(cfg)
    trainer.run()
    x = torch.randn(3, 3, 32, 32)
    trainer.adapter.eval()
    with torch.no_grad():
        expected = trainer.backbone.encode_image(x)
    trainer.close()
    torch.manual_seed(0)  # the trainer's seed: the same random tiny-vit base
    fresh = load_backbone("tiny-vit")
    with torch.no_grad(), attached(fresh, adapter_from_sparse(load_adapter(out, fresh.blocks), fresh)):
        got = fresh.encode_image(x)
    with torch.no_grad():
        base = fresh.encode_image(x)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(base, expected)  # the adapter did change the embedding


def test_clip_eval_reports_zero_shot_and_retrieval(tmp_path):
    backbone = load_backbone("tiny-clip")
    from selora.adapters import AdapterConfig, GatedAdapter

    adapter = GatedAdapter(AdapterConfig(r=2, gated=False), backbone.blocks, backbone.model).eval()
    result = evaluate(backbone, adapter, "synthetic", None, 32, test_subset=40)
    assert result["zero_shot_before"] == result["zero_shot_after"]  # B = 0: the adapter is the identity
    assert set(result["retrieval_after"]) == {"image_to_text_R@1", "text_to_image_R@1", "image_to_text_R@5",
                                              "text_to_image_R@5"}
    table = format_table({**result, "knn": {"k": 20, "temperature": 0.07}})
    assert "zero_shot_after" in table and table.rstrip().endswith(" 0.07")  # a setting, not a percentage


def test_eval_cli_reports_a_bad_adapter_cleanly(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "AdapterNotFoundError" in capsys.readouterr().err
