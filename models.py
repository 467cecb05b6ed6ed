"""Building ViTs by timm name or small preset, loading weights, and the model file.

Every checkpoint this project writes carries an ``arch`` entry of primitives:
{"model": timm name or preset, "model_kwargs": {...}, "num_classes", "input_size",
"mean", "std", "prune_spec": dict or None}. From it ``load_model_file`` rebuilds the exact
(dense or compressed) architecture without any pickled code, then loads the weights.
"""
import difflib
import logging

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from pruning import apply_spec
from utils import CheckpointError, UserError, clean_message, load_checkpoint_file, save_atomic, state_dict_of

logger = logging.getLogger("vitcompress")

# Small presets under names timm does not use. They are plain timm VisionTransformers.
PRESETS = {
    # 12 blocks like DeiT, sized to train on 2 CPU cores on 32 px digits (64 patches of 4 px)
    "vit_nano_patch4_32": dict(img_size=32, patch_size=4, embed_dim=48, depth=12, num_heads=4, mlp_ratio=4.0),
    # the same with a distillation token (DeiT's distilled variant)
    "deit_nano_distilled_patch4_32": dict(img_size=32, patch_size=4, embed_dim=48, depth=12, num_heads=4,
                                          mlp_ratio=4.0, distilled=True),
    # 4 blocks, for tests and smoke runs
    "vit_pico_patch8_32": dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, mlp_ratio=2.0),
}
DEFAULT_DIGITS_MODEL = "vit_nano_patch4_32"


class ModelError(UserError):
    pass


def _all_model_names():
    return list(PRESETS) + timm.list_models("*vit*") + timm.list_models("deit*")


