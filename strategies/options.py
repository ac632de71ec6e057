"""The built-in strategies: their options, and where each one's plugin lives.

Declared here, apart from the plugins, so that listing and validating a config never imports
torch or Avalanche: the registry imports a strategy's module only when a run builds it. Each
option says where its default comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from incremental.config.fields import MAX_BATCH, MAX_EPOCHS, MAX_WEIGHT, Component, component, opt
from incremental.config.memory import FLOAT64, TRAINED_PARAMETER_BYTES, MemoryNeed, backbone_width
from incremental.errors import ConfigError
from incremental.registry import STRATEGIES


@dataclass
class ReplayConfig:
    # herding: iCaRL's selection on normalised features; random: a seeded random subset.
    selection: Literal["herding", "random"] = "herding"


@dataclass
class BalancedFinetuningConfig:
    """Finetuning on a class-balanced set after each experience (EEIL, ViTIL, DyTox).

    ``preset: dytox`` is DyTox's recipe (Douillard et al. 2022, ``freeze_ft: [sab]``,
    ``finetuning_lr`` kept constant): the patch and position embeddings and every transformer
    block but the last frozen in eval mode, a constant LR of 0.1x (5e-5 after 5e-4), 20 epochs.
    The defaults are this toolkit's choice, not DyTox's: every parameter trains with a cosine
    decay, kept so that the ViTIL ablation (experiments/vitil_ablation) stays comparable."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "dytox": {"params": "frozen_encoder", "schedule": "constant", "epochs": 20, "lr_scale": 0.1},
    }

    preset: Literal["dytox"] | None = None
    enabled: bool = True
    epochs: int = opt(20, ge=1, le=MAX_EPOCHS)  # DyTox: 20 on CIFAR and ImageNet
    lr_scale: float = opt(0.1, gt=0, le=1000)  # times training.optimizer.lr (DyTox: 5e-5 / 5e-4)
    # all: every parameter; head: the classifier only (EEIL/BiC-style); frozen_encoder: DyTox's
    # freeze_ft [sab] (embeddings and all blocks but the last frozen, in eval mode; ViTs only)
    params: Literal["head", "all", "frozen_encoder"] = "all"
    schedule: Literal["cosine", "constant"] = "cosine"  # DyTox keeps its finetuning LR constant
    batch_size: int | None = opt(None, ge=1, le=MAX_BATCH)  # None: training.batch_size


