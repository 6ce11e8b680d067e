"""Run configuration: one typed dataclass, validated in one place.

Defaults follow the FSL-SAGE paper where they apply (q=5, l=10, 100 alignment epochs, alignment
batch 1000, buffer 1000, Adam 1e-3 / weight decay 1e-4 for client and server, Adam 1e-3 for the
auxiliary model). ``batch_size=0`` and ``model="auto"`` pick per dataset: 256 and resnet18 for
CIFAR (the paper), 32 and the small ``cnn`` for the embedded MNIST-5k data.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ALGORITHMS = ("fedavg", "splitfed_v1", "splitfed_v2", "cse_fsl", "fsl_sage")
SCHEDULES = ("sequential", "parallel")
DATASETS = ("mnist5k", "cifar10", "cifar100", "synthetic", "femnist", "tinyimagenet")
PARTITIONS = ("iid", "dirichlet", "shards")
QUANTIZE = ("none", "int8", "int4")
PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("adam", "sgd")  # client and server
DIST_FEDAVG = ("ordered", "allreduce")  # distributed FedAvg: chain in client order | one all-reduce


class ConfigError(ValueError):
    """A bad option value; the CLI prints the message and exits with status 2."""


@dataclass
class Config:
    algorithm: str = "fsl_sage"
    model: str = "auto"
    aux: str = "default"
    dataset: str = "mnist5k"
    data_dir: str | None = None
    partition: str = "iid"
    alpha: float | None = None
    shards_per_client: int = 2  # --partition shards
    clients: int = 10
    clients_per_round: int = 0  # M sampled per round (uniform, without replacement); 0: all
    dropout_prob: float = 0.0  # a participant fails during the round with this probability
    client_store: str = "off"  # off | memory | disk: per-client state off the hot set (engines/store.py)
    client_profile: str | None = None  # simulated clock: a preset (fsl_fast.clock.PRESETS) or a JSON file
    rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 0
    server_update_interval: int = 5
    align_interval: int = 10
    align_epochs: int = 100
    align_batch_size: int = 1000
    buffer_size: int = 1000
    lr: float = 1e-3
    weight_decay: float = 1e-4
    aux_lr: float = 1e-3
    optimizer: str = "adam"  # client and server optimizer (the auxiliary keeps Adam with aux_lr)
    momentum: float = 0.0  # SGD only
    nesterov: bool = False  # SGD only
    lr_schedule: str = "constant"  # constant | cosine | multistep:M1,M2,...:GAMMA (per round)
    warm_start: str | None = None  # run directory (or its checkpoint) whose models start this run
    seed: int = 0
    schedule: str = "sequential"
    comm_budget_gib: float | None = None
    quantize: str = "none"
    quantize_group_size: int = 0
    stochastic_rounding: bool = False
    fused: bool = False
    client_batching: str = "auto"
    precision: str = "fp32"
    log_estimate_quality: bool = False
    device: str = "cpu"
    threads: int = 0
    eval_batch_size: int = 1000
    eval_every: int = 1  # test evaluation every N rounds (and the last round, the budget's round)
    tensorboard: bool = False  # also write the per-round scalars as TensorBoard events (out/tensorboard)
    # distributed runtime (fsl_fast/distributed.py; launched by torchrun)
    distributed: bool = False
    dist_timeout: float = 300.0
    dist_fedavg: str = "ordered"
    extra: dict = field(default_factory=dict)

    # -- resolution --------------------------------------------------------------------------
    def resolved(self) -> "Config":
        c = dataclasses.replace(self)
        cifar = c.dataset.startswith("cifar") or c.dataset == "tinyimagenet"  # natural RGB images
        if c.model == "auto":
            c.model = "resnet18" if cifar else "cnn"
        if c.batch_size == 0:
            c.batch_size = 256 if cifar else 32
        if c.lr_schedule == "cosine":  # anneal over this run's rounds, fixed at creation (resume)
            c.lr_schedule = f"cosine:{c.rounds}"
        if c.quantize == "int4" and c.quantize_group_size == 0:
            c.quantize_group_size = 32
        c.validate()
        return c

    def validate(self) -> None:
        def choice(name, allowed):
            v = getattr(self, name)
            if v not in allowed:
                raise ConfigError(f"--{name.replace('_', '-')}: unknown value {v!r} (choose from {', '.join(allowed)})")

        choice("algorithm", ALGORITHMS)
        choice("schedule", SCHEDULES)
        if not self.dataset.startswith("synthetic:"):
            choice("dataset", DATASETS)
        choice("partition", PARTITIONS)
        choice("quantize", QUANTIZE)
        choice("client_batching", ("auto", "loop", "vmap"))
        choice("precision", PRECISIONS)
        choice("dist_fedavg", DIST_FEDAVG)
        from fsl_fast.optim import parse_lr_schedule

        choice("optimizer", OPTIMIZERS)
        if not (0.0 <= self.momentum < float("inf")):
            raise ConfigError(f"--momentum: must be >= 0, got {self.momentum!r}")
        if self.optimizer != "sgd" and (self.momentum or self.nesterov):
            raise ConfigError("--momentum/--nesterov: only with --optimizer sgd (Adam has its own betas)")
        if self.nesterov and not self.momentum > 0:
            raise ConfigError("--nesterov: needs --momentum > 0")
        try:
            parse_lr_schedule(self.lr_schedule)
        except ValueError as e:
            raise ConfigError(f"--lr-schedule: {e}") from None
        from fsl_fast.models import AUX_NAMES, MODEL_NAMES

        from fsl_fast.models import is_factory_name

        if not is_factory_name(self.model):
            if ":" in str(self.model):
                raise ConfigError(f"--model: {self.model!r} is not of the form package.module:factory")
            choice("model", MODEL_NAMES)
            choice("aux", AUX_NAMES)
        elif not isinstance(self.aux, str) or not self.aux:
            raise ConfigError(f"--aux: expected a name, got {self.aux!r}")
        for name in ("clients", "rounds", "local_epochs", "batch_size", "server_update_interval",
                     "align_interval", "align_epochs", "align_batch_size", "buffer_size",
                     "eval_batch_size", "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be a positive integer, got {v!r}")
        for name in ("lr", "aux_lr"):
            v = getattr(self, name)
            if not (v > 0 and v < float("inf")):
                raise ConfigError(f"--{name.replace('_', '-')}: must be a positive number, got {v!r}")
        if not (self.weight_decay >= 0 and self.weight_decay < float("inf")):
            raise ConfigError(f"--weight-decay: must be >= 0, got {self.weight_decay!r}")
        if not isinstance(self.clients_per_round, int) or not 0 <= self.clients_per_round <= self.clients:
            raise ConfigError(f"--clients-per-round: must be 0 (all) or 1..{self.clients} (--clients), "
                              f"got {self.clients_per_round!r}")
        if self.distributed and 0 < self.clients_per_round < self.clients:
            raise ConfigError("--clients-per-round: the distributed runtime trains every client every "
                              "round; partial participation runs in process only")
        if not (0.0 <= self.dropout_prob <= 1.0):
            raise ConfigError(f"--dropout-prob: must be a probability in [0, 1], got {self.dropout_prob!r}")
        if self.distributed and self.dropout_prob > 0:
            raise ConfigError("--dropout-prob: simulated dropouts run in process only")
        if self.tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise ConfigError("--tensorboard: the tensorboard package is not installed "
                                  "(pip install tensorboard, or fsl_fast[tensorboard])")
        choice("client_store", ("off", "memory", "disk"))
        if self.client_store != "off":
            if not self.fused:
                raise ConfigError("--client-store: the fused engine's option (add --fused)")
            if not 0 < self.clients_per_round:
                raise ConfigError("--client-store: needs --clients-per-round M (memory then grows with M)")
            if self.distributed:
                raise ConfigError("--client-store: in-process runs only")
            if self.warm_start:
                raise ConfigError("--warm-start: not available with --client-store yet")
        if self.distributed and self.client_profile:
            raise ConfigError("--client-profile: the simulated clock runs in process only")
        if self.distributed and self.warm_start:
            raise ConfigError("--warm-start: in-process runs only (start the distributed run from scratch)")
        if self.threads < 0:
            raise ConfigError(f"--threads: must be >= 0 (0 = torch default), got {self.threads}")
        if self.seed < 0:
            raise ConfigError(f"--seed: must be >= 0, got {self.seed}")
        if isinstance(self.shards_per_client, bool) or not isinstance(self.shards_per_client, int) \
                or self.shards_per_client < 1:
            raise ConfigError(f"--shards-per-client: must be a positive integer, got {self.shards_per_client!r}")
        if self.dataset == "femnist" and self.partition != "iid":
            raise ConfigError("--partition: femnist is split by writer (one client per writer); leave "
                              "--partition at its default")
        if self.dataset == "femnist" and not self.data_dir:
            raise ConfigError("--dataset femnist: needs --data-dir DIR with LEAF's train/*.json and test/*.json")
        if self.dataset == "tinyimagenet" and not self.data_dir:
            raise ConfigError("--dataset tinyimagenet: needs --data-dir DIR with Tiny ImageNet's folders")
        if self.partition == "dirichlet":
            if self.alpha is None or not (self.alpha > 0 and self.alpha < float("inf")):
                raise ConfigError(f"--alpha: dirichlet partition needs a positive finite alpha, got {self.alpha!r}")
        if self.comm_budget_gib is not None and not (self.comm_budget_gib > 0):
            raise ConfigError(f"--comm-budget-gib: must be positive, got {self.comm_budget_gib!r}")
        if self.quantize_group_size < 0:
            raise ConfigError(f"--quantize-group-size: must be >= 0, got {self.quantize_group_size}")
        if self.quantize == "int4" and self.quantize_group_size % 2:
            raise ConfigError(f"--quantize-group-size: int4 needs an even group size, got {self.quantize_group_size}")
        if not (self.dist_timeout > 0 and self.dist_timeout < float("inf")):
            raise ConfigError(f"--dist-timeout: must be a positive number of seconds, got {self.dist_timeout!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"--device: expected cpu or cuda[:N], got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"--device {self.device}: CUDA is not available on this machine")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_file_dict(self) -> dict:
        """config.json's content: the fields plus the file format version."""
        from fsl_fast.faults import FORMAT_VERSION

        return {"format_version": FORMAT_VERSION, **self.to_dict()}

    @classmethod
    def from_file_dict(cls, d: dict, where: str = "config.json") -> "Config":
        """Read config.json's content (ConfigError, exit 2, for a format this version cannot read)."""
        from fsl_fast.faults import check_version

        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        d = dict(d)
        check_version("run configuration", d.pop("format_version", None), where)
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"config: unknown keys {sorted(unknown)}")
        return cls(**d)
