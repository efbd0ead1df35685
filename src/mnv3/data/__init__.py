"""Images and data sets: reading, preprocessing as a model's metadata says, image folders."""

from mnv3.data.images import (
                              IMAGE_SUFFIXES,
                              DataError,
                              ImageFolderSet,
                              load_image,
                              preprocess_pixels,
                              to_input,
)

__all__ = ["IMAGE_SUFFIXES", "DataError", "ImageFolderSet", "load_image", "preprocess_pixels", "to_input"]