@dataclass
class DistillationConfig:
    """Logit distillation from the previous model: ``weight * T^2 * KL`` on the old classes.

    The ``T^2`` factor (Hinton et al.) makes weight 1 at T = 2 four times PyCIL's iCaRL KD, which
    has no such factor; ``preset: pycil`` (weight 0.25) gives PyCIL's gradients. Weight 1 with
    ``T^2`` is this toolkit's choice: the gradient scale then does not depend on T."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"pycil": {"temperature": 2.0, "weight": 0.25}}

    preset: Literal["pycil"] | None = None
    enabled: bool = True
    temperature: float = opt(2.0, gt=0, le=1000)  # T = 2 as iCaRL/LwF in PyCIL
    weight: float = opt(1.0, ge=0, le=MAX_WEIGHT)


@dataclass
class ViTILConfig(ReplayConfig):
    # The classifier's LR over the base LR. ViTIL gives no value; 10x is the usual factor for
    # a freshly initialised layer when finetuning, and the digits ablation (experiments/
    # vitil_ablation) measured it. 1 turns the ingredient off.
    head_lr_scale: float = opt(10.0, gt=0, le=10_000)
    head_weight_decay: float | None = opt(None, ge=0, le=10)  # None: training.optimizer.weight_decay
    balanced_finetuning: BalancedFinetuningConfig = field(default_factory=BalancedFinetuningConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)


@dataclass
class GradReweightConfig(ReplayConfig):
    # PILOT's exps/dgr.json: lambda 1, gammar_r 1, T 2 (SGD at 1e-3 with momentum 0.9 and weight
    # decay 5e-4, batch 128, 20 epochs, cosine: the run's training section; 2,000 exemplars:
    # protocol.memory)
    kd_weight: float = opt(1.0, ge=0, le=MAX_WEIGHT)  # lambda, times old / new classes
    temperature: float = opt(2.0, gt=0, le=100)  # T of the distillation
    gamma: float = opt(1.0, ge=0, le=MAX_WEIGHT)  # gammar_r: the new classes' extra damping
    # true: the cross-entropy adds the log of the training label distribution to the logits
    # (PILOT's regularized_cn); false: plain cross-entropy
    logit_adjustment: bool = True
    # kaiming_uniform: new rows as PILOT's SimpleLinear (uniform +-sqrt(3 / d), bias 0); linear:
    # nn.Linear's default (Avalanche's)
    head_init: Literal["kaiming_uniform", "linear"] = "kaiming_uniform"
    # the KD gradient joins the old rows' only when its norm exceeds this fraction of the
    # reweighted CE rows' norm. 0 is PILOT's: at an experience's first step the student's old
    # logits equal the teacher's, so the KD gradient is round-off (1e-8 here) and PILOT's ratio
    # scales that noise up to the CE gradient's size, a direction that changes with the batch's
    # arithmetic (a batch split over ranks, another BLAS); 1e-6 leaves it out
    kd_gradient_floor: float = opt(0.0, ge=0, le=1)


@dataclass
class CoilConfig(ReplayConfig):
    # PILOT's exps/coil.json: sinkhorn 0.464, norm_term 3, reg_term 1e-3, T 2 (SGD at 1e-3 with
    # momentum 0.9 and weight decay 5e-4 on every parameter, batch 64, 10 epochs: the run's
    # training section; 2,000 exemplars: protocol.memory)
    sinkhorn_reg: float = opt(0.464, gt=0, le=100)  # the entropic regulariser of the plans
    sinkhorn_iterations: int = opt(1000, ge=1, le=100_000)  # POT's numItermax
    cost_norm: float = opt(3.0, ge=1, le=100)  # q of the cost ||p_i - p_j||_q between prototypes
    temperature: float = opt(2.0, gt=0, le=100)  # T of every distillation
    # the first epoch's distillation from the rows transported to the new classes (PILOT's 0.001)
    new_branch_weight: float = opt(0.001, ge=0, le=MAX_WEIGHT)
    # reg_term: the later epochs' distillation into the rows transported back, times (epoch / E)^2
    old_branch_weight: float = opt(0.001, ge=0, le=MAX_WEIGHT)
    refresh_every: int = opt(30, ge=1, le=1_000_000)  # iterations between transports back
    # the old classes' prototypes for the new rows: all_data, every training image of theirs
    # (PILOT's); memory, the exemplars only (within the memory budget)
    old_prototypes: Literal["all_data", "memory"] = "all_data"


@dataclass
class MEMOConfig(ReplayConfig):
    # PILOT's exps/memo.json (vit_base_patch16_224_memo: the last block specialised; train_base
    # and train_adaptive false; alpha_aux 1; SGD at 1e-3 with momentum 0.9, weight decay 5e-4 in
    # the first experience and 2e-4 after, on every parameter, batch 32, 10 then 20 epochs: the
    # run's training section; 2,000 exemplars: protocol.memory)
    specialised_blocks: int = opt(1, ge=1, le=64)  # the last blocks copied per experience
    # random: the specialised blocks start from PyTorch's default draws, as PILOT's
    # Specialized_Vit builds its last_block; pretrained: from the pre-trained blocks
    specialised_init: Literal["random", "pretrained"] = "random"
    aux_weight: float = opt(1.0, ge=0, le=MAX_WEIGHT)  # alpha_aux
    train_generalised: bool = False  # train_base: the shared blocks keep training after experience 0
    train_old_specialised: bool = False  # train_adaptive: the older copies keep training


@dataclass
class ExpandableRepresentationConfig(ReplayConfig):
    # PILOT's exps/der.json: the loss clf + aux (SGD at 1e-3 with momentum 0.9, weight decay 5e-4 in
    # the first experience and 2e-4 after, on every parameter, batch 32, 10 epochs: the run's
    # training section; 2,000 exemplars: protocol.memory)
    aux_weight: float = opt(1.0, ge=0, le=MAX_WEIGHT)  # the auxiliary loss's weight (PILOT: 1)


@dataclass
class FOSTERConfig(ReplayConfig):
    # PILOT's exps/foster.json: beta1 0.96, beta2 0.97, lambda_okd 1, T 2, compression 20 epochs at
    # the run's LR without weight decay (SGD at 1e-3 with momentum 0.9 and weight decay 5e-4 on
    # every parameter, batch 32, 20 epochs, a cosine stepped once an epoch: the run's training
    # section; 20 exemplars a class: protocol.memory)
    beta_boosting: float = opt(0.96, ge=0, lt=1)  # beta1: the boosting loss's class-balanced weights
    beta_compression: float = opt(0.97, ge=0, lt=1)  # beta2: the compression's
    kd_weight: float = opt(1.0, ge=0, le=MAX_WEIGHT)  # lambda_okd
    temperature: float = opt(2.0, gt=0, le=100)  # T of both distillations
    compression_epochs: int = opt(20, ge=1, le=MAX_EPOCHS)
    compression_lr: float | None = opt(None, gt=0, le=100)  # None: training.optimizer.lr
    compression_weight_decay: float = opt(0.0, ge=0, le=10)  # PILOT's compression SGD has none


@dataclass
class ICaRLConfig(ReplayConfig):
    # ncm: iCaRL's nearest-mean-of-exemplars; cnn: the trained classifier (PyCIL reports both)
    classifier: Literal["ncm", "cnn"] = "ncm"
    flip_means: bool = True  # iCaRL averages each exemplar's features with its mirror image's


@dataclass
class DERConfig(ReplayConfig):
    selection: Literal["herding", "random"] = "random"  # DER's reservoir buffer holds a random sample
    alpha: float = opt(0.1, ge=0, le=MAX_WEIGHT)  # Avalanche's defaults, from Mammoth's DER++ on Seq-CIFAR-10
    beta: float = opt(0.5, ge=0, le=MAX_WEIGHT)   # 0: DER; > 0: DER++
    batch_size_mem: int | None = opt(None, ge=1, le=MAX_BATCH)  # None: training.batch_size


@dataclass
class LwFConfig:
    alpha: float = opt(1.0, ge=0, le=MAX_WEIGHT)        # distillation weight (Avalanche's and Li & Hoiem's 1)
    temperature: float = opt(2.0, gt=0, le=1000)  # Li & Hoiem's T = 2


@dataclass
class EWCConfig:
    ewc_lambda: float = opt(1000.0, ge=0, le=1e12)  # PyCIL's EWC uses lambda = 1000
    # separate: one penalty per past experience; online: one running penalty (Schwarz et al. 2018)
    mode: Literal["separate", "online"] = "separate"
    decay_factor: float | None = opt(None, ge=0, le=1)  # online mode only

    def validate(self) -> None:
        if self.mode == "online" and self.decay_factor is None:
            raise ConfigError("mode online needs decay_factor (e.g. 0.9)", key="decay_factor")
        if self.mode == "separate" and self.decay_factor is not None:
            raise ConfigError("decay_factor is only used with mode: online", key="decay_factor")


@dataclass
class BiCConfig:
    # Defaults are Avalanche's, which follow Wu et al.: 10% of the memory held out to fit
    # the bias layer, T = 2, 200 epochs of SGD at 0.1 (decayed at 50/100/150) for stage 2.
    val_percentage: float = opt(0.1, gt=0, lt=1)
    temperature: float = opt(2.0, gt=0, le=1000)
    stage_2_epochs: int = opt(200, ge=1, le=MAX_EPOCHS)
    stage_2_lr: float = opt(0.1, gt=0, le=100)
    # -1: Wu et al.'s adaptive weight old/(old+new) between distillation and classification
    distillation_weight: float = opt(-1.0, ge=-1, le=MAX_WEIGHT)


# ----------------------------------------------------------------------------- pre-trained-model methods
# Their defaults are the published ones (PILOT's exps/*.json, the papers); the optimizer, LR,
# epochs and batch size live in `training:`, as the shipped *_ptm protocols set them.


@dataclass
class SimpleCILConfig:
    metric: Literal["cosine", "euclidean"] = "cosine"  # PILOT: a cosine classifier of prototypes


@dataclass
class FirstSessionConfig:
    # how the first session adapts the model (PILOT's aper_adapter / _ssf / _vpt / _finetune,
    # ranpac and fecam: adapters, 20 epochs); frozen: none
    tuning: Component = component("tuning", "adapter")
    tune_epochs: int | None = opt(None, ge=0, le=MAX_EPOCHS)  # None: training.initial_epochs, else epochs
    # the head the first session trains with: cosine, PILOT's CosineLinear (sigma cos, sigma learnt
    # from 1) on the adapted features; linear, nn.Linear on the model's pooled features
    first_session_head: Literal["cosine", "linear"] = "cosine"


@dataclass
class APERConfig(FirstSessionConfig):
    metric: Literal["cosine", "euclidean"] = "cosine"


@dataclass
class RanPACConfig(FirstSessionConfig):
    projection_dim: int = opt(10_000, ge=1, le=100_000)  # M (RanPAC: 10,000)
    validation_fraction: float = opt(0.2, gt=0, lt=1)  # held out of each experience to choose lambda
    # cosine: the ridge weights in a CosineLinear, cos(h, W_c), as RanPAC's and PILOT's code
    # classify; linear: h W^T, the regression's own prediction
    classifier: Literal["cosine", "linear"] = "cosine"
    # float64: G, Q and the solves in fp64 (in fp32, G summed over thousands of images lost its
    # positive definiteness on digits); float32: the reference's arithmetic (RanPAC's and PILOT's
    # code: G and Q in fp32, one fp32 LU solve per candidate lambda and one for the weights)
    precision: Literal["float64", "float32"] = "float64"

    def memory_needs(self, run: Any) -> list[MemoryNeed]:
        # the M x M Gram matrix kept in host RAM (its fp64 solve factorises it in place)
        m, wide = self.projection_dim, self.precision == "float64"
        size, name = (FLOAT64, "fp64") if wide else (FLOAT64 // 2, "fp32")
        return [MemoryNeed("projection_dim", m * m * size, f"RanPAC's {m} x {m} {name} ridge system",
                           on_device=False)]


@dataclass
class FeCAMConfig(FirstSessionConfig):
    # identity: Sigma + alpha I (PILOT's shrink_cov); fecam: Sigma + alpha V1 I + alpha V2 (1 - I),
    # the FeCAM paper's (its alpha1 = alpha2 = 1)
    shrinkage: Literal["identity", "fecam"] = "identity"
    alpha: float = opt(100.0, ge=0, le=1e8)  # PILOT's self.alpha = 100
    # rows_correlation: torch.corrcoef of the shrunk matrix, its rows as variables (PILOT's);
    # correlation: S_ij / sqrt(S_ii S_jj) (the FeCAM paper's normalize_cov)
    normalization: Literal["rows_correlation", "correlation"] = "rows_correlation"
    # Tukey's ladder of powers on the features (the paper's 0.5, for ReLU features); None: none (PILOT)
    tukey_power: float | None = opt(None, gt=0, le=10)


@dataclass
class InfLoRAConfig:
    # liangyanshuo/InfLoRA's configs/cifar100_inflora.json: rank 10, lamb 0.95, lame 1.0 (Adam at
    # 5e-4, batch 128, 20 epochs: the run's training section)
    rank: int = opt(10, ge=1, le=4096)  # r of every task's branch
    lamb: float = opt(0.95, gt=0, le=1)  # DualGPM's share of the spectrum after the first task
    lame: float = opt(1.0, gt=0, le=1)  # ... which moves linearly towards this over the tasks

    def validate(self) -> None:
        if self.lame < self.lamb:
            raise ConfigError(f"lame {self.lame} is below lamb {self.lamb}: the threshold would fall", key="lame")


@dataclass
class ACILConfig:
    # frozen: the backbone as loaded (the reference with a pre-trained backbone and no base
    # classes, main.py's load_pretrain); finetune: trained in the first experience with the linear
    # head, then frozen (the reference's base training); or a parameter-efficient tuning (ViT, Swin)
    tuning: Component = component("tuning", "frozen")
    tune_epochs: int | None = opt(None, ge=0, le=MAX_EPOCHS)  # None: training.initial_epochs, else epochs
    expansion_size: int = opt(8192, ge=1, le=65_536)  # the random buffer's width (--buffer-size 8192, CIFAR-100)
    gamma: float = opt(0.1, gt=0, le=1e8)  # the ridge (--gamma 0.1)
    # rows per recursive update (--IL-batch-size 4096): ACIL's solution does not depend on it
    rls_batch_size: int = opt(4096, ge=1, le=MAX_BATCH)

    STREAMS: ClassVar[int] = 1

    def memory_needs(self, run: Any) -> list[MemoryNeed]:
        # R, the M x M fp64 inverse of each stream, kept in host RAM, plus a block's expanded
        # features, R X^T and K^-1 X R (M x block each)
        m = self.expansion_size
        size = self.STREAMS * m * m * FLOAT64 + 3 * m * self.rls_batch_size * FLOAT64
        return [MemoryNeed("expansion_size", size, f"the {self.STREAMS} x {m} x {m} fp64 recursive least squares",
                           on_device=False)]


@dataclass
class DSALConfig(ACILConfig):
    gamma_comp: float = opt(0.1, gt=0, le=1e8)  # the compensation stream's ridge (--gamma-comp 0.1)
    compensation_ratio: float = opt(0.6, ge=0, le=MAX_WEIGHT)  # C (-C 0.6, the README's CIFAR-100 command)

    STREAMS: ClassVar[int] = 2


@dataclass
class SLCAConfig:
    backbone_lr_scale: float = opt(0.01, ge=0, le=1)  # SLCA's 1/100 of the head's LR
    ca_epochs: int = opt(3, ge=0, le=MAX_EPOCHS)  # classifier alignment epochs (PILOT: 3)
    ca_samples_per_class: int = opt(256, ge=1, le=100_000)
    ca_logit_norm: float | None = opt(0.1, gt=0, le=100)  # None: plain cross-entropy in alignment
    # restore: the aligned head classifies until the next experience starts, which begins from the
    # head as it was before alignment (PILOT's fc.backup() / fc.recall()); keep: alignment's head
    # carries on into later experiences
    head_after_alignment: Literal["restore", "keep"] = "restore"
    # true: the slow learner leaves older classes' head rows as they were (PILOT freezes old heads),
    # so weight decay and momentum do not move them; false: every row is a parameter of the step
    freeze_old_heads: bool = True
    head_init: Literal["trunc_normal", "linear"] = "trunc_normal"  # new rows, as L2P's (PILOT's heads)


@dataclass
class CoFiMAConfig(SLCAConfig):
    # PILOT's exps/cofima.json (SLCA's training values, which the run's training section holds):
    # fisher_weighting true, wt_lambda 0.4; models/cofima.py's fishermax 1e-4
    fisher_weighting: bool = True  # false: the plain average (1 - w) theta_0 + w theta_1
    merge_weight: float = opt(0.4, ge=0, le=1)  # w, the new network's share (wt_lambda)
    fisher_max: float = opt(1e-4, gt=0, le=1e8)  # each Fisher entry's cap (fishermax)
    # times_fisher: a new experience's head rows become F_1 theta_1 in the merge (PILOT's code);
    # trained: they stay as trained (alignment retrains every row after the merge either way)
    new_head_rows: Literal["times_fisher", "trained"] = "times_fisher"
    # the older classes' head rows, which the slow learner leaves as they were: stale_gradient
    # gives them the square of the last gradient that reached them in the previous experience
    # (alignment's last step, or the first experience's last Fisher batch), as PILOT's frozen
    # heads keep that .grad and its Fisher pass adds it; computed: their own Fisher on this data
    old_head_fisher: Literal["stale_gradient", "computed"] = "stale_gradient"


@dataclass
class LAEConfig:
    # PILOT's exps/lae.json: a compensatory prefix PET (pet_cls Prefix, pet_length 10, adapt_blocks
    # 0-4); Adam at 0.0028125, batch 128, 5 epochs, a constant LR: the run's training section
    tuning: Component = component("tuning", "prefix")  # the PET: prefix, adapter, lora, ssf, vpt_deep, finetune
    ema_decay: float = opt(0.9999, ge=0, le=1)  # the offline PET's EMA, after every step (ema_decay)
    freeze_epochs: int = opt(3, ge=0, le=MAX_EPOCHS)  # the PET frozen for each experience's first epochs (num_freeze_epochs)
    # kaiming_uniform: new classes' head rows as PILOT's SimpleLinear (uniform +-sqrt(3 / d), bias 0);
    # linear: nn.Linear's default (Avalanche's)
    head_init: Literal["kaiming_uniform", "linear"] = "kaiming_uniform"

    def validate(self) -> None:
        if self.tuning is not None and self.tuning.name == "frozen":
            raise ConfigError("LAE trains a parameter-efficient module: choose prefix, adapter, lora, ssf, "
                              "vpt_deep or finetune", key="tuning")


@dataclass
class MOSConfig:
    # PILOT's exps/mos.json: adapters of 16 (ffn_num) with scale 0.1 and dropout 0.1, SGD at 0.03
    # with momentum 0.9 and weight decay 5e-4, batch 48, 20 epochs, cosine: the run's training section
    bottleneck: int = opt(16, ge=1, le=16384)
    adapter_scale: float = opt(0.1, gt=0, le=MAX_WEIGHT)
    adapter_dropout: float = opt(0.1, ge=0, lt=1)  # on the bottleneck in training (vit_mos: 0.1)
    adapter_momentum: float = opt(0.1, ge=0, le=1)  # m, the pull towards the earlier sets' mean
    # per_block: before every block of each training forward and after every step (PILOT's
    # forward_features and adapter_merge); per_step: only after every step
    merge: Literal["per_block", "per_step"] = "per_block"
    orth_weight: float = opt(0.1, ge=0, le=MAX_WEIGHT)  # reg
    orth_temperature: float = opt(0.8, gt=0, le=100)  # PILOT's orth_loss divides by 0.8
    head_lr_scale: float = opt(0.1, gt=0, le=1000)  # PILOT trains the head at init_lr x 0.1
    # trunc_normal: new rows from N(0, 0.02) truncated at +-2, bias 0 (timm's head, which PILOT's
    # vit_mos loads); linear: nn.Linear's default (Avalanche's)
    head_init: Literal["trunc_normal", "linear"] = "trunc_normal"
    ca_epochs: int = opt(30, ge=0, le=MAX_EPOCHS)  # crct_epochs
    ca_lr: float = opt(0.005, gt=0, le=10)  # ca_lr
    ca_samples_per_class: int | None = opt(None, ge=1, le=100_000)  # None: 5 x training.batch_size, as PILOT
    rounds: int = opt(4, ge=1, le=100)  # the most sets one image reads at test (MAX_ITER)
    ensemble: bool = True  # the last read's softmax averaged with the prototypes' (ensemble)


@dataclass
class L2PConfig:
    pool_size: int = opt(10, ge=1, le=10_000)
    length: int = opt(5, ge=1, le=1024)
    top_k: int = opt(5, ge=1, le=10_000)
    pull_coefficient: float = opt(0.1, ge=0, le=MAX_WEIGHT)
    batchwise: bool = True  # training: the batch's most frequent keys (as L2P; under torchrun, each rank's shard's)
    pool: Literal["prompt", "token"] = "prompt"  # L2P's head: the mean of the prompt tokens
    # trunc_normal: new classes' head rows drawn from N(0, 0.02) truncated at +-2, bias 0 (PILOT's
    # timm ViT head); linear: nn.Linear's default, uniform +-1/sqrt(d) with a bias (Avalanche's)
    head_init: Literal["trunc_normal", "linear"] = "trunc_normal"

    def validate(self) -> None:
        if self.top_k > self.pool_size:
            raise ConfigError(f"top_k {self.top_k} exceeds pool_size {self.pool_size}", key="top_k")

    def memory_needs(self, run: Any) -> list[MemoryNeed]:
        width = backbone_width(run)
        values = self.pool_size * (self.length + 1) * width  # prompts and their keys
        return [MemoryNeed("pool_size", values * TRAINED_PARAMETER_BYTES,
                           f"a pool of {self.pool_size} prompts of length {self.length} at width {width}")]


@dataclass
class DualPromptConfig:
    g_length: int = opt(5, ge=1, le=1024)
    g_layers: list[int] = opt(factory=lambda: [0, 1], ge=0, le=1023)
    e_length: int = opt(5, ge=1, le=1024)
    e_layers: list[int] = opt(factory=lambda: [2, 3, 4], ge=0, le=1023)
    pool_size: int | None = opt(None, ge=1, le=10_000)  # None: one E-prompt per experience
    pull_coefficient: float = opt(0.1, ge=0, le=MAX_WEIGHT)
    head_init: Literal["trunc_normal", "linear"] = "trunc_normal"  # as L2P's
    # previous: E-prompt t starts as a copy of E-prompt t-1 (PILOT's shared_prompt_pool, on in its
    # dualprompt.json); random: from its own uniform(-1, 1) draw
    e_prompt_init: Literal["previous", "random"] = "previous"

    def memory_needs(self, run: Any) -> list[MemoryNeed]:
        if self.pool_size is None:
            return []
        width = backbone_width(run)
        values = self.pool_size * (2 * self.e_length * len(self.e_layers) + 1) * width  # prefix keys and values
        return [MemoryNeed("pool_size", values * TRAINED_PARAMETER_BYTES,
                           f"a pool of {self.pool_size} E-prompts of length {self.e_length} on "
                           f"{len(self.e_layers)} layers at width {width}")]


@dataclass
class CodaPromptConfig:
    pool_size: int = opt(100, ge=1, le=10_000)
    length: int = opt(8, ge=2, le=1024)
    layers: list[int] = opt(factory=lambda: [0, 1, 2, 3, 4], ge=0, le=1023)
    ortho_weight: float = opt(0.0, ge=0, le=MAX_WEIGHT)  # PILOT's prompt_param[2]

    def memory_needs(self, run: Any) -> list[MemoryNeed]:
        width = backbone_width(run)
        values = self.pool_size * (self.length + 2) * width * len(self.layers)  # components, keys, attention
        return [MemoryNeed("pool_size", values * TRAINED_PARAMETER_BYTES,
                           f"a pool of {self.pool_size} prompt components of length {self.length} on "
                           f"{len(self.layers)} layers at width {width}")]


@dataclass
class EASEConfig:
    bottleneck: int = opt(64, ge=1, le=16384)  # one adapter set per experience (PILOT's ffn_num)
    adapter_scale: float = opt(0.1, gt=0, le=MAX_WEIGHT)
    adapter_dropout: float = opt(0.1, ge=0, lt=1)  # on the bottleneck in training (PILOT's vit_ease: 0.1)
    # true: after each experience, every old experience's classes are complemented afresh in every
    # later subspace d, from the classes of experiences d.. (PILOT's recalc_sim, on in ease.json);
    # false: only into the newest subspace, from the newest classes, earlier complements kept
    recalc_sim: bool = True
    # true: a class's logit weighs its own experience's subspace 1 and each other seen one
    # alpha / t (PILOT's forward_reweight, use_reweight in ease.json); false: one cosine over the
    # concatenated features
    use_reweight: bool = True
    alpha: float = opt(0.1, ge=0, le=MAX_WEIGHT)  # ease.json
    # the head each experience trains its adapters with: cosine, PILOT's (a fresh sigma cos on
    # the experience's own subspace, sigma from 1); linear, nn.Linear on the concatenated features
    training_head: Literal["cosine", "linear"] = "cosine"


@dataclass
class GANReplayConfig:
    """Generative replay (Shin et al. 2017) with a class-conditional GAN (incremental.memory.gan):
    hinge loss, spectral norm, a projection discriminator and DiffAugment by default.

    The generator is the whole memory: its bytes count towards ``protocol.memory.bytes``, and
    ``width: null`` picks the widest generator that fits that budget (32 without one). The
    discriminator is rebuilt each experience and not kept."""

    loss: Literal["hinge", "wgan_gp"] = "hinge"
    width: int | None = opt(None, ge=4, le=1024)  # the generator's blocks; its 4x4 map has twice that
    max_width: int = opt(128, ge=4, le=1024)  # the widest ``width: null`` may pick (training time grows with it)
    z_dim: int = opt(32, ge=1, le=4096)  # DCGAN's 100 would take most of a small budget
    discriminator_width: int = opt(32, ge=4, le=1024)
    steps: int = opt(1000, ge=1, le=10_000_000)  # generator updates per experience
    d_steps: int = opt(1, ge=1, le=20)  # discriminator updates per generator update (WGAN-GP: 5)
    batch_size: int = opt(64, ge=2, le=MAX_BATCH)
    lr: float = opt(2e-4, gt=0, le=1.0)  # Adam, betas (0, 0.9), as SNGAN
    diffaugment: bool = True
    gp_weight: float = opt(10.0, ge=0, le=MAX_WEIGHT)
    # the share of each classifier batch that is generated old-class samples (0: finetuning)
    mix_ratio: float = opt(0.5, ge=0, le=0.95)
    # condition: a generated sample's label is the class it was generated for (conditional
    # replay, Lesort et al. 2019; the default, since this GAN is class-conditional); solver: the
    # previous experience's model's prediction among the old classes, as DGR (Shin et al. 2017)
    # labels its unconditional generator's samples
    labels: Literal["condition", "solver"] = "condition"
    storage: Literal["float32", "float16"] = "float32"  # the generator's weights as kept
    quality_samples: int = opt(100, ge=2, le=100_000)  # generated per class to score them
    # where the Frechet distance of generated to test images is measured: pixels_8x8, the eval
    # images average-pooled to 8 x 8 (one space for every step and run: digits' own resolution);
    # model, the current model's pooled features (a space that changes at every step)
    frechet_space: Literal["pixels_8x8", "model"] = "pixels_8x8"
    grid_samples: int = opt(8, ge=1, le=64)  # per class, in TensorBoard


@dataclass
class ZeroShotConfig:
    # all: every class name of the dataset from the first experience (CLIP's zero-shot evaluation
    # over the whole label set); seen: the names of the classes seen so far (PROOF's ZS-CLIP,
    # the same classifier as continual_clip)
    classes: Literal["all", "seen"] = "all"


@dataclass
class CLIPReplayConfig(ReplayConfig):
    """Replay plus feature distillation through the old classes' text embeddings: the KL between
    the old and the new model's CLIP logits over the old classes, ``weight * T^2 * KL``."""

    distill_weight: float = opt(1.0, ge=0, le=MAX_WEIGHT)
    temperature: float = opt(2.0, gt=0, le=100)


