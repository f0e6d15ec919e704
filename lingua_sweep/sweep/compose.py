"""Compose and validate each job's config, and the hash that pins it in the journal.

Hydra composes a config in ~0.3 s, and copying one takes ~4 ms: at 10,000 jobs either
dominates a sweep. Jobs that differ only in plain `key=value` overrides (no config group, no
`+`/`~`, no `hydra.*`, no dict or list value) share one composition, their *template*: a job is
the template plus its values (`JobConfig`), validated and hashed on a scratch copy, and made
whole only where it runs. A test checks the result equals a full composition, and the hash
equals the full config's.

The trainer's integration is applied only when the app's config is the trainer's (its root is
typed by `TrainConfig`): the `cluster=<name>` override and `preflight`. Any other Hydra app is
composed as Hydra would.
"""

import copy
import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lingua_sweep.config import ClusterConfig
from lingua_sweep.errors import UserError

EXCLUDED_FROM_HASH = ("hydra", "cluster", "code_version")  # where and with which commit


class JobConfig:
    """One job's config, light: the template composed for its shape (shared by every job of
    that shape) and the values that make it this job. `materialize()` builds the full config;
    the launcher never needs to, the job does on its node, so a 10,000-job sweep holds one
    config per shape, and an array pickles its template once."""

    __slots__ = ("template", "values", "task", "dirname", "num", "hash", "steps", "work_flops",
                 "too_big_for", "_data_view")  # fmt: skip

    def __init__(self, template, values, task, dirname, num, digest, steps, data_view,
                 work_flops=None):  # fmt: skip
        self.template = template
        self.values, self.task, self.dirname, self.num = values, task, dirname, num
        self.hash, self.steps, self._data_view = digest, steps, data_view
        self.work_flops = work_flops  # a trainer job's training FLOPs per GPU (placement)
        self.too_big_for: dict[str, str] = {}  # cluster -> why the job does not fit its GPUs

    def materialize(self) -> DictConfig:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra.core.override_parser.overrides_parser import OverridesParser

        config = copy.deepcopy(self.template)
        with open_dict(config):
            parsed = OverridesParser.create().parse_overrides(self.values)
            ConfigLoaderImpl._apply_overrides_to_config(parsed, config)
            config.hydra.overrides.task = list(self.task)
            config.hydra.job.override_dirname = self.dirname
            config.hydra.job.num = self.num
        return config

    def data_view(self) -> DictConfig:
        """A config whose `data` and `cluster` are this job's (the template's unless the job
        sets them itself): what the data check reads."""
        return self.materialize() if self._data_view is None else self._data_view


class _Template:
    """A shape's composition: the config (handed to jobs, never changed after), a scratch copy
    each job's values are applied to (to validate and hash them), and the hashed content."""

    def __init__(self, config: DictConfig):
        self.config = config
        self.scratch = copy.deepcopy(config)
        keys = [k for k in config if k not in EXCLUDED_FROM_HASH]
        self.plain = OmegaConf.to_container(OmegaConf.masked_copy(config, keys), resolve=False)
        self.trainer = is_trainer_config(config)


# What a job's size (its FLOPs, its peak memory) depends on, besides its shape's template.
SIZING_KEYS = ("steps", "model", "data", "optim", "distributed")


