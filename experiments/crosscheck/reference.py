"""The toolkit's pre-trained-model methods against their reference implementations, side by side.

    python experiments/crosscheck/reference.py --pilot-root PATH --continual-clip-root PATH
        --mcm-root PATH --proof-root PATH --acl-root PATH [--methods simplecil ranpac_frozen ...]
        [--seeds 1993 1994 1995] [--out runs/crosscheck_reference]

Each PATH is a checkout of a reference: LAMDA-PILOT (github.com/LAMDA-CL/LAMDA-PILOT) for its
methods (simplecil, ranpac_*, aper_adapter, fecam, slca, cofima, the prompt methods, ease, lae, mos,
grad_reweight: PILOT's dgr),
vgthengane/Continual-CLIP for continual_clip, deeplearning-wisc/MCM for mcm, zhoudw-zdw/PROOF
for proof*, ZHUANGHP/Analytic-continual-learning for acil* and dsal (analytic_references.py),
liangyanshuo/InfLoRA for inflora (inflora_reference.py);
only the checkouts of the methods run are needed. Their
learners are imported from there and run in this process; nothing of their code is copied into
this project. Both sides get, per seed:

- the same weights. For PILOT's methods with nothing to train (simplecil, ranpac_*) one timm
  ``vit_tiny_patch16_224`` built at 32 px with 4-px patches and one input channel (the digits'),
  initialised by timm from the seed; for those that train (aper_adapter, slca, l2p, dualprompt,
  codaprompt, ease) the protocol's ViT (128 wide, 4 blocks) pretrained for the seed by
  ``incremental pretrain-mae`` on the base classes' training images (as
  experiments/pretrained/run_digits.py makes it), read through its class token as PILOT reads
  every ViT. Each is saved to a safetensors file; the toolkit loads it as ``backbone.pretrained``,
  PILOT gets it in its own ViT classes (pilot_models.py). For the CLIP methods the toolkit's
  ``clip-tiny``, contrastively pretrained for the seed by experiments/clip/run_digits.py's
  ``pretrain`` (random weights would make every zero-shot figure chance); the references get
  the same open_clip module (clip_references.py says how it stands in for what they load);
- the same images, labels and class order: the toolkit's digits (eval transform: resized to
  32 px and normalised), in the toolkit's class order for the seed, B0 with 2 classes a step;
- the same hyper-parameters (the reference's exps/*.json or config where the method has them).

What the harness changes in PILOT to run it here, each written into reference.md:

- ``utils.inc_net.get_backbone`` returns the shared ViT instead of downloading ViT-B/16
  (pilot_models.py ``stand_in_backbones``): for the ``*_adapter`` and ``*_ease`` backbone types,
  PILOT's adapter ViT (``backbone/vit_adapter.py``, ``vit_ease.py``, built by their constructors
  at the shared ViT's size with the AdaptFormer config PILOT gives them) holding the shared
  weights, converted as PILOT converts timm's (the fused qkv split, ``mlp.fc*`` renamed), all but
  the adapters frozen as there; for the prompt types (``*_l2p``, ``*_dualprompt``,
  ``*_coda_prompt``) PILOT's own ``get_backbone`` runs, with the arguments it passes, and its
  ``timm.create_model`` builds the module's VisionTransformer at the shared ViT's size, loading the
  weights through the module's own ``checkpoint_filter_fn``;
- PILOT's ``CodaPromptVitNet`` hard-codes ViT-B's width 768 for its head and ``CodaPrompt``
  (and ``CodaPrompt``'s ``key_dim``): both are rebuilt by PILOT's classes at the shared width;
  ``EaseCosineLinear.forward_reweight``'s ``out_dim`` defaults to 768 and EASE's network does not
  pass it: it defaults to the shared width (pilot_models.py ``at_shared_width``). PILOT's ``LAE``
  network sets its ViT's ``out_dim`` to 768 and hard-codes ``adapt_blocks`` 0-4: its feature width
  is the shared ViT's and the blocks are cut to the ViT's 4 (``lae_net``); its ``vit_lae`` module
  imports ``timm.models.layers.helpers``, gone from timm 1.0, aliased to ``timm.layers.helpers``.
  CODA-Prompt's ViT's forward adds in place to ``torch.zeros(.., requires_grad=True).to(device)``, a copy on
  a GPU and the leaf itself on the CPU, where that fails; it gets the copy (``TorchAsOnAGPU``).
  PILOT's ``vit_base_patch16_224_mos`` downloads timm's ViT-B/16: its ``vit_mos`` VisionTransformer
  is built at the shared size with the shared weights instead (``adapter_vit``), its head of all
  the classes drawn as timm draws a ViT head (N(0, 0.02) truncated, zero bias); ``MOSNet`` sets
  its ViT's ``out_dim`` to 768, here the shared width (``mos_net``);
- ``mos_reference_stored_sets_kept`` is PILOT's MOS evaluated without its merge, whose
  ``forward_features`` with ``train=False`` rewrites the stored adapter set it reads at every
  forward; training is PILOT's own (``keep_stored_sets``);
- the training values of l2p, dualprompt, codaprompt and ease are PILOT's exps/*.json read from
  the checkout, with the changes METHODS names: DualPrompt's E-prompt blocks [2, 3, 4] become
  [2, 3] (the ViT has 4 blocks), EASE trains 5 epochs a task instead of 20 (on both sides, for
  time);
- a stand-in for PILOT's DataManager serves the toolkit's tensors (``get_task_size``,
  ``get_dataset``, exemplars as ``appendent``), in the eval transform for every mode, the test
  images class by class as PILOT's DataManager orders them; the toolkit's side of a method that
  trains runs with ``dataset.augment: false``;
- the learners' DataLoader workers are 0 (PILOT's 8, and the 4 of MOS's class-mean pass and of
  the exemplar passes in ``models/base.py``, would fork on a 2-core machine); PILOT's DGR builds
  its logit prior with ``.cuda()``, which leaves it on the CPU here (``TorchOnTheCPU``); and
  ``topk`` is capped at the classes seen (PILOT's 5 fails with 2 classes a step);
- ``timm.models.layers.weight_init`` (PILOT's import, gone from timm 1.0) is aliased to
  ``timm.layers.weight_init``;
- RanPAC with a frozen ViT is PILOT's RanPAC with ``tuned_epoch: 0``, whose ``_init_train``
  fails without an epoch (its last log line reads a variable the loop sets), so the harness
  skips that call, which is what zero epochs do;
- PILOT's FeCAM saves its network after the first session (``save_checkpoint``, a pickle in the
  working directory): the harness skips that call, which changes nothing it computes;
- the ``*_shared_projection`` rows replace the W_rand PILOT's ``setup_RP`` draws by the one the
  toolkit's run drew (read from its checkpoint), after that call, so both sides project alike;
- the ``*_reference_per_image`` rows are the same PILOT run as their method's, evaluated after each
  task a second time with the prompt pool's ``batchwise_prompt`` off: PILOT's L2P and DualPrompt
  choose the prompts of a test batch by its majority, on test batches sorted by class;
- ``codaprompt_reference_toolkit_schedule`` is PILOT's CODA-Prompt trained as the toolkit trains:
  every epoch's last partial batch kept (its loader drops it) and the LR a half-cosine over the
  task's iterations, set every step (its own is a quarter period, stepped once an epoch).

Writes reference.md next to this file: per method, last and average incremental accuracy over
the seeds (mean ± std) for both sides and the gap (for mcm: AUROC and FPR95), with each
reference's commit.
"""

