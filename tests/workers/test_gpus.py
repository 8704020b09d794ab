"""The NVML GPU inventory: parsing against a fake NVML module, and the real library on this CPU-only host."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from workers import gpus

REPO = Path(__file__).resolve().parents[2]
GIB = 1024**3


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """The handful of pynvml calls the inventory makes, over a list of fake devices."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, devices, *, init_error=None, cuda=12040, driver="550.54.15"):
        self.devices = devices
        self.init_error = init_error
        self.cuda = cuda
        self.driver = driver
        self.init_calls = 0

    def nvmlInit(self):
        self.init_calls += 1
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.devices[index]

    def nvmlDeviceGetUUID(self, handle):
        return handle["uuid"]

    def nvmlDeviceGetName(self, handle):
        if handle.get("lost"):
            raise FakeNVMLError("GPU is lost")
        return handle["name"]

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(
            total=handle["total"], used=handle["used"], free=handle["total"] - handle["used"]
        )

    def nvmlDeviceGetUtilizationRates(self, handle):
        if handle.get("util") is None:
            raise FakeNVMLError("Not Supported")
        return SimpleNamespace(gpu=handle["util"], memory=0)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        if handle.get("temp") is None:
            raise FakeNVMLError("Not Supported")
        return handle["temp"]

    def nvmlSystemGetCudaDriverVersion(self):
        return self.cuda

    def nvmlSystemGetDriverVersion(self):
        return self.driver


def device(i, **extra):
    return {"uuid": f"GPU-{i}a2b3c4d-0000-1111-2222-33334444555{i}", "name": f"NVIDIA H100 80GB HBM3 #{i}",
            "total": 80 * GIB, "used": i * GIB, "util": 10 * i, "temp": 40 + i, **extra}


def inventory(devices, visible=None, **kwargs):
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    return gpus.GpuInventory(nvml=FakeNvml(devices, **kwargs), environ=environ)


def test_reads_every_gpu_with_memory_in_bytes_utilisation_and_temperature():
    result = inventory([device(0), device(1)]).gpus()

    assert result == [
        {
            "index": 0,
            "name": "NVIDIA H100 80GB HBM3 #0",
            "uuid": device(0)["uuid"],
            "memory_total_bytes": 80 * GIB,
            "memory_used_bytes": 0,
            "utilization_pct": 0,
            "temperature_c": 40,
        },
        {
            "index": 1,
            "name": "NVIDIA H100 80GB HBM3 #1",
            "uuid": device(1)["uuid"],
            "memory_total_bytes": 80 * GIB,
            "memory_used_bytes": GIB,
            "utilization_pct": 10,
            "temperature_c": 41,
        },
    ]
    json.dumps(result)  # goes into a JSON column as it is


def test_nvml_is_initialised_once_per_process():
    inv = inventory([device(0)])
    inv.gpus()
    inv.gpus()
    inv.driver_versions()

    assert inv._nvml.init_calls == 1


def test_old_pynvml_bytes_names_are_decoded():
    result = inventory([device(0, name=b"Tesla T4", uuid=b"GPU-abc")]).gpus()

    assert result[0]["name"] == "Tesla T4" and result[0]["uuid"] == "GPU-abc"


def test_unsupported_readings_become_none_instead_of_hiding_the_gpu():
    (gpu,) = inventory([device(0, util=None, temp=None)]).gpus()

    assert (
        gpu["utilization_pct"] is None
        and gpu["temperature_c"] is None
        and gpu["memory_total_bytes"] == 80 * GIB
    )


def test_a_lost_gpu_is_skipped_and_the_others_still_reported():
    result = inventory([device(0, lost=True), device(1)]).gpus()

    assert [g["index"] for g in result] == [1]


@pytest.mark.parametrize(("visible", "indices"), [
    ("1", [1]),
    ("2,0", [2, 0]),
    (" 1 , 2 ", [1, 2]),
    ("GPU-2a2b3c4d", [2]),  # a UUID prefix, as CUDA accepts
    ("2a2b3c4d", [2]),  # CUDA also takes the UUID without its GPU- prefix
    ("0,7,1", [0]),  # reading stops at the first entry that names no device, like CUDA's
    ("-1", []),
    ("", []),
    ("1,1", [1]),
    ("GPU-", []),  # a prefix that matches several devices selects none
    ("MIG-5c8a3b19-0000-1111-2222-333344445555", []),
])
def test_cuda_visible_devices_selects_and_orders_gpus(visible, indices):
    result = inventory([device(0), device(1), device(2)], visible=visible).gpus()

    assert [g["index"] for g in result] == indices


@pytest.mark.parametrize(
    "error", [FakeNVMLError("NVML Shared Library Not Found"), OSError("libnvidia-ml.so.1")]
)
def test_a_host_without_a_driver_reports_no_gpus_and_no_versions(error):
    inv = inventory([device(0)], init_error=error)

    assert inv.gpus() == []
    assert inv.driver_versions() == {}


def test_driver_and_cuda_versions_come_from_nvml():
    assert inventory([device(0)], cuda=12040).driver_versions() == {
        "nvidia_driver": "550.54.15",
        "cuda": "12.4",
    }
    assert gpus.cuda_version_text(11080) == "11.8"


def test_torch_cuda_build_is_read_from_torch_metadata(tmp_path, monkeypatch):
    package = tmp_path / "torch"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('torch must not be imported')\n")
    (package / "version.py").write_text("from typing import Optional\n__version__ = '2.4.0+cu121'\n"
                                        "cuda: Optional[str] = '12.1'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch", raising=False)

    assert gpus.torch_cuda_build() == "12.1"


def test_this_cpu_only_host_reports_no_gpus_without_importing_torch():
    """The real pynvml on this machine (no NVIDIA driver), in a fresh interpreter like a worker's parent."""
    code = (
        "import json, sys\n"
        "from workers import gpus\n"
        "print(json.dumps({'gpus': gpus.read_gpus(), 'versions': gpus.cuda_versions(),\n"
        "                  'torch': 'torch' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=True)

    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"gpus": [], "versions": {"cuda": "none"}, "torch": False}  # this venv has the CPU torch


def test_software_versions_record_torch_transformers_and_cuda():
    from workers.fleet import software_versions

    versions = software_versions()

    assert {"python", "torch", "transformers", "cuda"} <= versions.keys()
    assert versions["cuda"] == "none"
