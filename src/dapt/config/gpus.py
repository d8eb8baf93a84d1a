"""Every GPU fact dapt uses, in one table: the names plan.gpu and cluster.gpu take, how torch spells each device,
its memory, its dense bf16 tensor-core peak, SkyPilot's name for it, the NCCL settings it needs, and the cloud
instances that carry it. Everything else (the planner, the profiler's MFU, submit, doctor, the config's choices)
reads from here."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Gpu:
    name: str  # dapt's name: plan.gpu, cluster.gpu
    device: str  # a part of torch.cuda.get_device_name(), lower case
    memory_gb: float
    peak_tflops: (
        float  # dense (not sparse) bf16 tensor-core TFLOPS with fp32 accumulation, from NVIDIA's data sheets
    )
    skypilot: str  # SkyPilot's catalog name (`sky show-gpus`)
    nccl: dict = field(default_factory=dict)  # environment NCCL needs on this card


# RTX 3090/4090 have no (4090) or unreliable (3090) peer-to-peer over PCIe: NCCL hangs or corrupts without P2P off.
# The RTX PRO 6000 Blackwell figure is the published FP4 sparse figure halved per step (sparse -> dense -> FP8 ->
# BF16): set profile.peak_tflops when you know better.
TABLE = [
    Gpu("RTX-3090", "rtx 3090", 24, 71.0, "RTX3090", {"NCCL_P2P_DISABLE": "1"}),
    Gpu("RTX-4090", "rtx 4090", 24, 165.2, "RTX4090", {"NCCL_P2P_DISABLE": "1"}),
    Gpu("A100-40GB", "a100", 40, 312.0, "A100"),
    Gpu("A100-80GB", "a100", 80, 312.0, "A100-80GB"),
    Gpu("H100-80GB", "h100", 80, 989.0, "H100"),
    Gpu("H200", "h200", 141, 989.0, "H200"),
    Gpu("L40S", "l40s", 48, 362.0, "L40S"),
    Gpu("RTX-PRO-6000", "rtx pro 6000", 96, 500.0, "RTXPRO6000"),
]
BY_NAME = {g.name: g for g in TABLE}
NAMES = tuple(BY_NAME)

# Devices torch may report that are no plan.gpu choice, matched before the table's rows (the more specific first)
OTHER_DEVICES = [("h100 pcie", 756.0)]

# Instance types whose GPUs are public facts: (GPU, GPUs per instance).
INSTANCES = {
    "g7e.2xlarge": ("RTX-PRO-6000", 1),
    "g7e.48xlarge": ("RTX-PRO-6000", 8),
    "p4d.24xlarge": ("A100-40GB", 8),
    "p4de.24xlarge": ("A100-80GB", 8),
    "p5.48xlarge": ("H100-80GB", 8),
    "p5en.48xlarge": ("H200", 8),
    "g6e.xlarge": ("L40S", 1),
    "g6e.48xlarge": ("L40S", 8),
}


def peak_for_device(device_name: str) -> tuple[float, str] | None:
    """(dense bf16 peak TFLOPS, the row matched) for a torch device name; None for a GPU dapt has no figure for."""
    lower = device_name.lower()
    for device, peak in OTHER_DEVICES:
        if device in lower:
            return peak, device
    # longer device names first: "rtx pro 6000" before anything shorter it contains
    for gpu in sorted(TABLE, key=lambda g: -len(g.device)):
        if gpu.device in lower:
            return gpu.peak_tflops, gpu.name
    return None
