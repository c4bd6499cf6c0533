"""Reading SEM images and their pixel size.

Supported: TIFF (8-bit, 16-bit, float32; first page, single channel or RGB
converted to grey) and PNG. The pixel size comes from, in this order:

1. FEI / Thermo Fisher metadata: TIFF tag 34682 holding XML with an element
   ``PixelWidth`` (metres) anywhere in the tree.
2. FEI legacy INI text in tag 34682 (``PixelWidth=1.0e-09`` in ``[Scan]``).
3. Zeiss SmartSEM: TIFF tag 34118, a text block with ``Image Pixel Size = 1.234 nm``
   (units pm, nm, um/µm accepted).
4. The manifest's ``pixel_nm`` column.

Neither present is a :class:`~segsem_cli.errors.SegsemError`.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from .errors import SegsemError

FEI_TAG = 34682
ZEISS_TAG = 34118
_UNITS_NM = {"pm": 1e-3, "nm": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3, "mm": 1e6, "m": 1e9}


def _tag_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], (str, bytes)):
        return "\n".join(_tag_text(v) or "" for v in value)
    return str(value)


def _raw_tag_text(tif, tag) -> str | None:
    """The tag's bytes as text, read from the file (tifffile parses some vendor tags into dicts)."""
    if isinstance(tag.value, (str, bytes)) and tag.value:
        return _tag_text(tag.value)
    try:
        fh = tif.filehandle
        fh.seek(tag.valueoffset)
        return fh.read(tag.count).decode("utf-8", errors="replace")
    except Exception:  # noqa: BLE001
        return _tag_text(tag.value)


def pixel_nm_from_fei(text: str) -> float | None:
    """Pixel size in nm from an FEI/Thermo tag-34682 block (XML or INI), or None."""
    text = text.strip().strip("\x00")
    if text.startswith("<"):
        try:
            root = ET.fromstring(text)
        except ET.ParseError:
            root = None
        if root is not None:
            for el in root.iter():
                tag = el.tag.rsplit("}", 1)[-1]
                if tag == "PixelWidth" and el.text and el.text.strip():
                    try:
                        return float(el.text.strip()) * 1e9
                    except ValueError:
                        return None
            # Some exports put the value in <PixelSize><X>..</X></PixelSize>
            for el in root.iter():
                if el.tag.rsplit("}", 1)[-1] == "PixelSize":
                    x = el.find("X")
                    if x is not None and x.text:
                        try:
                            return float(x.text) * 1e9
                        except ValueError:
                            return None
            return None
    m = re.search(r"^\s*PixelWidth\s*=\s*([0-9.eE+-]+)", text, flags=re.M)
    if m:
        return float(m.group(1)) * 1e9
    return None


def pixel_nm_from_zeiss(text: str) -> float | None:
    """Pixel size in nm from a Zeiss tag-34118 text block, or None."""
    m = re.search(r"Image Pixel Size\s*=\s*([0-9.eE+-]+)\s*([a-zA-Zµμ]+)", text)
    if not m:
        return None
    unit = m.group(2)
    if unit not in _UNITS_NM:
        return None
    return float(m.group(1)) * _UNITS_NM[unit]


def _to_gray(arr: np.ndarray, path: Path) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 3:
        if arr.shape[-1] in (3, 4):
            arr = arr[..., :3].astype(np.float32).mean(axis=-1)
        elif arr.shape[0] in (1, 3, 4) and arr.shape[-1] > 4:
            arr = arr[:3].astype(np.float32).mean(axis=0)
        else:
            raise SegsemError(f"{path}: unsupported image layout {arr.shape} (expected a 2-D grey image)")
    if arr.ndim != 2:
        raise SegsemError(f"{path}: unsupported image shape {arr.shape} (expected a 2-D grey image)")
    if arr.dtype.kind not in "uif" and arr.dtype != bool:
        raise SegsemError(f"{path}: unsupported pixel type {arr.dtype}")
    out = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(out)):
        raise SegsemError(f"{path}: image contains NaN or infinite values")
    return out


#: Formats read with OpenCV (no pixel-size metadata: the manifest's ``pixel_nm`` is used). BMP is
#: what several CD-SEMs export; JPEG is lossy (8 x 8 block artefacts), read but not recommended.
_CV2_FORMATS = {".png": "PNG", ".bmp": "BMP", ".jpg": "JPEG", ".jpeg": "JPEG"}


def read_sem(path: str | Path, pixel_nm: float | None = None) -> tuple[np.ndarray, float]:
    """Read an SEM image and its pixel size.

    Parameters
    ----------
    path : TIFF, PNG, BMP or JPEG file (colour is averaged to grey).
    pixel_nm : fallback pixel size in nm (from the manifest), used only when
        the file carries none.

    Returns
    -------
    pixels : 2-D float32 array indexed ``[row, column]`` (grey levels as stored).
    pixel_nm : pixel size in nm (metadata wins over the argument).
    """
    path = Path(path)
    if not path.is_file():
        raise SegsemError(f"{path}: file not found")
    suffix = path.suffix.lower()
    meta_px = None
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                arr = page.asarray()
                tags = page.tags
                fei = tags.get(FEI_TAG)
                if fei is not None:
                    t = _raw_tag_text(tif, fei)
                    meta_px = pixel_nm_from_fei(t) if t else None
                if meta_px is None:
                    zeiss = tags.get(ZEISS_TAG)
                    if zeiss is not None:
                        t = _raw_tag_text(tif, zeiss)
                        meta_px = pixel_nm_from_zeiss(t) if t else None
        except SegsemError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure is bad input
            raise SegsemError(f"{path}: unreadable TIFF ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    elif suffix in _CV2_FORMATS:
        import cv2

        arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise SegsemError(f"{path}: unreadable {_CV2_FORMATS[suffix]}")
        if arr.ndim == 3:
            arr = arr[..., ::-1]  # BGR(A) -> RGB(A)
    else:
        raise SegsemError(f"{path}: unsupported image format '{path.suffix}' (use TIFF, PNG, BMP or JPEG)")
    pixels = _to_gray(arr, path)
    px = meta_px if meta_px is not None else pixel_nm
    if px is None:
        raise SegsemError(f"{path}: no pixel size in the file's metadata and none in the manifest (add a pixel_nm column)")
    if not (px > 0 and np.isfinite(px)):
        raise SegsemError(f"{path}: invalid pixel size {px!r} nm")
    return pixels, float(px)


def read_label(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read an instance label mask (PNG/TIFF, 0 = background, 1..N = objects) as int32."""
    path = Path(path)
    if not path.is_file():
        raise SegsemError(f"{path}: label file not found")
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            arr = tifffile.imread(path)
        except Exception as exc:  # noqa: BLE001
            raise SegsemError(f"{path}: unreadable label TIFF ({exc})") from None
    else:
        import cv2

        arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise SegsemError(f"{path}: unreadable label image")
    if arr.ndim != 2:
        raise SegsemError(f"{path}: label mask must be a single-channel image, got shape {arr.shape}")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise SegsemError(f"{path}: label size {arr.shape[1]}x{arr.shape[0]} does not match its image {shape[1]}x{shape[0]}")
    return arr.astype(np.int32)
