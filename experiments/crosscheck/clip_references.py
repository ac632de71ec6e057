"""The vision-language references of ``reference.py``: Continual-CLIP (vgthengane/Continual-CLIP),
MCM's score (deeplearning-wisc/MCM, ``utils/detection_util.py``) and PROOF (zhoudw-zdw/PROOF,
``models/proof.py``), run from their checkouts on the CLIP the toolkit's run loads.

Continual-CLIP's ``continual_clip`` package imports ``omegaconf`` (its requirements.txt):
``pip install omegaconf`` before running its row; MCM and PROOF need nothing beyond the
toolkit's test install.

The references are written for OpenAI's ``clip`` package, Hugging Face's ``CLIPModel`` or
open_clip's ViT-B/16 download, on a GPU. What the harness puts in their place, each written into
reference.md:

- ``clip`` (Continual-CLIP's import): a module whose ``load`` returns the shared open_clip model
  behind OpenAI CLIP's call, ``model(image, text) -> (logits_per_image, logits_per_text)``,
  and whose ``tokenize`` is open_clip's BPE tokenizer (the same vocabulary as OpenAI's) at the
  model's context length; the images are the toolkit's eval transform, not CLIP's preprocessing;
- ``transformers.CLIPTokenizer`` (MCM's import, used only through ``from_pretrained(...)(texts,
  padding=True, return_tensors="pt")``): the same tokenizer, with an all-ones attention mask
  (open_clip's text tower pools at the end-of-text token under a causal mask, so padding after
  it changes nothing);
- MCM's ``net.get_image_features`` / ``get_text_features`` are the open_clip model's
  ``encode_image`` / ``encode_text`` (MCM normalises both itself);
- ``torch.Tensor.cuda`` is the identity while MCM's scoring runs (there is no GPU here);
- MCM's ``utils/detection_util.py`` is loaded as a file: its package's ``__init__`` imports the
  training utilities, which need Hugging Face's ``CLIPModel`` and the datasets' loaders;
- PROOF's ``utils.inc_net.get_convnet`` returns the shared model (``out_dim``: its embedding
  width) and open_clip's tokenizer instead of downloading ViT-B/16 (LAION-400M); a stand-in for
  its DataManager serves the toolkit's digits repeated to 3 channels (as the toolkit's CLIP
  backbone feeds grey images), in the eval transform for every mode (the toolkit's side runs
  with ``dataset.augment: false``), the class names and the templates;
- PROOF's learner is evaluated by its ``_eval_cnn`` (what its ``eval_task`` reports as top-1):
  ``eval_task`` also runs ``_eval_zero_shot``, which moves the text to the GPU; DataLoader
  workers of ``models/proof.py`` are 0 (its base learner's exemplar loaders keep their 4).
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


def checkout_commit(root: Path) -> str:
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown (not a git checkout)"


# top-level packages that PILOT and PROOF both have, under the same names
CHECKOUT_PACKAGES = ("models", "utils", "convs", "backbone", "analytic", "methods")


def use_checkout(root: Path) -> None:
    """Imports of ``models``, ``utils``, ... resolve to the checkout at ``root``: another
    checkout's modules of those names are dropped from the import cache."""
    root = root.resolve()
    for name in [n for n in sys.modules if n.split(".")[0] in CHECKOUT_PACKAGES]:
        origin = getattr(sys.modules[name], "__file__", None) or ""
        if not Path(origin).resolve().is_relative_to(root):
            del sys.modules[name]
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))


def load_open_clip(weights: Path, image_size: int) -> torch.nn.Module:
    """The toolkit's ``clip-tiny`` at ``image_size`` with the weights the toolkit's run loads."""
    import copy

    import open_clip

    from incremental.models.clip import TOOLKIT_ARCHITECTURES

    architecture = copy.deepcopy(TOOLKIT_ARCHITECTURES["clip-tiny"])
    architecture["vision_cfg"]["image_size"] = image_size
    model = open_clip.CLIP(**architecture)
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def open_clip_tokenize(model: torch.nn.Module, texts: Sequence[str]) -> torch.Tensor:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=int(model.positional_embedding.shape[0]))(list(texts))


