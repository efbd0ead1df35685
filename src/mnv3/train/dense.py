"""What the dense-prediction tasks (segmentation, detection) share when they start a run: the
weights a model starts from, the backbone tensors that carry over, batch-norm statistics for
weights that had them folded, and the run folder's state."""

from __future__ import annotations

from pathlib import Path


def load_source(weights: str | None, arch, default_arch: str, recipe, progress: bool = True):
    """(source model or None, base backbone spec, its preprocessing): the model `weights` loads to
    (any source the importers take), or a fresh spec from `arch`; the recipe's batch-norm momentum
    applied."""
    from mnv3.presets import resolve_arch
    from mnv3.weights import Preprocess, load, model_meta

    source, pre = None, Preprocess()
    if weights:
        source = load(weights, arch, progress=progress)
        base, pre = source.spec, model_meta(source).preprocess
    else:
        base = resolve_arch(arch or default_arch)
    if recipe.bn_momentum is not None:
        base = base.replace(bn_momentum=recipe.bn_momentum)
    return source, base, pre


def transfer_backbone(model, source) -> tuple[int, int]:
    """Copy `source`'s backbone (a classifier or a dense model) into `model.backbone`; returns (copied,
    not copied). Where the backbone only has fewer channels than the source (the RF2 stage of the
    paper's segmentation head, a detector's reduced tail), those layers inherit the source's weights
    as NetAdapt prunes: the filters with the largest L2 norm and the matching input channels
    (`mnv3.adapt.prune.pruned_model`), instead of starting random. Otherwise every tensor whose name
    and shape fit is copied and the rest keep their random initialisation."""
    theirs_model = source.backbone if hasattr(source, "backbone") else source
    theirs = _inherited(model.backbone, theirs_model) or theirs_model.state_dict()
    ours = model.backbone.state_dict()
    fit = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
    model.backbone.load_state_dict(fit, strict=False)
    return len(fit), len([k for k in ours if k not in fit])


def _inherited(ours, theirs) -> dict | None:
    """`theirs`'s state pruned to `ours`'s channel counts, or None when the two differ in more than
    fewer channels (another structure, more channels somewhere) or have the same counts."""
    import dataclasses

    from mnv3.adapt.prune import PruneError, pruned_model, structure

    a, b = getattr(ours, "spec", None), getattr(theirs, "spec", None)
    if a is None or b is None or len(a.blocks) != len(b.blocks):
        return None
    # strides and dilations do not change the weights (a dilated block halved may gain a residual)
    a = a.replace(blocks=tuple(dataclasses.replace(x, stride=y.stride, dilation=y.dilation)
                               for x, y in zip(a.blocks, b.blocks)))
    if structure(a) != structure(b):
        return None
    mine, source = _channel_counts(a), _channel_counts(b)
    if mine == source or any(x > y for x, y in zip(mine, source)):
        return None
    try:
        return pruned_model(theirs, a).state_dict()
    except PruneError:
        return None


def _channel_counts(spec) -> tuple[int, ...]:
    """Every channel count of a network, in order: stem, each block's expansion, output and SE, last conv."""
    blocks = tuple(c for b in spec.blocks for c in (b.expansion, b.out, b.se or 0))
    return (spec.stem.out, *blocks, spec.head.last_conv)


def backbone_note(model, source, weights: str, what: str) -> str:
    """Transfer the backbone (`transfer_backbone`) and say what was copied; none fitting is an error."""
    from mnv3.train.engine import TrainError

    copied, fresh = transfer_backbone(model, source)
    if copied == 0:
        raise TrainError(f"--weights {weights}: no backbone tensor fits {model.spec.name}; pass the backbone "
                         "these weights were trained for (--arch)")
    return f"backbone from {weights}: {copied} tensors copied, {fresh} new ({what})"


def restore_batchnorm(model, source, dataset) -> str:
    """When `source` had its batch norm folded into the convolutions (the authors' TFLite files),
    estimate the statistics on 64 images of `dataset` so training starts from the same network;
    returns what to add to the run's note ("" when nothing was done)."""
    from mnv3.train.classify import has_folded_batchnorm, unfold_batchnorm

    if source is None or not has_folded_batchnorm(source.backbone if hasattr(source, "backbone") else source):
        return ""
    n = unfold_batchnorm(model, dataset, images=64, batch=8)
    return (f"; its batch norm was folded into the convolutions: statistics estimated on {n} training "
            "images so that training starts from the same network")


def check_run_folder(out: str | Path, resume: bool) -> Path:
    """The run folder: it must exist to resume, and must not hold a run to start one."""
    from mnv3.train.engine import TrainError

    out = Path(out)
    if resume and not out.is_dir():
        raise TrainError(f"{out}: no such run folder to resume")
    if not resume and ((out / "checkpoint.pt").exists() or (out / "model.safetensors").exists()):
        raise TrainError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    return out
