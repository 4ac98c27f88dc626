"""Loading a network's weights from a state dict or a training checkpoint, with errors that say what does not match."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from scripts.runtime.errors import CheckpointError, CheckpointNotFound


def load_weights(network: torch.nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
    """Load a state dict (or a checkpoint holding one under ``model``/``ema``/``network``) into ``network``.

    Raises:
        CheckpointNotFound: the checkpoint does not exist (a ``FileNotFoundError``).
        CheckpointError: the checkpoint cannot be read or does not match the network (a ``ValueError``); the
            message names the file and the missing, unexpected and mis-shaped parameters (with both shapes).
    """
    if not Path(path).is_file():
        raise CheckpointNotFound(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files
        raise CheckpointError(f"checkpoint {path} cannot be read: {' '.join(str(err).splitlines())}") from err
    for key in ("model", "ema", "network"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or mis_shaped:

        def head(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        shapes = [f"{k} (checkpoint {tuple(state[k].shape)}, network {tuple(own[k].shape)})" for k in mis_shaped]
        details = [
            f"{label}: {head(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", shapes))
            if keys
        ]
        # one line: the command prints it as the whole report
        raise CheckpointError(
            f"checkpoint {path} does not match the network ({type(network).__name__}; was it "
            "trained with other network_def settings?): " + "; ".join(details)
        )
    network.load_state_dict(state)
