"""Shared DICOM test data: an ultrasound cine phantom carrying PHI in its tags and burnt into its pixels, and
a writer for it in any transfer syntax pydicom (with its plugins) can encode, or JPEG baseline through Pillow."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest


pydicom = pytest.importorskip("pydicom", reason="pydicom is needed for the DICOM cases (pip install -e .[dicom])")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.pixels import convert_color_space  # noqa: E402
from pydicom.uid import (  # noqa: E402
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)


PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID998877",
    "PatientBirthDate": "19700101",
    "InstitutionName": "Saint Example Hospital",
    "AccessionNumber": "ACC554433",
    "ReferringPhysicianName": "Who^Doctor",
    "StudyInstanceUID": "1.2.826.0.1.3680043.99.12345",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.99.67890",
}
PHI_IN_PATHS = ["Doe_Jane", "PID998877"]  # the DICOM folder and file names carry PHI too
# The DICOM phantom: a fan (apex at the top centre) of boiling speckle on a 120 x 160 canvas, burnt-in
# text inside the fan's bounding box but outside the fan, a moving ECG trace below it.
H, W, APEX, RADIUS, HALF_ANGLE = 120, 160, (80, 6), 100, np.deg2rad(40)
TEXT = (slice(10, 22), slice(18, 46))  # rows, columns


def fan_mask() -> np.ndarray:
    y, x = np.mgrid[:H, :W]
    dy, dx = y - APEX[1], x - APEX[0]
    return (np.hypot(dx, dy) < RADIUS) & (np.abs(np.arctan2(dx, np.maximum(dy, 1e-6))) < HALF_ANGLE) & (dy > 0)


def echo_frames(num_frames: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = np.zeros((num_frames, H, W), dtype=np.uint8)
    fan = fan_mask()
    frames[:, fan] = rng.integers(40, 220, size=(num_frames, fan.sum()))
    frames[:, TEXT[0], TEXT[1]] = np.where(np.arange(TEXT[1].stop - TEXT[1].start) % 4 < 2, 255, 0)  # "text"
    for t in range(num_frames):  # ECG: a sweeping trace under the sector
        columns = np.arange((t * 7) % W + 1)
        frames[t, 115 + np.round(3 * np.sin(columns / 5 + t)).astype(int), columns] = 200
    return frames


def write_dicom(
    path: Path,
    frames: np.ndarray,
    modality: str = "US",
    jpeg: bool = False,
    regions: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    pixel_data: bool = True,
    photometric: str = "MONOCHROME2",
):
    """A DICOM of grey `frames` (T, H, W) uint8 at 50 fps, with `PHI` in its tags. `jpeg`: JPEG baseline frames
    (Pillow); else `transfer_syntax`, encoded by pydicom (RLE; JPEG-LS with pyjpegls; JPEG 2000 with pylibjpeg-
    openjpeg). `pixel_data=False` leaves the pixel data out. `photometric`: MONOCHROME2, MONOCHROME1 (stored
    inverted), RGB or YBR_FULL (the grey replicated, then converted), uncompressed."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage if modality == "US" else CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyDescription = modality, f"Echo of {PHI['PatientName']}"
    ds.Rows, ds.Columns = frames.shape[1:]
    if len(frames) > 1:
        ds.NumberOfFrames, ds.FrameTime = len(frames), "20"  # 50 fps
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    if photometric == "MONOCHROME1":
        frames = 255 - frames
    elif photometric in ("RGB", "YBR_FULL"):
        frames = np.repeat(frames[..., None], 3, axis=-1)  # (T, H, W, 3), colour by pixel
        if photometric == "YBR_FULL":
            frames = convert_color_space(frames, "RGB", "YBR_FULL")
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if regions:
        region = pydicom.Dataset()
        region.RegionSpatialFormat = 1
        region.RegionLocationMinX0, region.RegionLocationMinY0 = 10, 4
        region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 150, 108
        ds.SequenceOfUltrasoundRegions = [region]
    if pixel_data and jpeg:
        from PIL import Image

        encoded = []
        for frame in frames:
            buffer = io.BytesIO()
            Image.fromarray(frame, mode="L").save(buffer, format="JPEG", quality=95)
            encoded.append(buffer.getvalue())
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    elif pixel_data:
        ds.PixelData = frames.tobytes()
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax)
    ds.save_as(path, enforce_file_format=True)
