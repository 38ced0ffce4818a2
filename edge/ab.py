"""A/B tests on the device: ``[ab.<model>] split = {"1" = 0.9, "2" = 0.1}`` in the settings.

The repository serves both versions and draws each request's version by weight; the
response's ``model_version`` and the per-version metrics say which one answered.
"""

from __future__ import annotations

import logging

from edge.settings import AbSettings
from serving.repository import ModelRepository
from shared.errors import TetherError

log = logging.getLogger(__name__)


def apply_ab_tests(repository: ModelRepository, ab: dict[str, AbSettings]) -> dict[str, str]:
    """Serve each configured split; returns ``{model: error}`` for those that failed."""
    failed: dict[str, str] = {}
    for name, test in ab.items():
        versions = sorted(int(v) for v in test.split)
        try:
            repository.load(name, versions=versions, split=test.split)
        except TetherError as exc:
            log.error("A/B test of %s not applied: %s", name, exc.message)
            failed[name] = exc.message
    return failed
