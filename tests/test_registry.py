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
