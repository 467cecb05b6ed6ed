"""Building ViTs by timm name or small preset, loading weights, and the model file.

Every checkpoint this project writes carries an ``arch`` entry of primitives:
{"model": timm name or preset, "model_kwargs": {...}, "num_classes", "input_size",
"mean", "std", "prune_spec": dict or None}. From it ``load_model_file`` rebuilds the exact
(dense or compressed) architecture without any pickled code, then loads the weights.
"""
import copy
import difflib
import hashlib
import logging
import os
import warnings

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, resample_abs_pos_embed
from timm.models.deit import VisionTransformerDistilled
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from pruning import TokenReducingBlock, apply_spec
from utils import (CheckpointError, UserError, clean_message, load_checkpoint_file, save_atomic, state_dict_of,
                   write_json_atomic)

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
    ckpt = load_checkpoint_file(path) if ckpt is None else ckpt
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
        if not isinstance(blk, Block):
            raise ModelError(f"cannot set drop-path on a {type(blk).__name__} block (timm Blocks only)")
        for name in ("drop_path1", "drop_path2"):  # in the block's mode: an eval model stays deterministic
            setattr(blk, name, (DropPath(p) if p > 0 else nn.Identity()).train(blk.training))
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


# =============================================================================================
# Deployment (issue 14): ONNX export, verified with ONNX Runtime against PyTorch.
# A self-contained section: nothing above depends on it; onnx / onnxruntime load lazily.
# =============================================================================================

ONNX_INPUT_NAME = "input"
ONNX_OUTPUT_NAME = "logits"
# Exporter and opset, by evidence (DeiT-S, 224 px, batch 32, ONNX Runtime CPU; the README's Deploy
# section and `benchmarks/bench_speed.py --onnxruntime --exporter dynamo:20 torchscript:17 ...`):
# * both exporters export the token-reducing block (TopK + GatherElements; max |diff| ~2e-6);
# * ORT speed is close at this scale: on a quiet Xeon (2 threads, 3 repeats) dynamo/opset-20 graphs
#   of the -40% / -60% models ran 1.67x / 2.56x faster than its dense graph (1.00 / 1.02 of the MACs
#   ratio), TorchScript/opset-17 graphs 1.50x / 2.12x (0.90 / 0.85); on 2 shared cores (load ~6,
#   5 repeats) 1.74x / 2.47x against 1.67x / 2.58x, every variant within the noise;
# * opset 20 has a Gelu operator that ORT fuses with the fc1 bias (BiasGelu); the dynamo graph at
#   opset 18 keeps Erf, Mul and Add apart (no speed difference measurable on these machines);
# * dynamo is torch's default, supported exporter; the TorchScript one is deprecated (a
#   DeprecationWarning since torch 2.9) but exports ~5x faster: exporter="torchscript" keeps it.
ONNX_OPSET = 20
ONNX_EXPORTERS = ("dynamo", "torchscript")
DEFAULT_ONNX_EXPORTER = "dynamo"


class ExportError(UserError):
    """A model that cannot be exported for a known reason, or an ONNX file that disagrees with
    PyTorch (one-line message)."""


def check_exportable(model):
    """Raise ExportError naming what this export does not support; returns the (H, W) input size.

    Supported: a timm VisionTransformer (distilled too) whose blocks are exactly timm ``Block`` or
    ``pruning.TokenReducingBlock`` with timm ``Attention`` and ``Mlp``, at a fixed image size.
    A subclass with its own forward may hide data-dependent Python control flow, so it is refused
    by name rather than exported into a graph that holds for one input only.
    """


    if not isinstance(model, VisionTransformer):
        raise ExportError(f"cannot export a {type(model).__name__}: only timm VisionTransformer models are supported")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise ExportError("cannot export: the model has no transformer blocks")
    for i, blk in enumerate(blocks):
        if type(blk) not in (Block, TokenReducingBlock):
            raise ExportError(f"cannot export block {i}: {type(blk).__name__} is not supported "
                              f"(only timm Block and TokenReducingBlock)")
        if type(blk.attn) is not Attention:
            raise ExportError(f"cannot export block {i}: attention {type(blk.attn).__name__} is not supported "
                              f"(only timm Attention)")
        if not isinstance(blk.mlp, Mlp):
            raise ExportError(f"cannot export block {i}: MLP {type(blk.mlp).__name__} is not supported "
                              f"(only timm Mlp)")
        if isinstance(blk, TokenReducingBlock) and not isinstance(blk.token_keep, int):
            raise ExportError(f"cannot export block {i}: its kept token count {blk.token_keep!r} is not a constant")
    size = getattr(model.patch_embed, "img_size", None)
    if size is None:
        raise ExportError("cannot export: the model has no fixed image size")
    return int(size[0]), int(size[1])


