"""Export to ONNX or to a torch.export program (.pt2), verified against PyTorch, with a preprocessing JSON beside it."""
import copy
import logging
import os
import warnings

import numpy as np
import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.models.eva import Eva
from timm.models.vision_transformer import Attention, Block, VisionTransformer

import flops
from pruning import SpecError, TokenReducingBlock, eva_blocks
from utils import UserError, clean_message, write_json_atomic

logger = logging.getLogger("vitcompress")

# the format a path is exported to, by its suffix
EXPORT_FORMATS = {".onnx": "onnx", ".pt2": "pt2"}

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
    """A model that cannot be exported for a known reason, or an exported file that disagrees with
    PyTorch (one-line message)."""


def export_format(path):
    """"onnx" or "pt2", by ``path``'s suffix; ExportError naming both for any other suffix."""
    fmt = EXPORT_FORMATS.get(os.path.splitext(os.fspath(path))[1].lower())
    if fmt is None:
        raise ExportError(f"cannot export to {os.fspath(path)}: the suffix names the format, .onnx (ONNX) or .pt2 "
                          f"(a torch.export program); e.g. {os.path.splitext(os.fspath(path))[0]}.onnx")
    return fmt


def check_exportable(model):
    """Raise ExportError naming what this export does not support; returns the (H, W) input size.

    Supported: a timm VisionTransformer (distilled too) whose blocks are exactly timm ``Block`` or
    ``pruning.TokenReducingBlock`` with timm ``Attention`` and ``Mlp``, at a fixed image size.
    A subclass with its own forward may hide data-dependent Python control flow, so it is refused
    by name rather than exported into a graph that holds for one input only.
    An EVA-02 Eva is supported with the blocks ``pruning.eva_blocks`` accepts (``_check_exportable_eva``).
    """
    if isinstance(model, Eva):
        return _check_exportable_eva(model)
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


def _check_exportable_eva(model):
    """check_exportable for a timm Eva: EvaBlocks with EvaAttention (AttentionRope where heads were
    sliced) and a SwiGLU / GluMlp / Mlp, at a fixed image size (the rope is built for its patch grid)."""
    try:
        eva_blocks(model)
    except SpecError as e:
        raise ExportError(f"cannot export: {e}") from e
    size = getattr(model.patch_embed, "img_size", None)
    if size is None or getattr(model, "dynamic_img_size", False):
        raise ExportError("cannot export: the model has no fixed image size")
    return int(size[0]), int(size[1])


def _dynamic_batch():
    """torch.export's dynamic_shapes for the one input: its axis 0 (the batch) is symbolic."""
    return ({0: torch.export.Dim("batch")},)


def _export_graph(model, example, path, opset, exporter):
    """torch.onnx.export with a dynamic batch axis, one self-contained file."""
    if exporter == "dynamo":
        torch.onnx.export(model, (example,), path, dynamo=True, external_data=False, opset_version=opset,
                          input_names=[ONNX_INPUT_NAME], output_names=[ONNX_OUTPUT_NAME],
                          dynamic_shapes=_dynamic_batch(), verbose=False)
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


def _compare(run, model, sample, atol, path, pair):
    """``run`` (numpy logits of a float32 batch) against ``model`` (float32, eval) on ``sample``
    [N, 3, H, W], on the whole batch and on its first image alone (the batch axis is dynamic).
    Returns {"max_abs_diff", "top1_agreement", "images", "batch_sizes"}; raises ExportError
    beyond ``atol`` (``pair`` names what differs), or when the shapes differ."""
    sample = torch.as_tensor(sample).detach().float().cpu()
    was_training = model.training
    model.eval()
    batches = [sample] if sample.shape[0] == 1 else [sample, sample[:1]]
    diff, agree = 0.0, None
    try:
        with torch.no_grad():
            for x in batches:
                ref = model(x).float().cpu().numpy()
                got = run(x)
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
        raise ExportError(f"{pair} differ by {diff:.3g} (tolerance {atol:g}) on {path}; "
                          f"top-1 agreement {agree:.1%}")
    return result


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
    return _compare(lambda x: sess.run([ONNX_OUTPUT_NAME], {ONNX_INPUT_NAME: x.numpy()})[0], model, sample, atol,
                    path, "ONNX Runtime and PyTorch")


