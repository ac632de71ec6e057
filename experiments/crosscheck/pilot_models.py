"""The ViTs both sides of reference.py's cross-checks share, and PILOT's ViTs built by PILOT's
own constructors at their size, holding their weights; and the toolkit's LR schedule for a
reference's optimizer, for the rows that train a reference on it. Nothing of PILOT's code is
copied: its modules are imported from the checkout reference.py puts on the path.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent

# The ViTs the two sides share, as timm's VisionTransformer arguments. "random": timm's
# vit_tiny_patch16_224 at 32 px with 4-px patches, initialised by timm from the seed (a method with
# nothing to train checks its arithmetic on it). "mae": the protocol's ViT (128 wide, 4 blocks)
# pretrained per seed by ``incremental pretrain-mae`` on the base classes, as
# experiments/pretrained/run_digits.py does (a method that adapts the ViT needs features worth
# adapting, and PILOT's SLCA trains an epoch of it in 3.7 s here against the tiny ViT's 20 s),
# read through its class token as PILOT builds every ViT: the encoder's final norm (fc_norm, as
# it was pretrained for mean pooling) becomes the token norm, where timm applies it for a
# class-token ViT.
SHARED_VITS = {"random": {"embed_dim": 192, "depth": 12, "num_heads": 3, "global_pool": "token"},
               "mae": {"embed_dim": 128, "depth": 4, "num_heads": 4, "global_pool": "token"}}
MAE_CONFIG = HERE.parent / "backbones" / "digits" / "vit_mae_pretrain.yaml"


def build_vit(kind: str) -> torch.nn.Module:
    import timm

    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, in_chans=1, num_classes=0, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0,
        **SHARED_VITS[kind])


def shared_vit(seed: int, out: Path, kind: str) -> Path:
    """The seed's ViT of ``kind``, made once and kept in ``out`` for both sides."""
    from safetensors.torch import load_file, save_file

    from run_common import run_incremental

    path = out / f"{'mae' if kind == 'mae' else 'vit'}-seed{seed}.safetensors"
    if path.is_file():
        return path
    if kind == "mae":
        print(run_incremental("pretrain-mae", MAE_CONFIG, out / f"mae-seed{seed}", f"seed={seed}",
                              f"protocol.order_seed={seed}", "output.tensorboard=false", marker="mae_log.json"),
              flush=True)
        state = load_file(str(out / f"mae-seed{seed}" / "encoder.safetensors"))
        state = {k.replace("fc_norm.", "norm."): v for k, v in state.items()}
    else:
        torch.manual_seed(seed)  # timm's own initialisation, drawn from the seed
        state = build_vit(kind).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def shared_kind(path: Path) -> str:
    return "mae" if path.name.startswith("mae-") else "random"


def load_vit(path: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    model = build_vit(shared_kind(path))
    model.load_state_dict(load_file(str(path)))
    model.out_dim = model.num_features
    return model.eval()


def split_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's fused ``qkv`` split into ``q_proj``/``k_proj``/``v_proj`` and ``mlp.fc*`` renamed
    ``fc*``, as PILOT's adapter ViTs (``vit_adapter``, ``vit_ease``) convert timm's checkpoint."""
    converted = {}
    for key, value in state.items():
        if ".attn.qkv." in key:
            for part, chunk in zip("qkv", value.chunk(3)):
                converted[key.replace(".qkv.", f".{part}_proj.")] = chunk
        else:
            converted[key.replace(".mlp.fc", ".fc")] = value
    return converted


def load_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], new: tuple[str, ...]) -> list[str]:
    """``state`` into ``model``; the keys it lacks must all be the method's own (names holding one
    of ``new``), or the shared ViT does not fit PILOT's. The missing keys."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or not all(any(part in key for part in new) for key in missing):
        raise SystemExit(f"the shared ViT does not fit PILOT's {type(model).__module__}: missing {missing}, "
                         f"unexpected {unexpected}")
    return missing


