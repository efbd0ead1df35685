"""Deployment: verified export of model files to ONNX, TFLite, PT2 and TorchScript."""

from mnv3.deploy.export import FORMATS, ExportError, ExportReport, export, read_metadata

__all__ = ["FORMATS", "ExportError", "ExportReport", "export", "read_metadata"]
