"""Training throughput and MFU of a preset on ONE GPU, plus the cross-entropy over the vocab.

    python bench/gpu_throughput.py                        # experiment=default, 30 timed steps
    python bench/gpu_throughput.py --ce chunked           # the step with a chunked fused CE
    python bench/gpu_throughput.py optim.fused=false distributed.compile=false   # Hydra overrides
    python bench/gpu_throughput.py --sdpa flash --sync-debug
    python bench/gpu_throughput.py --device cpu --tiny    # smoke check without a GPU

Part 1, the training step: the model, init, per-block compile (`distributed.parallelize`),
optimizer (`optim.build_optimizer`: fused AdamW on GPU unless optim.fused=false), bf16 autocast
and grad clipping exactly as the trainer sets them up for one process, on synthetic tokens made
once on the device (no data loader, no host sync inside the timed steps). --warmup steps (they
include compilation, timed separately), then --steps timed between two synchronizations.
Prints tokens/s, ms/step, MFU (FLOPs/token from `model.flops_per_token`, peak from
`metrics.peak_flops` of the detected GPU) and peak memory.

--ce picks how the loss is computed in the step:
  model    `net(inputs, targets)`: the model's own head, full [B*T, vocab] logits upcast to fp32
  compiled the same math (linear head + fp32 CE) under torch.compile
  chunked  a fused linear + CE that computes the loss and both gradients chunk by chunk of
           rows in the forward (Liger-style), so no full [B*T, vocab] tensor ever exists
`compiled` and `chunked` run the model's body (embedding, blocks, final norm) here, a copy of
`Transformer.forward` without its last line: keep `body()` in step with lingua_sweep/model.py.

Part 2, the memory-heavy part alone: fwd+bwd of cross-entropy over [B*T, vocab] logits from
[B*T, dim] bf16 hidden states and the fp32 [vocab, dim] head (32768 x 100277 for the default
preset), for each CE variant: ms, TFLOP/s of the three matmuls, peak extra memory, and the
difference of loss and gradients from `model` (a correctness check of the variants).
"""

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lingua_sweep import distributed, metrics, model, optim
from lingua_sweep.config import TrainConfig, register_configs

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.vocab_size=1000",
    "data.batch_size=4",
    "data.seq_len=128",
    "distributed.compile=false",
]
CE_VARIANTS = ("model", "compiled", "chunked")


# --- cross-entropy variants: (hidden [N, dim], head weight [vocab, dim], targets [N]) -> loss --


def reference_ce(hidden, weight, targets):
    """What `Transformer.forward` does: bf16 logits (under autocast), fp32 softmax."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets)


_compiled_ce = None


def compiled_ce(hidden, weight, targets):
    global _compiled_ce
    if _compiled_ce is None:
        _compiled_ce = torch.compile(reference_ce)
    return _compiled_ce(hidden, weight, targets)


def _ce_chunk_grad(logits, targets, n_total: int):
    """Summed loss / n_total and d(loss)/d(logits) of one chunk, in the logits' dtype."""
    dtype = logits.dtype
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    loss = (lse - target_logit).sum() / n_total
    grad = torch.exp(logits - lse[:, None])
    grad.scatter_add_(1, targets[:, None], torch.full_like(target_logit[:, None], -1.0))
    return loss, (grad / n_total).to(dtype)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean CE of hidden @ weight.T, rows in chunks; gradients computed in the forward.

    Peak extra memory is one chunk of logits (chunk_rows x vocab) instead of all of them, and
    the logits are read a fixed small number of times. The per-chunk softmax part is compiled
    on GPU, which fuses the upcast, log-sum-exp and gradient into two kernels.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, chunk_fn):
        n = hidden.shape[0]
        w = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_rows):
            h = hidden[start : start + chunk_rows]
            chunk_loss, grad_logits = chunk_fn(h @ w.T, targets[start : start + chunk_rows], n)
            grad_logits = grad_logits.to(hidden.dtype)
            loss += chunk_loss
            grad_hidden[start : start + chunk_rows] = grad_logits @ w
            grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype),
            (grad_weight * grad_loss).to(ctx.weight_dtype),
            None,
            None,
            None,
        )


_chunk_fn = None


def chunked_ce(hidden, weight, targets, chunk_rows: int = 4096):
    global _chunk_fn
    if _chunk_fn is None:
        _chunk_fn = torch.compile(_ce_chunk_grad) if hidden.is_cuda else _ce_chunk_grad
    dtype = torch.get_autocast_dtype(hidden.device.type)
    if torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, _chunk_fn)


