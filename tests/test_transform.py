import math

import numpy as np
import pytest

from segsem_cli.transform import PixelTransform


def make(**kw):
    base = dict(center_nm=(1000.0, 2000.0), pixel_nm=2.0, shape=(100, 200))
    base.update(kw)
    return PixelTransform(**base)


def test_image_centre_maps_to_centre_nm():
    t = make()
    # W = 200, H = 100: the centre of the image is (u, v) = (100, 50)
    np.testing.assert_allclose(t.to_layout([100.0, 50.0]), [1000.0, 2000.0])


def test_pixel_edge_convention_and_y_flip():
    t = make()
    # top-left corner of pixel (row 0, col 0) is (u, v) = (0, 0): x = Xc - W/2 p, y = Yc + H/2 p
    np.testing.assert_allclose(t.to_layout([0.0, 0.0]), [1000.0 - 200.0, 2000.0 + 100.0])
    # centre of pixel (row 0, col 0) is (0.5, 0.5)
    np.testing.assert_allclose(t.to_layout([0.5, 0.5]), [1000.0 - 199.0, 2000.0 + 99.0])
    # moving down in the image (v up) moves down in the layout (y down)
    a, b = t.to_layout([[10.0, 10.0], [10.0, 20.0]])
    assert b[1] < a[1] and b[0] == a[0]


def test_round_trip_with_offset_and_rotation():
    rng = np.random.default_rng(0)
    uv = rng.uniform(-50, 250, size=(500, 2))
    t = make(offset_nm=(3.25, -7.5), rotation_rad=0.01)
    np.testing.assert_allclose(t.to_pixel(t.to_layout(uv)), uv, atol=1e-9)


def test_offset_shifts_layout_position():
    t0 = make()
    t1 = t0.with_offset((4.0, -6.0))
    uv = np.array([[12.3, 45.6]])
    np.testing.assert_allclose(t1.to_layout(uv) - t0.to_layout(uv), [[4.0, -6.0]])
    assert t1.true_center_nm == (1004.0, 1994.0)


def test_rotation_is_counter_clockwise_about_centre():
    t = make(rotation_rad=math.pi / 2)
    # a point one pixel right of centre goes to one pixel (2 nm) above the centre in layout
    np.testing.assert_allclose(t.to_layout([101.0, 50.0]), [1000.0, 2002.0], atol=1e-9)


def test_field_of_view():
    t = make()
    assert t.field_of_view_nm() == pytest.approx((800.0, 1900.0, 1200.0, 2100.0))
    assert t.field_of_view_nm(5) == pytest.approx((790.0, 1890.0, 1210.0, 2110.0))


def test_bad_pixel_size():
    with pytest.raises(ValueError, match="pixel size"):
        make(pixel_nm=0.0)
