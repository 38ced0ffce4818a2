"""The model repository: ``<root>/<name>/<version>/model.*`` plus ``<name>/config.json``.

Triton's semantics: each model's version policy (latest N, all, specific) picks the
versions on disk to serve; models are loaded and unloaded explicitly; a model is ready
only once every served version is loaded and warmed up. A reload loads and warms the new
versions first and then switches atomically, so no request fails during a switch.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from pathlib import Path

from serving.control_file import ControlFile
from serving.model_config import ModelConfig, list_models, list_versions, load_model_config
from serving.runtimes import Runtime, RuntimeOptions, create_runtime
from shared.errors import InvalidInput, ModelNotFound, ModelNotReady, TetherError, Unavailable
from shared.model_names import check_model_name
from shared.protocol import RepositoryIndexEntry

log = logging.getLogger(__name__)

RuntimeFactory = Callable[[ModelConfig, str, Path, RuntimeOptions, str], Runtime]


class ModelRepository:
    """Loads, serves and unloads the model versions found under ``root``."""

    def __init__(
        self,
        root: Path,
        options: RuntimeOptions | None = None,
        *,
        backend: str = "auto",
        control: ControlFile | None = None,
        runtime_factory: RuntimeFactory = create_runtime,
    ) -> None:
        self.root = root
        self.options = options or RuntimeOptions()
        self.backend = backend
        self.control = control
        self._factory = runtime_factory
        #: name -> {version: runtime}; replaced whole on change, so readers need no lock.
        self._served: dict[str, dict[str, Runtime]] = {}
        self._configs: dict[str, ModelConfig] = {}
        self._failures: dict[str, str] = {}
        self._applied: dict[str, int] = {}
        #: name -> [(cumulative weight, version)] for A/B traffic splits.
        self._splits: dict[str, list[tuple[float, str]]] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ discovery

    def model_names(self) -> list[str]:
        """Models on disk: folders holding at least one numeric version folder."""
        return list_models(self.root)

    @staticmethod
    def _versions_on_disk(model_dir: Path) -> list[int]:
        return list_versions(model_dir)

    # ------------------------------------------------------------------ control

    def load(
        self,
        name: str,
        *,
        versions: list[int] | None = None,
        split: dict[str, float] | None = None,
    ) -> list[str]:
        """Load (or reload) a model; returns the versions now served.

        By default the model's version policy picks the versions; ``versions`` pins them
        (the fleet agent switches versions this way) and ``split`` weights the traffic
        between them when no version is asked for (``{"1": 0.9, "2": 0.1}``).
        """
        if split:
            _check_split(split, versions)
        self._model_dir(name)  # a valid name of a model on disk, before anything is recorded
        if self.control is not None:
            self._applied[name] = self.control.record(name, "load", versions=versions, split=split)
        return self._load(name, versions, split)

    def unload(self, name: str) -> None:
        """Stop serving a model; in-flight requests on it still finish."""
        check_model_name(name)
        if name not in self._served and name not in self.model_names():
            raise ModelNotFound(f"unknown model {name!r}")
        if self.control is not None:
            self._applied[name] = self.control.record(name, "unload")
        self._unload(name)

    def sync(self) -> None:
        """Apply load/unload orders other worker processes recorded (cheap when none)."""
        if self.control is None or not self.control.changed():
            return
        with self._lock:
            for name, order in self.control.read().items():
                generation = int(order.get("generation", 0))
                if self._applied.get(name) == generation:
                    continue
                self._applied[name] = generation
                try:
                    if order.get("action") == "unload":
                        self._unload(name)
                    else:
                        self._load(name, order.get("versions"), order.get("split"))
                except TetherError as exc:
                    log.warning("could not apply %s of %s: %s", order.get("action"), name, exc)

    def _load(
        self,
        name: str,
        pinned: list[int] | None = None,
        split: dict[str, float] | None = None,
    ) -> list[str]:
        model_dir = self._model_dir(name)
        with self._lock:
            try:
                config = load_model_config(model_dir)
                on_disk = self._versions_on_disk(model_dir)
                if pinned is not None:
                    missing = sorted(set(pinned) - set(on_disk))
                    if missing:
                        raise ModelNotFound(f"model {name!r} has no version {missing[0]} on disk")
                    versions = sorted(set(pinned))
                else:
                    versions = config.version_policy.select(on_disk)
                if not versions:
                    raise Unavailable(f"model {name!r}: its version policy selects no version")
                current = self._served.get(name, {})
                loaded: dict[str, Runtime] = {}
                for number in versions:
                    version = str(number)
                    loaded[version] = self._start(config, version, model_dir / version)
            except TetherError as exc:
                self._failures[name] = exc.message
                raise
            self._configs[name] = config
            self._failures.pop(name, None)
            self._splits.pop(name, None)
            if split:
                self._splits[name] = _cumulative(split, loaded)
            self._served = {**self._served, name: loaded}
            retired = [old for version, old in current.items() if loaded.get(version) is not old]
            _release_later(retired)
            log.info("model %s ready, versions %s", name, ", ".join(loaded))
            return list(loaded)

    def _start(self, config: ModelConfig, version: str, version_dir: Path) -> Runtime:
        try:
            runtime = self._factory(config, version, version_dir, self.options, self.backend)
            runtime.load()
            runtime.warm_up(self.options.warmup_batch_sizes)
        except TetherError as exc:
            raise Unavailable(f"model {config.name!r} v{version} failed to load: {exc}") from exc
        except Exception as exc:
            raise Unavailable(
                f"model {config.name!r} v{version} failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        runtime.mark_ready()
        return runtime

    def _unload(self, name: str) -> None:
        with self._lock:
            if name not in self._served and name not in self.model_names():
                raise ModelNotFound(f"unknown model {name!r}")
            served = self._served
            old = served.get(name, {})
            self._served = {k: v for k, v in served.items() if k != name}
            self._failures.pop(name, None)
            _release_later(list(old.values()))

    def _model_dir(self, name: str) -> Path:
        model_dir = self.root / check_model_name(name)
        if not model_dir.is_dir() or not self._versions_on_disk(model_dir):
            raise ModelNotFound(f"unknown model {name!r}")
        return model_dir

    # ------------------------------------------------------------------ serving

    def get(self, name: str, version: str | None = None) -> Runtime:
        """The runtime serving ``name`` (its latest served version unless one is named)."""
        versions = self._served.get(name)
        if not versions:
            if name in self._failures:
                raise ModelNotReady(f"model {name!r} is not ready: {self._failures[name]}")
            if self._is_on_disk(name):
                raise ModelNotReady(f"model {name!r} is not loaded")
            raise ModelNotFound(f"unknown model {name!r}")
        if version is None:
            split = self._splits.get(name)
            if split is not None:
                draw = random.random()
                for bound, chosen in split:
                    if draw < bound and chosen in versions:
                        return versions[chosen]
            return versions[max(versions, key=int)]
        runtime = versions.get(version)
        if runtime is None:
            raise ModelNotFound(f"model {name!r} has no served version {version!r}")
        return runtime

    def served(self) -> dict[str, dict[str, Runtime]]:
        """A snapshot of what is served: name -> version -> runtime."""
        return self._served

    def _is_on_disk(self, name: str) -> bool:
        try:
            self._model_dir(name)
        except TetherError:
            return False
        return True

    def all_ready(self) -> bool:
        """True when every model that was asked to load is loaded and warmed up."""
        served = self._served
        if self._failures:
            return False
        return all(r.ready for versions in served.values() for r in versions.values())

    def index(self) -> list[RepositoryIndexEntry]:
        """Every model on disk or served, with each version's state (Triton's index)."""
        entries: list[RepositoryIndexEntry] = []
        served = self._served
        for name in sorted(set(self.model_names()) | set(served)):
            if name in served:
                for version, runtime in sorted(served[name].items(), key=lambda kv: int(kv[0])):
                    state = "READY" if runtime.ready else "UNAVAILABLE"
                    entries.append(RepositoryIndexEntry(name=name, version=version, state=state))
            elif name in self._failures:
                entries.append(
                    RepositoryIndexEntry(
                        name=name, state="UNAVAILABLE", reason=self._failures[name]
                    )
                )
            else:
                entries.append(
                    RepositoryIndexEntry(name=name, state="UNAVAILABLE", reason="unloaded")
                )
        return entries


def _check_split(split: dict[str, float], versions: list[int] | None) -> None:
    if any(w < 0 for w in split.values()) or sum(split.values()) <= 0:
        raise InvalidInput(f"traffic split weights must be >= 0 and not all 0: {split}")
    if versions is not None and not {int(v) for v in split} <= set(versions):
        raise InvalidInput(f"traffic split {split} names versions not in {versions}")


def _cumulative(split: dict[str, float], loaded: dict[str, Runtime]) -> list[tuple[float, str]]:
    """Normalised cumulative weights over the split's versions that are loaded."""
    weights = [(str(v), w) for v, w in split.items() if str(v) in loaded and w > 0]
    total = sum(w for _, w in weights) or 1.0
    bounds: list[tuple[float, str]] = []
    running = 0.0
    for version, weight in weights:
        running += weight / total
        bounds.append((running, version))
    if bounds:
        bounds[-1] = (1.0, bounds[-1][1])
    return bounds


#: How long a replaced or unloaded runtime keeps working for requests that already hold it.
RELEASE_GRACE_S = 30.0


def _release_later(runtimes: list[Runtime]) -> None:
    """Unload ``runtimes`` after a grace period, not at once.

    A request may have resolved the old runtime just before a switch and run it just after;
    it must still succeed ("no request fails during the switch"). New requests never see a
    retired runtime: it is already out of the served map.
    """
    if not runtimes:
        return

    def release() -> None:
        for runtime in runtimes:
            runtime.unload()

    timer = threading.Timer(RELEASE_GRACE_S, release)
    timer.daemon = True
    timer.start()