CE_FUNCTIONS = {"model": reference_ce, "compiled": compiled_ce, "chunked": chunked_ce}


# --- the training step ----------------------------------------------------------------------


def body(net, tokens):
    """`Transformer.forward` up to the head: final-normed hidden states [batch, seq, dim]."""
    h = net.tok_embeddings(tokens)
    for block in net.layers.values():
        h = block(h, net.posembed)
    return net.norm(h)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def sdpa_context(name: str):
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "auto":
        return contextlib.nullcontext()
    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return sdpa_kernel(backend)


def bench_step(tc: TrainConfig, args, dev: torch.device) -> dict:
    env = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=dev)
    torch.manual_seed(tc.seed)
    net = model.build_model(tc.model)
    net.init_weights(tc.seed)
    net.to(dev)
    net = distributed.parallelize(net, tc.distributed, env)
    optimizer = optim.build_optimizer(net, tc.optim)
    params = list(net.parameters())
    shape = (tc.data.batch_size, tc.data.seq_len)
    inputs = torch.randint(0, tc.model.vocab_size, shape, device=dev)
    targets = torch.randint(0, tc.model.vocab_size, shape, device=dev)
    ce = CE_FUNCTIONS[args.ce]

    def step():
        with distributed.autocast(tc.distributed, env), sdpa_context(args.sdpa):
            if args.ce == "model":
                loss = net(inputs, targets)
            else:
                loss = ce(body(net, inputs).flatten(0, 1), net.output.weight, targets.flatten())
        loss.backward()
        if tc.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    sync(dev)
    warmup_s = time.perf_counter() - t0
    first_loss = loss.item()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        if args.sync_debug:
            torch.cuda.set_sync_debug_mode("warn")  # warns on every host sync in the steps
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(dev)
    elapsed = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.set_sync_debug_mode(0)
    tokens = args.steps * shape[0] * shape[1]
    return {
        "warmup_s": warmup_s,
        "ms_per_step": 1e3 * elapsed / args.steps,
        "tokens_per_s": tokens / elapsed,
        "loss": (first_loss, loss.item()),
        "peak_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None,
    }


# --- the cross-entropy alone ----------------------------------------------------------------