@dataclass
class PROOFConfig(ReplayConfig):
    """PROOF's options (Zhou et al. 2025); defaults from its repository's exps/cifar.json."""

    prompt_length: int = opt(3, ge=1, le=1024)  # context prompts added per experience
    dropout: float = opt(0.1, ge=0, lt=1)  # in the fusion attention
    # batch: the repository's code, which averages the fused text and prototype tokens over the
    # batch (so an image's logits depend on the rest of its batch); instance: each image attends
    # over its own copy of the text, prototype and prompt tokens, as the paper writes it
    fusion: Literal["instance", "batch"] = "batch"


STRATEGIES.declare("finetune", "incremental.strategies.finetune:Finetune",
                   summary="Naive finetuning: new data only, no memory, no regularisation (the lower bound).")
STRATEGIES.declare("gan_replay", "incremental.strategies.gan_replay:GANReplay", config=GANReplayConfig,
                   summary="Generative replay: a class-conditional GAN (hinge, spectral norm, projection D, DiffAugment).")
STRATEGIES.declare("replay", "incremental.strategies.replay:ExemplarReplay", config=ReplayConfig,
                   summary="Exemplar replay: class-balanced memory (herding), mixed into each experience's data.")
STRATEGIES.declare("vitil", "incremental.strategies.vitil:ViTIL", config=ViTILConfig,
                   summary="ViTIL: herding replay, head LR scaling, balanced finetuning, logit KD (each switchable).")
