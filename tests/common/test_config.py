"""Settings that contradict each other are refused when a service starts, not per request."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common.config import GatewayConfig


def test_a_default_over_its_limit_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STYLEBLEND_MAX_SIDE_PX", "128")
    with pytest.raises(ValidationError, match="default_side_px 256 is over max_side_px 128"):
        GatewayConfig()
    monkeypatch.setenv("STYLEBLEND_DEFAULT_SIDE_PX", "128")
    assert GatewayConfig().default_side_px == 128
    with pytest.raises(ValidationError, match="default_iterations 150 is over max_iterations 99"):
        GatewayConfig(max_iterations=99)
