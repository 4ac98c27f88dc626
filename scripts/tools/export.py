"""TorchScript export of the trained diffusion network, with the bundle's metadata and inference config inside.

``python -m scripts.export --ckpt bundle/models/model.pt --out bundle/models/model.ts`` builds the network from
``inference.json``'s ``network_def``, loads the weights with :func:`scripts.runtime.weights.load_weights`, traces
``forward(x, timesteps, cond, treatment, horizon)`` (all tensors, the call the sampler makes) and saves it with
:func:`monai.data.save_net_with_metadata`, in the layout of ``monai.bundle ckpt_export``: ``metadata.json`` (the
bundle's metadata plus MONAI/PyTorch/NumPy versions) and ``inference.json`` (the config the network was built
from, overrides applied) as extra files, plus ``export.json`` (checkpoint SHA-256, traced signature, spatial-size
constraint, and the largest difference to the eager network measured at export).

Why tracing: MONAI's ``DiffusionModelUNet`` cannot be scripted, and ``ckpt_export --use_trace`` feeds a single
input tensor, while this network needs five. The trace holds for any batch size and any spatial size divisible by
``patch_size * 2 ** (len(channels) - 1)`` (16 for the shipped network); both are checked here against the eager
network. Overrides use the ``monai.bundle`` syntax, e.g. ``--network_channels "[8,16,16,16]"``.

``bundle/configs/inference_ts.json`` forecasts with the exported file (:func:`load_torchscript`) instead of
``network_def`` + ``model.pt``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import monai.networks.nets.diffusion_model_unet as monai_unet
import scripts.runtime.network as network_module
import torch
from monai.bundle import ConfigParser
from monai.data import load_net_with_metadata, save_net_with_metadata
from monai.networks.utils import convert_to_torchscript
from scripts.runtime.constants import CONDITION_CHANNELS, NULL_TREATMENT
from scripts.runtime.files import file_sha256
from scripts.runtime.weights import load_weights
from torch import nn

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
FORWARD_ARGS: tuple[str, ...] = ("x", "timesteps", "cond", "treatment", "horizon")
EXPORT_INFO = "export.json"
"""Extra file of ``model.ts`` describing the export (checkpoint hash, signature, constraints, check results)."""


class TracedForward(nn.Module):
    """The signature traced into ``model.ts``: ``forward(x, timesteps, cond, treatment, horizon)``, all tensors.

    ``x`` (N, 1, *S) noisy NET2 signal, ``timesteps`` (N,) int64, ``cond`` (N, C, *S), ``treatment`` (N,) int64 arm
    index (``NULL_TREATMENT`` for none), ``horizon`` (N,) float weeks. Returns the network's prediction (N, 1, *S).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        cond: torch.Tensor,
        treatment: torch.Tensor,
        horizon: torch.Tensor,
    ) -> torch.Tensor:
        return self.network(x, timesteps, cond, treatment, horizon)


def _timestep_embedding_any_device(
    timesteps: torch.Tensor, embedding_dim: int, max_period: int = 10000
) -> torch.Tensor:
    """MONAI's ``get_timestep_embedding`` with its index vector built from ``timesteps`` instead of ``torch.arange``.

    ``torch.jit.trace`` stores the device of a tensor created inside ``forward`` as a constant, so MONAI's
    ``arange(..., device=timesteps.device)`` would tie a CPU trace to the CPU. A cumulative sum of ones shaped from
    ``timesteps`` follows its device at run time and holds the same exact integers, so the values are identical.
    """
    if timesteps.ndim != 1:
        raise ValueError("Timesteps should be a 1d-array")
    half_dim = embedding_dim // 2
    index = torch.ones_like(timesteps[:1], dtype=torch.float32).expand(half_dim).cumsum(0) - 1
    freqs = torch.exp(-math.log(max_period) * index / half_dim)
    args = timesteps[:, None].float() * freqs[None, :]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if embedding_dim % 2 == 1:
        embedding = nn.functional.pad(embedding, (0, 1, 0, 0))
    return embedding


@contextlib.contextmanager
def _device_independent_tracing() -> Iterator[None]:
    """Swap in :func:`_timestep_embedding_any_device` where the network looks up ``get_timestep_embedding``."""
    modules = (monai_unet, network_module)
    saved = [m.get_timestep_embedding for m in modules]
    try:
        for m in modules:
            m.get_timestep_embedding = _timestep_embedding_any_device
        yield
    finally:
        for m, original in zip(modules, saved, strict=True):
            m.get_timestep_embedding = original


def spatial_multiple(network: nn.Module) -> int:
    """Spatial sizes the network accepts are multiples of this: the patch size times one 2 per down-sampling."""
    return int(getattr(network, "patch_size", 1)) * 2 ** (len(network.block_out_channels) - 1)


