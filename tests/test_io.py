import numpy as np
import pytest
import tifffile

from segsem_cli.errors import SegsemError
from segsem_cli.images import read_label, read_sem
from segsem_cli.manifest import read_manifest

FEI_XML = "<?xml version='1.0'?><Metadata><Scan><PixelWidth>1.25e-09</PixelWidth><PixelHeight>1.25e-09</PixelHeight></Scan></Metadata>"
ZEISS = "0\r\nAP_PIXEL_SIZE\r\nImage Pixel Size = 2.481 nm\r\n"


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_dtypes_and_fei_pixel_size(tmp_path, dtype):
    arr = (np.arange(12 * 10).reshape(12, 10) % 200).astype(dtype)
    p = tmp_path / "a.tif"
    tifffile.imwrite(p, arr, extratags=[(34682, "s", 0, FEI_XML, True)])
    pix, px = read_sem(p, pixel_nm=7.0)
    assert pix.dtype == np.float32 and pix.shape == (12, 10)
    np.testing.assert_array_equal(pix, arr.astype(np.float32))
    assert px == pytest.approx(1.25)  # metadata wins over the manifest


def test_fei_ini_style(tmp_path):
    p = tmp_path / "b.tif"
    tifffile.imwrite(p, np.zeros((4, 4), np.uint8), extratags=[(34682, "s", 0, "[Scan]\r\nPixelWidth=3.5e-09\r\n", True)])
    assert read_sem(p)[1] == pytest.approx(3.5)


def test_zeiss_pixel_size(tmp_path):
    p = tmp_path / "z.tif"
    tifffile.imwrite(p, np.zeros((4, 4), np.uint16), extratags=[(34118, "s", 0, ZEISS, True)])
    assert read_sem(p)[1] == pytest.approx(2.481)


def test_manifest_pixel_size_used_without_metadata(tmp_path):
    import cv2

    p = tmp_path / "c.png"
    cv2.imwrite(str(p), np.full((5, 6), 17, np.uint8))
    pix, px = read_sem(p, pixel_nm=0.8)
    assert px == 0.8 and pix.shape == (5, 6) and pix[0, 0] == 17



@pytest.mark.parametrize("suffix", [".bmp", ".jpg", ".jpeg"])
def test_bmp_and_jpeg_read_as_grey_with_the_manifest_pixel_size(tmp_path, suffix):
    import cv2

    img = np.tile(np.linspace(20, 220, 16).astype(np.uint8), (12, 1))  # smooth: JPEG keeps it within a few levels
    p = tmp_path / f"c{suffix}"
    cv2.imwrite(str(p), cv2.merge([img, img, img]))  # written as 3-channel grey, as SEM exports often are
    pix, px = read_sem(p, pixel_nm=1.5)
    assert px == 1.5 and pix.shape == (12, 16) and pix.dtype == np.float32
    assert np.abs(pix - img).max() <= (0 if suffix == ".bmp" else 6)
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(b"not an image")
    with pytest.raises(SegsemError, match=rf"bad\{suffix}: unreadable (BMP|JPEG)"):
        read_sem(bad, pixel_nm=1)
    with pytest.raises(SegsemError, match=r"unsupported image format '\.gif' \(use TIFF, PNG, BMP or JPEG\)"):
        (tmp_path / "x.gif").write_bytes(b"GIF89a")
        read_sem(tmp_path / "x.gif", pixel_nm=1)


def test_no_pixel_size_anywhere(tmp_path):
    p = tmp_path / "d.tif"
    tifffile.imwrite(p, np.zeros((4, 4), np.uint8))
    with pytest.raises(SegsemError, match=r"d\.tif: no pixel size"):
        read_sem(p)


def test_unreadable_tiff(tmp_path):
    p = tmp_path / "bad.tif"
    p.write_bytes(b"II*\x00garbage")
    with pytest.raises(SegsemError, match=r"bad\.tif: unreadable TIFF"):
        read_sem(p, pixel_nm=1)


def test_missing_image(tmp_path):
    with pytest.raises(SegsemError, match="file not found"):
        read_sem(tmp_path / "nope.tif", pixel_nm=1)


def test_label_size_mismatch(tmp_path):
    import cv2

    p = tmp_path / "l.png"
    cv2.imwrite(str(p), np.zeros((5, 6), np.uint8))
    assert read_label(p, (5, 6)).shape == (5, 6)
    with pytest.raises(SegsemError, match="does not match"):
        read_label(p, (6, 6))


def write(tmp_path, text, name="m.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_manifest_ok_with_extras_and_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    p = write(tmp_path / "sub", "image,x_nm,y_nm,pixel_nm,label,lot\nimg1.tif,10,20.5,1.0,l1.png,A7\nimg2.tif,-3,4,,,B1\n")
    rows = read_manifest(p)
    assert rows[0].image == tmp_path / "sub" / "img1.tif"
    assert rows[0].label == tmp_path / "sub" / "l1.png"
    assert (rows[0].x_nm, rows[0].y_nm, rows[0].pixel_nm) == (10.0, 20.5, 1.0)
    assert rows[0].extra == {"lot": "A7"} and rows[1].extra == {"lot": "B1"}
    assert rows[1].pixel_nm is None and rows[1].label is None and rows[1].row == 3


@pytest.mark.parametrize(
    "text,match",
    [
        ("image,x_nm,pixel_nm\na.tif,1,1\n", r"m\.csv row 1: missing column 'y_nm'"),
        ("image,x_nm,y_nm,pixel_nm\na.tif,1,abc,1\n", r"m\.csv row 2 field 'y_nm': 'abc' is not a number"),
        ("image,x_nm,y_nm,pixel_nm\na.tif,1,2,1\nb.tif,,2,1\n", r"m\.csv row 3 field 'x_nm': empty value"),
        ("image,x_nm,y_nm,pixel_nm\na.tif,1,2,-1\n", r"row 2 field 'pixel_nm': pixel size must be positive"),
        ("image,x_nm,y_nm,pixel_nm\na.tif,1,2,1\na.tif,1,2,1\n", r"row 3 field 'image': 'a.tif' already listed in row 2"),
        ("image,x_nm,y_nm,pixel_nm\n", r"m\.csv: manifest has no rows"),
    ],
)
def test_manifest_errors(tmp_path, text, match):
    with pytest.raises(SegsemError, match=match):
        read_manifest(write(tmp_path, text))


def test_manifest_label_required(tmp_path):
    p = write(tmp_path, "image,x_nm,y_nm,pixel_nm,label\na.tif,1,2,1,\n")
    with pytest.raises(SegsemError, match=r"row 2 field 'label'"):
        read_manifest(p, require_label=True)
