"""The report generator builds its tables, targets and plots from a small recorded result."""

from __future__ import annotations

import json
from pathlib import Path

from selora.bench.report import write_report
from selora.bench.targets import evaluate
from selora.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "recorded_tiny.json"


def test_report_from_recorded_result(tmp_path):
    result = json.loads(FIXTURE.read_text())
    paths = write_report(result, tmp_path, "r")
    names = sorted(p.name for p in paths)
    assert names == ["r.json", "r.md", "r_figure9.png", "r_multitenant.png"]
    for png in (tmp_path / "r_figure9.png", tmp_path / "r_multitenant.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    md = (tmp_path / "r.md").read_text()
    for heading in ("## Targets", "## FLOPs", "### tiny-vit", "### tiny-clip", "## Latency", "## Multi-tenant", "## Memory"):
        assert heading in md
    assert result["meta"]["command"] in md
    assert "| lora | 16 |" in md  # a FLOP table row
    assert json.loads((tmp_path / "r.json").read_text()) == result


def test_targets_are_computed_from_the_numbers():
    result = json.loads(FIXTURE.read_text())
    targets = {t["target"]: t for t in evaluate(result)}
    exact = next(t for name, t in targets.items() if name.startswith("FLOPs: FlopCounterMode"))
    assert exact["met"] is True and exact["measured"].startswith(f"{len(result['flops'])}/{len(result['flops'])}")
    gpu = next(t for name, t in targets.items() if name.startswith("GPU"))
    assert gpu["met"] is None and "not measurable" in gpu["measured"]
    # break one grid point: the exactness target must fail
    result["flops"][3]["match"] = False
    assert next(t for t in evaluate(result) if t["target"].startswith("FLOPs: FlopCounterMode"))["met"] is False
    # the multi-tenant base ratio follows the recorded medians
    mt = next(t for t in evaluate(result) if "within 1.10x" in t["target"])
    sel = next(r for r in result["multitenant"] if r["method"] == "selora" and r["num_adapters"] == 32)
    assert f"{sel['rel_base']:.3f}x" in mt["measured"] and mt["met"] == (sel["rel_base"] <= 1.10)


def test_cli_report_only_and_bad_block(tmp_path, capsys):
    assert main(["bench", "--report-only", str(FIXTURE), "--out", str(tmp_path), "--stem", "again"]) == 0
    assert (tmp_path / "again.md").is_file() and (tmp_path / "again_figure9.png").is_file()
    code = main(["bench", "--models", "tiny-vit", "--ranks", "4", "--stages", "flops", "--blocks", "vision.7.nope",
                 "--out", str(tmp_path)])
    assert code == 2 and "vision.7.nope" in capsys.readouterr().err