def ce_fwd_bwd(ce, hidden, weight, targets, dtype):
    hidden.grad = weight.grad = None
    with torch.autocast(hidden.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = ce(hidden, weight, targets)
    loss.backward()
    return loss


def bench_ce(tc: TrainConfig, args, dev: torch.device) -> None:
    n = tc.data.batch_size * tc.data.seq_len
    dim, vocab = tc.model.dim, tc.model.vocab_size
    dtype = torch.bfloat16 if tc.distributed.model_dtype == "bf16" else torch.float32
    gen = torch.Generator(device=dev).manual_seed(0)
    hidden0 = torch.randn(n, dim, device=dev, dtype=dtype, generator=gen)
    weight0 = torch.randn(vocab, dim, device=dev, generator=gen) * tc.model.init_std
    targets = torch.randint(0, vocab, (n,), device=dev, generator=gen)
    flops = 6 * n * dim * vocab  # logits, grad of hidden, grad of weight
    print(
        f"\ncross-entropy alone: {n} x {vocab} logits from dim {dim} "
        f"({n * vocab * 4 / 1e9:.2f} GB as fp32), fwd+bwd, {args.ce_iters} timed"
    )
    reference = None
    for name in args.ce_variants:
        hidden = hidden0.clone().requires_grad_()
        weight = weight0.clone().requires_grad_()
        ce_args = (CE_FUNCTIONS[name], hidden, weight, targets, dtype)
        loss = ce_fwd_bwd(*ce_args)  # warm-up (and compilation)
        loss = ce_fwd_bwd(*ce_args)
        sync(dev)
        base = 0
        if dev.type == "cuda":
            hidden.grad = weight.grad = None
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        for _ in range(args.ce_iters):
            loss = ce_fwd_bwd(*ce_args)
        sync(dev)
        ms = 1e3 * (time.perf_counter() - t0) / args.ce_iters
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 1e9 if dev.type == "cuda" else None
        result = (loss.detach().float(), hidden.grad.float(), weight.grad.float())
        if reference is None:
            reference = result
        diffs = [
            ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
            for a, b in zip(result, reference, strict=True)
        ]
        mem = f"peak +{peak:6.2f} GB" if peak is not None else "peak n/a (CPU)"
        print(
            f"  {name:9s} {ms:9.2f} ms  {flops / ms / 1e9:8.1f} TFLOP/s  {mem}  "
            f"rel. diff vs {args.ce_variants[0]}: loss {diffs[0]:.1e}, "
            f"d hidden {diffs[1]:.1e}, d weight {diffs[2]:.1e}"
        )


# --- main -----------------------------------------------------------------------------------


def compose_config(args) -> TrainConfig:
    register_configs()
    overrides = ["cluster=local", f"experiment={args.preset}", "logging.wandb=null"]
    overrides += (TINY if args.tiny else []) + args.overrides
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    tc: TrainConfig = OmegaConf.to_object(cfg)
    if tc.model.vocab_size is None:
        sys.exit("error: set model.vocab_size (synthetic tokens need no tokenizer)")
    return tc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="default", help="experiment preset (conf/experiment)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model: smoke check on CPU")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps (compilation)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--ce", choices=CE_VARIANTS, default="model", help="loss in the step")
    parser.add_argument(
        "--sdpa", choices=("auto", "flash", "efficient", "cudnn", "math"), default="auto"
    )
    parser.add_argument("--sync-debug", action="store_true", help="warn on host syncs (GPU)")
    parser.add_argument("--ce-iters", type=int, default=10, help="timed CE fwd+bwd per variant")
    parser.add_argument(
        "--ce-variants",
        type=lambda s: s.split(","),
        default=list(CE_VARIANTS),
        help="comma-separated CE variants for part 2 (first = reference); 'none' skips part 2",
    )
    parser.add_argument(
        "--ce-chunk-rows", type=int, help="rows per chunk of `chunked` (4096; --tiny: 128)"
    )
    parser.add_argument("--skip-step", action="store_true", help="only the CE bench (part 2)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.batch_size=16")
    args = parser.parse_args()
    if args.ce_variants == ["none"]:
        args.ce_variants = []
    unknown = set(args.ce_variants) - set(CE_VARIANTS)
    if unknown:
        parser.error(f"--ce-variants: unknown {sorted(unknown)}; choose from {CE_VARIANTS}")

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"error: no CUDA GPU is visible (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}); this benchmark measures one GPU. For a smoke check of the "
            "script without one: python bench/gpu_throughput.py --device cpu --tiny",
            file=sys.stderr,
        )
        sys.exit(2)
    dev = torch.device(args.device)
    chunk_rows = args.ce_chunk_rows or (128 if args.tiny else 4096)
    CE_FUNCTIONS["chunked"] = functools.partial(chunked_ce, chunk_rows=chunk_rows)
    tc = compose_config(args)
    gpu = distributed.gpu_name(dev)
    peak = metrics.peak_flops(gpu)
    flops_per_token = model.flops_per_token(tc.model, tc.data.seq_len)
    print(
        f"{gpu or 'CPU'} (torch {torch.__version__}, CUDA {torch.version.cuda}); preset "
        f"{args.preset}{' --tiny' if args.tiny else ''} {' '.join(args.overrides)}\n"
        f"dim {tc.model.dim}, {tc.model.n_layers} layers, {tc.model.n_heads} heads, vocab "
        f"{tc.model.vocab_size}, batch {tc.data.batch_size}x{tc.data.seq_len}, "
        f"{tc.distributed.model_dtype}, compile {tc.distributed.compile}, optim.fused "
        f"{tc.optim.fused}, ce {args.ce}"
        + (f" ({chunk_rows}-row chunks)" if args.ce == "chunked" else "")
        + f", sdpa {args.sdpa}; "
        f"{flops_per_token / 1e6:.1f} MFLOP/token, peak "
        + (f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (no MFU)")
    )

    if not args.skip_step:
        r = bench_step(tc, args, dev)
        mfu = r["tokens_per_s"] * flops_per_token / peak if peak else None
        print(
            f"train step: {r['tokens_per_s']:,.0f} tokens/s, {r['ms_per_step']:.1f} ms/step, "
            f"MFU {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'}, "
            f"{r['tokens_per_s'] * flops_per_token / 1e12:.1f} TFLOP/s achieved, "
            + (f"peak memory {r['peak_gb']:.1f} GB, " if r["peak_gb"] is not None else "")
            + f"warm-up {r['warmup_s']:.1f} s ({args.warmup} steps incl. compile); "
            f"loss {r['loss'][0]:.3f} -> {r['loss'][1]:.3f} over {args.steps} steps"
        )
        if not all(math.isfinite(x) for x in r["loss"]):
            sys.exit("error: non-finite loss")
    if args.ce_variants:
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the step's blocks back to the driver before part 2
        bench_ce(tc, args, dev)


if __name__ == "__main__":
    main()
