"""What the real training loop costs on top of a bare fwd/bwd/optimizer-step loop.

    python bench/trainer_overhead.py [--threads 1] [--chunk 20] [--pairs 20] [overrides...]
    python bench/trainer_overhead.py data.tokenizer.name=cl100k model.vocab_size=null
    python bench/trainer_overhead.py --mode sequential --repeats 5

Trainer side: `lingua_sweep.train.run` on a config composed by Hydra from `conf/` (preset
`--preset`, default `debug`, plus any Hydra overrides given), exactly as `train.py` runs it: the
threaded data loader on the embedded corpus (built once into the local cluster's data root, or
--data-root), the scheduler, grad clipping, the loss/out + tokens/s + grad-norm record every
`logging.freq` steps into metrics.jsonl. Validation is off by default (`logging.val_loss_every=0`,
it is extra work rather than overhead; --keep-val keeps the preset's cadence), as are WandB and
checkpoints.

Bare side: the same model (same config and init, compile/autocast through
`lingua_sweep.distributed`), the same optimizer (`optim.build_optimizer`) and grad clipping, the
same micro-batch shape and gradient accumulation, on tensors made once before timing.

The machine may be shared, so both sides are measured interleaved in one process:

- `--mode interleaved` (default): one trainer run of warmup + pairs x chunk steps. Every --chunk
  steps, right after the trainer wrote its loss/out record, a hook on `MetricLogger.log` runs
  --chunk bare steps (bare model built and warmed up beforehand). Each pair (trainer chunk, bare
  chunk) gives a ratio; the median over all pairs is reported. Trainer time of a chunk = from
  the end of the previous hook to the start of this one, so it holds everything the loop does
  (data waits, logging, .item() syncs, scheduler) but not the bench. Caveat: the loader thread
  keeps prefetching (up to data.prefetch batches) while the bare chunk runs, so at most
  prefetch/chunk of the data work can move out of the trainer's window. That happens only when
  the loader is behind (its queue not full at the chunk's end), which the printed "data wait"
  (share of the trainer chunk spent in `next(loader)`, from `TrainLoader.wait_s`) shows.
- `--mode sequential`: whole trainer runs (steady-state throughput from the `time` stamps of the
  loss/out records of steps --warmup and last) alternating with whole bare runs, --repeats
  times; the median of the per-repeat ratios. No hook, but slower drifts of the machine's load
  hit one side and not the other.

Start-up (model build, corpus, val batches, loss/init) and the first --warmup steps are excluded
on both sides. Target: ratio >= 0.95.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lingua_sweep import distributed, metrics, model, optim, train
from lingua_sweep.config import TrainConfig, register_configs
from lingua_sweep.tokenizer import build_tokenizer, check_vocab_size
from lingua_sweep.train import run

REPO = Path(__file__).resolve().parents[1]


def compose_config(args, steps: int) -> TrainConfig:
    overrides = [
        "cluster=local",
        f"experiment={args.preset}",
        f"steps={steps}",
        "logging.wandb=null",
        "checkpoint.dump.every=-1",
        "checkpoint.eval.every=-1",
    ]
    if not args.keep_val:
        overrides.append("logging.val_loss_every=0")
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides + args.overrides)
    return OmegaConf.to_object(cfg)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_trainer(tc: TrainConfig) -> list[dict]:
    """Runs the real trainer in a temporary run directory; returns its metrics.jsonl records."""
    with tempfile.TemporaryDirectory(prefix="lingua_bench_") as tmp:
        run(tc, run_dir=Path(tmp), environ={})
        return [json.loads(line) for line in open(Path(tmp) / "metrics.jsonl")]


def tokens_per_step(tc: TrainConfig, records: list[dict]) -> int:
    first = records[0]  # step 0: loss/init and the batch shape the trainer actually used
    return first["micro_batch_size"] * first["grad_acc_steps"] * tc.data.seq_len


class BareLoop:
    """fwd/bwd/clip/optimizer step of the trainer's model and optimizer, on pre-made tensors."""

    def __init__(self, tc: TrainConfig, *, batch_size: int, grad_acc: int):
        self.env = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=device())
        self.tc = tc
        torch.manual_seed(tc.seed)
        net = model.build_model(tc.model)
        net.init_weights(tc.seed)
        net.to(self.env.device)
        self.net = distributed.parallelize(net, tc.distributed, self.env)
        self.params = list(self.net.parameters())
        self.optimizer = optim.build_optimizer(self.net, tc.optim)
        shape = (batch_size, tc.data.seq_len)
        vocab = tc.model.vocab_size
        self.micro_batches = [
            (
                torch.randint(0, vocab, shape, device=self.env.device),
                torch.randint(0, vocab, shape, device=self.env.device),
            )
            for _ in range(grad_acc)
        ]
        self.tokens_per_step = batch_size * grad_acc * tc.data.seq_len

    def step(self) -> None:
        grad_acc = len(self.micro_batches)
        for inputs, targets in self.micro_batches:
            with distributed.autocast(self.tc.distributed, self.env):
                loss = self.net(inputs, targets)
            if grad_acc > 1:
                loss = loss / grad_acc
            loss.backward()
        if self.tc.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.tc.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed(self, steps: int) -> float:
        """Seconds for `steps` steps (device synchronized at both ends)."""
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        return time.perf_counter() - t0