class JobComposer:
    def __init__(self, launcher_config: DictConfig, config_loader):
        self.base = launcher_config
        self.loader = config_loader
        self.groups = self._all_groups("")
        # The trainer's config has a `cluster` group: each job is composed for its cluster.
        self.has_cluster = "cluster" in self.groups and "cluster" in launcher_config
        self.templates: dict[tuple, _Template] = {}
        self._parsed: dict[str, Any] = {}  # override line -> Hydra's parse of it (ANTLR: slow)
        self._parser = None
        self._keys: list[str] | None = None  # the config's keys, for "did you mean"
        # (cluster, processes of a job there) whose GPUs a trainer job must fit; set by the
        # controller. Fits are cached per template and sizing values (SIZING_KEYS).
        self.memory_targets: list[tuple[ClusterConfig, int]] = []
        self._fits: dict[tuple, dict[str, str]] = {}
        self._work: dict[tuple, float | None] = {}  # the same key -> a job's training FLOPs

    def _all_groups(self, parent: str) -> set[str]:
        found = set()
        for group in self.loader.list_groups(parent):
            full = f"{parent}/{group}" if parent else group
            found |= {full} | self._all_groups(full)
        return found

    def _is_plain_value(self, override) -> bool:
        """A `key=value` that sets one leaf: jobs differing only in those share a template.
        (A dict or list value merges into what is there, so it is part of the shape.)"""
        key = override.key_or_group
        return (
            override.is_force_add() is False
            and not override.is_add()
            and not override.is_delete()
            and not override.is_hydra_override()
            and key.replace(".", "/") not in self.groups
            and override.package is None
            and not override.is_sweep_override()
            and not isinstance(override.value(), dict | list)
        )

    def _parse(self, lines: list[str]) -> list:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        new = [line for line in dict.fromkeys(lines) if line not in self._parsed]
        if new:
            if self._parser is None:
                self._parser = OverridesParser.create()
            self._parsed.update(zip(new, self._parser.parse_overrides(new), strict=True))
        return [self._parsed[line] for line in lines]

    def _suggestion(self, error: Exception) -> str:
        """A mistyped key's closest real one, for Hydra's "Could not override 'x.y'"."""
        import re

        from lingua_sweep.config import config_keys
        from lingua_sweep.errors import did_you_mean

        found = re.search(r"Could not override '([^']+)'", str(error))
        if not found:
            return ""
        if self._keys is None:
            self._keys = config_keys(self.base)
        return did_you_mean(found.group(1), self._keys)

    def compose(
        self, overrides: list[str], job_num: int, cluster: ClusterConfig | None, sweep_dir: str
    ) -> DictConfig:
        """The job's full config on `cluster`; raises UserError naming the job on any mistake."""
        return self.job_config(overrides, job_num, cluster, sweep_dir).materialize()

    def job_config(
        self, overrides: list[str], job_num: int, cluster: ClusterConfig | None, sweep_dir: str
    ) -> JobConfig:
        """The job on `cluster`, composed (once per shape) and validated; raises UserError
        naming the job on any mistake."""
        from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname

        where = f"job #{job_num} ({' '.join(overrides)})"
        extra = list(overrides)
        if self.has_cluster and cluster is not None:
            extra = [o for o in extra if o.split("=", 1)[0].lstrip("+~") != "cluster"]
            extra.append(f"cluster={cluster.name}")
        extra.append(f"hydra.sweep.dir={sweep_dir}")
        try:
            parsed = self._parse(extra)
            values = [o for o in parsed if self._is_plain_value(o)]
            key = (
                tuple(o.input_line for o in parsed if o not in values),
                tuple(o.key_or_group for o in values),
            )
            template = self.templates.get(key)
            if template is None:
                template = self.templates[key] = _Template(
                    self.loader.load_sweep_config(self.base, extra)
                )
            scratch = template.scratch
            with open_dict(scratch):
                ConfigLoaderImpl._apply_overrides_to_config(values, scratch)
            task = [o for o in parsed if not o.is_hydra_override()]
            dirname = scratch.hydra.job.config.override_dirname
            override_dirname = get_overrides_dirname(
                overrides=task, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep,
                exclude_keys=list(dirname.exclude_keys),
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - Hydra's composition errors have many types
            raise UserError(f"{where}: {_first_line(e)}{self._suggestion(e)}") from e
        steps = work_flops = None
        too_big_for: dict[str, str] = {}
        if template.trainer:
            from lingua_sweep.config import check_known_keys
            from lingua_sweep.preflight import preflight

            try:
                check_known_keys(scratch)
                preflight(scratch)  # the root is typed by `train_schema`: types already checked
            except UserError as e:
                raise UserError(f"{where}: {e}") from e
            steps = scratch.get("steps")
            # Sized once per template and values that size it (an lr sweep: once in all).
            key = (id(template), tuple(o.input_line for o in values
                                       if o.key_or_group.split(".")[0] in SIZING_KEYS))  # fmt: skip
            if key not in self._work:
                self._work[key] = _work_flops(scratch)
            work_flops = self._work[key]
            too_big_for = self._too_big_for(scratch, where, key)
        touches_data = any(o.key_or_group.split(".")[0] in ("data", "cluster") for o in values)
        config = JobConfig(
            template.config, [o.input_line for o in values], [o.input_line for o in task],
            override_dirname, job_num, _hash(template, values), steps,
            None if touches_data else template.config, work_flops,
        )  # fmt: skip
        config.too_big_for = too_big_for
        return config

    def _too_big_for(self, scratch, where: str, key: tuple) -> dict[str, str]:
        """The clusters whose GPUs the job's training does not fit (`lingua_sweep.memory`);
        a job that fits none is a one-line error before anything is submitted."""
        if not self.memory_targets or not scratch.distributed.get("memory_check", True):
            return {}
        from lingua_sweep import memory

        if key not in self._fits:
            self._fits[key] = {
                c.name: why for c, world in self.memory_targets
                if (why := memory.fits_on_cluster(scratch, c, world_size=world))
            }  # fmt: skip
        too_big = self._fits[key]
        if len(too_big) == len(self.memory_targets):
            raise UserError(f"{where}: {next(iter(too_big.values()))}")
        return too_big


def _work_flops(cfg) -> float | None:
    """Training FLOPs one GPU does over the whole job: how big a job is, whatever the GPU (its
    run time on a cluster is this over the FLOP/s the trainer achieves there)."""
    from lingua_sweep.config import ModelConfig
    from lingua_sweep.model import flops_per_token
    from lingua_sweep.preflight import KNOWN_VOCAB_SIZES

    fields = OmegaConf.to_container(cfg.model)
    fields["vocab_size"] = fields["vocab_size"] or KNOWN_VOCAB_SIZES.get(cfg.data.tokenizer.name)
    if not fields["vocab_size"]:
        return None  # a tokenizer file's vocab: known only when the job reads it
    d = cfg.data
    tokens = cfg.steps * d.batch_size * d.seq_len * cfg.optim.grad_acc_steps
    return tokens * flops_per_token(ModelConfig(**fields), d.seq_len)


def _hash(template: _Template, values) -> str:
    """config_hash of the template with the job's values, from the template's content and the
    values as the scratch config holds them (typed): no conversion of the whole config."""
    content = template.plain
    for o in values:
        parts = o.key_or_group.split(".")
        if parts[0] in EXCLUDED_FROM_HASH:
            continue
        node = template.scratch
        try:
            for part in parts:
                node = node._get_node(part)
            value = (OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node)
                     else node._value())  # fmt: skip
        except Exception:  # noqa: BLE001 - a path this shortcut does not follow: hash it all
            return config_hash(template.scratch)
        content = _replaced(content, parts, value)
        if content is None:
            return config_hash(template.scratch)
    return _digest(content)