class OpenAICallView(torch.nn.Module):
    """An open_clip model called as OpenAI's CLIP: ``(logits_per_image, logits_per_text)``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_features = self.model.encode_image(image.expand(-1, 3, -1, -1), normalize=True)
        text_features = self.model.encode_text(text, normalize=True)
        logits_per_image = self.model.logit_scale.exp() * image_features @ text_features.T
        return logits_per_image, logits_per_image.T


def run_continual_clip(root: Path, weights: Path, manager: Any, template: str) -> list[float]:
    """Continual-CLIP's ``ClassIncrementalCLIP`` through every step, evaluated as its
    ``run_class_incremental`` does: top-1 over the test images of all tasks so far."""
    sys.path.insert(0, str(root))
    model = load_open_clip(weights, manager.image_size)
    # one stand-in module, given this seed's model: continual_clip.models keeps the module it imported
    stand_in = sys.modules.setdefault("clip", types.ModuleType("clip"))
    stand_in.load = lambda name, device=None, jit=False: (OpenAICallView(model), None)
    stand_in.tokenize = lambda texts: open_clip_tokenize(model, texts)
    from continual_clip.models import ClassIncrementalCLIP

    increments = [manager.get_task_size(t) for t in range(manager.nb_tasks)]
    # labels are positions in the toolkit's class order, so the reference's class_order is the identity
    cfg = types.SimpleNamespace(prompt_template=template, model_name="clip-tiny", class_order=list(range(sum(increments))),
                                initial_increment=increments[0], increment=increments[1])
    learner = ClassIncrementalCLIP(cfg, torch.device("cpu"))
    learner.classes_names = manager.class_texts
    images, labels = manager.data["test"]
    accuracies, seen = [], 0
    for task in range(manager.nb_tasks):
        learner.adaptation(task)
        seen += increments[task]
        keep = labels < seen
        predictions = torch.cat([learner(chunk).argmax(dim=1) for chunk in images[torch.from_numpy(keep)].split(128)])
        accuracies.append(100.0 * float((predictions.numpy() == labels[keep]).mean()))
    return accuracies


class HFView(torch.nn.Module):
    """An open_clip model as MCM calls Hugging Face's ``CLIPModel``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values.expand(-1, 3, -1, -1))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids)