def _export_graph(model, example, path, opset, exporter):
    """torch.onnx.export with a dynamic batch axis, one self-contained file."""

    if exporter == "dynamo":
        batch = torch.export.Dim("batch")
        torch.onnx.export(model, (example,), path, dynamo=True, external_data=False, opset_version=opset,
                          input_names=[ONNX_INPUT_NAME], output_names=[ONNX_OUTPUT_NAME],
                          dynamic_shapes=({0: batch},), verbose=False)
    else:
        with warnings.catch_warnings():  # the tracer's shape-check and deprecation notes
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), path, dynamo=False, opset_version=opset,
                              input_names=[ONNX_INPUT_NAME], output_names=[ONNX_OUTPUT_NAME],
                              dynamic_axes={ONNX_INPUT_NAME: {0: "batch"}, ONNX_OUTPUT_NAME: {0: "batch"}})


def onnx_session(path, threads=0, spinning=True, optimized_path=None):
    """An ONNX Runtime CPU session with full graph optimisation (what a deployer gets by default).

    ``threads``: intra-op threads (0: ONNX Runtime's default, one per physical core);
    ``spinning=False`` stops idle worker threads from busy-waiting after a run (fair when
    interleaving with other work on the same cores); ``optimized_path`` saves the optimised graph.
    """
    onnxruntime = _onnxruntime()
    opts = onnxruntime.SessionOptions()
    opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path:
        opts.optimized_model_filepath = str(optimized_path)
    return onnxruntime.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def verify_onnx(path, model, sample, atol=1e-4):
    """Run the ONNX file in ONNX Runtime and ``model`` in PyTorch (float32, eval) on ``sample``
    [N, 3, H, W], on the whole batch and on its first image alone (the batch axis is dynamic).

    Returns {"max_abs_diff", "top1_agreement", "images", "batch_sizes"}; raises ExportError when the
    file's input / output names differ from ``input`` / ``logits`` or the logits differ by more
    than ``atol``.
    """
    sess = onnx_session(path)
    names_in = [i.name for i in sess.get_inputs()]
    names_out = [o.name for o in sess.get_outputs()]
    if names_in != [ONNX_INPUT_NAME] or names_out != [ONNX_OUTPUT_NAME]:
        raise ExportError(f"{path} has inputs {names_in} and outputs {names_out}, "
                          f"expected ['{ONNX_INPUT_NAME}'] and ['{ONNX_OUTPUT_NAME}']")
    sample = torch.as_tensor(sample).detach().float().cpu()
    was_training = model.training
    model.eval()
    batches = [sample] if sample.shape[0] == 1 else [sample, sample[:1]]
    diff, agree = 0.0, None
    try:
        with torch.no_grad():
            for x in batches:
                ref = model(x)
                got = sess.run([ONNX_OUTPUT_NAME], {ONNX_INPUT_NAME: x.numpy()})[0]
                ref = ref.float().cpu().numpy()
                if got.shape != ref.shape:
                    raise ExportError(f"{path} gives logits of shape {got.shape} for a batch of {x.shape[0]}, "
                                      f"PyTorch {ref.shape}")
                d = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
                diff = max(diff, d if np.isfinite(d) else float("inf"))
                if agree is None:
                    agree = float(np.mean(got.argmax(axis=1) == ref.argmax(axis=1)))
    finally:
        model.train(was_training)
    result = {"max_abs_diff": diff, "top1_agreement": agree, "images": int(sample.shape[0]),
              "batch_sizes": [int(x.shape[0]) for x in batches]}
    if not diff <= atol:
        raise ExportError(f"ONNX Runtime and PyTorch differ by {diff:.3g} (tolerance {atol:g}) on {path}; "
                          f"top-1 agreement {agree:.1%}")
    return result