def verify_pt2(path, model, sample, atol=1e-4):
    """Load the .pt2 file with ``torch.export.load`` (as a deployer does) and run its program and
    ``model`` on ``sample``, as ``verify_onnx`` does; same result and errors."""
    with open(path, "rb") as f:  # a file object: the loader expects a .pt2 name, ``path`` may be a temporary
        program = torch.export.load(f).module()
    return _compare(lambda x: program(x).float().numpy(), model, sample, atol, path,
                    "the loaded torch.export program and the model")


def _prepare(model, path, arch, sample, verify_batch, seed, fmt):
    """What every format checks and needs before exporting: the target (``check_export_target``,
    of format ``fmt``), the model (``check_exportable``, its size against ``arch``) and the
    verification images. Returns (float32 CPU eval copy of ``model``, sample, its description)."""
    check_export_target(path)
    if export_format(path) != fmt:
        raise ExportError(f"export_{fmt} writes .{fmt} files, not {os.fspath(path)}; export_model picks the "
                          f"format from the suffix")
    height, width = check_exportable(model)
    size = int(arch["input_size"])
    if (height, width) != (size, size):
        raise ExportError(f"the model expects {height}x{width} images but its file says input_size {size}")
    model = copy.deepcopy(model).float().cpu().eval()
    in_chans = int(model.patch_embed.proj.in_channels)
    kind = "given images" if sample is not None else f"random normal images (seed {seed})"
    if sample is None:
        g = torch.Generator().manual_seed(seed)
        sample = torch.randn(max(int(verify_batch), 1), in_chans, height, width, generator=g)
    sample = torch.as_tensor(sample).detach().float().cpu()
    if sample.ndim != 4 or tuple(sample.shape[1:]) != (in_chans, height, width):
        raise ExportError(f"verification images have shape {tuple(sample.shape)}, expected [N, {in_chans}, "
                          f"{height}, {width}]")
    return model, sample, kind


def _write_verified(path, write, verify, what):
    """``write(tmp)`` then ``verify(tmp)`` on ``path``'s temporary copy, renamed to ``path`` only
    once verified: a failed export leaves no file. ``what`` names the exporter in its error.
    Returns the verification result."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".partial"
    try:
        try:
            write(tmp)
        except Exception as e:  # the exporters raise many types; report the first line, keep the chain
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise ExportError(f"{what} failed: {type(e).__name__}: {first}") from e
        check = verify(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return check


def _example(sample):
    """The batch a graph is traced with: 2 images (a batch of 1 would be specialised)."""
    return sample[:2] if sample.shape[0] >= 2 else sample.repeat(2, 1, 1, 1)


def _write_metadata(model, path, arch, fmt, io_names, check, atol, sample_kind, crop_ratio, interpolation,
                    extra):
    """The JSON file beside an exported ``path``: what a deployer needs (see export_onnx).
    Returns its content, plus ``<fmt>_path`` and ``json_path``."""
    in_chans, (height, width) = int(model.patch_embed.proj.in_channels), map(int, model.patch_embed.img_size)
    size = int(arch["input_size"])
    try:
        cost = flops.model_macs(model, (height, width))
        gmacs, params = cost["macs"] / 1e9, cost["params"]
    except ValueError:  # a head flops.py does not count (attention pooling)
        gmacs, params = None, sum(p.numel() for p in model.parameters())
    distilled = isinstance(getattr(model, "head_dist", None), torch.nn.Module)
    name_in, name_out = io_names
    meta = {
        fmt: os.path.basename(path),
        "model": arch.get("model"),
        "input": {**name_in, "shape": ["N", in_chans, height, width], "dtype": "float32",
                  "layout": "NCHW, RGB, pixel values scaled to [0, 1], then (x - mean) / std per channel"},
        "output": {**name_out, "shape": ["N", int(model.num_classes)],
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
        **({"labels": list(arch["labels"])} if arch.get("labels") else {}),  # a Hugging Face model's id2label
        "gmacs": gmacs,
        "params": int(params),
        "prune_spec": getattr(model, "prune_spec", None) or arch.get("prune_spec"),
        **extra,
        "verification": dict(check, atol=float(atol), sample=sample_kind),
    }
    json_path = metadata_path(path)
    write_json_atomic(json_path, meta)
    return dict(meta, **{f"{fmt}_path": path, "json_path": json_path})


def export_model(model, path, arch, **options):
    """``export_onnx`` or ``export_pt2``, by ``path``'s suffix (.onnx or .pt2)."""
    return (export_onnx if export_format(path) == "onnx" else export_pt2)(model, path, arch, **options)


