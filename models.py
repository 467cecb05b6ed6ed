"""Building ViTs by timm name or small preset, loading weights, and the model file.

Every checkpoint this project writes carries an ``arch`` entry of primitives:
{"model": timm name or preset, "model_kwargs": {...}, "num_classes", "input_size",
"mean", "std", "prune_spec": dict or None}. From it ``load_model_file`` rebuilds the exact
(dense or compressed) architecture without any pickled code, then loads the weights.
"""
import difflib
import functools
import hashlib
import logging
import math
import os

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm, resample_abs_pos_embed
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer

from pruning import SpecError, apply_spec, vit_blocks
from utils import (CheckpointError, UserError, clean_message, load_checkpoint_file, read_json_object, save_atomic,
                   state_dict_of)

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
# A timm VisionTransformer defined wholly by its file's model_kwargs (the keywords of a PRESETS entry,
# plus "norm_eps", the LayerNorm epsilon): the architecture of a converted Hugging Face model.
CUSTOM_MODEL = "vit_custom"


class ModelError(UserError):
    pass


def _all_model_names():
    return list(PRESETS) + timm.list_models("*vit*") + timm.list_models("deit*") + timm.list_models("eva02*")


def check_model_name(name):
    if name in PRESETS or name == CUSTOM_MODEL or name in timm.list_models():
        return
    close = difflib.get_close_matches(name, _all_model_names(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('*vit*') or the presets " \
        + ", ".join(PRESETS)
    raise ModelError(f"unknown model '{name}'{hint}")


def build_model(name, num_classes=1000, img_size=None, pretrained=False, drop_rate=0.0, drop_path_rate=0.0,
                **extra):
    """A timm ViT/DeiT by name, one of PRESETS, or CUSTOM_MODEL defined by ``extra`` (a file's
    model_kwargs). Raises ModelError with close names."""
    check_model_name(name)
    kwargs = dict(num_classes=num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate, **extra)
    if name in PRESETS or name == CUSTOM_MODEL:
        preset = dict(PRESETS.get(name, {}), **kwargs)
        if not {"patch_size", "embed_dim", "depth", "num_heads"} <= set(preset):
            raise ModelError(f"model '{name}' is the architecture a model file defines (a converted Hugging Face "
                             f"model): start from that file with --resume or --finetune")
        distilled = preset.pop("distilled", False)
        if "norm_eps" in preset:  # a primitive in the file, a LayerNorm of that epsilon in the model
            preset["norm_layer"] = functools.partial(LayerNorm, eps=float(preset.pop("norm_eps")))
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
                             f"compresses ViT/DeiT, SigLIP, CLIP and EVA-02 models") from e
        except (OSError, RuntimeError, ValueError) as e:
            if pretrained:
                raise ModelError(f"could not load pretrained weights for {name} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:160]}); without internet use --finetune FILE") from e
            raise
    if isinstance(model, Eva):  # EVA-02: accepted when its blocks are ones this tool slices and counts
        try:
            vit_blocks(model)
        except SpecError as e:
            raise ModelError(f"model '{name}' is an Eva this tool cannot compress: {e}") from e
    elif not isinstance(model, VisionTransformer):
        raise ModelError(f"model '{name}' is a {type(model).__name__}, not a timm VisionTransformer (or EVA-02 Eva)")
    size, patch = model.patch_embed.img_size or (), model.patch_embed.patch_size  # img_size None: dynamic size
    if any(s < p or s % p for s, p in zip(size, patch)):  # timm would drop the last pixels or fail later
        raise ModelError(f"input size {size[0]} does not fit {name}'s {patch[0]}-pixel patches: use a multiple "
                         f"of {patch[0]} for --input-size")
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


def load_finetune(model, path, ckpt=None):
    """Initialise from a file or URL (``--finetune``; ``ckpt``: its contents, when already read):
    drops a classifier of another size and interpolates position embeddings to the model's grid.
    A compressed model file initialises a model of the same compressed shape (build_from_arch)."""
    ckpt = read_model_file(path) if ckpt is None else ckpt
    arch = ckpt.get("arch") if isinstance(ckpt.get("arch"), dict) else None
    if arch and arch.get("prune_spec") and arch["prune_spec"] != getattr(model, "prune_spec", None):
        raise CheckpointError(f"{path} is a compressed model; a model of its compressed shape is needed to start "
                              f"from it (main.py builds one when --finetune names the file)")
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


def set_drop_path(model, rate):
    """Give ``model``'s blocks stochastic depth as timm's VisionTransformer builds it from
    ``drop_path_rate``: block i of L drops its two residual branches with probability
    rate * i / (L - 1), a DropPath where that is above 0 and an Identity elsewhere. A model rebuilt
    from a file (models.load, a sliced one) has none, whatever it was trained with. Returns the model."""
    blocks = list(model.blocks)
    for blk, p in zip(blocks, torch.linspace(0, float(rate), len(blocks)).tolist()):
        if not isinstance(blk, (Block, EvaBlock)):
            raise ModelError(f"cannot set drop-path on a {type(blk).__name__} block (timm Block / EvaBlock only)")
        for name in ("drop_path1", "drop_path2"):  # in the block's mode: an eval model stays deterministic
            setattr(blk, name, (DropPath(p) if p > 0 else nn.Identity()).train(blk.training))
    return model


def class_logits(out):
    """The logits of a model's output. A distilled DeiT gives (class head, distillation head) logits
    in training mode (timm's ``distilled_training``) and their average in eval mode; this averages a
    pair the same way, so that every caller scores a distilled model as DeiT does at inference."""
    if isinstance(out, (tuple, list)):
        return (out[0] + out[1]) / 2
    return out


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
    timm ``.safetensors`` and bare state dicts; a Hugging Face folder, which ``read_model_file``
    converts into this tool's form (its ``format`` names the Hugging Face class).
    """
    arch = ckpt.get("arch")
    if isinstance(arch, dict):
        return {"format": ckpt.get("format") or "this tool's model file", "arch": arch, "model": arch.get("model"),
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


def weights_fingerprint(model):
    """A short hash of ``model``'s weights (names, dtypes, shapes, bytes): which dense model a search
    or a finetuning started from, wherever its file lies now and whatever it is called."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def load(path, model_name=None, input_size=None, num_classes=None, mean=None, std=None, ckpt=None,
         use_ema=False, device="cpu"):
    """THE loader for every model file a user holds: returns (model in eval mode, arch, ckpt).

    Reads ``path`` once with read_model_file (a file, or a Hugging Face folder), or uses ``ckpt``,
    its already-read contents. A file of this tool (and a converted Hugging Face folder) rebuilds
    its own (dense or compressed) architecture; other formats (see inspect_checkpoint) build
    ``model_name`` (or the name the file records) at ``input_size`` with the head size
    found in the weights. ``num_classes``, when given, must match the file's head.
    """
    ckpt = read_model_file(path) if ckpt is None else ckpt
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
    ckpt = read_model_file(path) if ckpt is None else ckpt
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
    ckpt = read_model_file(path)
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
# the preset of the CLUTTERED_DIGITS benchmark (datasets.build_cluttered_digits)
# vit_nano_patch4_32's width on 64 px canvases cut into 64 patches of 8 px (the same sequence length),
# with 6 blocks instead of 12: half the cost per image, so that it trains to ~88% in ~10 min on 2 cores.
PRESETS["vit_nano_d6_patch8_64"] = dict(img_size=64, patch_size=8, embed_dim=48, depth=6, num_heads=4, mlp_ratio=4.0)
# ----------------------------------------------------------------------------------------------