def _replaced(content: dict, parts: list[str], value):
    """A copy of `content` with the value at `parts` replaced (copying only that path), or
    None where the path goes through something other than dicts."""
    top = dict(content)
    node = top
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            return None
        node[part] = node = dict(child)
    node[parts[-1]] = value
    return top


def is_trainer_config(config: DictConfig) -> bool:
    from lingua_sweep.config import TrainConfig

    return OmegaConf.get_type(config) is TrainConfig


def experiment_name(config: DictConfig) -> str:
    """The sweep's name in output paths and Slurm job names: the trainer's `name`, else the
    app's Hydra job name."""
    name = config.get("name") if is_trainer_config(config) else None
    return str(name or config.hydra.job.name)


def config_hash(config: DictConfig) -> str:
    """What the job will compute: the config without Hydra's bookkeeping, the cluster (which the
    dispatcher may change) and the code version (a resumed sweep may run fixed code),
    interpolations unresolved (so `${now:}` never differs)."""
    keys = [k for k in config if k not in EXCLUDED_FROM_HASH]
    return _digest(OmegaConf.to_container(OmegaConf.masked_copy(config, keys), resolve=False))


def _digest(content: dict) -> str:
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _first_line(e: BaseException) -> str:
    """Hydra's message on one line, minus its `+key` hint: the schema rejects new keys anyway."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("To append to your config use")]
    return " ".join(lines) or type(e).__name__
