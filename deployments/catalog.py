"""Which models each variant serves, as the Router sees them."""

from __future__ import annotations

import time

from mlx_serving.deployments.errors import HTTPError

_TTL_S = 5.0


class ModelCatalog:
    """The models of each variant's LLMServer deployment, asked of a replica and kept for
    a few seconds. An empty answer is never kept: it means the replica is still loading
    or already shutting down."""

    def __init__(self, servers: dict):
        self._servers = servers   # variant -> LLMServer handle
        self._models: dict[str, tuple[float, list[dict]]] = {}

    async def models(self, variant: str) -> list[dict]:
        """``{"id", "max_model_len"}`` of each model the variant serves."""
        at, models = self._models.get(variant, (0.0, []))
        if time.monotonic() - at > _TTL_S or not models:
            models = await self._servers[variant].models.remote()
            self._models[variant] = (time.monotonic(), models)
        return models

    async def names(self, variant: str) -> list[str]:
        return [m["id"] for m in await self.models(variant)]

    async def require(self, variant: str) -> list[str]:
        """The variant's model names; a 503 with Retry-After while it serves none (not a
        client's mistake, so not a 404)."""
        names = await self.names(variant)
        if not names:
            raise HTTPError(503, f"variant {variant!r} has no model loaded yet; retry shortly",
                            type="service_unavailable_error", code="no_model_loaded",
                            retry_after=1.0)
        return names