ADAPTER_VITS = {"_adapter": ("backbone.vit_adapter", ".adaptmlp."), "_ease": ("backbone.vit_ease", "cur_adapter."),
                "_mos": ("backbone.vit_mos", "cur_adapter.")}


def adapter_vit(path: Path, ffn_num: int, suffix: str = "_adapter", num_classes: int = 0,
                **config: Any) -> torch.nn.Module:
    """PILOT's adapter ViT for the backbone types ending in ``suffix`` (``backbone/vit_adapter.py``,
    ``vit_ease.py`` or ``vit_mos.py``'s VisionTransformer, with the AdaptFormer config its
    ``get_backbone`` gives them, plus ``config``) at the shared ViT's size, holding its weights
    converted as PILOT's ``vit_base_patch16_224_adapter``, ``_ease`` and ``_mos`` convert timm's
    (``split_qkv``); everything but the adapters (and a head of ``num_classes``) frozen, as there.
    MOS's head is timm's ViT head as PILOT loads it, drawn from N(0, 0.02) truncated, zero bias."""
    import importlib
    import types

    from safetensors.torch import load_file

    module, adapters = ADAPTER_VITS[suffix]
    spec = SHARED_VITS[shared_kind(path)]
    config = types.SimpleNamespace(ffn_adapt=True, ffn_option="parallel", ffn_adapter_layernorm_option="none",
                                   ffn_adapter_init_option="lora", ffn_adapter_scalar="0.1", ffn_num=ffn_num,
                                   d_model=spec["embed_dim"], vpt_on=False, vpt_num=0, _device=torch.device("cpu"),
                                   **config)
    model = importlib.import_module(module).VisionTransformer(
        img_size=32, patch_size=4, in_chans=1, num_classes=num_classes, embed_dim=spec["embed_dim"],
        depth=spec["depth"], num_heads=spec["num_heads"], mlp_ratio=4, qkv_bias=True, global_pool=False,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), drop_path_rate=0.0, tuning_config=config)
    if num_classes:
        torch.nn.init.trunc_normal_(model.head.weight, std=0.02)
        torch.nn.init.zeros_(model.head.bias)
    missing = load_checked(model, split_qkv(load_file(str(path))), (adapters, "head."))
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name in missing
    model.out_dim = spec["embed_dim"]
    return model.eval()