def export_onnx(model, path, arch, sample=None, opset=ONNX_OPSET, atol=1e-4, exporter=DEFAULT_ONNX_EXPORTER,
                crop_ratio=0.875, interpolation="bicubic", verify_batch=5, seed=0):
    """Export ``model`` (dense or compressed timm ViT) to ONNX at ``path`` and verify it.

    * The file has one input ``input`` [N, 3, H, W] (float32, normalised with ``arch`` mean / std,
      N dynamic) and one output ``logits`` [N, classes]. A distilled DeiT outputs the mean of its
      class and distillation heads, as DeiT and timm do in eval mode.
    * ``arch`` is the model file's ``arch`` entry (``model_arch``): name, input size, mean, std,
      prune spec. ``sample``: images [N, 3, H, W] to verify on (already normalised); None draws
      ``verify_batch`` standard-normal images with ``seed``.
    * Verification (``verify_onnx``) runs ONNX Runtime (CPU) and PyTorch on the same images and
      raises ExportError beyond ``atol``; a failed export leaves no file at ``path``.
    * A JSON file beside it (``path`` with ``.json``) says what a deployer needs: preprocessing
      (mean, std, input size, interpolation, resize and crop), class count, GMACs, params, the
      prune spec and the verification result.

    Returns that JSON content as a dict, plus ``onnx_path`` and ``json_path``.
    """
    import flops  # here, not at the top: flops imports models

    if exporter not in ONNX_EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(ONNX_EXPORTERS)}")
    check_export_target(path)
    _onnxruntime()  # before the export, which takes a while
    if int(opset) < 17:
        raise ExportError(f"opset {opset} is too old: LayerNormalization needs opset 17 or newer")
    height, width = check_exportable(model)
    size = int(arch["input_size"])
    if (height, width) != (size, size):
        raise ExportError(f"the model expects {height}x{width} images but its file says input_size {size}")
    model = copy.deepcopy(model).float().cpu().eval()
    in_chans = int(model.patch_embed.proj.in_channels)
    sample_kind = "given images" if sample is not None else f"random normal images (seed {seed})"
    if sample is None:
        g = torch.Generator().manual_seed(seed)
        sample = torch.randn(max(int(verify_batch), 1), in_chans, height, width, generator=g)
    sample = torch.as_tensor(sample).detach().float().cpu()
    if sample.ndim != 4 or tuple(sample.shape[1:]) != (in_chans, height, width):
        raise ExportError(f"verification images have shape {tuple(sample.shape)}, expected [N, {in_chans}, "
                          f"{height}, {width}]")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".partial"
    try:
        example = sample[:2] if sample.shape[0] >= 2 else sample.repeat(2, 1, 1, 1)  # batch 1 would be specialised
        try:
            _export_graph(model, example, tmp, int(opset), exporter)
        except Exception as e:  # the exporters raise many types; report the first line, keep the chain
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise ExportError(f"torch.onnx.export ({exporter}) failed on {arch.get('model', type(model).__name__)}: "
                              f"{type(e).__name__}: {first}") from e
        check = verify_onnx(tmp, model, sample, atol=atol)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:
        cost = flops.model_macs(model, (height, width))
        gmacs, params = cost["macs"] / 1e9, cost["params"]
    except ValueError:  # a head flops.py does not count (attention pooling)
        gmacs, params = None, sum(p.numel() for p in model.parameters())
    distilled = isinstance(getattr(model, "head_dist", None), torch.nn.Module)
    meta = {
        "onnx": os.path.basename(path),
        "model": arch.get("model"),
        "input": {"name": ONNX_INPUT_NAME, "shape": ["N", in_chans, height, width], "dtype": "float32",
                  "layout": "NCHW, RGB, pixel values scaled to [0, 1], then (x - mean) / std per channel"},
        "output": {"name": ONNX_OUTPUT_NAME, "shape": ["N", int(model.num_classes)],
                   "meaning": "class logits (no softmax)" + (
                       "; the mean of the class and distillation heads, as DeiT in eval mode"
                       if distilled else "")},
        "mean": [float(m) for m in arch["mean"]],
        "std": [float(s) for s in arch["std"]],
        "input_size": [in_chans, height, width],
        "interpolation": interpolation,
        "crop_ratio": float(crop_ratio),
        "resize_shorter_side": int(size / crop_ratio),
        "preprocess": f"resize the shorter side to {int(size / crop_ratio)} px ({interpolation}), "
                      f"center-crop {height}x{width}, scale to [0, 1], normalise with mean and std",
        "num_classes": int(model.num_classes),
        "gmacs": gmacs,
        "params": int(params),
        "prune_spec": getattr(model, "prune_spec", None) or arch.get("prune_spec"),
        "opset": int(opset),
        "exporter": exporter,
        "verification": dict(check, atol=float(atol), sample=sample_kind),
        "versions": {"torch": torch.__version__, "onnxruntime": _onnxruntime_version()},
    }
    json_path = onnx_json_path(path)
    write_json_atomic(json_path, meta)
    logger.info(f"exported {path} ({exporter}, opset {opset}): ONNX Runtime vs PyTorch max |diff| "
                f"{check['max_abs_diff']:.2e}, top-1 agreement {check['top1_agreement']:.1%} on "
                f"{check['images']} images (batch sizes {check['batch_sizes']}); metadata {json_path}")
    return dict(meta, onnx_path=path, json_path=json_path)


