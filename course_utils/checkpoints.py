"""A local cache of trained models, verified before it is trusted.

Each checkpoint is two files in the cache folder::

    NAME-CONFIGHASH.pt     the model's state_dict (and its config)
    NAME-CONFIGHASH.json   name, config, config hash, SHA-256 of the .pt, metrics

``CONFIGHASH`` is the first 12 hex digits of the SHA-256 of the configuration
(as canonical JSON). Anything that changes the trained result (architecture,
budget, data) belongs in the config, so a checkpoint trained differently is
simply a different file.

Loading checks the SHA-256 of the file against the sidecar, the config hash
against the config, and that the weights fit the model. A checkpoint failing
any check is reported and ignored (then retrained by ``load_or_train``), never
silently loaded. Instructors can hand out a folder of checkpoints: point
``$COURSE_CHECKPOINT_DIR`` at it.

The cache folder is ``$COURSE_CHECKPOINT_DIR``, else ``DATA_ROOT/checkpoints``
when the data root is writable, else ``~/.cache/deep-generative-course/checkpoints``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from .data import DEFAULT_ROOT, data_root, training_data_description
from .runtime import budget

CHECKPOINT_ENV = "COURSE_CHECKPOINT_DIR"


def _writable(folder: Path) -> bool:
    # A data folder shipped read-only (no write bits, as on CI) stays untouched even for root.
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.stat().st_mode & 0o222:
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("ok")
        probe.unlink()
        return True
    except OSError:
        return False


def checkpoint_dir(directory=None) -> Path:
    """Where checkpoints are cached (see the module docstring for the order)."""
    if directory is not None:
        return Path(directory).expanduser().resolve()
    if os.environ.get(CHECKPOINT_ENV):
        return Path(os.environ[CHECKPOINT_ENV]).expanduser().resolve()
    under_data = data_root() / "checkpoints"
    if _writable(under_data):
        return under_data
    return DEFAULT_ROOT / "checkpoints"


def config_hash(config: dict) -> str:
    """SHA-256 of the config as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_paths(name: str, config: dict, directory=None) -> tuple[Path, Path]:
    stem = f"{name}-{config_hash(config)[:12]}"
    folder = checkpoint_dir(directory)
    return folder / f"{stem}.pt", folder / f"{stem}.json"


def save_checkpoint(name: str, model: nn.Module, config: dict, metrics: dict | None = None,
                    directory=None) -> Path:
    """Write ``model``'s weights and a verified sidecar; returns the ``.pt`` path."""
    weights_path, sidecar_path = checkpoint_paths(name, config, directory)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in getattr(model, "_orig_mod", model).state_dict().items()}
    tmp = weights_path.with_suffix(".pt.tmp")
    torch.save({"name": name, "config": config, "state_dict": state}, tmp)
    tmp.replace(weights_path)
    sidecar = {
        "name": name,
        "config": config,
        "config_hash": config_hash(config),
        "sha256": file_sha256(weights_path),
        "file": weights_path.name,
        "metrics": metrics or {},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
    }
    sidecar_path.write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
    return weights_path


def verify_checkpoint(name: str, config: dict, directory=None) -> tuple[bool, str]:
    """Is there a checkpoint for (name, config) that passes every check? And why not."""
    weights_path, sidecar_path = checkpoint_paths(name, config, directory)
    if not weights_path.exists():
        return False, f"no checkpoint {weights_path.name} in {weights_path.parent}"
    if not sidecar_path.exists():
        return False, f"{weights_path.name} has no {sidecar_path.name} sidecar, so it cannot be verified"
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError as err:
        return False, f"{sidecar_path.name} is not valid JSON ({err})"
    if sidecar.get("config_hash") != config_hash(config):
        return False, f"{weights_path.name} was trained with a different configuration"
    actual = file_sha256(weights_path)
    if actual != sidecar.get("sha256"):
        return False, (f"{weights_path.name} is corrupt: its SHA-256 {actual[:12]}... does not "
                       f"match the recorded {str(sidecar.get('sha256'))[:12]}...")
    return True, "ok"


def load_checkpoint(name: str, model: nn.Module, config: dict, directory=None,
                    map_location="cpu", verbose: bool = True) -> dict | None:
    """Load verified weights into ``model``; return the sidecar, or None.

    A missing checkpoint returns None quietly; a corrupt or mismatched one is
    reported (printed) and returns None, so the caller retrains.
    """
    ok, reason = verify_checkpoint(name, config, directory)
    weights_path, sidecar_path = checkpoint_paths(name, config, directory)
    if not ok:
        if verbose and weights_path.exists():
            print(f"[course checkpoints] ignoring {name}: {reason}; it will be retrained")
        return None
    payload = torch.load(weights_path, map_location=map_location, weights_only=True)
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as err:
        if verbose:
            first = str(err).splitlines()[0]
            print(f"[course checkpoints] ignoring {name}: weights do not fit the model ({first}); "
                  "it will be retrained")
        return None
    return json.loads(sidecar_path.read_text())


def load_or_train(name: str, config: dict, model: nn.Module, train_fn, budget_name=None,
                  directory=None, use_cache: bool | None = None):
    """Load a verified checkpoint for ``(name, config)``, else train and cache one.

    ``train_fn(model) -> metrics dict or None``. The cache is used in the
    ``classroom`` and ``full`` budgets; the ``smoke`` budget always trains, so
    tests exercise the real code. Returns ``(model, info)`` where
    ``info["source"]`` is ``"cache"`` or ``"trained"``.
    """
    if use_cache is None:
        use_cache = budget(budget_name) != "smoke"
    if use_cache:
        sidecar = load_checkpoint(name, model, config, directory)
        if sidecar is not None:
            print(f"[course checkpoints] loaded {name} from {checkpoint_dir(directory)} "
                  f"(verified SHA-256, trained {sidecar['created']})")
            model.eval()
            return model, {"source": "cache", **sidecar}
    metrics = train_fn(model) or {}
    path = None
    try:
        path = save_checkpoint(name, model, config, metrics, directory)
    except OSError as err:  # a read-only cache must not lose the trained model
        print(f"[course checkpoints] could not cache {name}: {err}")
    model.eval()
    return model, {"source": "trained", "metrics": metrics, "path": str(path) if path else None}


def training_config(model_config: dict, budget_name: str | None = None, seed: int = 0,
                    max_seconds: float | None = None) -> dict:
    """A model's config completed as ``course train`` caches it: the seed and the training data.

    ``course train`` and the notebooks both build their configs with this, so that
    a notebook finds the checkpoint the command cached (:func:`load_or_train`). A
    time limit (``max_seconds``) is not part of it: it changes how long a model
    trains, not which model it is, so ``course train vae --max-seconds 300`` writes
    the checkpoint that notebook 03 loads, and a new limit replaces it instead of
    adding a file. ``course train`` records the limit in ``metrics.json``.
    """
    del max_seconds  # accepted for the callers' convenience; deliberately not hashed
    config = dict(model_config)
    config.update(seed=seed, data=training_data_description(budget_name=budget_name))
    return config