def memo_vits(path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """PILOT's MEMO pair (``backbone/vit_memo.py``'s ``Generalized_Vit`` and ``Specialized_Vit``)
    at the shared ViT's size, holding its weights as PILOT's ``vit_base_patch16_224_memo`` holds
    ViT-B's: the generalised ViT all blocks but the last; the specialised one every block (its
    forward reads none of them), the final norm, and a ``last_block`` the weights never reach
    (PyTorch's default draws)."""
    from backbone import vit_memo
    from safetensors.torch import load_file

    spec = SHARED_VITS[shared_kind(path)]
    state = load_file(str(path))
    last = f"blocks.{spec['depth'] - 1}."
    kwargs = {"img_size": 32, "patch_size": 4, "in_chans": 1, "num_classes": 0, **spec}
    generalised = vit_memo.Generalized_Vit(**kwargs)
    generalised.load_state_dict({k: v for k, v in state.items() if not k.startswith(last)})
    specialised = vit_memo.Specialized_Vit(**kwargs)
    load_checked(specialised, state, ("last_block.",))
    generalised.out_dim = specialised.out_dim = spec["embed_dim"]
    return generalised, specialised


# the backbone types PILOT's get_backbone builds through timm.create_model: the prompt ViTs, and
# LAE's (whose PETs its network attaches afterwards)
PROMPT_VITS = {"_l2p": "backbone.vit_l2p", "_dualprompt": "backbone.vit_dualprompt",
               "_coda_prompt": "backbone.vit_coda_promtpt", "_lae": "backbone.vit_lae"}


def prompt_vit(module: Any, path: Path, **kwargs: Any) -> torch.nn.Module:
    """``module``'s VisionTransformer (PILOT's copy of timm's, with its prompts) built from the
    arguments PILOT's ``get_backbone`` passes, at the shared ViT's size, holding its weights read
    through the module's own ``checkpoint_filter_fn`` (which gives L2P's prompt tokens the class
    token's position embedding)."""
    from safetensors.torch import load_file

    spec = {k: v for k, v in SHARED_VITS[shared_kind(path)].items() if k != "global_pool"}
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained", "drop_block_rate")}
    model = module.VisionTransformer(img_size=32, patch_size=4, in_chans=1, **spec, **kwargs)
    load_checked(model, module.checkpoint_filter_fn(load_file(str(path)), model), ("prompt", "head."))
    return model


class PilotTimm:
    """``timm`` as PILOT's ``utils/inc_net.py`` sees it: ``create_model`` of a prompt ViT builds it
    at the shared ViT's size with the shared weights (``prompt_vit``) instead of downloading
    ViT-B/16; everything else is timm's."""

    def __init__(self, path: Path):
        self.path = path

    def create_model(self, name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        import importlib

        import timm

        for suffix, module in PROMPT_VITS.items():
            if name.endswith(suffix):
                return prompt_vit(importlib.import_module(module), self.path, **kwargs)
        return timm.create_model(name, pretrained=pretrained, **kwargs)

    def __getattr__(self, name: str) -> Any:
        import timm

        return getattr(timm, name)


def stand_in_backbones(inc_net: Any, path: Path) -> None:
    """PILOT's ``get_backbone`` with the shared ViT at ``path`` in place of every download: the
    prompt ViTs through its own function (its arguments) with ``PilotTimm``; the adapter ViTs
    (APER's, EASE's) by ``adapter_vit``; a plain ViT as it is."""
    original = inc_net.__dict__.setdefault("_pilot_get_backbone", inc_net.get_backbone)
    inc_net.timm = PilotTimm(path)

    def get_backbone(args: dict[str, Any], pretrained: bool = False) -> torch.nn.Module:
        name = args["backbone_type"]
        if name.endswith(tuple(PROMPT_VITS)):
            return original(args, pretrained)
        if "_memo" in name:
            return memo_vits(path)
        if "_mos" in name:
            return adapter_vit(path, args["ffn_num"], "_mos", num_classes=args["nb_classes"],
                               adapter_momentum=args["adapter_momentum"])
        for suffix in ADAPTER_VITS:
            if suffix in name:
                return adapter_vit(path, args["ffn_num"], suffix)
        return load_vit(path)

    inc_net.get_backbone = get_backbone


class TorchAsOnAGPU:
    """``torch`` for PILOT's CODA ViT, whose forward starts the prompt loss as
    ``torch.zeros((1,), requires_grad=True).to(device)`` and adds to it in place: on a GPU ``.to``
    makes a copy, on the CPU it returns the leaf itself, where the in-place add fails. Here that
    tensor is the copy it is on a GPU; everything else is torch."""

    @staticmethod
    def zeros(*size: Any, requires_grad: bool = False, **kwargs: Any) -> torch.Tensor:
        tensor = torch.zeros(*size, **kwargs)
        return tensor.requires_grad_() * 1 if requires_grad else tensor

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class TorchOnTheCPU:
    """``torch`` for PILOT's DGR, whose logit adjustment builds its prior with
    ``torch.FloatTensor(..).cuda()``: here that tensor's ``.cuda()`` leaves it where it is (the
    CPU); everything else is torch."""

    class _Tensor(torch.Tensor):
        def cuda(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            return self

    @classmethod
    def FloatTensor(cls, data: Any) -> torch.Tensor:  # noqa: N802 (torch's name)
        return torch.as_tensor(data, dtype=torch.float32).as_subclass(cls._Tensor)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def coda_net(inc_net: Any, path: Path) -> Any:
    """PILOT's ``CodaPromptVitNet``, whose head and ``CodaPrompt`` hard-code ViT-B's width (768,
    and the prompt's ``key_dim`` default), at the shared ViT's: both rebuilt by PILOT's own
    classes with that width, nothing else changed; its ViT's forward with ``TorchAsOnAGPU``."""
    from backbone import vit_coda_promtpt
    from backbone.prompt import CodaPrompt

    vit_coda_promtpt.torch = TorchAsOnAGPU()

    width = SHARED_VITS[shared_kind(path)]["embed_dim"]

    def build(args: dict[str, Any], pretrained: bool) -> torch.nn.Module:
        net = inc_net.CodaPromptVitNet(args, pretrained)
        net.fc = torch.nn.Linear(width, args["nb_classes"])
        net.prompt = CodaPrompt(width, args["nb_tasks"], args["prompt_param"], key_dim=width)
        return net
    return build


def lae_net(inc_net: Any, path: Path) -> Any:
    """PILOT's ``LAE`` network at the shared ViT's size: its ``adapt_blocks`` (0-4, hard-coded)
    cut to the blocks the ViT has, and its feature width the ViT's (it sets the backbone's
    ``out_dim`` to 768); nothing else changed."""
    spec = SHARED_VITS[shared_kind(path)]

    class LAEAtSharedSize(inc_net.LAE):
        @property
        def adapt_blocks(self) -> list[int]:
            return self._adapt_blocks

        @adapt_blocks.setter
        def adapt_blocks(self, blocks: list[int]) -> None:
            self._adapt_blocks = [block for block in blocks if block < spec["depth"]]

        @property
        def feature_dim(self) -> int:
            return spec["embed_dim"]
    return LAEAtSharedSize


def mos_net(inc_net: Any, path: Path) -> Any:
    """PILOT's ``MOSNet`` with its ViT's ``out_dim`` (set to 768 there) the shared ViT's width,
    which its prototype classifier and its evaluation's feature buffer read."""
    width = SHARED_VITS[shared_kind(path)]["embed_dim"]

    class MOSNetAtSharedWidth(inc_net.MOSNet):
        def __init__(self, args: dict[str, Any], pretrained: bool):
            super().__init__(args, pretrained)
            self.backbone.out_dim = width
    return MOSNetAtSharedWidth


def at_shared_width(module: Any, inc_net: Any, path: Path) -> None:
    """The places in PILOT that hard-code ViT-B's size, given the shared ViT's: CODA-Prompt's
    network (``coda_net``), LAE's (``lae_net``), MOS's (``mos_net``) and the ``out_dim`` default
    of ``EaseCosineLinear.forward_reweight``, which EASE's network calls without it (at another
    width its loop over the subspaces would run ``in_features // 768`` times)."""
    if hasattr(module, "LAE"):
        module.LAE = lae_net(inc_net, path)
    if hasattr(module, "MOSNet"):
        module.MOSNet = mos_net(inc_net, path)
    if hasattr(module, "CodaPromptVitNet"):
        module.CodaPromptVitNet = coda_net(inc_net, path)
    if hasattr(module, "EaseNet"):
        from backbone import linears

        original = linears.__dict__.setdefault("_pilot_forward_reweight", linears.EaseCosineLinear.forward_reweight)
        width = SHARED_VITS[shared_kind(path)]["embed_dim"]
        linears.EaseCosineLinear.forward_reweight = functools.partialmethod(original, out_dim=width)


def follow_toolkit_cosine(optimizer: torch.optim.Optimizer, per_epoch: int, epochs: int) -> None:
    """After every step of ``optimizer``, each group's LR set to its LR now times the toolkit's
    cosine (a half period over ``per_epoch x epochs`` iterations, to 0) at the iteration reached,
    as the toolkit schedules a task."""
    from incremental.config.schema import SchedulerConfig
    from incremental.training.optim import lr_factor

    cosine, base, steps = SchedulerConfig(name="cosine", min_lr_ratio=0.0), [g["lr"] for g in optimizer.param_groups], \
        itertools.count(1)

    def after_step(*args: Any) -> None:
        factor = lr_factor(cosine, iteration=next(steps), iters_per_epoch=per_epoch, epochs=epochs)
        for group, lr in zip(optimizer.param_groups, base):
            group["lr"] = lr * factor
    optimizer.register_step_post_hook(after_step)
