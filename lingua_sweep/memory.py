"""Peak training memory of a config, per process, from the config alone.

Two callers: the trainer checks its device before it loads data or builds the model (the default
preset on a CPU machine was OOM-killed after a minute, without a word), and the sweep launcher
checks every job against every cluster's GPUs before submitting: arithmetic, cheap for 10,000 jobs.

The terms follow what the trainer does (model.py, optim.py, distributed.py): coefficients read off
the tensors autograd saves, totals checked against peak RSS on CPU (bench/memory.py, figures in
bench/NOTES.md). The peak is the biggest of three moments:

- the loss's backward, for any big vocab: every layer's saved activations plus [tokens, vocab]
  logits. `F.cross_entropy` of the fp32 upcast saves an fp32 log-softmax; its backward holds
  that, nll_loss's fp32 gradient and its own: 12 bytes per logit (the forward peaks at 10).
  Gradients are not there yet, except an earlier micro-step's under accumulation;
- under FSDP (more than one process) the end of the backward: the root's (embedding and head)
  unsharded gradients and their fp32 reduce-scatter buffer;
- the optimizer step: weights, gradients, optimizer state and foreach's temporaries.
"""

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lingua_sweep import gpus
from lingua_sweep.config import ClusterConfig, ModelConfig, TrainConfig
from lingua_sweep.errors import UserError
from lingua_sweep.model import ffn_hidden_dim
from lingua_sweep.preflight import KNOWN_VOCAB_SIZES

GB = 1e9  # as gpus.py and the cluster configs count
HEADROOM = 0.9  # the estimate must fit in this share of what is available

# What each layer saves for backward, per token: (size, count, bytes per element), by compute
# precision and per-block compile. Autocast casts the fp32 residual stream again for each matmul
# (wq, wk, wv: three bf16 copies); compiled blocks cast once and recompute elementwise ops (norm,
# rope, silu) in the backward instead of saving their outputs. Norms compute in fp32 inside.
SAVED = {
    ("fp32", False): (("dim", 9, 4), ("kv", 2, 4), ("hidden", 4, 4)),
    ("fp32", True): (("dim", 7, 4), ("kv", 2, 4), ("hidden", 3, 4)),
    ("autocast", False): (("dim", 4, 4), ("dim", 8, 2), ("kv", 2, 2), ("hidden", 4, 2)),
    ("autocast", True): (("dim", 1, 4), ("dim", 6, 2), ("kv", 2, 2), ("hidden", 3, 2)),
    # More than one process: FSDP2 casts the weights instead of autocast casting activations.
    ("bf16", False): (("dim", 4, 4), ("dim", 5, 2), ("kv", 2, 2), ("hidden", 4, 2)),
    ("bf16", True): (("dim", 7, 2), ("kv", 2, 2), ("hidden", 3, 2)),
}
# The final norm's input and normalized output, and the output head's input.
HEAD_SAVED = {"fp32": (("dim", 3, 4),), "autocast": (("dim", 2, 4), ("dim", 1, 2))}
HEAD_SAVED["bf16"] = HEAD_SAVED["autocast"]
LOGIT_COPIES = 3  # fp32 [tokens, vocab] tensors at the loss's backward (module docstring)
BACKWARD_TRANSIENT_LAYERS = 0.25  # the last layer's backward's own gradients (measured)
# On CPU glibc serves tensors under its mmap ceiling (32 MiB) from the heap, whose freed chunks
# stay resident: measured, such activations cost about 1.45 times their size in RSS.
CPU_HEAP_MAX = 32 << 20
CPU_HEAP_FACTOR = 1.45
# The process: Python, torch, the trainer's modules, tokenizer and data loader (CPU, measured);
# the CUDA context, cuBLAS workspace and NCCL buffers (GPU, outside torch's counts; not measured).
OVERHEAD = {"cpu": int(0.45 * GB), "gpu": int(1.5 * GB)}


