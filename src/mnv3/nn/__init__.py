"""Layers, the MobileNet backbone and the dense-prediction models (LR-ASPP, SSDLite)."""

from mnv3.nn.mobilenet import FeatureTap, MobileNet, build


def build_dense(spec, head):
    """The segmentation (`Segmenter`) or detection (`Detector`) model a `DenseHead` describes."""
    if head.task == "detect":
        from mnv3.nn.ssdlite import build_detector

        return build_detector(spec, head)
    from mnv3.nn.lraspp import build_segmenter

    return build_segmenter(spec, head)


__all__ = ["FeatureTap", "MobileNet", "build", "build_dense"]
