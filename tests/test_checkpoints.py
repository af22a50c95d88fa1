import json

import pytest
import torch
from torch import nn

from course_utils import checkpoints
from course_utils.checkpoints import (
    config_hash,
    load_checkpoint,
    load_or_train,
    save_checkpoint,
    verify_checkpoint,
)

CONFIG = {"hidden": 4, "epochs": 2, "data": "MNIST test images 1-8,000"}


def make_model(hidden=4):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def test_config_hash_is_canonical():
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_round_trip_with_verified_sidecar(tmp_path):
    model = make_model()
    path = save_checkpoint("toy", model, CONFIG, {"loss": 0.1}, directory=tmp_path)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["sha256"] == checkpoints.file_sha256(path)
    assert sidecar["config_hash"] == config_hash(CONFIG)
    fresh = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    info = load_checkpoint("toy", fresh, CONFIG, directory=tmp_path)
    assert info["metrics"] == {"loss": 0.1}
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_corrupt_checkpoint_is_reported_and_not_loaded(tmp_path, capsys):
    path = save_checkpoint("toy", make_model(), CONFIG, directory=tmp_path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    ok, reason = verify_checkpoint("toy", CONFIG, directory=tmp_path)
    assert not ok and "corrupt" in reason
    fresh = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    before = [p.clone() for p in fresh.parameters()]
    assert load_checkpoint("toy", fresh, CONFIG, directory=tmp_path) is None
    assert "corrupt" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters(), strict=True))


def test_checkpoint_that_does_not_fit_is_reported(tmp_path, capsys):
    save_checkpoint("toy", make_model(hidden=4), CONFIG, directory=tmp_path)
    wrong_shape = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    assert load_checkpoint("toy", wrong_shape, CONFIG, directory=tmp_path) is None
    assert "do not fit" in capsys.readouterr().out


def test_edited_sidecar_config_is_a_mismatch(tmp_path):
    path = save_checkpoint("toy", make_model(), CONFIG, directory=tmp_path)
    sidecar_path = path.with_suffix(".json")
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["config_hash"] = "0" * 64
    sidecar_path.write_text(json.dumps(sidecar))
    ok, reason = verify_checkpoint("toy", CONFIG, directory=tmp_path)
    assert not ok and "different configuration" in reason


def test_load_or_train_trains_once_then_loads(tmp_path):
    calls = []

    def train_fn(model):
        calls.append(1)
        with torch.no_grad():
            model[0].weight.fill_(0.25)
        return {"loss": 1.0}

    model, info = load_or_train("toy", CONFIG, make_model(), train_fn, budget_name="classroom",
                                directory=tmp_path)
    assert info["source"] == "trained" and calls == [1]
    again, info = load_or_train("toy", CONFIG, make_model(), train_fn, budget_name="classroom",
                                directory=tmp_path)
    assert info["source"] == "cache" and calls == [1]
    assert torch.all(again[0].weight == 0.25)
    _, info = load_or_train("toy", CONFIG, make_model(), train_fn, budget_name="smoke",
                            directory=tmp_path)
    assert info["source"] == "trained" and calls == [1, 1]  # smoke always exercises training


def test_corrupt_cache_is_retrained(tmp_path, capsys):
    path = save_checkpoint("toy", make_model(), CONFIG, directory=tmp_path)
    path.write_bytes(b"not a checkpoint")
    _, info = load_or_train("toy", CONFIG, make_model(), lambda m: None,
                            budget_name="classroom", directory=tmp_path)
    assert info["source"] == "trained" and "retrained" in capsys.readouterr().out
    assert verify_checkpoint("toy", CONFIG, directory=tmp_path)[0]


def test_read_only_data_root_is_not_used_for_the_cache(tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    root.chmod(0o555)
    monkeypatch.delenv("COURSE_CHECKPOINT_DIR", raising=False)
    monkeypatch.setenv("COURSE_DATA_DIR", str(root))
    try:
        assert checkpoints.checkpoint_dir() != root / "checkpoints"
    finally:
        root.chmod(0o755)
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path / "writable"))
    assert checkpoints.checkpoint_dir() == (tmp_path / "writable" / "checkpoints").resolve()


@pytest.mark.parametrize("env", ["COURSE_CHECKPOINT_DIR"])
def test_environment_overrides_cache(tmp_path, monkeypatch, env):
    monkeypatch.setenv(env, str(tmp_path / "handout"))
    assert checkpoints.checkpoint_dir() == (tmp_path / "handout").resolve()