def check_model_name(name):
    if name in PRESETS or name in timm.list_models():
        return
    close = difflib.get_close_matches(name, _all_model_names(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('*vit*') or the presets " \
        + ", ".join(PRESETS)
    raise ModelError(f"unknown model '{name}'{hint}")


def build_model(name, num_classes=1000, img_size=None, pretrained=False, drop_rate=0.0, drop_path_rate=0.0,
                **extra):
    """A timm ViT/DeiT by name, or one of PRESETS. Raises ModelError with close names."""
    check_model_name(name)
    kwargs = dict(num_classes=num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate, **extra)
    if name in PRESETS:
        preset = dict(PRESETS[name])
        distilled = preset.pop("distilled", False)
        preset.update(kwargs)
        if img_size is not None:
            preset["img_size"] = img_size
        if distilled:
            model = VisionTransformerDistilled(**preset)
        else:
            model = VisionTransformer(**preset)
        if pretrained:
            raise ModelError(f"preset {name} has no pretrained weights; train it or use --finetune FILE")
    else:
        if img_size is not None:
            kwargs["img_size"] = img_size
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as e:  # a non-ViT rejects ViT keywords such as img_size
            raise ModelError(f"model '{name}' is not a timm VisionTransformer ({clean_message(e)}); this tool "
                             f"compresses ViT/DeiT models") from e
        except (OSError, RuntimeError, ValueError) as e:
            if pretrained:
                raise ModelError(f"could not load pretrained weights for {name} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:160]}); without internet use --finetune FILE") from e
            raise
    if not isinstance(model, VisionTransformer):
        raise ModelError(f"model '{name}' is a {type(model).__name__}, not a timm VisionTransformer")
    return model


def native_input_size(name):
    """The image size a model was defined for (a preset's img_size, timm's pretrained config)."""
    if name in PRESETS:
        return PRESETS[name]["img_size"]
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, ValueError, AttributeError):
        cfg = None
    if cfg is not None and cfg.input_size:
        return int(cfg.input_size[-1])
    return 224


def model_arch(name, model, input_size, mean, std, model_kwargs=None):
    """The primitives that rebuild ``model``: stored in every checkpoint as ``arch``."""
    spec = getattr(model, "prune_spec", None)
    return {
        "model": name,
        "model_kwargs": dict(model_kwargs or {}),
        "num_classes": int(model.num_classes),
        "input_size": int(input_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "prune_spec": spec,
    }


def load_state_strict(model, state, source):
    """Strict load with a one-line message naming the first mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        if shape:
            k = shape[0]
            what = f"shape of {k} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        elif missing:
            what = f"{len(missing)} weights missing, e.g. {missing[0]}"
        else:
            what = f"{len(unexpected)} unexpected weights, e.g. {unexpected[0]}"
        raise CheckpointError(f"{source} does not match this architecture: {what}")
    model.load_state_dict(state, strict=True)


def load_finetune(model, path):
    """Initialise from a file or URL (``--finetune``): drops a classifier of another size and
    interpolates position embeddings to the model's grid."""
    ckpt = load_checkpoint_file(path)
    arch = ckpt.get("arch") if isinstance(ckpt.get("arch"), dict) else None
    if arch and arch.get("prune_spec"):
        raise CheckpointError(f"{path} is a compressed model; continue training it with --resume {path}")
    state = dict(state_dict_of(ckpt))
    own = model.state_dict()
    for head in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
        if head in state and head in own and state[head].shape != own[head].shape:
            logger.info(f"finetune: dropping {head} {tuple(state[head].shape)} (model has {tuple(own[head].shape)})")
            del state[head]
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        npt = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        old = state["pos_embed"]
        state["pos_embed"] = resample_abs_pos_embed(old, new_size=list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=npt)
        logger.info(f"finetune: interpolated pos_embed {tuple(old.shape)} -> {tuple(state['pos_embed'].shape)}")
    bad = [k for k in state if k in own and state[k].shape != own[k].shape]
    if bad or not any(k in own for k in state):
        k = bad[0] if bad else next(iter(state), "<empty>")
        raise CheckpointError(f"{path} is for another architecture (first mismatch: {k})")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head")]
    if missing:
        raise CheckpointError(f"{path} is for another architecture ({len(missing)} weights missing, e.g. {missing[0]})")
    return ckpt


def build_from_arch(arch):
    """Rebuild the (dense or compressed) model described by a checkpoint's ``arch``."""
    try:
        name = arch["model"]
        model = build_model(name, num_classes=arch["num_classes"], img_size=arch["input_size"],
                            **arch.get("model_kwargs", {}))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint 'arch' entry is incomplete ({e})") from e
    spec = arch.get("prune_spec")
    if spec:
        apply_spec(model, spec)
    return model


def _strip_prefix(state):
    """Drop the ``module.`` prefix a DDP-wrapped model leaves in its state dict."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def inspect_checkpoint(ckpt, path):
    """What a loaded checkpoint holds, without building anything.

    Returns {"format", "arch" (ours, or None), "model" (a name, or None), "input_size" (or None),
    "num_classes" (or None), "state", "training" (holds optimizer state this tool can resume)}.
    Formats: this tool's model / training files (an ``arch`` dict); DeiT's ``main.py`` training
    checkpoint (``model`` + ``args`` with model and input_size); timm's ``train.py`` checkpoint
    (``state_dict`` + ``arch`` = model name); DeiT's release files (``{"model": state_dict}``);
    timm ``.safetensors`` and bare state dicts.
    """
    arch = ckpt.get("arch")
    if isinstance(arch, dict):
        return {"format": "this tool's model file", "arch": arch, "model": arch.get("model"),
                "input_size": arch.get("input_size"), "num_classes": arch.get("num_classes"),
                "state": None, "training": "optimizer" in ckpt and "epoch" in ckpt}
    state = _strip_prefix(state_dict_of(ckpt))
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    name, size = None, None
    if isinstance(arch, str):
        fmt, name = "timm train.py checkpoint", arch
        size = args.get("img_size") or (args.get("input_size") or [None])[-1] if args else None
    elif args:
        fmt, name, size = "DeiT main.py checkpoint", args.get("model"), args.get("input_size")
    elif set(ckpt) == {"model"} or "model" in ckpt:
        fmt = "DeiT release file"
    else:
        fmt = "state dict"
    head = state.get("head.weight")
    ncls = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.dim() == 2 else None
    return {"format": fmt, "arch": None, "model": name if isinstance(name, str) else None,
            "input_size": int(size) if isinstance(size, (int, float)) else None, "num_classes": ncls,
            "state": state, "training": False}


def class_mismatch_error(path, file_classes, data_classes):
    return CheckpointError(f"{path} has a {file_classes}-class head but the data set has {data_classes} classes; "
                           f"to adapt it to this data set train from it with --finetune {path} (a new head)")


def load(path, model_name=None, input_size=None, num_classes=None, mean=None, std=None, ckpt=None,
         use_ema=False, device="cpu"):
    """THE loader for every model file a user holds: returns (model in eval mode, arch, ckpt).

    Reads ``path`` once (or uses ``ckpt``, its already-loaded contents). A file of this tool
    rebuilds its own (dense or compressed) architecture; other formats (see inspect_checkpoint)
    build ``model_name`` (or the name the file records) at ``input_size`` with the head size
    found in the weights. ``num_classes``, when given, must match the file's head.
    """
    ckpt = load_checkpoint_file(path) if ckpt is None else ckpt
    info = inspect_checkpoint(ckpt, path)
    if info["arch"] is not None:
        arch = info["arch"]
        if model_name and model_name != arch.get("model"):
            raise CheckpointError(f"{path} holds a {arch.get('model')} model, not {model_name}")
        model = build_from_arch(arch)
        ema = ckpt.get("model_ema")
        state = ema if use_ema and isinstance(ema, dict) else state_dict_of(ckpt)
    else:
        name = model_name or info["model"]
        if not name:
            raise CheckpointError(f"{path} ({info['format']}) holds weights without a model name: "
                                  f"pass --model NAME (e.g. deit_small_patch16_224)")
        if info["model"] and model_name and info["model"] != model_name:
            raise CheckpointError(f"{path} records model {info['model']}, not {model_name}")
        if info["num_classes"] is None:
            raise CheckpointError(f"{path} has no classifier weights (head.weight): not a ViT classifier file")
        size = input_size or info["input_size"]
        model = build_model(name, num_classes=info["num_classes"], img_size=size)
        size = size or int(model.patch_embed.img_size[0])
        arch = model_arch(name, model, size, mean or (0.5, 0.5, 0.5), std or (0.5, 0.5, 0.5))
        state = info["state"]
    if num_classes is not None and arch["num_classes"] != num_classes:
        raise class_mismatch_error(path, arch["num_classes"], num_classes)
    load_state_strict(model, _strip_prefix(state), path)
    return model.to(device).eval(), arch, ckpt


def load_model_file(path, device="cpu", use_ema=False, ckpt=None):
    """A model file written by this tool: (model in eval mode, ckpt). See ``load``."""
    ckpt = load_checkpoint_file(path) if ckpt is None else ckpt
    if not isinstance(ckpt.get("arch"), dict):
        raise CheckpointError(f"{path} has no 'arch' entry: not a model file written by this tool "
                              f"(use --model NAME --resume {path} or --finetune {path} for plain weights)")
    model, _, ckpt = load(path, ckpt=ckpt, use_ema=use_ema, device=device)
    return model, ckpt


class ResizeInput(nn.Module):
    """Feeds a model (a teacher) its own input size when the student's differs."""

    def __init__(self, model, size):
        super().__init__()
        self.model = model
        self.size = int(size)

    def forward(self, x):
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return self.model(x)


def build_teacher(name, path, num_classes, input_size):
    """The distillation teacher: a model file of this tool, or any timm classifier ``name``
    (DeiT's recipe: regnety_160) with weights from ``path``; inputs are resized to the
    teacher's own size when it has one (a ViT trained at another resolution)."""
    if not path:
        raise UserError("distillation needs --teacher-path (a weights file or a model file of this tool)")
    ckpt = load_checkpoint_file(path)
    if isinstance(ckpt.get("arch"), dict):
        teacher, arch, _ = load(path, ckpt=ckpt)
        own = arch["input_size"]
    else:
        check_model_name(name)
        try:
            teacher = timm.create_model(name, num_classes=num_classes)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ModelError(f"cannot build teacher {name}: {clean_message(e)}") from e
        load_state_strict(teacher, _strip_prefix(state_dict_of(ckpt)), path)
        embed = getattr(teacher, "patch_embed", None)
        own = int(embed.img_size[0]) if embed is not None and getattr(embed, "img_size", None) else None
    if getattr(teacher, "num_classes", num_classes) != num_classes:
        raise class_mismatch_error(path, teacher.num_classes, num_classes)
    if own and own != input_size:
        logger.info(f"teacher runs at its own input size {own} (student {input_size})")
        teacher = ResizeInput(teacher, own)
    return teacher.eval()


def save_model_file(path, model, arch, extra=None):
    """Write a self-contained model file: arch primitives + state dict (+ extra primitives)."""
    obj = {"arch": arch, "model": model.state_dict()}
    if extra:
        obj.update(extra)
    save_atomic(obj, path)


# ----------------------------------------------------------------------------------------------
# issue 11: preset for the CLUTTERED_DIGITS benchmark (datasets.build_cluttered_digits)
# vit_nano_patch4_32's width on 64 px canvases cut into 64 patches of 8 px (the same sequence length),
# with 6 blocks instead of 12: half the cost per image, so that it trains to ~88% in ~10 min on 2 cores.
PRESETS["vit_nano_d6_patch8_64"] = dict(img_size=64, patch_size=8, embed_dim=48, depth=6, num_heads=4, mlp_ratio=4.0)
# ----------------------------------------------------------------------------------------------