from __future__ import annotations

import argparse
import functools
import json
import hashlib
import re
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from clip_references import PROOF_OVERRIDES  # noqa: E402
from pilot_models import (SHARED_VITS, TorchOnTheCPU, at_shared_width, follow_toolkit_cosine, shared_kind,  # noqa: E402
                         shared_vit, stand_in_backbones)
from run_common import is_complete, mean_std  # noqa: E402

PROTOCOL = "digits_b0_5steps"
VIT = "vit_tiny_patch16_224"
PILOT_RANPAC = ("models.ranpac", {"model_name": "ranpac", "M": 1000, "use_RP": True, "use_input_norm": False,
                                   "tuned_epoch": 0})
# the prompt methods as PILOT's exps run them: a constant LR (its optimizer rebuilt every task, as
# the toolkit's is), no weight decay, 5 epochs a task, no augmentation on either side
PROMPT_TRAINING = ["dataset.augment=false", "training.epochs=5", "training.scheduler={name: constant}"]
# PILOT chooses L2P's and DualPrompt's prompts batchwise at test too, on test loaders sorted by
# class; a *_reference_per_image row evaluates the same PILOT run with a choice per image
PER_IMAGE = "_reference_per_image"
# PILOT's exps/slca.json and exps/cofima.json: the whole ViT at 1/100 of the head's LR 0.01, 20
# epochs, the LR x0.1 at epoch 18, batch 64
SLCA_TRAINING = ["dataset.augment=false", "training.epochs=20", "training.batch_size=64",
                 "training.optimizer={name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 0.0005}",
                 "training.scheduler={name: step, milestones: [18], gamma: 0.1}"]
# MEMO's and DER's training as PILOT's exps/memo.json and der.json set it (see their rows)
METHODS_MEMO = ["strategy=memo", "protocol.memory={total: 200}", "dataset.augment=false", "training.epochs=5",
                "training.batch_size=32", "training.optimizer={name: sgd, lr: 0.001, momentum: 0.9, "
                "weight_decay: 0.0002, initial_weight_decay: 0.0005, weight_decay_on: all}",
                "training.scheduler={name: constant}"]