# =============================================================================================
# Hugging Face folders (issue 23): config.json + model.safetensors (or pytorch_model.bin) of a
# ViTForImageClassification, DeiTForImageClassification or DeiTForImageClassificationWithTeacher,
# read with json and safetensors / torch.load(weights_only=True) (no transformers, none of the
# folder's code) and converted into the timm VisionTransformer that computes the same logits.
# =============================================================================================

# Hugging Face class -> (root of its weights, the timm name of its distillation token, the timm
# keywords that class adds, the heads: timm name <- Hugging Face name)
HF_CLASSES = {
    "ViTForImageClassification": ("vit", None, {}, {"head": "classifier"}),
    # the distillation token rides along and only the class token is classified: a timm register token
    "DeiTForImageClassification": ("deit", "reg_token", {"reg_tokens": 1}, {"head": "classifier"}),
    # the mean of the class and distillation heads (in eval mode): timm's distilled DeiT
    "DeiTForImageClassificationWithTeacher": ("deit", "dist_token", {"distilled": True},
                                              {"head": "cls_classifier", "head_dist": "distillation_classifier"}),
}
# what Hugging Face's ViTConfig and DeiTConfig take for a key that a config.json leaves out
HF_CONFIG_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                          hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
                          qkv_bias=True)
HF_MEAN_STD = 0.5  # ViTImageProcessor's image_mean and image_std, without a preprocessor_config.json
# the Hugging Face names of a timm block's modules: first the layout that save_pretrained writes and
# the Hub holds (encoder.layer.N.attention.attention.query), then transformers 5's own module names
HF_LAYER_ROOTS = ("encoder.layer.{}.", "layers.{}.")
HF_QKV = (("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
          ("attention.attention.value", "attention.v_proj"))
HF_LAYER_MODULES = {"norm1": ("layernorm_before",), "attn.proj": ("attention.output.dense", "attention.o_proj"),
                    "norm2": ("layernorm_after",), "mlp.fc1": ("intermediate.dense", "mlp.fc1"),
                    "mlp.fc2": ("output.dense", "mlp.fc2")}
HF_UNUSED = ("pooler.", "embeddings.mask_token")  # weights of other heads, unused by the classifiers
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")  # in the order transformers prefers them


def read_model_file(path):
    """The contents of any model file ``load`` reads: a checkpoint or weights file
    (utils.load_checkpoint_file), or a Hugging Face model folder, converted (read_hf_folder)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return read_hf_folder(path)
    return load_checkpoint_file(path)


# Hugging Face's hidden_act -> timm's act_layer (None: timm ViT's own exact GELU); gelu_new and
# gelu_pytorch_tanh are both the tanh approximation, quick_gelu is x * sigmoid(1.702 x) in both
HF_ACTIVATIONS = {"gelu": None, "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}


def read_hf_folder(path):
    """A Hugging Face model folder as a model file of this tool: {"arch", "model" (a timm state
    dict), "format"}. The arch is CUSTOM_MODEL with the config's sizes (hidden_size, num_hidden_layers,
    num_attention_heads, intermediate_size, image_size, patch_size, num_channels, qkv_bias,
    layer_norm_eps, hidden_act as HF_ACTIVATIONS maps it), mean and std from
    preprocessor_config.json (else 0.5, as ViTImageProcessor) and the config's id2label as
    ``labels``. The config's dropout rates are training settings and are not carried over
    (finetuning uses --drop / --drop-path). Raises CheckpointError in one line for a
    folder of another kind, a class not in HF_CLASSES, or an option the conversion does not reproduce."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        inside = os.path.join(path, "checkpoint.pth")
        hint = f"; did you mean {inside}?" if os.path.isfile(inside) else ""
        raise CheckpointError(f"{path} is a folder without config.json, not a Hugging Face model folder: pass a "
                              f"model file{hint}")
    config = read_json_object(config_file, CheckpointError)
    kinds = config.get("architectures")
    kind = kinds[0] if isinstance(kinds, list) and kinds else None
    if kind not in HF_CLASSES:
        what = kind or f"model_type {config.get('model_type')!r} without architectures"
        raise CheckpointError(f"{path} holds a Hugging Face {what} model; this tool reads "
                              f"{', '.join(HF_CLASSES)} folders")
    root, token, extra, heads = HF_CLASSES[kind]
    if config.get("model_type", root) != root:
        raise CheckpointError(f"{config_file} says model_type {config.get('model_type')!r} for a {kind}; "
                              f"expected {root!r}")
    c = {key: config.get(key, default) for key, default in HF_CONFIG_DEFAULTS.items()}
    if c["hidden_act"] not in HF_ACTIVATIONS:
        raise CheckpointError(f"{config_file}: hidden_act {c['hidden_act']!r} is not reproduced by the conversion "
                              f"(only {', '.join(map(repr, HF_ACTIVATIONS))})")
    if HF_ACTIVATIONS[c["hidden_act"]]:
        extra = dict(extra, act_layer=HF_ACTIVATIONS[c["hidden_act"]])
    sizes = {key: _hf_size(config_file, key, c[key]) for key in
             ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
              "patch_size", "num_channels")}
    dim, heads_n, image, patch = (sizes[k] for k in ("hidden_size", "num_attention_heads", "image_size", "patch_size"))
    if dim % heads_n:
        raise CheckpointError(f"{config_file}: hidden_size {dim} is not a multiple of num_attention_heads {heads_n}")
    if image % patch:
        raise CheckpointError(f"{config_file}: image_size {image} is not a multiple of patch_size {patch}")
    eps = c["layer_norm_eps"]
    if not isinstance(c["qkv_bias"], bool) or isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise CheckpointError(f"{config_file}: qkv_bias {c['qkv_bias']!r} or layer_norm_eps {eps!r} is not usable")
    ratio = sizes["intermediate_size"] / dim  # timm's MLP width is int(dim * mlp_ratio)
    while int(dim * ratio) < sizes["intermediate_size"]:
        ratio = math.nextafter(ratio, math.inf)
    hf, weights_file = _hf_weights(path)
    state = _hf_to_timm(hf, root, token, heads, sizes["num_hidden_layers"], c["qkv_bias"],
                        os.path.join(path, weights_file))
    num_classes = int(state["head.weight"].shape[0])
    mean, std = _hf_mean_std(path, sizes["num_channels"])
    arch = {"model": CUSTOM_MODEL,
            "model_kwargs": dict(patch_size=patch, embed_dim=dim, depth=sizes["num_hidden_layers"], num_heads=heads_n,
                                 mlp_ratio=ratio, qkv_bias=c["qkv_bias"], in_chans=sizes["num_channels"],
                                 norm_eps=float(eps), **extra),
            "num_classes": num_classes, "input_size": image, "mean": mean, "std": std, "prune_spec": None}
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and len(id2label) == num_classes:  # JSON keys: "0", "1", ...
        labels = [id2label.get(str(i)) for i in range(num_classes)]
        if all(isinstance(label, str) for label in labels):
            arch["labels"] = labels
    logger.info(f"{path}: Hugging Face {kind} read as a timm VisionTransformer ({sizes['num_hidden_layers']} "
                f"blocks of {heads_n} heads, width {dim}, MLP {sizes['intermediate_size']}, {image} px, "
                f"{num_classes} classes)")
    return {"arch": arch, "model": state, "format": f"Hugging Face {kind} folder"}


