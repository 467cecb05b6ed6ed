"""Building ViTs by timm name or small preset, loading weights, and the model file.

Every checkpoint this project writes carries an ``arch`` entry of primitives:
{"model": timm name or preset, "model_kwargs": {...}, "num_classes", "input_size",
"mean", "std", "prune_spec": dict or None}. From it ``load_model_file`` rebuilds the exact
(dense or compressed) architecture without any pickled code, then loads the weights.
"""
import difflib
import logging

from timm.models.vision_transformer import VisionTransformer

from utils import CheckpointError, UserError, load_checkpoint_file, state_dict_of

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
    import timm
    return list(PRESETS) + timm.list_models("*vit*") + timm.list_models("deit*")


def check_model_name(name):
    import timm
    if name in PRESETS or name in timm.list_models():
        return
    close = difflib.get_close_matches(name, _all_model_names(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('*vit*') or the presets " \
        + ", ".join(PRESETS)
    raise ModelError(f"unknown model '{name}'{hint}")


def build_model(name, num_classes=1000, img_size=None, pretrained=False, drop_rate=0.0, drop_path_rate=0.0,
                **extra):
    """A timm ViT/DeiT by name, or one of PRESETS. Raises ModelError with close names."""
    import timm
    check_model_name(name)
    kwargs = dict(num_classes=num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate, **extra)
    if name in PRESETS:
        preset = dict(PRESETS[name])
        distilled = preset.pop("distilled", False)
        preset.update(kwargs)
        if img_size is not None:
            preset["img_size"] = img_size
        if distilled:
            from timm.models.deit import VisionTransformerDistilled
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
        except (OSError, RuntimeError, ValueError) as e:
            if pretrained:
                raise ModelError(f"could not load pretrained weights for {name} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:160]}); without internet use --finetune FILE") from e
            raise
    if not isinstance(model, VisionTransformer):
        raise ModelError(f"model '{name}' is a {type(model).__name__}, not a timm VisionTransformer")
    return model


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


def load_weights(model, path, key_preference=("model",)):
    """Load exact-matching weights (``--resume``, ``--eval``) from a checkpoint or state dict."""
    ckpt = load_checkpoint_file(path)
    state = None
    for key in key_preference:
        if isinstance(ckpt.get(key), dict):
            state = ckpt[key]
            break
    if state is None:
        state = state_dict_of(ckpt)
    load_state_strict(model, state, path)
    return ckpt


def load_finetune(model, path):
    """Initialise from a file or URL (``--finetune``): drops a classifier of another size and
    interpolates position embeddings to the model's grid."""
    from timm.layers import resample_abs_pos_embed

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
        from pruning import apply_spec
        apply_spec(model, spec)
    return model


def load_model_file(path, device="cpu", use_ema=False, ckpt=None):
    """Load a model file written by this project: returns (model, ckpt). The model is in eval mode.
    ``ckpt`` is the file's already-loaded contents, when the caller has read them."""
    ckpt = load_checkpoint_file(path) if ckpt is None else ckpt
    arch = ckpt.get("arch")
    if not isinstance(arch, dict):
        raise CheckpointError(f"{path} has no 'arch' entry: not a model file written by this tool "
                              f"(use --model NAME --finetune {path} for plain weights)")
    model = build_from_arch(arch)
    state = ckpt.get("model_ema") if use_ema and isinstance(ckpt.get("model_ema"), dict) else state_dict_of(ckpt)
    load_state_strict(model, state, path)
    return model.to(device).eval(), ckpt


def save_model_file(path, model, arch, extra=None):
    """Write a self-contained model file: arch primitives + state dict (+ extra primitives)."""
    from utils import save_atomic
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