METHODS = {  # name: (the toolkit's overrides, PILOT's module, PILOT's args or {"exps": its file, changes})
    "simplecil": ("strategy=simplecil", "models.simplecil", {"model_name": "simplecil"}),
    "ranpac_frozen": ("strategy={name: ranpac, tuning: frozen, projection_dim: 1000}", *PILOT_RANPAC),
    # the departures measured one at a time: ours in the reference's fp32 arithmetic; then also
    # PILOT given the toolkit's W_rand (the one draw the two sides do not share otherwise)
    "ranpac_frozen_fp32": ("strategy={name: ranpac, tuning: frozen, projection_dim: 1000, precision: float32}",
                           *PILOT_RANPAC),
    "ranpac_frozen_fp32_shared_projection": (
        "strategy={name: ranpac, tuning: frozen, projection_dim: 1000, precision: float32}", *PILOT_RANPAC),
    "ranpac_frozen_shared_projection": ("strategy={name: ranpac, tuning: frozen, projection_dim: 1000}",
                                        *PILOT_RANPAC),
    # PILOT's exps/aper_aperpter.json: adapters (ffn_num 64) trained 20 epochs in the first session
    # through a cosine head, SGD, batch 48; no augmentation on either side (PILOT is served eval
    # images). On this randomly initialised ViT the adapters barely move (loss 0.694 -> 0.690 in
    # 120 steps; at LR 0.1, 0.696 -> 0.679), so both sides end at SimpleCIL's accuracy: the row
    # checks the plumbing (dual branch, prototypes), not the adaptation
    "aper_adapter": (["strategy={name: aper, tuning: {name: adapter, bottleneck: 64}}", "dataset.augment=false",
                      "training.epochs=20", "training.batch_size=48",
                      "training.optimizer={name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 0.0005}",
                      "training.scheduler={name: cosine, min_lr_ratio: 0.0}"],
                     "models.aper_adapter", {"model_name": "aper_adapter", "backbone_type": "vit_adapter_shared",
                                             "tuned_epoch": 20, "init_lr": 0.01, "batch_size": 48,
                                             "weight_decay": 0.0005, "min_lr": 0, "ffn_num": 64}),
    # PILOT's exps/fecam.json: APER's first session (adapters, ffn_num 64, 20 epochs, cosine head,
    # SGD 0.01, batch 48), then per-class shrunk covariances (alpha 100) and Mahalanobis distances
    "fecam": (["strategy={name: fecam, tuning: {name: adapter, bottleneck: 64}}", "dataset.augment=false",
               "training.epochs=20", "training.batch_size=48",
               "training.optimizer={name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 0.0005}",
               "training.scheduler={name: cosine, min_lr_ratio: 0.0}"],
              "models.fecam", {"exps": "fecam.json"}),
    # PILOT's exps/slca.json: the whole ViT at 1/100 of the head's LR 0.01, 20 epochs, the LR x0.1
    # at epoch 18, batch 64; alignment 3 epochs on 256 samples a class with logit norm 0.1
    "slca": (["strategy=slca", *SLCA_TRAINING],
             "models.slca", {"model_name": "slca", "lrate": 0.01, "weight_decay": 5e-4, "batch_size": 64,
                             "lrate_decay": 0.1, "epochs": 20, "ca_epochs": 3, "ca_with_logit_norm": 0.1,
                             "milestones": [18]}),
    # PILOT's exps/cofima.json: SLCA's values (above), Fisher weighting, wt_lambda 0.4
    "cofima": (["strategy=cofima", *SLCA_TRAINING], "models.cofima",
               {"exps": "cofima.json", "model_name": "cofima"}),
    # ours with the older head rows' Fisher computed on the data, against the same PILOT runs
    "cofima_computed_old_head_fisher": (["strategy={name: cofima, old_head_fisher: computed}", *SLCA_TRAINING],
                                        "models.cofima", {"exps": "cofima.json", "model_name": "cofima"}),
    # PILOT's exps/l2p.json, read from the checkout: Adam 0.001875, batch 16, 5 epochs a task,
    # pool 10, length 5, top 5, the pull constraint 0.1, the prompt tokens' mean as the features
    "l2p": (["strategy={name: l2p, pool_size: 10, length: 5, top_k: 5}", *PROMPT_TRAINING,
             "training.batch_size=16", "training.optimizer={name: adam, lr: 0.001875, weight_decay: 0.0}"],
            "models.l2p", {"exps": "l2p.json"}),
    # PILOT's exps/dualprompt.json: Adam 0.001, batch 24, 5 epochs, G-prompt on blocks 0-1, a pool of
    # 10 E-prompts; its E-prompt blocks [2, 3, 4] are [2, 3] on both sides, as the ViT has 4 blocks
    "dualprompt": (["strategy={name: dualprompt, g_layers: [0, 1], e_layers: [2, 3], pool_size: 10}", *PROMPT_TRAINING,
                    "training.batch_size=24", "training.optimizer={name: adam, lr: 0.001, weight_decay: 0.0}"],
                   "models.dualprompt", {"exps": "dualprompt.json", "e_prompt_layer_idx": [2, 3]}),
    # PILOT's exps/coda_prompt.json: Adam 0.001, batch 128, 20 epochs, cosine, 100 components of
    # length 8 on blocks 0-4 (the ViT's 0-3: PILOT's block 4 prompts are never read), no
    # orthogonality penalty. PILOT's loader drops the last partial batch and its cosine is a quarter
    # period per epoch (cos(99 pi e / 200 (K - 1))); the toolkit keeps every batch and steps a
    # half-cosine per iteration
    "codaprompt": (["strategy={name: codaprompt, pool_size: 100, length: 8, layers: [0, 1, 2, 3]}",
                    "dataset.augment=false", "training.epochs=20", "training.batch_size=128",
                    "training.optimizer={name: adam, lr: 0.001, weight_decay: 0.0}",
                    "training.scheduler={name: cosine, min_lr_ratio: 0.0}"],
                   "models.coda_prompt", {"exps": "coda_prompt.json"}),
    # PILOT's exps/ease.json: adapters (ffn_num 64) trained through a cosine head, SGD 0.025, batch
    # 48, cosine; prototypes complemented afresh (recalc_sim), logits reweighted (use_reweight, alpha
    # 0.1); 5 epochs a task on both sides instead of its 20, for time on 2 CPU cores
    "ease": (["strategy={name: ease, bottleneck: 64}", "dataset.augment=false", "training.epochs=5",
              "training.batch_size=48",
              "training.optimizer={name: sgd, lr: 0.025, momentum: 0.9, weight_decay: 0.0005}",
              "training.scheduler={name: cosine, min_lr_ratio: 0.0}"],
             "models.ease", {"exps": "ease.json", "init_epochs": 5, "later_epochs": 5}),
    # PILOT's exps/lae.json: a compensatory prefix of 10 tokens in blocks 0-4 (the ViT's 0-3), Adam
    # 0.0028125, batch 128, 5 epochs, a constant LR, the PET frozen for 3 epochs, EMA decay 0.9999
    "lae": (["strategy=lae", *PROMPT_TRAINING, "training.batch_size=128",
             "training.optimizer={name: adam, lr: 0.0028125, weight_decay: 0.0}"], "models.lae", {"exps": "lae.json"}),
    # PILOT's exps/dgr.json: the whole ViT and a linear head, SGD 1e-3 with weight decay on every
    # parameter, batch 128, its cosine stepped once an epoch (ours: epoch_cosine), herding exemplars (200 here: 20 a class, as its 2,000 are
    # on CIFAR-100), lambda 1, gamma 1, T 2; 5 epochs a task on both sides instead of its 20, for time
    "grad_reweight": (["strategy=grad_reweight", "protocol.memory={total: 200}", "dataset.augment=false",
                       "training.epochs=5", "training.batch_size=128",
                       "training.optimizer={name: sgd, lr: 0.001, momentum: 0.9, weight_decay: 0.0005, "
                       "weight_decay_on: all}", "training.scheduler={name: epoch_cosine}"],
                      "models.dgr", {"exps": "dgr.json", "memory_size": 200, "init_epoch": 5, "epochs": 5}),
    # PILOT's exps/coil.json: the whole ViT and a cosine head, SGD 1e-3 with weight decay 5e-4 on
    # every parameter, batch 64, 10 epochs (its milestones 80 and 120 never reached: a constant LR),
    # herding exemplars (200 here: 20 a class, as its 2,000 are on CIFAR-100), Sinkhorn 0.464, the
    # 3-norm cost, reg_term 1e-3, T 2
    "coil": (["strategy=coil", "protocol.memory={total: 200}", "dataset.augment=false", "training.epochs=10",
              "training.batch_size=64", "training.optimizer={name: sgd, lr: 0.001, momentum: 0.9, "
              "weight_decay: 0.0005, weight_decay_on: all}", "training.scheduler={name: constant}"],
             "models.coil", {"exps": "coil.json", "memory_size": 200}),
    # PILOT's exps/memo.json: the last block specialised (from PyTorch's default draws, as its
    # vit_memo builds it), SGD 1e-3 with momentum 0.9 and weight decay on every parameter (5e-4 in
    # the first task, 2e-4 after), batch 32, its milestones never reached (a constant LR), herding
    # exemplars (200 here: 20 a class, as its 2,000 are on CIFAR-100), alpha_aux 1; 5 epochs a task
    # on both sides instead of its 10 and 20, for time
    "memo": (METHODS_MEMO, "models.memo", {"exps": "memo.json", "memory_size": 200, "init_epoch": 5, "epochs": 5}),
    # PILOT's exps/der.json (DER, Yan et al.; the toolkit's der is Dark Experience Replay): a whole
    # ViT per task, SGD 1e-3 with momentum 0.9 and weight decay on every parameter (5e-4 in the
    # first task, 2e-4 after), batch 32, its milestones never reached, 200 herding exemplars, aux
    # loss weight 1; 5 epochs a task on both sides instead of its 10, for time
    "expandable_representation": (
        ["strategy=expandable_representation", *[o for o in METHODS_MEMO if o != "strategy=memo"]],
        "models.der", {"exps": "der.json", "memory_size": 200, "init_epoch": 5, "epochs": 5}),
    # PILOT's exps/foster.json: SGD 1e-3 with momentum 0.9 and weight decay 5e-4 on every parameter,
    # batch 32, a cosine stepped once an epoch, the compression without weight decay, 20 herding
    # exemplars a class (fixed_memory), beta1 0.96, beta2 0.97, lambda_okd 1, T 2; 10 epochs in each
    # phase on both sides instead of its 20, for time
    "foster": (["strategy={name: foster, compression_epochs: 10}", "protocol.memory={per_class: 20}",
                "dataset.augment=false", "training.epochs=10", "training.batch_size=32",
                "training.optimizer={name: sgd, lr: 0.001, momentum: 0.9, weight_decay: 0.0005, weight_decay_on: all}",
                "training.scheduler={name: epoch_cosine}"],
               "models.foster", {"exps": "foster.json", "fixed_memory": True, "memory_per_class": 20, "init_epochs": 10,
                                 "boosting_epochs": 10, "compression_epochs": 10}),
    # PILOT's exps/mos.json: adapters of 16, SGD 0.03 (the head at 0.003), batch 48, 20 epochs,
    # cosine; merge momentum 0.1, orthogonality 0.1; alignment 30 epochs at 0.005; the ensemble
    "mos": (["strategy=mos", "dataset.augment=false", "training.epochs=20", "training.batch_size=48",
             "training.optimizer={name: sgd, lr: 0.03, momentum: 0.9, weight_decay: 0.0005}",
             "training.scheduler={name: cosine, min_lr_ratio: 0.0}"], "models.mos", {"exps": "mos.json"}),
}
for _prompted in ("l2p", "dualprompt"):  # the same two runs, PILOT's evaluated with a prompt choice per image
    METHODS[_prompted + PER_IMAGE] = METHODS[_prompted]
