"""What a benchmark figure needs beside its timing: the machine it ran on (device, versions,
date, the settings that change the numbers), the process's peak resident memory, and the
summary statistics of repeated trials. Used by `marlin_mlx.bench` and `marlin_mlx.memory`."""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import shutil
import statistics
import subprocess
import sys
from typing import Optional

import mlx.core as mx

GB = 1e9


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def _gpu_names() -> Optional[list]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        return [line.strip() for line in out.stdout.splitlines() if line.strip()] or None
    except Exception:
        return None


def machine_info() -> dict:
    """What a figure needs to be reproducible: device, versions, date."""
    try:
        dev = mx.device_info()
    except Exception:
        dev = {}
    return {
        "device": "gpu" if mx.default_device() == mx.gpu else "cpu",
        "device_name": dev.get("device_name") or dev.get("architecture"),
        "device_memory_gb": round(dev["memory_size"] / GB, 1) if dev.get("memory_size") else None,
        "nvidia_smi": _gpu_names(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": _version("mlx-lm"),
        "marlin_mlx": _version("marlin-mlx"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # settings that change the numbers (MLX's graph batching, our kernel paths)
        "environment": {k: v for k, v in os.environ.items()
                        if k.startswith(("MLX_", "MARLIN_MLX_"))},
    }


class PeakRSS:
    """Peak resident memory of this process, resettable where the OS allows (Linux)."""

    @staticmethod
    def reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5 = reset the peak RSS (VmHWM) to the current RSS
            return True
        except OSError:
            return False

    @staticmethod
    def current() -> Optional[int]:
        return PeakRSS._status("VmRSS")

    @staticmethod
    def peak() -> Optional[int]:
        value = PeakRSS._status("VmHWM")
        if value is not None:
            return value
        try:
            import resource

            r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux
        except Exception:
            return None

    @staticmethod
    def _status(key: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None


def summarize(values: list) -> dict:
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": list(values),
    }


def free_memory() -> None:
    gc.collect()
    mx.clear_cache()
