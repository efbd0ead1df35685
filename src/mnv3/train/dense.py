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
    """Copy every backbone tensor of `source` (a classifier or a dense model) whose name and shape
    fit `model.backbone`; returns (copied, not copied). Layers whose channels changed (the RF2 stage,
    a reduced tail) keep their random initialisation."""
    theirs = source.backbone.state_dict() if hasattr(source, "backbone") else source.state_dict()
    ours = model.backbone.state_dict()
    fit = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
    model.backbone.load_state_dict(fit, strict=False)
    return len(fit), len([k for k in ours if k not in fit])


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