def _hf_size(file, key, value):
    """A positive int from a Hugging Face config; [n, n] (a square image or patch) counts as n."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        square = " (this tool takes square images and patches)" if key in ("image_size", "patch_size") else ""
        raise CheckpointError(f"{file}: {key} {value!r} is not a positive integer{square}")
    return value


def _hf_weights(path):
    """(the folder's weights as one flat dict, the file they came from), from HF_WEIGHT_FILES."""
    name = next((n for n in HF_WEIGHT_FILES if os.path.isfile(os.path.join(path, n))), None)
    if name is None:
        raise CheckpointError(f"{path} has a config.json but none of {', '.join(HF_WEIGHT_FILES)}")
    files = [name]
    if name.endswith(".index.json"):  # a sharded checkpoint: the index maps each weight to its file
        weight_map = read_json_object(os.path.join(path, name), CheckpointError).get("weight_map")
        files = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        if not files or any(not isinstance(f, str) or os.path.basename(f) != f for f in files):
            raise CheckpointError(f"{os.path.join(path, name)} does not list weight files of this folder")
    state = {}
    for f in files:
        part = load_checkpoint_file(os.path.join(path, f))
        bad = next((k for k, v in part.items() if not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise CheckpointError(f"{os.path.join(path, f)} is not a flat state dict (entry {bad!r})")
        state.update(part)
    return state, name


def _hf_to_timm(hf, root, token, heads, depth, qkv_bias, source):
    """The timm state dict of the Hugging Face weights ``hf``: query, key and value stacked into qkv,
    each weight used once; one that is missing or left over raises CheckpointError."""
    hf = dict(hf)

    def take(*keys):  # the first of ``keys`` the file holds
        found = next((k for k in keys if k in hf), None)
        if found is None:
            raise CheckpointError(f"{source} lacks the weight {keys[0]} that its config.json implies")
        return hf.pop(found)

    def layer(i, names, suffix):
        return take(*(f"{root}.{r.format(i)}{n}.{suffix}" for r in HF_LAYER_ROOTS for n in names))

    emb = f"{root}.embeddings."
    state = {"cls_token": take(emb + "cls_token"), "pos_embed": take(emb + "position_embeddings"),
             "patch_embed.proj.weight": take(emb + "patch_embeddings.projection.weight"),
             "patch_embed.proj.bias": take(emb + "patch_embeddings.projection.bias")}
    if token:
        state[token] = take(emb + "distillation_token")
    for i in range(depth):
        for suffix in ("weight", "bias") if qkv_bias else ("weight",):
            state[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat([layer(i, names, suffix) for names in HF_QKV])
        for module, names in HF_LAYER_MODULES.items():
            for suffix in ("weight", "bias"):
                state[f"blocks.{i}.{module}.{suffix}"] = layer(i, names, suffix)
    for suffix in ("weight", "bias"):
        state[f"norm.{suffix}"] = take(f"{root}.layernorm.{suffix}")
        for timm_head, hf_head in heads.items():
            state[f"{timm_head}.{suffix}"] = take(f"{hf_head}.{suffix}")
    left = [k for k in hf if not k.startswith(tuple(f"{root}.{u}" for u in HF_UNUSED))]
    if left:
        raise CheckpointError(f"{source} holds {len(left)} weights that its config.json has no place for, "
                              f"e.g. {left[0]}")
    if state["head.weight"].dim() != 2:
        raise CheckpointError(f"{source}: the classifier weight has shape {tuple(state['head.weight'].shape)}")
    return state


def _hf_mean_std(path, channels):
    """([mean], [std]) per channel from preprocessor_config.json, else ViTImageProcessor's 0.5."""
    file = os.path.join(path, "preprocessor_config.json")
    pre = read_json_object(file, CheckpointError) if os.path.isfile(file) else {}
    if pre.get("do_normalize") is False:
        return [0.0] * channels, [1.0] * channels
    out = []
    for key in ("image_mean", "image_std"):
        value = pre.get(key, HF_MEAN_STD)
        value = [value] * channels if isinstance(value, (int, float)) else value
        if not isinstance(value, list) or len(value) != channels or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise CheckpointError(f"{file}: {key} {value!r} does not give one number per channel ({channels})")
        out.append([float(v) for v in value])
    return out[0], out[1]