@dataclass(kw_only=True)
class MemoryEstimate:
    """Bytes per process; `total` is the biggest of the moments in the module docstring."""

    params: int  # fp32 master weights (this rank's shard under full_shard)
    grads: int
    optimizer: int  # its state
    optimizer_temp: int  # foreach's temporaries during the step
    optimizer_name: str
    weight_copies: int  # for compute: autocast's bf16 cache, FSDP's unsharded weights
    activations: int  # saved by every layer for backward
    logits: int
    reduce_buffers: int  # FSDP: the root's unsharded gradients, their reduce-scatter input
    overhead: int
    grads_in_backward: bool  # gradient accumulation: the last micro-step's gradients are there
    vocab_size: int
    micro_batch: int
    seq_len: int

    def moments(self) -> dict[str, dict[str, int]]:
        """The terms live at each candidate peak."""
        weights, opt, overhead = self.params + self.optimizer, self.optimizer_name, self.overhead
        grads = self.grads if self.grads_in_backward else 0
        moments = {
            "loss backward": {
                "logits": self.logits,
                "activations": self.activations + self.weight_copies,
                f"params+{'grads+' if grads else ''}{opt}": weights + grads,
                "overhead": overhead,
            },
            "optimizer step": {
                f"params+grads+{opt}": weights + self.grads + self.optimizer_temp,
                "overhead": overhead,
            },
        }
        if self.reduce_buffers:
            moments["gradient reduce"] = {
                f"params+grads+{opt}": weights + self.grads,
                "fsdp buffers": self.weight_copies + self.reduce_buffers,
                "overhead": overhead,
            }
        return moments

    def parts(self) -> dict[str, int]:
        """The terms of the peak, biggest first."""
        peak = max(self.moments().values(), key=lambda terms: sum(terms.values()))
        return dict(sorted(peak.items(), key=lambda kv: -kv[1]))

    @property
    def total(self) -> int:
        return sum(self.parts().values())

    def describe(self) -> str:
        """E.g. "~47.6 GB (logits 39.4, activations 4.5, params+adamw 2.2, overhead 1.5)"."""
        parts = ", ".join(f"{name} {value / GB:.1f}" for name, value in self.parts().items())
        return f"~{self.total / GB:.1f} GB ({parts})"


def _gb(n: float) -> str:
    return f"{n / GB:.{1 if n < 10 * GB else 0}f}"


def vocab_size(tc: TrainConfig) -> int | None:
    """The model's vocab size, or the tokenizer's when known without its file; else None."""
    return tc.model.vocab_size or KNOWN_VOCAB_SIZES.get(tc.data.tokenizer.name)


def micro_batch_size(tc: TrainConfig, gpu: str | None) -> int:
    # distributed.apply_a100_rule without its log line (this runs for every job of a sweep); an
    # odd batch is that function's error to raise, at run time.
    a100 = gpu is not None and "A100" in gpu and tc.distributed.a100_halve_batch
    return tc.data.batch_size // 2 if a100 and tc.data.batch_size % 2 == 0 else tc.data.batch_size


