"""GET /v1/models in vLLM's shape (`vllm/entrypoints/openai/models/serving.py`,
`show_available_models`): a card per served name, then one per LoRA adapter (root its
path, parent the base model, max_model_len null). vLLM serves no GET /v1/models/{id}."""

from __future__ import annotations

import time
import uuid
from typing import Any

from tollgate_sim.exchange import Exchange
from tollgate_sim.http import dumps


def _card(
    name: str, root: str, parent: str | None, max_len: int | None, now: int
) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": now,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_len,
        "permission": [
            {
                "id": "modelperm-" + uuid.uuid4().hex,
                "object": "model_permission",
                "created": now,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }


async def list_models(ex: Exchange) -> None:
    knobs = ex.knobs
    now = int(time.time())
    cards = [_card(n, knobs.model, None, knobs.max_model_len, now) for n in knobs.served_names]
    cards += [_card(n, f"/loras/{n}", knobs.model, None, now) for n in knobs.lora_names]
    ex.send(200, dumps({"object": "list", "data": cards}))