def interleaved(args, tc: TrainConfig, shape: dict, warmup: int, chunk: int) -> list[tuple]:
    """(trainer tok/s, bare tok/s) per chunk pair, from one trainer run with a hook."""
    bare = BareLoop(tc, batch_size=shape["batch_size"], grad_acc=shape["grad_acc"])
    bare.timed(warmup)
    trainer_tokens = shape["tokens_per_step"]
    pairs = []
    # End of the previous hook, the trainer's step and its loader's total wait there.
    state = {"end": None, "step": None, "wait": 0.0}
    loaders = []  # the trainer's train loader, caught as it is built, for its wait_s
    original_log = metrics.MetricLogger.log
    original_build = train.build_train_loader

    def build_train_loader(*a, **kw):
        loaders.append(original_build(*a, **kw))
        return loaders[-1]

    def log(self, step, record):
        original_log(self, step, record)
        if "loss/out" not in record or step < warmup or step % chunk:
            return
        now = time.perf_counter()  # the trainer's .item() of this record has synchronized
        if state["end"] is not None:
            trainer_s = now - state["end"]
            trainer_tps = (step - state["step"]) * trainer_tokens / trainer_s
            bare_tps = chunk * bare.tokens_per_step / bare.timed(chunk)
            wait_share = (loaders[0].wait_s - state["wait"]) / trainer_s
            pairs.append((trainer_tps, bare_tps))
            print(
                f"  steps {state['step']:4d}-{step:4d}: trainer {trainer_tps:9.0f} tok/s "
                f"(data wait {100 * wait_share:4.1f}%)  bare {bare_tps:9.0f} tok/s  "
                f"ratio {trainer_tps / bare_tps:.3f}",
                flush=True,
            )
        state["end"], state["step"] = time.perf_counter(), step
        state["wait"] = loaders[0].wait_s

    with (
        mock.patch.object(metrics.MetricLogger, "log", log),
        mock.patch.object(train, "build_train_loader", build_train_loader),
    ):
        run_trainer(tc)
    return pairs


