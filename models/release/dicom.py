"""One synthetic chest X-ray as a DICOM Secondary Capture object that cannot pass for a real patient's.

Each file is a Secondary Capture Image (SOP class 1.2.840.10008.5.1.4.1.1.7) with Conversion Type
``SYN`` (the standard's defined term for a synthetic image), Image Type ``DERIVED\\SECONDARY\\SYNTHETIC``,
Patient's Name ``SYNTHETIC^CXRSYNTH``, a Patient ID derived from the dataset id, Patient Identity
Removed ``YES`` with a De-identification Method that says why, Burned In Annotation and Recognizable
Visual Features ``NO``, and no dates, times, names or other identifiers at all. UIDs are fresh
(:func:`pydicom.uid.generate_uid`: pydicom's UID root + a SHA-512 hash) but derived from the dataset id
and the image's file, so exporting the same dataset twice gives byte-identical files.

Model: one synthetic patient and one study per dataset, one series per label, one instance per image.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from models.release.manifest import ManifestRow

PATIENT_NAME = "SYNTHETIC^CXRSYNTH"
IMAGE_TYPE = ("DERIVED", "SECONDARY", "SYNTHETIC")
DEIDENTIFICATION_METHOD = "SYNTHETIC IMAGE FROM A DIFFUSION MODEL; NO REAL PATIENT"
SOFTWARE_VERSION = "cxrsynth 0.1.0"
_UID_NAMESPACE = "cxrsynth-release"


def dataset_uid(dataset_id: str, *parts: str) -> UID:
    """A UID that is new to the world but the same every time for (dataset id, parts)."""
    # generate_uid hashes "".join(entropy_srcs): join with a separator so ("ab", "c") != ("a", "bc").
    return generate_uid(entropy_srcs=["\x1f".join((_UID_NAMESPACE, dataset_id, *parts))])


def patient_id(dataset_id: str) -> str:
    """The synthetic Patient ID of a dataset: ``SYN-`` + the first 16 characters of its id."""
    return f"SYN-{dataset_id[:16]}"


def pixels_of(image_bytes: bytes) -> np.ndarray:
    """Grey pixels of a PNG/JPEG: uint8 for 8-bit images, uint16 for 16-bit ones (colour is converted)."""
    with Image.open(io.BytesIO(image_bytes)) as im:
        if im.mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(im, dtype=np.uint16)
        if im.mode == "I":
            return np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
        return np.asarray(im.convert("L"), dtype=np.uint8)


def synthetic_dicom(
    pixels: np.ndarray, row: ManifestRow, *, dataset_id: str, instance_number: int, series_number: int,
    generator_id: str | None = None,
) -> tuple[Dataset, dict[str, str]]:
    """A Secondary Capture dataset of one synthetic image and its UIDs (``study``, ``series``, ``sop``)."""
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected 2-D uint8/uint16 grey pixels, got {pixels.dtype} {pixels.shape}")
    uids = {"study": dataset_uid(dataset_id, "study"),
            "series": dataset_uid(dataset_id, "series", row.label),
            "sop": dataset_uid(dataset_id, "instance", row.file)}
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uids["sop"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CXRSYNTH_010"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    # SOP common
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uids["sop"]
    # Patient: synthetic, nothing real; type 2 attributes present and empty
    ds.PatientName = PATIENT_NAME
    ds.PatientID = patient_id(dataset_id)
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
    # Study
    ds.StudyInstanceUID = uids["study"]
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "SYNTHETIC"
    ds.AccessionNumber = ""
    ds.StudyDescription = "SYNTHETIC CHEST X-RAY DATASET"
    # Series
    ds.Modality = "OT"
    ds.SeriesInstanceUID = uids["series"]
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"SYNTHETIC {row.label}"[:64]
    ds.BodyPartExamined = "CHEST"
    # SC equipment
    ds.ConversionType = "SYN"
    ds.SecondaryCaptureDeviceManufacturer = "cxrsynth"
    if generator_id:
        ds.SecondaryCaptureDeviceManufacturerModelName = f"generator {generator_id}"[:64]
    ds.SecondaryCaptureDeviceSoftwareVersions = SOFTWARE_VERSION
    # General image
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.ImageType = list(IMAGE_TYPE)
    ds.DerivationDescription = "Sampled by a denoising diffusion model (cxrsynth); derived from no single image"
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.ImageComments = _comments(row)
    # Image pixel
    rows, cols = pixels.shape
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(rows), int(cols)
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = _pixel_data(pixels)
    return ds, {k: str(v) for k, v in uids.items()}


def _comments(row: ManifestRow) -> str:
    made: Mapping[str, Any] = {"label": row.label, "index": row.index, "seed": row.seed, "sampler": row.sampler,
                               "steps": row.steps, "guidance": row.guidance}
    how = ", ".join(f"{k}={v}" for k, v in made.items() if v is not None)
    return f"SYNTHETIC image generated by cxrsynth; not from a patient; not for diagnosis. {how}".strip()


def dicom_bytes(ds: Dataset) -> bytes:
    """The Part 10 file (preamble, file meta, Explicit VR Little Endian) of ``ds``."""
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _pixel_data(pixels: np.ndarray) -> bytes:
    data = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
    return data + (b"\0" if len(data) % 2 else b"")


class SyntheticDicomEncoder:
    """Encodes the images of one dataset as :func:`synthetic_dicom` + :func:`dicom_bytes` would, faster.

    Only a handful of elements change from one image to the next (SOP Instance UID, Instance Number,
    Image Comments, Pixel Data); the other ~40 are the same for every image of a series and size. For
    each such group a template is built once and parsed back from its bytes, so pydicom keeps those
    elements raw (already encoded) and only re-encodes the ones set per image: about 1.7x faster than
    building each file from scratch, and byte-identical (tests/unit/test_release_formats.py).
    """

    MAX_TEMPLATES = 64

    def __init__(self, dataset_id: str) -> None:
        self.dataset_id = dataset_id
        self._templates: dict[tuple[Any, ...], Dataset] = {}

    def encode(self, pixels: np.ndarray, row: ManifestRow, *, instance_number: int, series_number: int,
               generator_id: str | None = None) -> tuple[bytes, dict[str, str]]:
        """The Part 10 bytes of one image and its UIDs (``study``, ``series``, ``sop``)."""
        group = (row.label, series_number, pixels.shape, pixels.dtype.str, generator_id)
        template = self._templates.get(group)
        if template is None:
            ds, uids = synthetic_dicom(pixels, row, dataset_id=self.dataset_id, instance_number=instance_number,
                                       series_number=series_number, generator_id=generator_id)
            data = dicom_bytes(ds)
            if len(self._templates) >= self.MAX_TEMPLATES:
                self._templates.clear()
            self._templates[group] = dcmread(io.BytesIO(data))
            return data, uids
        sop = dataset_uid(self.dataset_id, "instance", row.file)
        template.SOPInstanceUID = sop
        template.file_meta.MediaStorageSOPInstanceUID = sop
        template.InstanceNumber = instance_number
        template.ImageComments = _comments(row)
        template.PixelData = _pixel_data(pixels)
        uids = {"study": str(template.StudyInstanceUID), "series": str(template.SeriesInstanceUID), "sop": str(sop)}
        return dicom_bytes(template), uids