def _shapes(m: ModelConfig, vocab: int) -> tuple[int, int, int, int]:
    """kv dim, ffn hidden dim, matmul weights of one block, weights of FSDP's root module."""
    kv = (m.n_kv_heads or m.n_heads) * (m.dim // m.n_heads)
    hidden = ffn_hidden_dim(m)
    block_matmul = 2 * m.dim * m.dim + 2 * m.dim * kv + 3 * m.dim * hidden
    root = vocab * m.dim * (1 if m.tie_embeddings else 2) + m.dim  # embedding, head, final norm
    return kv, hidden, block_matmul, root


def param_count(m: ModelConfig, vocab: int) -> int:
    """Parameters of `model.build_model` (a tied head counted once), without building it."""
    _, _, block_matmul, root = _shapes(m, vocab)
    return root + m.n_layers * (block_matmul + 2 * m.dim)


def estimate(
    tc: TrainConfig, *, gpu: str | None = None, world_size: int = 1
) -> MemoryEstimate | None:
    """Peak bytes per process of training `tc` on `gpu` (a device or nominal name; None = CPU)
    with `world_size` processes. None when the vocab size is unknown (a tokenizer file): the
    logits, usually the biggest term, would be a guess."""
    m, vocab, on_gpu, opt = tc.model, vocab_size(tc), gpu is not None, tc.optim
    if vocab is None:
        return None
    kv, hidden, block_matmul, root = _shapes(m, vocab)
    n_params = param_count(m, vocab)
    no_decay = (vocab + 2 * m.n_layers + 1) * m.dim  # optim._param_groups
    if opt.optimizer == "sgd":
        state = 4 * n_params if opt.momentum > 0 else 0
        temp = 4 * (n_params - no_decay) if opt.weight_decay > 0 else 0  # decay, out of place
    else:  # adamw, and any user-registered one: assume two fp32 moments like adamw
        state = 8 * n_params
        fused = on_gpu if opt.fused is None else opt.fused
        # foreach's sqrt(exp_avg_sq), one param group at a time
        temp = 0 if fused else 4 * max(no_decay, n_params - no_decay)

    bf16 = tc.distributed.model_dtype == "bf16"
    precision = "fp32" if not bf16 else ("bf16" if world_size > 1 else "autocast")
    shards, reduce_buffers = 1, 0
    if world_size == 1:  # autocast's cache: every matmul weight, the head's too (even tied)
        weight_copies = 2 * (m.n_layers * block_matmul + vocab * m.dim) if bf16 else 0
    else:
        shards = world_size if tc.distributed.fsdp_type == "full_shard" else 1
        elem = 2 if bf16 else 4
        # The root stays unsharded from forward to backward, blocks about two at a time; with
        # nothing to gather or cast (fp32, no_shard), FSDP2 uses the weights as they are.
        gathered = root + min(2, m.n_layers) * block_matmul
        weight_copies = 0 if shards == 1 and not bf16 else elem * gathered
        reduce_buffers = (elem + 4) * root

    tokens = micro_batch_size(tc, gpu) * tc.data.seq_len
    sizes = {"dim": m.dim, "kv": kv, "hidden": hidden}

    def resident(saved) -> float:
        total = 0.0
        for size, count, elem in saved:
            nbytes = tokens * sizes[size] * elem
            heap = not on_gpu and nbytes < CPU_HEAP_MAX
            total += count * nbytes * (CPU_HEAP_FACTOR if heap else 1)
        return total

    per_layer = resident(SAVED[precision, tc.distributed.compile])
    per_layer += tokens * (4 * m.n_heads + 8)  # attention's log-sum-exp, the norms' 1/rms
    activations = (m.n_layers + BACKWARD_TRANSIENT_LAYERS) * per_layer
    activations += resident(HEAD_SAVED[precision]) + 16 * tokens  # + input and target ids
    sizes["vocab"] = vocab
    return MemoryEstimate(
        params=4 * n_params // shards,
        grads=4 * n_params // shards,
        optimizer=state // shards,
        optimizer_temp=temp // shards,
        optimizer_name=opt.optimizer,
        weight_copies=weight_copies,
        activations=int(activations),
        logits=int(resident([("vocab", LOGIT_COPIES, 4)])),
        reduce_buffers=reduce_buffers,
        overhead=OVERHEAD["gpu" if on_gpu else "cpu"],
        grads_in_backward=opt.grad_acc_steps > 1,
        vocab_size=vocab,
        micro_batch=tokens // tc.data.seq_len,
        seq_len=tc.data.seq_len,
    )


def _fix(tc: TrainConfig, biggest: str, *, on_gpu: bool, world_size: int) -> str:
    if biggest in ("logits", "activations"):
        fix = "lower data.batch_size and raise optim.grad_acc_steps (same tokens per step)"
        if biggest == "activations" and not tc.distributed.compile:
            fix += ", or set distributed.compile=true"
    elif biggest == "overhead":
        fix = "free memory on this machine"
    elif world_size > 1 and tc.distributed.fsdp_type != "full_shard":
        fix = "set distributed.fsdp_type=full_shard, or train a smaller model"
    else:
        fix = "train a smaller model (model.dim, model.n_layers) or shard it over more GPUs"
    return fix if on_gpu else fix + ", or use experiment=debug on CPU"


def fit_problem(
    tc: TrainConfig, *, available_bytes: int, where: str, gpu: str | None, world_size: int = 1
) -> str | None:
    """None if `tc` fits in `available_bytes` per process (or its size is unknown), else one
    line: the estimate, its biggest term, and the fix for that term."""
    est = estimate(tc, gpu=gpu, world_size=world_size)
    if est is None or est.total <= HEADROOM * available_bytes:
        return None
    name, value = next(iter(est.parts().items()))
    detail = f"{name} {_gb(value)} GB"
    if name == "logits":
        detail += f" at vocab {est.vocab_size} x batch {est.micro_batch} x seq {est.seq_len}"
    fix = _fix(tc, name, on_gpu=gpu is not None, world_size=world_size)
    return (
        f"model needs ~{_gb(est.total)} GB of memory per process ({detail}) but {where} has "
        f"{_gb(available_bytes)} GB available: {fix}"
    )


def check_fits(
    tc: TrainConfig, *, available_bytes: int, where: str, gpu: str | None, world_size: int = 1
) -> None:
    """UserError (one line naming the fix) unless `tc` fits in `available_bytes` per process."""
    kwargs = dict(available_bytes=available_bytes, where=where, gpu=gpu, world_size=world_size)
    if problem := fit_problem(tc, **kwargs):
        raise UserError(problem)


# --- clusters, for the sweep launcher --------------------------------------------------------


def cluster_memory_bytes(cluster: ClusterConfig) -> int | None:
    """Memory per GPU: the cluster's `gpu_memory_gb`, else the GPU table's; None for a CPU
    cluster or an unknown GPU."""
    if cluster.gpu_memory_gb is not None:
        return int(cluster.gpu_memory_gb * GB)
    spec = gpus.gpu_spec(cluster.gpu_type)
    return None if spec is None else int(spec.memory_gb * GB)


def fits_on_cluster(
    tc: TrainConfig, cluster: ClusterConfig, *, world_size: int | None = None
) -> str | None:
    """None when `tc` fits on one of the cluster's GPUs (or either size is unknown), else the
    one-line reason. `world_size`: the job's processes, by default one per GPU of a node."""
    available = cluster_memory_bytes(cluster)
    if available is None:
        return None
    world = world_size or max(cluster.gpus_per_node, 1)
    where = f"cluster {cluster.name} ({cluster.gpu_type}, {_gb(available)} GB per GPU)"
    return fit_problem(
        tc, available_bytes=available, where=where, gpu=cluster.gpu_type, world_size=world
    )


# --- the local device ------------------------------------------------------------------------


def local_available_bytes(device: torch.device, environ=os.environ) -> int | None:
    """What this process may use on `device`: free GPU memory; on CPU the machine's (or its
    cgroup's) available memory shared by this node's processes, plus this process's own resident
    memory (the estimate counts the process too). None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    known = [n for n in (_meminfo_available(), _cgroup_room()) if n is not None]
    if device.type != "cpu" or not known:
        return None
    return min(known) // max(int(environ.get("LOCAL_WORLD_SIZE", 1)), 1) + _own_rss()


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _cgroup_room(
    root: Path = Path("/sys/fs/cgroup"), own: Path = Path("/proc/self/cgroup")
) -> int | None:
    """The least room (limit minus usage) of this process's cgroup and its parents, v2 or v1;
    None when none of them has a limit."""
    paths = {"": "/", "memory": "/"}  # v2's unified tree, v1's memory tree
    with contextlib.suppress(OSError, ValueError):
        for line in own.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers in paths:
                paths[controllers] = path
    rooms = []
    for tree, limit_file, usage_file in (
        ("", "memory.max", "memory.current"),
        ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes"),
    ):
        top = root / tree
        here = top / paths[tree].lstrip("/")
        for directory in (here, *[p for p in here.parents if p.is_relative_to(top)]):
            with contextlib.suppress(OSError, ValueError):
                limit = (directory / limit_file).read_text().strip()
                usage = int((directory / usage_file).read_text())
                if limit != "max" and int(limit) < 1 << 60:  # v1's "no limit" is a huge number
                    rooms.append(max(int(limit) - usage, 0))
    return min(rooms, default=None)


def _own_rss() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def check_local(
    tc: TrainConfig, *, device: torch.device, gpu: str | None, world_size: int, environ=os.environ
) -> None:
    """UserError when `tc` does not fit on this process's device; nothing when unknown."""
    available = local_available_bytes(device, environ)
    if available is not None:
        where = f"this GPU ({gpu})" if gpu else "this machine"
        check_fits(tc, available_bytes=available, where=where, gpu=gpu, world_size=world_size)
