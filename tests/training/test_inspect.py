import json

from selora.adapters import export_adapter, save_adapter
from selora.cli import main
from tests.helpers import make_adapter


def test_inspect_prints_summary_and_writes_heatmap(tmp_path, tiny_clip, capsys):
    active = ["vision.1.fc1", "text.0.q", "vision.0.out"]
    path = save_adapter(export_adapter(make_adapter(tiny_clip, active=active), tiny_clip.model_id, tiny_clip.fingerprint), tmp_path / "ad")
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_active"] == 3 and info["num_scored"] == 24 and info["active_fraction"] == 3 / 24
    assert info["parameters"] == 4 * (64 + 256) + 4 * (64 + 64) + 4 * (64 + 64)
    png = path / "active_blocks.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_bad_adapter_is_one_line_error(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["inspect", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "AdapterNotFoundError" in err
