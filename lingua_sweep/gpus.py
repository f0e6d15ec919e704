"""What the team knows about each GPU type: one table, read by the trainer's MFU, the memory
preflight and the sweep's placement.

Names are matched as substrings of `torch.cuda.get_device_name()` or of a cluster's nominal
`gpu_type`, so "NVIDIA H100 80GB HBM3" finds H100.

`model_flops_per_s` is what the trainer achieves per GPU: the default preset's measured tokens/s
(the seed's table: 8xH100 ~1.5M tok/s, 8xA100 ~1.0M, 8xH200 ~1.8M) times its training FLOPs per
token (7.46e8, `model.flops_per_token`), so a job's run time there is its FLOPs over this.
Placement uses it only until a sweep has seen its own jobs run on a cluster.
"""

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    peak_bf16_flops: float  # dense, per GPU
    # per GPU, as sold (GB = 1e9 bytes); A100s come with 40 or 80 GB: the smaller, until a
    # cluster's config says `gpu_memory_gb: 80`
    memory_gb: float
    model_flops_per_s: float  # achieved per GPU by the trainer (the default preset's)


# H200 before H100: the first key found in a device name wins.
GPUS: dict[str, GpuSpec] = {
    "H200": GpuSpec(peak_bf16_flops=989e12, memory_gb=141, model_flops_per_s=168e12),
    "H100": GpuSpec(peak_bf16_flops=989e12, memory_gb=80, model_flops_per_s=140e12),
    "A100": GpuSpec(peak_bf16_flops=312e12, memory_gb=40, model_flops_per_s=93e12),
}


def gpu_spec(name: str | None) -> GpuSpec | None:
    """The spec of a device or nominal GPU name; None for a CPU or an unknown GPU."""
    if not name:
        return None
    for key, spec in GPUS.items():
        if key.lower() in name.lower():
            return spec
    return None