STRATEGIES.declare("icarl", "incremental.strategies.icarl:build_icarl", config=ICaRLConfig,
                   summary="iCaRL: herding replay, Avalanche's iCaRL loss and NCMClassifier (nearest mean of "
                   "exemplars).")
STRATEGIES.declare("lwf", "incremental.strategies.lwf:build_lwf", config=LwFConfig,
                   summary="LwF: distillation from the previous model on new data only (Avalanche's LwFPlugin).")
STRATEGIES.declare("ewc", "incremental.strategies.ewc:build_ewc", config=EWCConfig,
                   summary="EWC: a Fisher-weighted quadratic penalty on parameter changes (Avalanche's EWCPlugin).")
STRATEGIES.declare("bic", "incremental.strategies.bic:build_bic", config=BiCConfig,
                   summary="BiC: replay, distillation and a bias layer fitted on held-out exemplars (Avalanche's "
                   "BiCPlugin).")
STRATEGIES.declare("der", "incremental.strategies.der:DarkExperienceReplay", config=DERConfig,
                   summary="DER++: replay of exemplars with their stored logits (MSE) and labels (CE).")
STRATEGIES.declare("gdumb", "incremental.strategies.gdumb:build_gdumb",
                   summary="GDumb: retrain from scratch on a class-balanced memory only (Avalanche's GDumbPlugin).")