def export_onnx(model, path, arch, sample=None, opset=ONNX_OPSET, atol=1e-4, exporter=DEFAULT_ONNX_EXPORTER,
                crop_ratio=0.875, interpolation="bicubic", verify_batch=5, seed=0):
    """Export ``model`` (dense or compressed timm ViT) to ONNX at ``path`` and verify it.

    * The file has one input ``input`` [N, 3, H, W] (float32, normalised with ``arch`` mean / std,
      N dynamic) and one output ``logits`` [N, classes]. A distilled DeiT outputs the mean of its
      class and distillation heads, as DeiT and timm do in eval mode.
    * ``arch`` is the model file's ``arch`` entry (``models.model_arch``): name, input size, mean,
      std, prune spec. ``sample``: images [N, 3, H, W] to verify on (already normalised); None draws
      ``verify_batch`` standard-normal images with ``seed``.
    * Verification (``verify_onnx``) runs ONNX Runtime (CPU) and PyTorch on the same images and
      raises ExportError beyond ``atol``; a failed export leaves no file at ``path``.
    * A JSON file beside it (``path`` with ``.json``) says what a deployer needs: preprocessing
      (mean, std, input size, interpolation, resize and crop), class count, GMACs, params, the
      prune spec and the verification result.

    Returns that JSON content as a dict, plus ``onnx_path`` and ``json_path``.
    """
    if exporter not in ONNX_EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(ONNX_EXPORTERS)}")
    if exporter == "torchscript" and isinstance(model, Eva):
        raise ExportError("the TorchScript exporter cannot trace timm's Eva (its tracer turns the forward's "
                          "is_causal flag into a tensor); export EVA models with the default dynamo exporter")
    if int(opset) < 17:
        raise ExportError(f"opset {opset} is too old: LayerNormalization needs opset 17 or newer")
    model, sample, sample_kind = _prepare(model, path, arch, sample, verify_batch, seed, "onnx")
    _onnxruntime()  # before the export, which takes a while
    path = os.fspath(path)
    check = _write_verified(path, lambda tmp: _export_graph(model, _example(sample), tmp, int(opset), exporter),
                            lambda tmp: verify_onnx(tmp, model, sample, atol=atol),
                            f"torch.onnx.export ({exporter}) on {arch.get('model', type(model).__name__)}")
    meta = _write_metadata(model, path, arch, "onnx", ({"name": ONNX_INPUT_NAME}, {"name": ONNX_OUTPUT_NAME}),
                           check, atol, sample_kind, crop_ratio, interpolation,
                           {"opset": int(opset), "exporter": exporter,
                            "versions": {"torch": torch.__version__, "onnxruntime": _onnxruntime_version()}})
    logger.info(f"exported {path} ({exporter}, opset {opset}): ONNX Runtime vs PyTorch max |diff| "
                f"{check['max_abs_diff']:.2e}, top-1 agreement {check['top1_agreement']:.1%} on "
                f"{check['images']} images (batch sizes {check['batch_sizes']}); metadata {meta['json_path']}")
    return meta


