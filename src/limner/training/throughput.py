"""Time per step and model FLOP utilisation (MFU), as nanoGPT prints them, so a run's speed is visible
while it trains.

The FLOPs of one training step (the task's forward and backward passes) are counted once, on the first
step a run takes, with the formulas of torch's FlopCounterMode (`FlopCount`): they count the matrix
products, convolutions and attention that do the model's work, not element-wise ops or the optimizer.
MFU is those FLOPs over the measured time of a step, divided by the device's peak
(`TrainConfig.peak_tflops`, else `default_peak_tflops`). With several processes each one reports its own
share against one device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# dense peak TFLOP/s per GPU from the vendors' data sheets: (fp32, bf16/fp16 tensor cores). fp32 is the
# plain fp32 peak: torch does not use TF32 for matmuls unless told to (torch.backends.cuda.matmul.allow_tf32)
GPU_PEAK_TFLOPS = {
    "H200": (67.0, 989.4),
    "H100 PCIe": (51.2, 756.0),
    "H100": (67.0, 989.4),  # SXM
    "A100": (19.5, 312.0),
    "L40S": (91.6, 362.1),
    "L4": (30.3, 121.0),
    "A10": (31.2, 125.0),
    "V100": (15.7, 125.0),
    "T4": (8.1, 65.0),
}
# a CPU's peak: cores x clock x FLOPs per cycle and core (two FMA units, each a multiply and an add per lane:
# 64 fp32 FLOPs with AVX-512, 32 with AVX2, 16 otherwise); the clock is /proc/cpuinfo's, else 2.5 GHz
CPU_FLOPS_PER_CYCLE = (("avx512f", 64), ("avx2", 32))
CPU_DEFAULT_GHZ = 2.5


def _cpu_info() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read(1 << 16)
    except OSError:
        return ""


def cpu_peak_tflops(threads: int | None = None) -> float:
    """An estimate of this CPU's fp32 peak over the threads torch uses (see CPU_FLOPS_PER_CYCLE)."""
    info = _cpu_info()
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "").split()
    per_cycle = next((n for flag, n in CPU_FLOPS_PER_CYCLE if flag in flags), 16)
    mhz = next((line.split(":")[1] for line in info.splitlines() if line.startswith("cpu MHz")), None)
    ghz = float(mhz) / 1000 if mhz else CPU_DEFAULT_GHZ
    return (threads or torch.get_num_threads()) * ghz * per_cycle / 1000


def default_peak_tflops(device: torch.device, mixed_precision: str = "no") -> float | None:
    """The device's peak for the precision the matmuls run in: a GPU's from GPU_PEAK_TFLOPS (None when the
    card is not listed: then give peak_tflops), a CPU's estimated (cpu_peak_tflops)."""
    if device.type == "cpu":
        return cpu_peak_tflops()
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    half = mixed_precision in ("fp16", "bf16")
    for key, (fp32, tensor) in GPU_PEAK_TFLOPS.items():  # the more specific names come first
        if key in name:
            return tensor if half else fp32
    return None


def _register_cpu_attention() -> None:
    """torch counts the CUDA attention kernels but not the CPU's fused one, which diffusers' attention runs
    on a CPU: count it with torch's own attention formulas."""
    from torch.utils import flop_counter as fc

    pairs = (
        ("_scaled_dot_product_flash_attention_for_cpu", "sdpa_flop"),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", "sdpa_backward_flop"),
    )
    for op_name, formula in pairs:
        op, count = getattr(torch.ops.aten, op_name, None), getattr(fc, formula, None)
        if op is not None and count is not None and op not in fc.flop_registry:
            fc.register_flop_formula(op, get_raw=True)(count)  # `count` already reads shapes off the tensors


class FlopCount(TorchDispatchMode):
    """Counts the FLOPs of the ops run under it with torch.utils.flop_counter's formulas (FlopCounterMode's)
    and runs every op exactly as it would run without it. FlopCounterMode itself decomposes the ops it has
    no formula for and hooks every module for its per-module table; that changed a UNet's gradients in
    their last bits, and a run that counts must train exactly as one that does not."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(getattr(func, "_overloadpacket", None))
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


class Throughput:
    """Counts the FLOPs of the first step it is given (`counting()` around each of its micro-steps), then
    keeps nanoGPT's running average of the time per step (0.9 old, 0.1 new), leaving out that first,
    counted step: counting slows it down."""

    def __init__(self, peak_tflops: float | None):
        self.peak_tflops = peak_tflops
        self.flops_per_step: float | None = None  # None until the first step is done, or when nothing was counted
        self.step_seconds: float | None = None  # the running average
        self._first_done = False
        self._counted = 0

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        if self._first_done:
            yield
            return
        _register_cpu_attention()
        with FlopCount() as counter:
            yield
        self._counted += counter.flops

    def step_done(self, seconds: float) -> None:
        """Records a finished step's time; the first step's FLOPs become the per-step count."""
        if not self._first_done:
            self._first_done, self.flops_per_step = True, self._counted or None
            return  # the counted step is slow: not timed
        self.step_seconds = seconds if self.step_seconds is None else 0.9 * self.step_seconds + 0.1 * seconds

    def tflops(self, seconds: float | None = None) -> float | None:
        """Achieved TFLOP/s at `seconds` per step (default: the running average)."""
        seconds = seconds or self.step_seconds
        return self.flops_per_step / seconds / 1e12 if self.flops_per_step and seconds else None

    def mfu(self, seconds: float | None = None) -> float | None:
        achieved = self.tflops(seconds)
        return achieved / self.peak_tflops if achieved is not None and self.peak_tflops else None

    def scalars(self) -> dict[str, float]:
        """What is known of seconds per step, TFLOP/s and MFU, for the trackers."""
        values = {"step_seconds": self.step_seconds, "tflops": self.tflops(), "mfu": self.mfu()}
        return {k: v for k, v in values.items() if v is not None}

    def postfix(self) -> dict[str, str]:
        """The progress bar's fields: seconds per step and MFU (achieved TFLOP/s where no peak is known)."""
        out = {}
        if self.step_seconds is not None:
            out["s/step"] = f"{self.step_seconds:.3f}"
        if (mfu := self.mfu()) is not None:
            out["mfu"] = f"{100 * mfu:.3g}%"
        elif (tflops := self.tflops()) is not None:
            out["tflops"] = f"{tflops:.3g}"
        return out
