"""Compose and validate each job's config, and the hash that pins it in the journal.

Hydra composes a config in ~0.3 s, which dominates submitting a large sweep. Jobs that differ
from an already composed one only in plain `key=value` overrides (no config group, no `+`/`~`,
no `hydra.*`) reuse it: copy, apply those values, and update the bookkeeping Hydra derives from
overrides. A test checks the result equals a full composition.

The trainer's integration is applied only when the app's config is the trainer's (its root is
typed by `TrainConfig`): the `cluster=<name>` override and `preflight`. Any other Hydra app is
composed as Hydra would.
"""

import copy
import hashlib
import json

from omegaconf import DictConfig, OmegaConf, open_dict

from lingua_sweep.config import ClusterConfig
from lingua_sweep.errors import UserError


class JobComposer:
    def __init__(self, launcher_config: DictConfig, config_loader):
        self.base = launcher_config
        self.loader = config_loader
        self.groups = self._all_groups("")
        # The trainer's config has a `cluster` group: each job is composed for its cluster.
        self.has_cluster = "cluster" in self.groups and "cluster" in launcher_config
        self.cache: dict[tuple, DictConfig] = {}

    def _all_groups(self, parent: str) -> set[str]:
        found = set()
        for group in self.loader.list_groups(parent):
            full = f"{parent}/{group}" if parent else group
            found |= {full} | self._all_groups(full)
        return found

    def _is_plain_value(self, override) -> bool:
        key = override.key_or_group
        return (
            override.is_force_add() is False
            and not override.is_add()
            and not override.is_delete()
            and not override.is_hydra_override()
            and key.replace(".", "/") not in self.groups
            and override.package is None
        )

    def compose(
        self, overrides: list[str], job_num: int, cluster: ClusterConfig | None, sweep_dir: str
    ) -> DictConfig:
        """The job's full config on `cluster`; raises UserError naming the job on any mistake."""
        from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
        from hydra.core.override_parser.overrides_parser import OverridesParser

        where = f"job #{job_num} ({' '.join(overrides)})"
        extra = list(overrides)
        if self.has_cluster and cluster is not None:
            extra = [o for o in extra if o.split("=", 1)[0].lstrip("+~") != "cluster"]
            extra.append(f"cluster={cluster.name}")
        extra.append(f"hydra.sweep.dir={sweep_dir}")
        try:
            parsed = OverridesParser.create().parse_overrides(extra)
            values = [o for o in parsed if self._is_plain_value(o)]
            key = (
                tuple(o.input_line for o in parsed if o not in values),
                tuple(o.key_or_group for o in values),
            )
            base = self.cache.get(key)
            if base is None:
                config = self.loader.load_sweep_config(self.base, extra)
                self.cache[key] = copy.deepcopy(config)  # the cached one is never handed out
            else:
                config = copy.deepcopy(base)
                with open_dict(config):
                    ConfigLoaderImpl._apply_overrides_to_config(values, config)
                    config.hydra.overrides.task = [
                        o.input_line for o in parsed if not o.is_hydra_override()
                    ]
                    dirname = config.hydra.job.config.override_dirname
                    config.hydra.job.override_dirname = get_overrides_dirname(
                        overrides=[o for o in parsed if not o.is_hydra_override()],
                        kv_sep=dirname.kv_sep,
                        item_sep=dirname.item_sep,
                        exclude_keys=list(dirname.exclude_keys),
                    )
        except Exception as e:  # noqa: BLE001 - Hydra's composition errors have many types
            raise UserError(f"{where}: {_first_line(e)}") from e
        with open_dict(config.hydra.job):
            config.hydra.job.num = job_num
        if is_trainer_config(config):
            from lingua_sweep.config import check_known_keys
            from lingua_sweep.preflight import preflight

            try:
                check_known_keys(config)
                preflight(config)  # the root is typed by `train_schema`: types already checked
            except UserError as e:
                raise UserError(f"{where}: {e}") from e
        return config


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
    # Where and with which commit is not what: those keys are left out.
    keys = [k for k in config if k not in ("hydra", "cluster", "code_version")]
    content = OmegaConf.to_container(OmegaConf.masked_copy(config, keys), resolve=False)
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _first_line(e: BaseException) -> str:
    """Hydra's message on one line, minus its `+key` hint: the schema rejects new keys anyway."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("To append to your config use")]
    return " ".join(lines) or type(e).__name__