def export_pt2(model, path, arch, sample=None, atol=1e-4, crop_ratio=0.875, interpolation="bicubic", verify_batch=5,
               seed=0):
    """Export ``model`` to a torch.export program at ``path`` (.pt2, ``torch.export.save``) and verify it.

    The program takes one float32 tensor [N, 3, H, W] (N dynamic; normalised as ``arch`` says) and
    returns the logits [N, classes]; loading it needs only torch (``torch.export.load(path).module()``),
    not this repository, and ``torch.export.save`` files are only promised to load in the torch
    version that wrote them (recorded in the JSON). Arguments, verification (``verify_pt2``: the
    saved file loaded back), the JSON file beside it and the result are those of ``export_onnx``;
    the result has ``pt2_path`` instead of ``onnx_path``.
    """
    model, sample, sample_kind = _prepare(model, path, arch, sample, verify_batch, seed, "pt2")
    path = os.fspath(path)

    def write(tmp):
        program = torch.export.export(model, (_example(sample),), dynamic_shapes=_dynamic_batch())
        with open(tmp, "wb") as f:  # a file object: torch.export.save warns on a name not ending in .pt2
            torch.export.save(program, f)

    check = _write_verified(path, write, lambda tmp: verify_pt2(tmp, model, sample, atol=atol),
                            f"torch.export on {arch.get('model', type(model).__name__)}")
    meta = _write_metadata(model, path, arch, "pt2", ({}, {}), check, atol, sample_kind, crop_ratio, interpolation,
                           {"load": "torch.export.load(path).module()", "versions": {"torch": torch.__version__}})
    logger.info(f"exported {path} (torch.export): the loaded program vs PyTorch max |diff| "
                f"{check['max_abs_diff']:.2e}, top-1 agreement {check['top1_agreement']:.1%} on "
                f"{check['images']} images (batch sizes {check['batch_sizes']}); metadata {meta['json_path']}")
    return meta


def metadata_path(path):
    """The metadata file written beside an exported ``path``: ``model.onnx`` or ``model.pt2`` -> ``model.json``."""
    return os.path.splitext(os.fspath(path))[0] + ".json"


def export_files(path):
    """Every file exporting to ``path`` writes: the exported file, its temporary ``.partial`` copy,
    the metadata JSON beside it and that file's temporary copy."""
    path = os.fspath(path)
    return [path, path + ".partial", metadata_path(path), metadata_path(path) + ".tmp"]


def check_export_target(path, keep=()):
    """Raise ExportError (one line, before any work) when exporting to ``path`` cannot leave what
    it promises: ``path`` is a folder, its suffix names no format (``export_format``), two of the
    files it writes (``export_files``) are the same file (a link), or it would overwrite one of
    ``keep`` (e.g. the model file being exported)."""
    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(("/", os.sep)) or not os.path.basename(path):
        raise ExportError(f"{path} is a folder; name the file to write, e.g. {os.path.join(path, 'model.onnx')}")
    export_format(path)
    same = lambda p: os.path.normcase(os.path.realpath(os.fspath(p)))  # noqa: E731
    written = export_files(path)
    json_path = metadata_path(path)
    for other in written[1:]:
        if same(other) == same(path):
            what = "its metadata JSON" if other == json_path else "a temporary file"
            raise ExportError(f"cannot export to {path}: {what} would be written to {other}, the same file, "
                              f"overwriting the exported file; choose another name")
    for kept in keep:
        for target in written:
            if kept and os.path.exists(kept) and same(target) == same(kept):
                what = "the exported file" if target == path else f"its metadata {json_path}" \
                    if target == json_path else f"its temporary file {target}"
                raise ExportError(f"cannot export to {path}: {what} would overwrite {kept}; choose another name")


def _onnxruntime_version():
    return _onnxruntime().__version__


def _onnxruntime():
    """ONNX Runtime, imported here only: training, search and pruning run without it (and without
    its import time); only ONNX export and its verification need it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"exporting verifies the ONNX file in ONNX Runtime, which is not installed "
                          f"({clean_message(e)}): pip install onnxruntime") from e
    return onnxruntime