def example_inputs(
    batch_size: int,
    spatial_size: Sequence[int],
    cond_channels: int = len(CONDITION_CHANNELS),  # noqa: B008 (an int, fixed at import)
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, ...]:
    """Random inputs of the traced signature (every arm, the null token included, and horizons 1-104 weeks)."""
    g = torch.Generator().manual_seed(seed)
    size = [int(s) for s in spatial_size]
    inputs = (
        torch.randn(batch_size, 1, *size, generator=g),
        torch.randint(0, 1000, (batch_size,), generator=g),
        torch.rand(batch_size, cond_channels, *size, generator=g) * 2,
        torch.randint(0, NULL_TREATMENT + 1, (batch_size,), generator=g),
        1 + torch.rand(batch_size, generator=g) * 103,
    )
    return tuple(t.to(device) for t in inputs)


def trace_network(network: nn.Module, spatial_size: Sequence[int], batch_size: int = 2) -> torch.jit.ScriptModule:
    """Trace ``TracedForward(network)`` in eval mode on example inputs of ``spatial_size`` with MONAI's
    ``convert_to_torchscript`` (which also checks the trace against the network on those inputs)."""
    device = next(network.parameters()).device
    wrapper = TracedForward(network.eval()).eval()
    inputs = example_inputs(batch_size, spatial_size, network.cond_channels, device=device)
    with _device_independent_tracing(), warnings.catch_warnings():
        # the tracer warns about Python booleans taken from shapes (group-norm size checks, the head's batch-1
        # broadcast); they only skip checks or pick the same branch for any batch, and max_abs_difference checks it
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return convert_to_torchscript(
            wrapper,
            inputs=list(inputs),
            use_trace=True,
            verify=True,
            device=device,
            rtol=1e-4,
            atol=1e-5,
            check_trace=False,
        )


def max_abs_difference(
    traced: nn.Module, network: nn.Module, spatial_size: Sequence[int], batch_sizes: Sequence[int] = (1, 3)
) -> float:
    """Largest absolute difference between the traced and the eager network over random inputs of each batch size."""
    device = next(network.parameters()).device
    network.eval()
    worst = 0.0
    with torch.no_grad():
        for i, b in enumerate(batch_sizes):
            inputs = example_inputs(b, spatial_size, network.cond_channels, seed=100 + i, device=device)
            worst = max(worst, (traced(*inputs) - network(*inputs)).abs().max().item())
    return worst


def device_constants(traced: torch.jit.ScriptModule) -> list[str]:
    """Devices written as constants into the traced graph; empty when it runs on whatever device it is loaded to."""
    return sorted(
        {
            line.split('value="')[1].split('"')[0]
            for line in str(traced.inlined_graph).splitlines()
            if "Device = prim::Constant" in line and 'value="' in line
        }
    )