def mcm_module(root: Path, model: torch.nn.Module) -> Any:
    """MCM's ``utils.detection_util``, imported with the stand-in tokenizer."""
    class Tokenizer:
        @classmethod
        def from_pretrained(cls, name: str) -> Any:
            def tokenize(texts: Sequence[str], padding: bool = True, return_tensors: str = "pt") -> dict:
                tokens = open_clip_tokenize(model, texts)
                return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
            return tokenize

    transformers = types.ModuleType("transformers")
    transformers.CLIPTokenizer = Tokenizer
    sys.modules["transformers"] = transformers
    import importlib.util

    # the file alone: its package's __init__ imports the training utilities (CLIPModel, the datasets)
    spec = importlib.util.spec_from_file_location("mcm_detection_util", root / "utils" / "detection_util.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_mcm(root: Path, weights: Path, manager: Any, template: str) -> list[tuple[float, float]]:
    """MCM's score (``get_ood_scores_clip``, score MCM, T = 1) and its measures (``get_measures``)
    after each step with unseen classes left: in-distribution = the seen classes' test images,
    OOD = the unseen ones'; (AUROC %, FPR95 %) per step. MCM's prompt is its code's
    ``"a photo of a {c}"``; ``template`` must say the same for the toolkit's side."""
    if template != "a photo of a {}":
        raise ValueError("MCM's detection_util hard-codes the prompt 'a photo of a {c}'")
    model = load_open_clip(weights, manager.image_size)
    os.environ.setdefault("TQDM_DISABLE", "1")  # MCM's progress bars, one per loader
    detection = mcm_module(root, model)
    args = types.SimpleNamespace(model="CLIP", score="MCM", T=1.0, ckpt="stand-in", batch_size=128)
    images, labels = manager.data["test"]
    seen, measures = 0, []
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # CPU only: MCM moves every batch to the GPU
    try:
        for task in range(manager.nb_tasks - 1):
            seen += manager.get_task_size(task)
            names = manager.class_texts[:seen]
            scores = []
            for inside in (True, False):
                keep = torch.from_numpy(labels < seen if inside else labels >= seen)
                loader = torch.utils.data.DataLoader(
                    torch.utils.data.TensorDataset(images[keep], torch.from_numpy(labels)[keep]), batch_size=128)
                with torch.no_grad():
                    scores.append(detection.get_ood_scores_clip(args, HFView(model), loader, names, in_dist=inside))
            auroc, _, fpr = detection.get_measures(-scores[0], -scores[1])
            measures.append((100.0 * float(auroc), 100.0 * float(fpr)))
    finally:
        torch.Tensor.cuda = cuda
    return measures


def probe_measures(metrics: dict, label: str = "ood") -> list[tuple[float, float]]:
    """(AUROC %, FPR95 %) of the run's MCM probe (head: text, score msp) at each step it ran."""
    steps = metrics["probes"][label]
    return [(s["summary"]["auroc/msp"], s["summary"]["fpr95/msp"]) for s in steps
            if s is not None and "auroc/msp" in s.get("summary", {})]


def mean_over_steps(measures: list[tuple[float, float]]) -> tuple[float, float]:
    values = np.asarray(measures)
    return float(values[:, 0].mean()), float(values[:, 1].mean())


# PROOF's exps/cifar.json, the values a run on digits keeps (memory: the toolkit's digits protocol's)
PROOF_ARGS = {"model_name": "proof", "convnet_type": "clip", "projection_type": "pure_mlp", "frozen_layers": "visual",
              "tuned_epoch": 5, "init_lr": 0.001, "batch_size": 64, "weight_decay": 0.05, "min_lr": 0,
              "optimizer": "sgd", "memory_size": 200, "memory_per_class": 20, "fixed_memory": False}
# the same on the toolkit's side
PROOF_OVERRIDES = ["strategy=proof", "protocol.memory={total: 200}", "dataset.augment=false", "training.epochs=5",
                   "training.batch_size=64", "training.optimizer={name: sgd, lr: 0.001, momentum: 0.9, weight_decay: 0.05}",
                   "training.scheduler={name: cosine, min_lr_ratio: 0.0}"]


class ProofData:
    """What PROOF's learner reads of its DataManager: ``manager``'s digits repeated to 3 channels
    (as the toolkit's CLIP backbone feeds a grey image), the class names in label order
    (``_class_to_label``) and the templates (``_data_to_prompt``: the first trains)."""

    def __init__(self, manager: Any, templates: Sequence[str]):
        import copy

        self.manager = copy.copy(manager)  # its methods, over the RGB copies of its images
        self.manager.data = {source: (images.expand(-1, 3, -1, -1).contiguous(), labels)
                             for source, (images, labels) in manager.data.items()}
        self._class_to_label, self._data_to_prompt = list(manager.class_texts), list(templates)
        self.get_task_size, self.get_dataset = self.manager.get_task_size, self.manager.get_dataset


def run_proof(root: Path, weights: Path, manager: Any, templates: Sequence[str], seed: int, *,
              normalised: bool = False) -> list[float]:
    """PROOF's learner (``models/proof.py``) through every step; after each, top-1 over the seen
    classes' test images by its ``_eval_cnn`` (fused, projected and prototype logits).

    ``normalised``: the toolkit's normalisation patched into the reference, to measure it: CLIP's
    image and text embeddings L2-normalised before the projections, and the projected image
    normalised in evaluation too (the repository normalises it in training only)."""
    use_checkout(root)
    import importlib

    model = load_open_clip(weights, manager.image_size)
    model.out_dim = int(model.text_projection.shape[1])  # PROOF's get_convnet sets 512 for ViT-B/16
    inc_net = importlib.import_module("utils.inc_net")
    inc_net.get_convnet = lambda args, pretrained=False: (model, None,
                                                          lambda texts: open_clip_tokenize(model, texts))
    proof = importlib.import_module("models.proof")
    proof.num_workers = 0
    encode_image = inc_net.Proof_Net.encode_image
    if normalised:
        for name in ("encode_image", "encode_text"):
            setattr(model, name, lambda x, normalize=False, f=getattr(model, name): f(x, normalize=True))
        inc_net.Proof_Net.encode_image = lambda self, x, normalize=False: encode_image(self, x, normalize=True)
    try:
        return proof_steps(proof, ProofData(manager, templates), seed)
    finally:
        inc_net.Proof_Net.encode_image = encode_image


def proof_steps(proof: Any, data: ProofData, seed: int) -> list[float]:
    torch.manual_seed(seed)
    learner = proof.Learner({**PROOF_ARGS, "prefix": "crosscheck", "dataset": "digits", "shuffle": False,
                             "init_cls": data.get_task_size(0), "increment": data.get_task_size(1),
                             "device": [torch.device("cpu")], "seed": seed})
    accuracies = []
    for _ in range(data.manager.nb_tasks):
        learner.incremental_train(data)
        learner.topk = min(5, learner._total_classes)
        # its eval_task would also run _eval_zero_shot, which moves text to the GPU
        predictions, targets = learner._eval_cnn(learner.test_loader)
        accuracies.append(100.0 * float((predictions[:, 0] == targets).mean()))
        learner.after_task()
    return accuracies