# the same run of ours against PILOT's CODA trained with the toolkit's batches and LR schedule
TOOLKIT_SCHEDULE = "_reference_toolkit_schedule"
METHODS["codaprompt" + TOOLKIT_SCHEDULE] = METHODS["codaprompt"]
# the same run of ours against PILOT's MOS evaluated without merging its stored adapter sets
STORED_SETS_KEPT = "_reference_stored_sets_kept"
METHODS["mos" + STORED_SETS_KEPT] = METHODS["mos"]
CLIP_BACKBONE = "backbone={{name: clip, model: clip-tiny, pretrained: {weights}}}"
MCM_TEMPLATE = "a photo of a {}"  # MCM's detection_util: f"a photo of a {c}", no full stop
CLIP_METHODS = {  # name: (the toolkit's overrides, the reference's checkout option, its template)
    # Continual-CLIP's configs/class/*.yaml prompt_template
    "continual_clip": (["strategy=continual_clip", 'protocol.templates=["a bad photo of a {}."]'],
                       "continual_clip_root", "a bad photo of a {}."),
    # MCM's score is the OOD probe's msp on the text head (temperature 1), over every unseen test image
    "mcm": (["strategy=continual_clip", f'protocol.templates=["{MCM_TEMPLATE}"]',
             "probes=[{name: ood, head: text, scores: [msp], temperature: 1.0, num_samples: 100000}]"],
            "mcm_root", MCM_TEMPLATE),
    # exps/cifar.json's training values, 200 exemplars, no augmentation (the reference gets eval images)
    "proof": (PROOF_OVERRIDES, "proof_root", "a photo of a {}."),
    # the same run of ours against the reference with the toolkit's normalisation patched in
    "proof_reference_normalised": (PROOF_OVERRIDES, "proof_root", "a photo of a {}."),
}
# rows that change only the toolkit's side: the PILOT run they are compared with
SAME_REFERENCE = {"cofima_computed_old_head_fisher": "cofima"}
# name: (the toolkit's overrides, the reference's checkout option, the reference's options: beyond
# analytic_references.ANALYTIC_DEFAULTS, or InfLoRA's config file); the analytic methods at the
# defaults (one block per experience), and
# ACIL in blocks of 32 rows (a buffer of 1024: the reference forms an M x M x M product per block)
EXTERNAL_METHODS = {
    "acil": (["strategy=acil"], "acl_root", {}),
    "dsal": (["strategy=dsal"], "acl_root", {}),
    "acil_blocks_of_32": (["strategy={name: acil, expansion_size: 1024, rls_batch_size: 32}"], "acl_root",
                          {"expansion_size": 1024, "rls_batch_size": 32}),
    # liangyanshuo/InfLoRA's configs/cifar100_inflora.json: rank 10, Adam 5e-4, batch 128, no weight
    # decay; 5 epochs a task on both sides instead of its 20, for time; its LR a quarter cosine
    # stepped per epoch, the toolkit's a half-cosine per iteration (as CODA-Prompt's)
    "inflora": (["strategy={name: inflora, rank: 10}", "dataset.augment=false", "training.epochs=5",
                 "training.batch_size=128", "training.optimizer={name: adam, lr: 0.0005, weight_decay: 0.0}",
                 "training.scheduler={name: cosine, min_lr_ratio: 0.0}"], "inflora_root",
                {"init_epoch": 5, "epochs": 5}),
}
# at the config's 20 epochs a task (60 Adam steps on these digits, where 5 epochs leave the head
# near its random draw), ours with the reference's LR schedule (epoch_quarter_cosine, as the
# shipped inflora.yaml)
EXTERNAL_METHODS["inflora_20_epochs"] = (
    [*EXTERNAL_METHODS["inflora"][0][:2], "training.epochs=20", *EXTERNAL_METHODS["inflora"][0][3:5],
     "training.scheduler={name: epoch_quarter_cosine}"], "inflora_root", {"init_epoch": 20, "epochs": 20})
# the same run of ours against the reference trained with the toolkit's LR schedule
EXTERNAL_METHODS["inflora" + TOOLKIT_SCHEDULE] = (*EXTERNAL_METHODS["inflora"][:2],
                                                  {**EXTERNAL_METHODS["inflora"][2], "toolkit_schedule": True})


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pilot-root", type=Path, help="a checkout of LAMDA-PILOT")
    parser.add_argument("--continual-clip-root", type=Path, help="a checkout of vgthengane/Continual-CLIP")
    parser.add_argument("--mcm-root", type=Path, help="a checkout of deeplearning-wisc/MCM")
    parser.add_argument("--proof-root", type=Path, help="a checkout of zhoudw-zdw/PROOF")
    parser.add_argument("--acl-root", type=Path, help="a checkout of ZHUANGHP/Analytic-continual-learning")
    parser.add_argument("--inflora-root", type=Path, help="a checkout of liangyanshuo/InfLoRA")
    names = [*METHODS, *CLIP_METHODS, *EXTERNAL_METHODS]
    parser.add_argument("--methods", nargs="+", default=names, choices=names)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1993, 1994, 1995])
    parser.add_argument("--out", type=Path, default=Path("runs/crosscheck_reference"))
    args = parser.parse_args()
    needed = {"pilot_root": ("models/simplecil.py", "https://github.com/LAMDA-CL/LAMDA-PILOT"),
              "continual_clip_root": ("continual_clip/models.py", "https://github.com/vgthengane/Continual-CLIP"),
              "mcm_root": ("utils/detection_util.py", "https://github.com/deeplearning-wisc/MCM"),
              "proof_root": ("models/proof.py", "https://github.com/zhoudw-zdw/PROOF"),
              "acl_root": ("analytic/ACIL.py", "https://github.com/ZHUANGHP/Analytic-continual-learning"),
              "inflora_root": ("methods/inflora.py", "https://github.com/liangyanshuo/InfLoRA")}
    for method in args.methods:
        option = reference_of(method)
        root, (marker, url) = getattr(args, option), needed[option]
        if root is None or not (root / marker).is_file():
            parser.error(f"{method} runs against the reference code: --{option.replace('_', '-')} must name a "
                         f"checkout of {url.rsplit('/', 1)[1]} (git clone {url}); it is imported from there")
    return args