def read_export_info(ts_path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``export.json`` of a TorchScript file, read from its zip archive without loading the module."""
    with zipfile.ZipFile(ts_path) as archive:
        for name in archive.namelist():
            if name.endswith(f"extra/{EXPORT_INFO}"):
                return json.loads(archive.read(name))
    return None


def matches_checkpoint(ts_path: str | os.PathLike, ckpt_path: str | os.PathLike) -> bool:
    """Whether ``ts_path`` was exported from exactly the weights in ``ckpt_path``."""
    info = read_export_info(ts_path)
    return info is not None and info.get("ckpt_sha256") == file_sha256(ckpt_path)


def _parser(config_file: str | Sequence[str], meta_file: str | None, overrides: dict[str, Any]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_file)
    if meta_file is not None:
        parser.read_meta(meta_file)
    parser.update(overrides)
    return parser


def export(
    ckpt: str | os.PathLike = REPO_ROOT / "bundle" / "models" / "model.pt",
    out: str | os.PathLike = REPO_ROOT / "bundle" / "models" / "model.ts",
    config_file: str | Sequence[str] = str(REPO_ROOT / "bundle" / "configs" / "inference.json"),  # noqa: B008
    meta_file: str | None = str(REPO_ROOT / "bundle" / "configs" / "metadata.json"),  # noqa: B008
    batch_size: int = 2,
    check_batch_sizes: Sequence[int] = (1, 3),
    tolerance: float = 1e-4,
    **overrides: Any,
) -> dict[str, Any]:
    """Trace the network of ``config_file`` with the weights of ``ckpt`` into ``out``; returns ``export.json``.

    Args:
        ckpt: weights (a state dict or a checkpoint holding one, see :func:`scripts.runtime.weights.load_weights`).
        out: the TorchScript file to write.
        config_file: config(s) holding ``network_def`` and ``spatial_size`` (embedded as ``inference.json``).
        meta_file: bundle metadata embedded as ``metadata.json`` (None: none).
        batch_size: batch size of the example inputs traced.
        check_batch_sizes: batch sizes at which the trace is compared with the eager network.
        tolerance: largest absolute difference accepted.
        overrides: config overrides, ``monai.bundle`` syntax (``network_channels``, ``spatial_size``).

    Raises:
        ValueError: the trace differs from the eager network by more than ``tolerance``.
    """
    parser = _parser(config_file, meta_file, overrides)
    network = parser.get_parsed_content("network_def", instantiate=True)
    load_weights(network, ckpt, "cpu")
    network.eval()
    spatial_size = [int(s) for s in parser.get_parsed_content("spatial_size")]
    multiple = spatial_multiple(network)
    if any(s % multiple for s in spatial_size):
        raise ValueError(f"spatial_size {spatial_size} is not divisible by {multiple} (patch size x 2^levels)")

    traced = trace_network(network, spatial_size, batch_size)
    difference = max_abs_difference(traced, network, spatial_size, check_batch_sizes)
    if not difference <= tolerance:
        raise ValueError(f"traced network differs from the eager one by {difference:.3g} > {tolerance:g}")
    devices = device_constants(traced)
    if devices:  # a change in the network created a tensor inside forward: the file would run on these only
        logger.warning("the traced graph holds device constants %s: model.ts is tied to them", devices)

    info = {
        "ckpt": Path(ckpt).name,
        "ckpt_sha256": file_sha256(ckpt),
        "forward": list(FORWARD_ARGS),
        "traced_batch_size": batch_size,
        "traced_spatial_size": spatial_size,
        "spatial_multiple": multiple,
        "cond_channels": int(network.cond_channels),
        "checked_batch_sizes": [int(b) for b in check_batch_sizes],
        "max_abs_difference_vs_eager": difference,
        "device_constants": devices,
        "torch_version": torch.__version__,
    }
    config = {k: v for k, v in parser.get().items() if k != "_meta_"}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # written under its final name in a scratch folder, then moved: a failed export leaves no half-written file, and
    # the folder inside the archive keeps the file's stem, where MONAI Deploy looks for <stem>/extra/<config>.json
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_net_with_metadata(
            traced,
            str(scratch / out.name),
            include_config_vals=True,
            meta_values=parser.get().get("_meta_", {}),
            more_extra_files={"inference.json": json.dumps(config).encode(), EXPORT_INFO: json.dumps(info).encode()},
        )
        os.replace(scratch / out.name, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info(
        "exported %s (weights %s) to %s: max |traced - eager| = %.3g", type(network).__name__, ckpt, out, difference
    )
    return info


def load_torchscript(
    path: str | os.PathLike, device: str | torch.device = "cpu", spatial_size: Sequence[int] | None = None
) -> torch.jit.ScriptModule:
    """Load an exported ``model.ts`` for the forecast (``inference_ts.json``), checking it fits the config.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an export of this bundle's network, or ``spatial_size`` breaks its size constraint.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"TorchScript model {path} not found (export it with python -m scripts.export)")
    try:
        info = read_export_info(path) or {}
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not a TorchScript file: {err}") from err
    if info.get("forward") != list(FORWARD_ARGS):
        raise ValueError(f"{path} is not an export of scripts.export (no {EXPORT_INFO} with forward {FORWARD_ARGS})")
    if info["cond_channels"] != len(CONDITION_CHANNELS):
        raise ValueError(
            f"{path} takes {info['cond_channels']} conditioning channels, the bundle makes {len(CONDITION_CHANNELS)}"
        )
    if spatial_size is not None and any(int(s) % info["spatial_multiple"] for s in spatial_size):
        raise ValueError(
            f"spatial_size {list(spatial_size)} is not divisible by {info['spatial_multiple']}, which {path} requires"
        )
    module, meta, _ = load_net_with_metadata(str(path), map_location=torch.device(device))
    logger.info(
        "loaded %s (bundle %s, weights %s, exported with torch %s)",
        path,
        meta.get("version"),
        info.get("ckpt_sha256", "")[:12],
        info.get("torch_version"),
    )
    return module.eval()


def main(
    ckpt: str = "bundle/models/model.pt",
    out: str = "bundle/models/model.ts",
    config_file: str = "bundle/configs/inference.json",
    meta_file: str = "bundle/configs/metadata.json",
    **overrides: Any,
) -> None:
    """``python -m scripts.export --ckpt bundle/models/model.pt --out bundle/models/model.ts``: print export.json."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(json.dumps(export(ckpt, out, config_file, meta_file, **overrides), indent=2))
