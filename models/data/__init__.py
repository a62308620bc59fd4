"""Readers for the real-data layouts (ImageFolder, images+masks, PneumoniaMNIST), patient splits."""

from models.data.folders import (
    IMAGE_SUFFIXES,
    ImageRecord,
    images_to_array,
    list_image_folder,
    load_grey,
    load_pneumoniamnist,
    patient_id_from_name,
    patient_split,
    write_image_folder,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageRecord",
    "images_to_array",
    "list_image_folder",
    "load_grey",
    "load_pneumoniamnist",
    "patient_id_from_name",
    "patient_split",
    "write_image_folder",
]