def import_pilot(root: Path) -> str:
    """PILOT's packages importable from ``root``; its commit."""
    import timm.layers.helpers
    import timm.layers.weight_init

    from clip_references import checkout_commit

    sys.modules.setdefault("timm.models.layers.weight_init", timm.layers.weight_init)
    sys.modules.setdefault("timm.models.layers.helpers", timm.layers.helpers)  # backbone/vit_lae.py's to_2tuple
    return checkout_commit(root)


def vit_kind(method: str) -> str:
    """The shared ViT ``method`` runs on: the MAE encoder for the methods that train it."""
    return "random" if method == "simplecil" or method.startswith("ranpac") else "mae"


class Items(torch.utils.data.Dataset):
    """(index, image, label) as PILOT's DummyDataset yields them; ``labels`` as it keeps them."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, int]:
        return index, self.images[index], int(self.labels[index])


class DigitsManager:
    """What PILOT's learners read of its DataManager, over the toolkit's digits: labels are
    positions in the toolkit's class order for the seed (PILOT's ``_map_new_class_index``)."""

    def __init__(self, seed: int):
        from incremental.config import load_config
        from incremental.data import build_dataset
        from incremental.protocol import label_texts, make_class_split

        cfg, _ = load_config(PROTOCOL, [f"seed={seed}", f"protocol.order_seed={seed}"])
        splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
        split = make_class_split(cfg.protocol, splits.num_classes, cfg.seed)
        position = {c: i for i, c in enumerate(split.class_order)}
        self.data = {}
        for source, data in (("train", splits.train), ("test", splits.test)):
            images = torch.stack([splits.eval_transform(data[i][0]) for i in range(len(data))])
            self.data[source] = (images, np.array([position[int(t)] for t in data.targets]))
        self._increments = [len(r) for r in split.label_ranges()]
        self.dataset_name = "digits"
        self.image_size = splits.image_size
        self.class_texts = label_texts(splits.class_names, split.class_order)  # what a text tower reads

    @property
    def nb_tasks(self) -> int:
        return len(self._increments)

    def get_task_size(self, task: int) -> int:
        return self._increments[task]

    def get_total_classnum(self) -> int:
        return sum(self._increments)

    @property
    def nb_classes(self) -> int:  # Coil's prototype tables are this long
        return self.get_total_classnum()

    def getlen(self, index: int) -> int:
        """What PILOT's ``DataManager.getlen`` returns, which FOSTER reads as class ``index``'s
        training-image count: ``np.sum(np.where(y == index))``, the sum of those images' positions
        (where the count was meant; on CIFAR-100 PILOT's FOSTER uses 500 instead)."""
        return int(np.sum(np.where(self.data["train"][1] == index)))

    def get_dataset(self, indices: Any, source: str, mode: str, appendent: Any = None, ret_data: bool = False,
                    m_rate: Any = None) -> Any:
        """The images of classes ``indices`` (and ``appendent``'s, the learner's exemplars as it
        stores them: image arrays and labels); every mode gets the eval transform. Test images come
        class by class, as PILOT serves them; training images in the toolkit's order (PILOT's
        training loaders shuffle)."""
        images, labels = self.data[source]
        keep = np.flatnonzero(np.isin(labels, np.asarray(indices)))
        if source == "test":  # class by class, as PILOT's DataManager concatenates them (its L2P's
            keep = keep[np.argsort(labels[keep], kind="stable")]  # batchwise test prompts read that)
        images, labels = images[torch.from_numpy(keep)], labels[keep]
        if appendent is not None and len(appendent) and len(appendent[1]):  # SLCA passes []
            images = torch.cat([images, torch.as_tensor(np.asarray(appendent[0]), dtype=images.dtype)])
            labels = np.concatenate([labels, np.asarray(appendent[1], dtype=labels.dtype)])
        dataset = Items(images, labels)
        return (images.numpy(), labels, dataset) if ret_data else dataset


def pilot_args(root: Path, method: str, manager: DigitsManager, seed: int) -> dict[str, Any]:
    """PILOT's args for ``method`` on these digits: its exps/<method>.json's training values (the
    file itself where METHODS names it, with the changes written there), the protocol's split,
    the CPU."""
    changes = dict(METHODS[method][2])
    exps = json.loads((root / "exps" / changes.pop("exps")).read_text()) if "exps" in changes else {}
    return {"tuned_epoch": 0, "init_lr": 0.01, "batch_size": 48, "weight_decay": 0.0005, "min_lr": 0.0,
            "optimizer": "sgd", "backbone_type": VIT, **exps, "prefix": "crosscheck", "dataset": "digits",
            "memory_size": 0, "memory_per_class": 0, "fixed_memory": False, "shuffle": False,
            "init_cls": manager.get_task_size(0), "increment": manager.get_task_size(1),
            "device": [torch.device("cpu")], "seed": seed, "nb_classes": manager.get_total_classnum(),
            "nb_tasks": manager.nb_tasks, **changes}


def prompt_pool(learner: Any) -> Any:
    """The prompt pool whose batchwise choice PILOT's L2P or DualPrompt learner uses; None for others."""
    backbone = getattr(learner._network, "backbone", None)
    return getattr(backbone, "prompt", None) or getattr(backbone, "e_prompt", None)


def run_pilot(root: Path, method: str, seed: int, vit_path: Path, manager: DigitsManager,
              projection: torch.Tensor | None = None, init_seed: int | None = None) -> dict[str, list[float]]:
    """PILOT's learner for ``method`` through every step (given ``projection`` as its W_rand, if
    any; its torch seed ``init_seed`` when given, else ``seed``); its top-1 accuracy on the seen
    classes after each (PILOT's own ``eval_task``). For L2P and DualPrompt also with the prompts
    chosen per image at test ("per_image")."""
    import importlib

    from clip_references import use_checkout

    use_checkout(root)
    import utils.inc_net as inc_net

    stand_in_backbones(inc_net, vit_path)  # the shared ViT, no download
    module = importlib.import_module(METHODS[method][1])
    module.num_workers = 0
    at_shared_width(module, inc_net, vit_path)
    if method.startswith("ranpac_frozen"):  # 0 epochs: PILOT's _init_train logs a variable only its loop sets
        module.Learner._init_train = lambda self, *args, **kwargs: None
    if method == "fecam":  # its first session pickles the network into the working directory
        module.Learner.save_checkpoint = lambda self, *args, **kwargs: None
    module.DataLoader = functools.partial(in_process_loader, keep_last=method.endswith(TOOLKIT_SCHEDULE))
    sys.modules["models.base"].DataLoader = in_process_loader  # its exemplar passes ask for 4 workers
    if method.startswith("grad_reweight"):
        module.torch = TorchOnTheCPU()
    if method.startswith("foster"):  # its compression logs a top-5 curve, which fewer than 5 classes lack
        evaluate = module.BaseLearner._evaluate
        module.Learner._evaluate = lambda self, y_pred, y_true: {"top5": None, **evaluate(self, y_pred, y_true)}
    if hasattr(module, "MOSNet"):
        keep_stored_sets(method.endswith(STORED_SETS_KEPT))
    torch.manual_seed(seed if init_seed is None else init_seed)
    learner = module.Learner(pilot_args(root, method, manager, seed))
    if method.endswith(TOOLKIT_SCHEDULE):
        toolkit_schedule(learner)
    if projection is not None:
        learner.setup_RP = shared_projection(learner.setup_RP, learner, projection)
    curves: dict[str, list[float]] = {"pilot": []}
    for _ in range(manager.nb_tasks):
        learner.incremental_train(manager)
        learner.topk = min(5, learner._total_classes)
        curves["pilot"].append(float(learner.eval_task()[0]["top1"]))
        pool = prompt_pool(learner)
        if pool is not None and pool.batchwise_prompt:
            pool.batchwise_prompt = False
            curves.setdefault("per_image", []).append(float(learner.eval_task()[0]["top1"]))
            pool.batchwise_prompt = True
        learner.after_task()
    return curves


def ours_run(method: str) -> str:
    """The toolkit's run a row reads: a row that changes only PILOT's side reads its method's."""
    return method.removesuffix(PER_IMAGE).removesuffix(TOOLKIT_SCHEDULE).removesuffix(STORED_SETS_KEPT)


def in_process_loader(*args: Any, keep_last: bool = False, **kwargs: Any) -> torch.utils.data.DataLoader:
    """A DataLoader without worker processes (PILOT's MOS asks for 4 in its class-mean pass); with
    ``keep_last``, keeping each epoch's last partial batch, as the toolkit's training does."""
    return torch.utils.data.DataLoader(*args, **{**kwargs, "num_workers": 0, **({"drop_last": False} if keep_last else {})})


def keep_stored_sets(kept: bool) -> None:
    """With ``kept``, PILOT's MOS ViT evaluated without its merge: its ``forward_features`` with
    ``train=False`` runs ``reweight_adapter`` on the stored set it reads, which rewrites that set
    in place at every forward; here the merge's momentum is 0 during such a call (training is
    unchanged). Without, PILOT's own."""
    from backbone import vit_mos

    original = vit_mos.VisionTransformer.__dict__.get("_pilot_forward_features",
                                                        vit_mos.VisionTransformer.forward_features)
    vit_mos.VisionTransformer._pilot_forward_features = original
    if not kept:
        vit_mos.VisionTransformer.forward_features = original
        return

    def forward_features(self: Any, x: torch.Tensor, adapter_id: int, train: bool) -> Any:
        if train:
            return original(self, x, adapter_id, train)
        momentum, self.config.adapter_momentum = self.config.adapter_momentum, 0.0
        try:
            return original(self, x, adapter_id, train)
        finally:
            self.config.adapter_momentum = momentum
    vit_mos.VisionTransformer.forward_features = forward_features


def toolkit_schedule(learner: Any) -> None:
    """``learner``'s LR as the toolkit schedules a cosine: a half period over the task's
    iterations, set before every step (PILOT's CODA steps a quarter period once an epoch)."""
    build = learner.get_optimizer

    def get_optimizer() -> torch.optim.Optimizer:
        optimizer = build()
        follow_toolkit_cosine(optimizer, len(learner.train_loader), learner.args["tuned_epoch"])
        return optimizer
    learner.get_optimizer = get_optimizer
    learner.get_scheduler = lambda optimizer: None


def shared_projection(setup: Any, learner: Any, projection: torch.Tensor) -> Any:
    """PILOT's ``setup_RP``, then ``projection`` in place of the W_rand it drew."""
    def setup_with_projection() -> None:
        setup()
        learner.W_rand = learner._network.W_rand = projection.to(learner.W_rand.dtype)
    return setup_with_projection


def projection_of(run_dir: Path) -> torch.Tensor:
    """The W_rand of the toolkit's RanPAC run in ``run_dir`` (its checkpoint's plugin state)."""
    plugins = torch.load(run_dir / "checkpoint.pt", weights_only=True)["plugins"]
    return next(state["projection"] for state in plugins if isinstance(state, dict) and "projection" in state)


def run_ours(method: str, seed: int, backbone: str, out: Path, extra: Sequence[str] = ()) -> dict[str, Any]:
    """The toolkit's run of ``method`` on the shared ``backbone`` (an override), with ``extra``
    overrides last; its metrics.json."""
    from incremental.cli import main

    if not is_complete(out):
        if out.exists():  # a stopped run: run afresh (the run is deterministic given its seed)
            shutil.rmtree(out)
        overrides = {**METHODS, **CLIP_METHODS, **EXTERNAL_METHODS}[method][0]
        overrides = [overrides] if isinstance(overrides, str) else overrides
        sets = [f"seed={seed}", f"protocol.order_seed={seed}", backbone, "protocol.memory={}", *overrides,
                "output.tensorboard=false", *extra]
        code = main(["run", PROTOCOL, "--quiet", "--out", str(out), *[a for s in sets for a in ("--set", s)]])
        if code:
            raise SystemExit(f"the toolkit's {method} run failed (exit {code})")
    return json.loads((out / "metrics.json").read_text())


def vit_backbone(path: Path) -> str:
    """The toolkit's backbone holding the shared ViT: timm's, or the protocol's own ViT for the MAE encoder."""
    if shared_kind(path) == "mae":  # the protocol's ViT
        spec = SHARED_VITS["mae"]
        return (f"backbone={{name: vit, patch_size: 4, embed_dim: {spec['embed_dim']}, depth: {spec['depth']}, "
                f"num_heads: {spec['num_heads']}, drop_path_rate: 0.0, global_pool: token, pretrained: {path}}}")
    return f"backbone={{name: timm_vit, model: {VIT}, patch_size: 4, drop_path_rate: 0.0, pretrained: {path}}}"


def shared_clip(seed: int, out: Path) -> Path:
    """The seed's clip-tiny, contrastively pretrained on digits by experiments/clip/run_digits.py's
    ``pretrain`` (random weights would make every zero-shot figure chance)."""
    import importlib.util

    weights = out / f"clip-tiny-seed{seed}.pt"
    spec = importlib.util.spec_from_file_location("clip_digits", HERE.parent / "clip" / "run_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(module.pretrain(seed, weights), flush=True)
    return weights


def summary(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    """Last and average incremental accuracy of each seed's curve."""
    return [c[-1] for c in curves], [statistics.mean(c) for c in curves]


REFERENCE_NAMES = {"pilot_root": "PILOT", "continual_clip_root": "Continual-CLIP", "mcm_root": "MCM",
                   "proof_root": "PROOF", "acl_root": "Analytic-continual-learning", "inflora_root": "InfLoRA"}


def reference_of(method: str) -> str:
    """The checkout option ``method`` runs against."""
    other = {**CLIP_METHODS, **EXTERNAL_METHODS}
    return other[method][1] if method in other else "pilot_root"


def accuracy_table(results: dict[str, dict[str, list]]) -> list[str]:
    lines = ["| method | reference | last, ours | last, reference | gap | avg inc, ours | avg inc, reference | gap "
             "| largest step gap |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, sides in results.items():
        if method == "mcm":
            continue
        (ours_last, ours_avg), (ref_last, ref_avg) = summary(sides["ours"]), summary(sides["reference"])
        step_gap = max(abs(a - b) for o, p in zip(sides["ours"], sides["reference"]) for a, b in zip(o, p))
        lines.append(f"| {method} | {REFERENCE_NAMES[reference_of(method)]} | {mean_std(ours_last)} | "
                     f"{mean_std(ref_last)} | {mean_std([a - b for a, b in zip(ours_last, ref_last)])} | "
                     f"{mean_std(ours_avg)} | {mean_std(ref_avg)} | "
                     f"{mean_std([a - b for a, b in zip(ours_avg, ref_avg)])} | {step_gap:.2f} |")
    return lines


def mcm_table(sides: dict[str, list]) -> list[str]:
    """The OOD measures, averaged over the steps that have unseen classes, then over the seeds."""
    from clip_references import mean_over_steps

    ours, ref = [mean_over_steps(m) for m in sides["ours"]], [mean_over_steps(m) for m in sides["reference"]]
    step_gap = max(abs(a - b) for o, r in zip(sides["ours"], sides["reference"]) for so, sr in zip(o, r)
                   for a, b in zip(so, sr))
    lines = ["| score | measure | ours | MCM's detection_util | gap | largest step gap (either measure) |",
             "|---|---|---:|---:|---:|---:|"]
    for k, measure in enumerate(("AUROC", "FPR95")):
        mine, theirs = [m[k] for m in ours], [r[k] for r in ref]
        lines.append(f"| mcm (T = 1) | {measure} | {mean_std(mine)} | {mean_std(theirs)} | "
                     f"{mean_std([a - b for a, b in zip(mine, theirs)])} | {step_gap:.2f} |")
    return lines


WEIGHTS = {"random": f"a timm {VIT} (4-px patches, 1 channel) initialised by timm from each seed",
           "mae": "the protocol's ViT (4-px patches, 1 channel, 128 wide, 4 blocks) pretrained for each seed by "
                  "`incremental pretrain-mae` (experiments/backbones/digits/vit_mae_pretrain.yaml) on the base "
                  "classes' training images, read through its class token as PILOT's ViTs are",
           "clip": "the toolkit's clip-tiny, contrastively pretrained for each seed by experiments/clip/run_digits.py's "
                   "`pretrain` (the classes of experiences 0-2)"}


def header(commits: dict[str, str], seeds: list[int], methods: list[str]) -> list[str]:
    refs = "; ".join(f"{REFERENCE_NAMES[k]} at commit {c}" for k, c in commits.items())
    kinds = dict.fromkeys("clip" if m in CLIP_METHODS else vit_kind(m) for m in methods)
    weights = "; ".join(f"{', '.join(m for m in methods if m not in CLIP_METHODS and vit_kind(m) == k) or 'all'}: "
                        f"{WEIGHTS[k]}" if len(kinds) > 1 else WEIGHTS[k] for k in kinds)
    return [f"{refs}. Digits B0, 5 steps of 2 classes, 32 px. The shared weights: {weights}; the same weights on both "
            f"sides. Seeds {seeds}; mean ± std over seeds; the gap is ours minus the reference's, per seed, then "
            "averaged.", ""]


def run_reference(method: str, seed: int, args: argparse.Namespace, shared: dict[str, Path],
                  manager: DigitsManager) -> list:
    import clip_references

    if method == "continual_clip":
        return clip_references.run_continual_clip(args.continual_clip_root.resolve(), shared["clip"], manager,
                                                  CLIP_METHODS[method][2])
    if method == "mcm":
        return clip_references.run_mcm(args.mcm_root.resolve(), shared["clip"], manager, CLIP_METHODS[method][2])
    if method.startswith("proof"):
        return clip_references.run_proof(args.proof_root.resolve(), shared["clip"], manager,
                                         [CLIP_METHODS[method][2]], seed, normalised=method.endswith("normalised"))
    if method in EXTERNAL_METHODS:
        return external_curve(method, seed, args, shared[vit_kind(method)], manager)
    projection = projection_of(args.out / f"{method}-seed{seed}") if "shared_projection" in method else None
    # a *_reference_per_image row reads its method's run; a row that changes only our side, PILOT's
    run = SAME_REFERENCE.get(method, method.removesuffix(PER_IMAGE))
    if projection is not None:
        return run_pilot(args.pilot_root, run, seed, shared[vit_kind(method)], manager, projection)["pilot"]
    return pilot_curves(args, run, seed, shared[vit_kind(method)], manager)[
        "per_image" if method.endswith(PER_IMAGE) else "pilot"]


def pilot_curves(args: argparse.Namespace, run: str, seed: int, vit_path: Path,
                 manager: DigitsManager) -> dict[str, list[float]]:
    """``run_pilot``'s curves, kept in the output folder under a key of everything they depend on
    (PILOT's commit, its args, the shared weights' digest): PILOT's learners are deterministic on
    the CPU given the seed, so a later command (another row, a stopped run) reads them back."""
    from clip_references import checkout_commit

    digest = hashlib.sha256(vit_path.read_bytes()).hexdigest()
    inputs = json.dumps([checkout_commit(args.pilot_root), pilot_args(args.pilot_root, run, manager, seed), digest],
                        default=str, sort_keys=True)
    path = args.out / f"pilot-{run}-seed{seed}-{hashlib.sha256(inputs.encode()).hexdigest()[:16]}.json"
    if not path.is_file():
        curves = run_pilot(args.pilot_root, run, seed, vit_path, manager)
        path.write_text(json.dumps({"inputs": json.loads(inputs), "curves": curves}, indent=1))
    return json.loads(path.read_text())["curves"]


def external_curve(method: str, seed: int, args: argparse.Namespace, vit_path: Path, manager: DigitsManager) -> list:
    """The analytic-learning or InfLoRA reference's curve for ``method``, kept in the output
    folder under a digest of what it depends on (as ``pilot_curves``): the checkout's commit, the
    options, the shared weights and, for the analytic methods, the toolkit run's buffer."""
    from analytic_references import expansion_of, run_analytic
    from clip_references import checkout_commit
    from inflora_reference import run_inflora

    option, changes = EXTERNAL_METHODS[method][1], EXTERNAL_METHODS[method][2]
    root = getattr(args, option).resolve()
    inflora = method.startswith("inflora")
    expansion = None if inflora else expansion_of(args.out / f"{method}-seed{seed}")
    digests = [hashlib.sha256(vit_path.read_bytes()).hexdigest()]
    if expansion is not None:
        digests.append(hashlib.sha256(expansion.numpy().tobytes()).hexdigest())
    inputs = json.dumps([checkout_commit(root), method, seed, changes, digests], sort_keys=True)
    path = args.out / f"reference-{method}-seed{seed}-{hashlib.sha256(inputs.encode()).hexdigest()[:16]}.json"
    if not path.is_file():
        curve = (run_inflora(root, seed, vit_path, manager, changes) if inflora
                 else run_analytic(root, method, seed, vit_path, manager, expansion, changes))
        path.write_text(json.dumps({"inputs": json.loads(inputs), "curve": curve}, indent=1))
    return json.loads(path.read_text())["curve"]


def run_seed(seed: int, args: argparse.Namespace, results: dict[str, dict[str, list]]) -> None:
    from clip_references import probe_measures

    args.out.mkdir(parents=True, exist_ok=True)
    shared = {kind: shared_vit(seed, args.out, kind) for kind in dict.fromkeys(
        vit_kind(m) for m in args.methods if m not in CLIP_METHODS)}
    if any(m in CLIP_METHODS for m in args.methods):
        shared["clip"] = shared_clip(seed, args.out)
    manager = DigitsManager(seed)
    for method in args.methods:
        backbone = (CLIP_BACKBONE.format(weights=shared["clip"]) if method in CLIP_METHODS
                    else vit_backbone(shared[vit_kind(method)]))
        metrics = run_ours(method, seed, backbone, args.out / f"{ours_run(method)}-seed{seed}")
        results[method]["ours"].append(probe_measures(metrics) if method == "mcm" else metrics["accuracy"])
        results[method]["reference"].append(run_reference(method, seed, args, shared, manager))
        print(f"seed {seed} {method}: ours {results[method]['ours'][-1]}, "
              f"reference {results[method]['reference'][-1]}", flush=True)


def group_of(method: str) -> str:
    """reference.md's section that ``method``'s row belongs to: PILOT's, the CLIP references', the
    analytic-learning reference's or InfLoRA's."""
    return {"pilot_root": "pilot", "acl_root": "analytic", "inflora_root": "inflora"}.get(reference_of(method), "clip")


def section(group: str, results: dict[str, dict[str, list]], commits: dict[str, str], seeds: list[int]) -> str:
    """One generated section of reference.md: the command that produced it, then its tables. Its
    markers name its methods, so that a later command over the same methods replaces it."""
    command = "python experiments/crosscheck/reference.py " + " ".join(sys.argv[1:])
    mine = {m: r for m, r in results.items() if group_of(m) == group}
    used = {k: c for k, c in commits.items() if any(reference_of(m) == k for m in mine)}
    lines = [f"<!-- begin {group}: {' '.join(mine)} -->", "Produced by", "", f"    {command}", "",
             *header(used, seeds, list(mine)), *accuracy_table(mine)]
    if "mcm" in mine:
        lines += ["", "MCM's OOD score after each step with unseen classes (steps 0-3): in-distribution the seen "
                  "classes' test images, OOD the unseen classes'; the toolkit's `ood` probe (head: text, msp, "
                  "temperature 1) against MCM's `get_ood_scores_clip` and `get_measures`.", "", *mcm_table(mine["mcm"])]
    return "\n".join([*lines, f"<!-- end {group} -->"])


SECTION = re.compile(r"<!-- begin (\w+): ([^>]*) -->.*?<!-- end \1 -->", re.S)


def write_sections(path: Path, sections: list[str]) -> str:
    """``path`` with ``sections`` written in: each replaces the sections whose methods it covers
    (a command over fewer methods adds a section of its own); the other sections, each written by
    its own command, and the hand-written reading are kept."""
    text = path.read_text() if path.is_file() else "# The toolkit against the reference implementations, side by side\n"
    for body in sections:
        covered = set(SECTION.match(body).group(2).split())
        old = [m for m in SECTION.finditer(text) if set(m.group(2).split()) <= covered]
        if old:  # in the place of the first it supersedes
            text = text[:old[0].start()] + body + text[old[0].end():]
            for match in reversed([m for m in SECTION.finditer(text) if set(m.group(2).split()) <= covered][1:]):
                text = text[:match.start()].rstrip("\n") + "\n" + text[match.end():]
        elif "\n## Reading" in text:
            at = text.index("\n## Reading")
            text = text[:at].rstrip("\n") + "\n\n" + body + "\n" + text[at:]
        else:
            text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text)
    return text


def main() -> int:
    args = arguments()
    from clip_references import checkout_commit

    commits = {}
    if any(reference_of(m) == "pilot_root" for m in args.methods):
        commits["pilot_root"] = import_pilot(args.pilot_root.resolve())
    for option in ("continual_clip_root", "mcm_root", "proof_root", "acl_root", "inflora_root"):
        if any(reference_of(m) == option for m in args.methods):
            commits[option] = checkout_commit(getattr(args, option))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results: dict[str, dict[str, list]] = {m: {"ours": [], "reference": []} for m in args.methods}
    for seed in args.seeds:
        run_seed(seed, args, results)
    groups = dict.fromkeys(group_of(m) for m in args.methods)
    print(write_sections(HERE / "reference.md", [section(g, results, commits, args.seeds) for g in groups]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
