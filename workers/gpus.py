"""GPU inventory through NVML (the ``pynvml`` module of the ``nvidia-ml-py`` package).

Runs in the worker's main process, which must never initialise CUDA: NVML talks to the driver directly and
this module never imports torch. A host without the NVIDIA driver (or without ``pynvml``) reports no GPUs.

``CUDA_VISIBLE_DEVICES`` is honoured the way CUDA reads it: a comma-separated list of device indices or
(prefixes of) ``GPU-…`` UUIDs, read up to the first entry that names no device; an empty value hides every
GPU. Indices are NVML's (PCI bus order), which is CUDA's order when ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; pin
workers by UUID where the two orders may differ. MIG instances (``MIG-…``) are not listed.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, TypedDict

logger = logging.getLogger(__name__)


class GpuInfo(TypedDict):
    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_pct: int | None
    temperature_c: int | None


class GpuInventory:
    """Reads GPUs through one NVML session, opened on first use and kept for the life of the process."""

    def __init__(
        self, nvml: ModuleType | Any | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        self._nvml = nvml
        self._environ = os.environ if environ is None else environ
        self._initialised = False
        self._lock = threading.Lock()

    def _session(self) -> Any | None:
        """The initialised NVML module, or None on a host without a usable driver."""
        with self._lock:
            if self._initialised:
                return self._nvml
            if self._nvml is None:
                try:
                    import pynvml
                except ImportError:
                    return None
                self._nvml = pynvml
            try:
                self._nvml.nvmlInit()
            except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, …: a CPU-only host
                logger.debug("NVML unavailable: %s", exc)
                return None
            self._initialised = True
            return self._nvml

    def close(self) -> None:
        with self._lock:
            if self._initialised:
                self._initialised = False
                try:
                    self._nvml.nvmlShutdown()
                except Exception:
                    logger.debug("nvmlShutdown failed", exc_info=True)

    def gpus(self) -> list[GpuInfo]:
        """The GPUs this process may use, in CUDA_VISIBLE_DEVICES order; [] where NVML is unavailable."""
        nvml = self._session()
        if nvml is None:
            return []
        try:
            count = int(nvml.nvmlDeviceGetCount())
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
        except Exception:
            logger.warning("could not list GPUs through NVML", exc_info=True)
            return []
        gpus = []
        for index in visible_indices(self._environ.get("CUDA_VISIBLE_DEVICES"), uuids):
            try:
                gpus.append(_read_device(nvml, index, handles[index], uuids[index]))
            except Exception:  # a GPU that fell off the bus must not hide the others
                logger.warning("could not read GPU %s through NVML", index, exc_info=True)
        return gpus

    def driver_versions(self) -> dict[str, str]:
        """``{"nvidia_driver": "550.54.15", "cuda": "12.4"}`` from the driver; {} where NVML is
        unavailable."""
        nvml = self._session()
        if nvml is None:
            return {}
        versions = {}
        try:
            versions["nvidia_driver"] = _text(nvml.nvmlSystemGetDriverVersion())
        except Exception:
            logger.debug("no driver version from NVML", exc_info=True)
        try:
            versions["cuda"] = cuda_version_text(int(nvml.nvmlSystemGetCudaDriverVersion()))
        except Exception:
            logger.debug("no CUDA version from NVML", exc_info=True)
        return versions


def visible_indices(cuda_visible_devices: str | None, uuids: list[str]) -> list[int]:
    """NVML indices of the devices CUDA_VISIBLE_DEVICES selects, in its order (all when it is unset)."""
    if cuda_visible_devices is None:
        return list(range(len(uuids)))
    chosen: list[int] = []
    for entry in (part.strip() for part in cuda_visible_devices.split(",")):
        index = _resolve_entry(entry, uuids)
        if index is None:
            break  # CUDA ignores everything from the first invalid entry on
        if index not in chosen:
            chosen.append(index)
    return chosen


def _resolve_entry(entry: str, uuids: list[str]) -> int | None:
    if entry.isdigit():
        index = int(entry)
        return index if index < len(uuids) else None
    if not entry:
        return None
    prefix = entry if entry.startswith("GPU-") else f"GPU-{entry}"
    matches = [i for i, uuid in enumerate(uuids) if uuid.startswith(prefix)]
    return matches[0] if len(matches) == 1 else None


def _read_device(nvml: Any, index: int, handle: Any, uuid: str) -> GpuInfo:
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    return GpuInfo(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        uuid=uuid,
        memory_total_bytes=int(memory.total),
        memory_used_bytes=int(memory.used),
        utilization_pct=_optional(lambda: int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
        temperature_c=_optional(
            lambda: int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        ),
    )


def _optional(read) -> int | None:
    """A reading some GPUs do not support (MIG mode, some boards) becomes None instead of an error."""
    try:
        return read()
    except Exception:
        return None


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def cuda_version_text(version: int) -> str:
    """NVML's and CUDA's integer version as text: 12040 → "12.4"."""
    return f"{version // 1000}.{version % 1000 // 10}"


def torch_cuda_build() -> str | None:
    """The CUDA version torch was built for, read from ``torch/version.py`` without importing torch."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "cuda" and isinstance(node.value, ast.Constant):
            return node.value.value if isinstance(node.value.value, str) else None
    return None


_default = GpuInventory()


def read_gpus() -> list[GpuInfo]:
    """The GPUs visible to this process (see the module docstring); [] on a CPU-only host."""
    return _default.gpus()


def cuda_versions() -> dict[str, str]:
    """The driver's CUDA version (and driver version) where NVML has them, else the CUDA torch was built
    for."""
    versions = _default.driver_versions()
    if "cuda" not in versions:
        versions["cuda"] = torch_cuda_build() or "none"
    return versions