STRATEGIES.declare("simplecil", "incremental.strategies.simplecil:SimpleCIL", config=SimpleCILConfig,
                   summary="SimpleCIL: the frozen pre-trained model and a prototype (class-mean) classifier.")
STRATEGIES.declare("aper", "incremental.strategies.aper:APER", config=APERConfig,
                   summary="APER: first-session adaptation, then prototypes on the adapted and the original features.")
STRATEGIES.declare("ranpac", "incremental.strategies.ranpac:RanPAC", config=RanPACConfig,
                   summary="RanPAC: a random projection with ReLU and a ridge-regression head, accumulated over "
                   "experiences.")
STRATEGIES.declare("fecam", "incremental.strategies.fecam:FeCAM", config=FeCAMConfig,
                   summary="FeCAM: first-session adaptation, then per-class Mahalanobis distances from shrunk "
                   "covariances.")
STRATEGIES.declare("inflora", "incremental.strategies.inflora:InfLoRA", config=InfLoRAConfig,
                   summary="InfLoRA: per-task LoRA on keys and values, down-projections orthogonal to the old "
                   "tasks' inputs (DualGPM).")
STRATEGIES.declare("acil", "incremental.strategies.acil:ACIL", config=ACILConfig,
                   summary="ACIL: a frozen random ReLU expansion and a ridge head by recursive least squares "
                   "(exemplar-free, closed form).")
