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


def _o(default, help: str, *, choices=None, type=None, metavar=None):
    """A Config field that is a command-line option (see Config.cli_options)."""
    return field(default=default, metadata={"help": help, "choices": choices, "type": type, "metavar": metavar})


class ConfigError(ValueError):
    """A bad option value; the CLI prints the message and exits with status 2."""


@dataclass
class Config:
    # Every option of ``python -m fsl_fast.train`` is a field here: its name (--name-with-dashes),
    # type, default, help and choices; the command line is generated from them (cli_options()).
    algorithm: str = _o("fsl_sage", "which algorithm to train", choices=ALGORITHMS)
    fedavg_server: str = _o("copies", "FedAvg's server half: copies (each client trains its own copy; "
                            "they are averaged with the clients) | shared (one server half that every "
                            "client steps in turn, never averaged: how the FSL-SAGE authors' code runs "
                            "FedAvg)", choices=("copies", "shared"))
    model: str = _o("auto", "cnn | simple_conv | resnet18 | resnet50 | resnet56 | resnet110 | auto (resnet18 "
                    "for CIFAR and Tiny ImageNet, cnn otherwise) | package.module:factory (your own: "
                    "factory(in_shape, num_classes) -> (client, server, aux))")
    aux: str = _o("default", "auxiliary model: default | linear | layer3 (resnet18, resnet50) | layer2 "
                  "(resnet56, resnet110); for a factory model, any name other than default is passed "
                  "to it as aux=NAME")
    dataset: str = _o("mnist5k", " | ".join(DATASETS) + " | synthetic:CxHxW[:N] (mnist5k is embedded)")
    data_dir: str | None = _o(None, "folder holding the dataset's files (CIFAR pickles or .tar.gz, LEAF "
                              "FEMNIST JSON, Tiny ImageNet folders)", type=str)
    partition: str = _o("iid", "iid | dirichlet | shards (the authors' noniid: sorted by label, "
                        "--shards-per-client each)", choices=PARTITIONS)
    alpha: float | None = _o(None, "Dirichlet concentration (with --partition dirichlet)", type=float)
    shards_per_client: int = _o(2, "shards per client with --partition shards")
    clients: int = _o(10, "number of clients")
    clients_per_round: int = _o(0, "sample M clients per round, uniformly without replacement, seeded "
                                "(0 = all)")
    client_store: str = _o("off", "with --fused and --clients-per-round M: keep only the M clients of the "
                           "round in the engine and park the others' state (optimizer moments, FSL-SAGE "
                           "auxiliaries and buffers) in memory or in files under OUT/client_store "
                           "(lossless; off = every client in the engine)", choices=("off", "memory", "disk"))
    dropout_prob: float = _o(0.0, "each participant fails during a round with this probability, after a "
                             "uniformly drawn number of its local iterations; its update is discarded "
                             "(seeded)")
    client_profile: str | None = _o(None, "simulated clock: per-client compute speed, bandwidths and "
                                    "latency from a preset (uniform, mobile) or a JSON file; metrics.jsonl "
                                    "gets each round's simulated seconds", type=str, metavar="PRESET|FILE")
    rounds: int = _o(20, "training rounds")
    local_epochs: int = _o(1, "local epochs per round")
    batch_size: int = _o(0, "0 = auto: 256 for CIFAR and Tiny ImageNet, 32 otherwise")
    server_update_interval: int = _o(5, "q: upload every q-th local iteration")
    align_interval: int = _o(10, "l: align every l rounds")
    align_epochs: int = _o(100, "alignment epochs")
    align_batch_size: int = _o(1000, "alignment batch size")
    buffer_size: int = _o(1000, "alignment buffer rows per client")
    lr: float = _o(1e-3, "client and server learning rate")
    weight_decay: float = _o(1e-4, "client and server L2 weight decay")
    aux_lr: float = _o(1e-3, "auxiliary Adam learning rate")
    optimizer: str = _o("adam", "client and server optimizer: adam (the paper) | sgd; the auxiliary keeps "
                        "Adam", choices=OPTIMIZERS)
    momentum: float = _o(0.0, "SGD momentum")
    nesterov: bool = _o(False, "SGD with Nesterov momentum")
    lr_schedule: str = _o("constant", "per-round learning-rate schedule of client and server: constant | "
                          "cosine[:T] (to 0 at round T, default T = --rounds) | multistep:M1,M2,...:GAMMA "
                          "(times GAMMA from each milestone round on)", metavar="SPEC")
    warm_start: str | None = _o(None, "start from the models of another run (its directory or checkpoint "
                                "file): client, server and, when that run kept one per client of this run, "
                                "the auxiliaries; optimizers, schedule and round counter start fresh",
                                type=str, metavar="RUN")
    seed: int = _o(0, "seed of data order, partition, initial models and every draw")
    schedule: str = _o("sequential", "sequential (the authors' code) | parallel", choices=SCHEDULES)
    comm_budget_gib: float | None = _o(None, "stop when the paper-convention total reaches this", type=float)
    quantize: str = _o("none", "uplink smashed-data quantization (the same as --uplink int8|int4)",
                       choices=QUANTIZE)
    quantize_group_size: int = _o(0, "group size of the quantization stage when none is given with "
                                  ":gG (0 = per-row scales for int8; int4 and int2 default 32)")
    stochastic_rounding: bool = _o(False, "stochastic rounding in the quantization stages")
    uplink: str = _o("none", "smashed-data codec: none, or comma-separated stages topk:F, "
                     "int8|int4|int2[:gG], ef (e.g. topk:0.05,int4 or int2:g64 or int4,ef); docs/codecs.md")
    downlink: str = _o("none", "SplitFed cut-layer gradient codec (stages as --uplink; ef keeps the "
                       "residual on the server)")
    fused: bool = _o(False, "use the fused engine (fast path)")
    client_batching: str = _o("auto", "fused engine: run clients one by one (loop) or as one vmapped "
                              "computation (auto: vmap on CUDA)", choices=("auto", "loop", "vmap"))
    precision: str = _o("fp32", "fp32 | bf16: torch convolutions and matrix products of client, server "
                        "and auxiliary models in bfloat16 (AMX / tensor cores); weights, optimizer states, "
                        "FedAvg, the loss, the alignment targets and the wire stay fp32", choices=PRECISIONS)
    log_estimate_quality: bool = _o(False, "FSL-SAGE: before and after each alignment, log per aligned "
                                    "client the cosine between the auxiliary's gradient estimate and the "
                                    "true cut-layer gradient on its buffer, and their norm ratio "
                                    "(metrics.jsonl estimate_quality; costs a server pass); every "
                                    "algorithm: the norm of the averaged client model's change over "
                                    "each round (client_update_norm)")
    hold_estimate_norm: bool = _o(False, "FSL-SAGE ablation: after each alignment, scale each client's "
                                  "gradient estimate so that its norm on the client's buffer stays what it "
                                  "was before the alignment (the factors accumulate; metrics.jsonl "
                                  "estimate_scale)")
    eval_every: int = _o(1, "evaluate on the test set every N rounds, and always in the last round and "
                         "the round that reaches --comm-budget-gib; other rounds log test_accuracy null",
                         metavar="N")
    tensorboard: bool = _o(False, "also write each round's scalars (metrics.jsonl's numbers) as TensorBoard "
                           "events into OUT/tensorboard (needs the tensorboard package)")
    device: str = _o("cpu", "cpu | cuda[:N]")
    threads: int = _o(0, "torch intra-op threads (0 = torch default)")
    eval_batch_size: int = 1000  # (not a command-line option)
    # distributed runtime (fsl_fast/distributed/ and fsl_fast/transport/; launched by torchrun)
    distributed: bool = _o(False, "distributed runtime: launch with torchrun; rank 0 = server, ranks 1.. "
                           "host the clients")
    dist_timeout: float = _o(300.0, "seconds a rank waits for a peer before failing")
    dist_fedavg: str = _o("ordered", "ordered (running sum passed through the client ranks in client "
                          "order, bit-equal to the in-process run) | allreduce (one all-reduce)",
                          choices=DIST_FEDAVG)
    tolerate_dropouts: bool = _o(False, "distributed runtime: a client rank that dies is dropped (its "
                                 "clients leave the run) and the others go on; launch with "
                                 "python -m fsl_fast.launch (torchrun stops every worker when one fails)")
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

        for f in dataclasses.fields(self):  # the options with a fixed set of values
            if f.metadata.get("choices"):
                choice(f.name, f.metadata["choices"])
        if not self.dataset.startswith("synthetic:"):
            choice("dataset", DATASETS)
        from fsl_fast.optim import parse_lr_schedule

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
        if self.client_store != "off":
            if not self.fused:
                raise ConfigError("--client-store: the fused engine's option (add --fused)")
            if not 0 < self.clients_per_round:
                raise ConfigError("--client-store: needs --clients-per-round M (memory then grows with M)")
            if self.distributed:
                raise ConfigError("--client-store: in-process runs only")
            if self.warm_start:
                raise ConfigError("--warm-start: not available with --client-store yet")
        if self.hold_estimate_norm and self.algorithm != "fsl_sage":
            raise ConfigError(f"--hold-estimate-norm: an option of --algorithm fsl_sage, not {self.algorithm}")
        if self.hold_estimate_norm and self.distributed:
            raise ConfigError("--hold-estimate-norm: in-process runs only (an ablation)")
        if self.fedavg_server == "shared" and self.algorithm != "fedavg":
            raise ConfigError(f"--fedavg-server: an option of --algorithm fedavg, not {self.algorithm}")
        if self.fedavg_server == "shared" and self.distributed:
            raise ConfigError("--fedavg-server shared: in-process runs only (the shared server half lives "
                              "in one process)")
        if self.tolerate_dropouts and not self.distributed:
            raise ConfigError("--tolerate-dropouts: an option of the distributed runtime (add --distributed)")
        if self.tolerate_dropouts and self.device.startswith("cuda"):
            raise ConfigError("--tolerate-dropouts: CPU (gloo) only; NCCL cannot drop a rank from a "
                              "communicator mid-run")
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
        from fsl_fast import codec

        if self.uplink != "none" and self.quantize != "none" and self.uplink != self.quantize:
            raise ConfigError(f"--quantize {self.quantize} and --uplink {self.uplink}: give one "
                              "(--quantize is short for --uplink int8|int4)")
        up = codec.parse(codec.uplink_text(self), "--uplink")
        down = codec.parse(self.downlink, "--downlink")
        if up.bits in (4, 2) and up.group is None and self.quantize_group_size % {4: 2, 2: 4}[up.bits]:
            raise ConfigError(f"--quantize-group-size: int{up.bits} needs a group size divisible by "
                              f"{ {4: 2, 2: 4}[up.bits]}, got {self.quantize_group_size}")
        if not down.lossless and self.algorithm not in ("splitfed_v1", "splitfed_v2"):
            raise ConfigError(f"--downlink: only SplitFed sends cut-layer gradients down "
                              f"(--algorithm {self.algorithm} has no such downlink)")
        if not (self.dist_timeout > 0 and self.dist_timeout < float("inf")):
            raise ConfigError(f"--dist-timeout: must be a positive number of seconds, got {self.dist_timeout!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"--device: expected cpu or cuda[:N], got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"--device {self.device}: CUDA is not available on this machine")

    @classmethod
    def cli_options(cls):
        """(field name, option string, argparse keyword arguments) of every command-line option, in
        field order: booleans are flags; every default is None on the parser (so a run knows what
        was given) and shown in the help from the field."""
        out = []
        for f in dataclasses.fields(cls):
            md = f.metadata
            if "help" not in md:
                continue
            kw = {"default": None}
            shown = f.default
            if isinstance(f.default, bool):
                kw["action"] = "store_true"
                help_text = md["help"]
            else:
                kw["type"] = md["type"] or type(f.default)
                if md["choices"]:
                    kw["choices"] = md["choices"]
                if md["metavar"]:
                    kw["metavar"] = md["metavar"]
                help_text = md["help"] + ("" if shown is None else f" (default {shown})")
            kw["help"] = help_text.replace("%", "%%")
            out.append((f.name, "--" + f.name.replace("_", "-"), kw))
        return out

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
