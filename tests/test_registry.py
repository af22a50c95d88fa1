"""course_utils.registry: the models `course train` knows."""

import pytest

from course_utils import registry
from course_utils.runtime import CourseError


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_builtins_added", False)


def test_builtin_models_are_listed(clean_registry):
    assert {"classifier", "ae", "dae", "vae"} <= set(registry.available())
    with pytest.raises(CourseError, match="choose one of"):
        registry.get("no-such-model")


def test_registering_first_neither_hides_the_builtins_nor_is_overridden(clean_registry):
    mine = registry.ModelSpec("vae", "my own VAE", dict, dict, dict, dict)
    extra = registry.ModelSpec("my-model", "a model of mine", dict, dict, dict, dict)
    registry.register(mine)
    registry.register(extra)
    specs = registry.available()
    assert {"classifier", "ae", "dae", "my-model"} <= set(specs)
    assert registry.get("vae") is mine


def test_a_time_limit_does_not_hide_the_checkpoint_from_the_notebook(monkeypatch):
    # `course train vae --max-seconds 300` must write the checkpoint notebook 03 loads
    from course_utils import checkpoints, vae

    monkeypatch.setenv("COURSE_TEST_SPLIT", "1")
    limited = registry.training_config("vae", "classroom", 0, max_seconds=300)
    assert limited == vae.course_train_config("classroom")
    assert checkpoints.config_hash(limited) == checkpoints.config_hash(vae.course_train_config("classroom"))