STRATEGIES.declare("dsal", "incremental.strategies.dsal:DSAL", config=DSALConfig,
                   summary="DS-AL: ACIL's stream plus a tanh stream fitted to its residual on the current classes.")
STRATEGIES.declare("slca", "incremental.strategies.slca:SLCA", config=SLCAConfig,
                   summary="SLCA: a slow backbone, a fast head, and classifier alignment from class Gaussians.")
STRATEGIES.declare("cofima", "incremental.strategies.cofima:CoFiMA", config=CoFiMAConfig,
                   summary="CoFiMA: SLCA with the network a Fisher-weighted merge of the previous and the new one.")
STRATEGIES.declare("lae", "incremental.strategies.lae:LAE", config=LAEConfig,
                   summary="LAE: an online PET trained on, an offline EMA copy, and the max-softmax ensemble of both.")
STRATEGIES.declare("mos", "incremental.strategies.mos:MOS", config=MOSConfig,
                   summary="MOS: an adapter set per experience merged towards the earlier ones, aligned head, "
                   "self-refined set retrieval.")
STRATEGIES.declare("grad_reweight", "incremental.strategies.grad_reweight:GradientReweighting",
                   config=GradReweightConfig,
                   summary="Gradient reweighting (DGR): logit-adjusted CE, KD, and class-balanced classifier gradients.")
