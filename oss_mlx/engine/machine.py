"""What this machine is and what it allows: the chip, the backend MLX runs on, and the bytes a
model may use without the machine swapping (the memory plan compares with it).

What the machine allows (`machine_limit`): on macOS the GPU's working set, Metal's
recommendedMaxWorkingSetSize (mx.device_info), or the iogpu wired limit when the user has set
`sysctl iogpu.wired_limit_mb`; elsewhere the available RAM (MemAvailable). OSS_MLX_MEMORY_LIMIT
(bytes, or "12GB") overrides both, for tests and for users who want a margin.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from oss_mlx.defaults import parse_size

LIMIT_ENV = "OSS_MLX_MEMORY_LIMIT"


@dataclass
class Limit:
    bytes: int
    source: str  # what the figure is ("GPU working set", "iogpu wired limit", "available RAM")
    macos: bool
    total_ram: int
    recommended: int | None = None  # Metal's recommendedMaxWorkingSetSize
    wired_limit_mb: int | None = None  # sysctl iogpu.wired_limit_mb (0: the default)


def backend() -> str:
    """"cpu" or "gpu": where MLX computes by default."""
    import mlx.core as mx

    return "cpu" if mx.default_device().type == mx.DeviceType.cpu else "gpu"


def backend_name() -> str:
    """"Metal", "CUDA" or "CPU"."""
    import mlx.core as mx

    if mx.default_device() == mx.gpu and mx.metal.is_available():
        return "Metal"
    if mx.default_device() == mx.gpu and mx.cuda.is_available():
        return "CUDA"
    return "CPU"


def chip() -> str:
    """The processor's name: "Apple M4 Max", or /proc/cpuinfo's model name elsewhere."""
    if sys.platform == "darwin":
        brand = sysctl("machdep.cpu.brand_string")
        if brand:
            return brand
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sysctl(name: str) -> str | None:
    try:
        r = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def meminfo() -> dict[str, int]:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, v in
            (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def machine_limit() -> Limit:
    """The bytes a model may use here without the machine swapping (see the module docstring)."""
    macos = sys.platform == "darwin"
    info = {}
    if macos:
        import mlx.core as mx

        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    mem = meminfo()
    total = int(info.get("memory_size") or mem.get("MemTotal") or os.sysconf("SC_PAGE_SIZE")
                * os.sysconf("SC_PHYS_PAGES"))
    env = os.environ.get(LIMIT_ENV)
    if env:
        return Limit(parse_size(env, LIMIT_ENV), f"{LIMIT_ENV}", macos, total)
    if macos:
        rec = int(info.get("max_recommended_working_set_size") or 0) or None
        wired = sysctl("iogpu.wired_limit_mb")
        wired = int(wired) if wired and wired.isdigit() else None
        if wired:
            return Limit(wired << 20, "iogpu wired limit", True, total, rec, wired)
        return Limit(rec or int(total * 2 / 3), "GPU working set", True, total, rec, wired)
    return Limit(mem.get("MemAvailable", total), "available RAM", False, total)