def sequential(args, tc: TrainConfig, shape: dict, warmup: int, steps: int) -> list[tuple]:
    """(trainer tok/s, bare tok/s) per repeat of a whole trainer run and a whole bare run."""
    pairs = []
    for i in range(args.repeats):
        sides = {}
        for side in ("trainer", "bare") if i % 2 == 0 else ("bare", "trainer"):
            if side == "trainer":
                records = run_trainer(tc)
                outs = [r for r in records if "loss/out" in r]
                start = next(r for r in outs if r["step"] >= warmup)
                end = outs[-1]
                tokens = (end["step"] - start["step"]) * shape["tokens_per_step"]
                sides[side] = tokens / (end["time"] - start["time"])
            else:
                bare = BareLoop(tc, batch_size=shape["batch_size"], grad_acc=shape["grad_acc"])
                bare.timed(warmup)
                sides[side] = steps * bare.tokens_per_step / bare.timed(steps)
        pairs.append((sides["trainer"], sides["bare"]))
        print(
            f"  repeat {i + 1}: trainer {sides['trainer']:9.0f} tok/s  "
            f"bare {sides['bare']:9.0f} tok/s  ratio {sides['trainer'] / sides['bare']:.3f}",
            flush=True,
        )
    return pairs


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="debug", help="experiment preset (conf/experiment)")
    parser.add_argument("--mode", choices=("interleaved", "sequential"), default="interleaved")
    parser.add_argument("--warmup", type=int, default=20, help="steps excluded on both sides")
    parser.add_argument("--chunk", type=int, default=20, help="interleaved: steps per chunk")
    parser.add_argument("--pairs", type=int, default=20, help="interleaved: chunk pairs")
    parser.add_argument("--steps", type=int, default=200, help="sequential: steps timed")
    parser.add_argument("--repeats", type=int, default=5, help="sequential: repeats")
    parser.add_argument("--data-root", help="corpus directory (default: the local cluster's)")
    parser.add_argument("--keep-val", action="store_true", help="keep the preset's val cadence")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.dim=256")
    args = parser.parse_args()

    register_configs()
    if args.threads:
        torch.set_num_threads(args.threads)
    freq = compose_config(args, 1).logging.freq
    # Window edges must be loss/out records: round to multiples of logging.freq.
    warmup, chunk, steps = (round_up(n, freq) for n in (args.warmup, args.chunk, args.steps))
    if args.mode == "interleaved":
        warmup = round_up(warmup, chunk)  # the first pair starts at a chunk boundary
    total = warmup + (args.pairs * chunk if args.mode == "interleaved" else steps)
    tc = compose_config(args, total)
    print(
        f"preset {args.preset} {' '.join(args.overrides)}: dim {tc.model.dim}, "
        f"{tc.model.n_layers} layers, batch {tc.data.batch_size}x{tc.data.seq_len}, "
        f"tokenizer {tc.data.tokenizer.name}, compile {tc.distributed.compile}, "
        f"{tc.distributed.model_dtype}, logging.freq {freq}, "
        f"val every {tc.logging.val_loss_every}, prefetch {tc.data.prefetch}\n"
        f"torch {torch.__version__} on {device()}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; mode {args.mode}, "
        f"warmup {warmup} steps, "
        + (
            f"{args.pairs} pairs of {chunk}-step chunks"
            if args.mode == "interleaved"
            else f"{steps} steps x {args.repeats} repeats"
        )
    )

    # A short throwaway run: builds the corpus if needed, warms the process, gives the shape.
    records = run_trainer(compose_config(args, 2 * freq))
    tc.model.vocab_size = check_vocab_size(tc.model.vocab_size, build_tokenizer(tc.data.tokenizer))
    shape = {
        "batch_size": records[0]["micro_batch_size"],
        "grad_acc": records[0]["grad_acc_steps"],
        "tokens_per_step": tokens_per_step(tc, records),
    }

    if args.mode == "interleaved":
        pairs = interleaved(args, tc, shape, warmup, chunk)
    else:
        pairs = sequential(args, tc, shape, warmup, steps)

    ratios = [t / b for t, b in pairs]
    trainer = statistics.median(t for t, _ in pairs)
    bare = statistics.median(b for _, b in pairs)
    # What the trainer adds per step, in time: comparable across model sizes and machines.
    added_ms = statistics.median(1e3 * shape["tokens_per_step"] * (1 / t - 1 / b) for t, b in pairs)
    print(f"trainer loop (median): {trainer:10.0f} tokens/s")
    print(f"bare loop (median):    {bare:10.0f} tokens/s")
    print(
        f"trainer adds (median): {added_ms:10.3f} ms/step "
        f"(bare step {1e3 * shape['tokens_per_step'] / bare:.2f} ms)"
    )
    print(
        f"ratio trainer / bare:  {statistics.median(ratios):.3f}  (median of {len(ratios)} "
        f"paired ratios, min {min(ratios):.3f}, max {max(ratios):.3f}; target >= 0.95)"
    )
    # Total time of each side (equal tokens per pair): counts rare costs such as evaluations
    # (--keep-val) that the median leaves out, and noise spikes too.
    aggregate = statistics.harmonic_mean(t for t, _ in pairs) / statistics.harmonic_mean(
        b for _, b in pairs
    )
    print(f"ratio of total times:  {aggregate:.3f}")


if __name__ == "__main__":
    main()