STRATEGIES.declare("coil", "incremental.strategies.coil:Coil", config=CoilConfig,
                   summary="Coil: replay, with the new and old head rows tied by optimal transport between class "
                   "prototypes.")
STRATEGIES.declare("memo", "incremental.strategies.memo:MEMO", config=MEMOConfig,
                   summary="MEMO: shared generalised blocks, a specialised block copy per experience, herding replay.")
STRATEGIES.declare("expandable_representation",
                   "incremental.strategies.expandable_representation:ExpandableRepresentation",
                   config=ExpandableRepresentationConfig,
                   summary="DER (Yan et al.): a whole ViT copy per experience, an auxiliary head, herding replay.")
STRATEGIES.declare("foster", "incremental.strategies.foster:FOSTER", config=FOSTERConfig,
                   summary="FOSTER: feature boosting with a second ViT, then compression into one by balanced KD.")
STRATEGIES.declare("l2p", "incremental.strategies.prompting:L2P", config=L2PConfig,
                   summary="L2P: a prompt pool with learned keys on a frozen pre-trained ViT.")
STRATEGIES.declare("dualprompt", "incremental.strategies.prompting:DualPrompt", config=DualPromptConfig,
                   summary="DualPrompt: a shared G-prompt and task E-prompts as attention prefixes.")
STRATEGIES.declare("codaprompt", "incremental.strategies.prompting:CodaPrompt", config=CodaPromptConfig,
                   summary="CODA-Prompt: attention-weighted prompt components as attention prefixes.")
STRATEGIES.declare("ease", "incremental.strategies.ease:EASE", config=EASEConfig,
                   summary="EASE: an adapter subspace per experience and prototypes complemented across subspaces.")
STRATEGIES.declare("zeroshot", "incremental.strategies.clip:ZeroShot", config=ZeroShotConfig,
                   summary="Zero-shot CLIP: no training; the classifier is the class names' text embeddings.")
STRATEGIES.declare("continual_clip", "incremental.strategies.clip:ContinualCLIP",
                   summary="Continual-CLIP: zero-shot CLIP over the class names seen so far (Thengane et al. 2022).")
STRATEGIES.declare("clip_replay", "incremental.strategies.clip:CLIPReplay", config=CLIPReplayConfig,
                   summary="CLIP finetuning: text-initialised head, herding replay, distillation through old text "
                   "embeddings.")
STRATEGIES.declare("proof", "incremental.strategies.proof:PROOF", config=PROOFConfig,
                   summary="PROOF: frozen CLIP, per-experience projections and cross-modal fusion with replay.")