def onnx_json_path(path):
    """The metadata file written beside an exported ``path``: ``model.onnx`` -> ``model.json``."""
    return os.path.splitext(os.fspath(path))[0] + ".json"


def export_files(path):
    """Every file ``export_onnx(model, path, ...)`` writes: the ONNX file, its temporary
    ``.partial`` copy, the metadata JSON beside it and that file's temporary copy."""
    path = os.fspath(path)
    return [path, path + ".partial", onnx_json_path(path), onnx_json_path(path) + ".tmp"]


def check_export_target(path, keep=()):
    """Raise ExportError (one line, before any work) when exporting to ``path`` cannot leave what
    it promises: ``path`` is a folder, two of the files it writes (``export_files``) are the same
    file (``--export model.json`` would have its metadata overwrite the ONNX file), or it would
    overwrite one of ``keep`` (e.g. the model file being exported)."""
    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(("/", os.sep)) or not os.path.basename(path):
        raise ExportError(f"{path} is a folder; name the ONNX file to write, e.g. {os.path.join(path, 'model.onnx')}")
    same = lambda p: os.path.normcase(os.path.realpath(os.fspath(p)))  # noqa: E731
    written = export_files(path)
    json_path = onnx_json_path(path)
    for other in written[1:]:
        if same(other) == same(path):
            suggestion = os.path.splitext(path)[0] + ".onnx"
            what = "its metadata JSON" if other == json_path else "a temporary file"
            raise ExportError(f"cannot export to {path}: {what} would be written to {other}, the same file, "
                              f"overwriting the ONNX file; name the ONNX file e.g. {suggestion}")
    for kept in keep:
        for target in written:
            if kept and os.path.exists(kept) and same(target) == same(kept):
                what = "the ONNX file" if target == path else f"its metadata {json_path}" if target == json_path \
                    else f"its temporary file {target}"
                raise ExportError(f"cannot export to {path}: {what} would overwrite {kept}; choose another name")


def _onnxruntime_version():
    return _onnxruntime().__version__


def _onnxruntime():
    """ONNX Runtime, imported here only: training, search and pruning run without it (and without
    its import time); only export and its verification need it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"exporting verifies the ONNX file in ONNX Runtime, which is not installed "
                          f"({clean_message(e)}): pip install onnxruntime") from e
    return onnxruntime
