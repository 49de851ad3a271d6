"""LIBERO observation/action conventions (OpenVLA, openpi): pure numpy, no simulator needed."""

import math

import numpy as np
import pytest

from clients import libero_preprocess as lp

# Pillow 13.0 ``Image.resize((5, 7), LANCZOS / BILINEAR)`` of the 12x10x3 pattern below, recorded
# once with Pillow (not a dependency of the project) so the resampler is checked against PIL's.
_PATTERN = ((np.arange(12 * 10 * 3).reshape(12, 10, 3) * 37) % 256).astype(np.uint8)
_PIL_LANCZOS = [102, 121, 104, 134, 117, 121, 109, 135, 121, 124, 113, 140, 137, 124, 101, 98, 134,
                147, 152, 100, 130, 140, 156, 104, 120, 142, 164, 121, 129, 146, 108, 136, 116, 136,
                120, 131, 120, 136, 128, 136, 123, 119, 130, 137, 108, 95, 125, 144, 157, 99, 123,
                138, 170, 111, 111, 142, 117, 131, 119, 125, 113, 147, 127, 138, 129, 139, 129, 93,
                132, 145, 118, 108, 125, 151, 116, 97, 118, 135, 157, 110, 121, 132, 131, 113, 111,
                125, 133, 141, 119, 120, 119, 161, 140, 140, 131, 149, 140, 87, 137, 155, 126, 91,
                118, 164, 125]
_PIL_BILINEAR = [101, 119, 108, 132, 114, 120, 113, 135, 117, 120, 116, 138, 140, 118, 107, 104,
                 132, 146, 148, 109, 131, 138, 151, 112, 124, 141, 154, 122, 131, 145, 111, 137,
                 117, 133, 123, 133, 120, 136, 126, 136, 123, 122, 134, 136, 110, 101, 122, 143,
                 152, 107, 126, 136, 155, 110, 117, 139, 117, 131, 121, 126, 117, 148, 128, 136,
                 126, 142, 129, 109, 129, 144, 122, 112, 128, 147, 116, 102, 119, 133, 150, 111,
                 124, 131, 128, 114, 117, 125, 131, 140, 118, 123, 121, 157, 146, 145, 127, 149,
                 142, 95, 130, 149, 127, 98, 122, 156, 126]


def test_rotate_180_is_flip_of_both_axes():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    out = lp.rotate_180(img)
    assert out.flags["C_CONTIGUOUS"]
    assert np.array_equal(out[0, 0], img[1, 2]) and np.array_equal(out[1, 2], img[0, 0])
    assert np.array_equal(lp.rotate_180(out), img)
    assert np.array_equal(out, np.rot90(img, 2))


@pytest.mark.parametrize("method,golden", [("lanczos3", _PIL_LANCZOS), ("bilinear", _PIL_BILINEAR)])
def test_resize_matches_pillow(method, golden):
    out = lp.resize(_PATTERN, 7, 5, method=method, pil_compat=True)
    ref = np.array(golden, dtype=np.int32).reshape(7, 5, 3)
    assert out.shape == (7, 5, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(np.int32) - ref).max() <= 1


def test_resize_preserves_constant_and_ramp():
    const = np.full((256, 256, 3), 77, np.uint8)
    assert np.all(lp.resize(const, 224, 224) == 77)
    # A horizontal ramp stays (nearly) a ramp away from the borders: no shift of half a pixel.
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (8, 1, 3))
    out = lp.resize(ramp, 8, 128, method="bilinear").astype(float)
    expected = (np.arange(128) + 0.5) * 2 - 0.5
    assert np.abs(out[4, 4:-4, 0] - expected[4:-4]).max() <= 0.6


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        lp.resize(np.zeros((4, 4, 3), np.float32), 2, 2)
    with pytest.raises(ValueError, match="HWC"):
        lp.resize(np.zeros((4, 4), np.uint8), 2, 2)
    with pytest.raises(ValueError, match="method"):
        lp.resize(np.zeros((4, 4, 3), np.uint8), 2, 2, method="cubic")


def test_center_crop_keeps_area_fraction():
    top, left, ch, cw = lp.center_crop_box(224, 224, 0.9)
    assert (ch, cw) == (213, 213)  # 224 * sqrt(0.9) = 212.505 -> 213
    assert abs(ch * cw / 224 ** 2 - 0.9) < 0.01
    assert top == left == (224 - 213) // 2
    with pytest.raises(ValueError):
        lp.center_crop_box(10, 10, 0.0)
    # Crop + resize of an image whose centre is white and border black: more white afterwards.
    img = np.zeros((100, 100, 3), np.uint8)
    img[10:90, 10:90] = 255
    out = lp.center_crop_resize(img, 0.9)
    assert out.shape == img.shape
    assert (out > 128).mean() > (img > 128).mean()


def test_pad_geometry_and_resize_with_pad():
    # 128 x 256 (landscape) into 224 x 224: width-limited, 112 rows, 56 px black bars top/bottom.
    assert lp.pad_geometry(128, 256, 224, 224) == (112, 224, 56, 0)
    assert lp.pad_geometry(300, 100, 224, 224) == (224, 74, 0, 75)
    img = np.full((128, 256, 3), 200, np.uint8)
    out = lp.resize_with_pad(img, 224, 224)
    assert out.shape == (224, 224, 3)
    assert np.all(out[:56] == 0) and np.all(out[56 + 112:] == 0)
    assert np.all(out[56:56 + 112] == 200)
    # Square input of another size: no padding at all.
    sq = np.full((256, 256, 3), 9, np.uint8)
    assert np.all(lp.resize_with_pad(sq, 224, 224) == 9)


def _axisangle_to_quat(v):
    angle = np.linalg.norm(v)
    axis = v / angle
    return np.concatenate([axis * math.sin(angle / 2), [math.cos(angle / 2)]])


def test_quat2axisangle_known_and_roundtrip():
    q = np.array([0.0, 0.0, math.sin(0.3), math.cos(0.3)])  # 0.6 rad about z
    assert np.allclose(lp.quat2axisangle(q), [0, 0, 0.6], atol=1e-6)
    assert np.allclose(lp.quat2axisangle([0, 0, 0, 1]), 0)
    assert np.allclose(lp.quat2axisangle([0, 0, 0, 1.0000001]), 0)  # w clipped, no NaN
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = rng.normal(size=3)
        v *= rng.uniform(0.05, 3.0) / np.linalg.norm(v)
        assert np.allclose(lp.quat2axisangle(_axisangle_to_quat(v)), v, atol=1e-5)
    # LIBERO's home pose: gripper pointing down, quaternion ~ (1, 0, 0, 0) in xyzw -> pi about x.
    assert np.allclose(lp.quat2axisangle([1.0, 0, 0, 0.0]), [math.pi, 0, 0], atol=1e-6)
    with pytest.raises(ValueError):
        lp.quat2axisangle([0, 0, 1])


def test_libero_state_layout():
    obs = {"robot0_eef_pos": np.array([0.1, 0.2, 0.3]),
           "robot0_eef_quat": np.array([0.0, 0.0, math.sin(0.3), math.cos(0.3)]),
           "robot0_gripper_qpos": np.array([0.04, -0.04])}
    s = lp.libero_state(obs)
    assert s.dtype == np.float32 and s.shape == (8,)
    assert np.allclose(s, [0.1, 0.2, 0.3, 0, 0, 0.6, 0.04, -0.04], atol=1e-6)
    with pytest.raises(KeyError, match="robot0_gripper_qpos"):
        lp.libero_state({k: v for k, v in obs.items() if k != "robot0_gripper_qpos"})


def test_openvla_gripper_mapping():
    a = np.zeros((4, 7), np.float32)
    a[:, -1] = [1.0, 0.9, 0.1, 0.0]  # policy: 1 = open
    a[:, 0] = 0.25
    out = lp.openvla_gripper_to_env(a)
    assert out[:, -1].tolist() == [-1.0, -1.0, 1.0, 1.0]  # env: -1 = open, +1 = close
    assert np.all(out[:, 0] == 0.25)
    assert a[0, -1] == 1.0  # input untouched


def _fake_obs(h=256, w=256):
    rng = np.random.default_rng(1)
    return {"agentview_image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            "robot0_eye_in_hand_image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            "robot0_eef_pos": np.zeros(3), "robot0_eef_quat": np.array([1.0, 0, 0, 0]),
            "robot0_gripper_qpos": np.array([0.02, -0.02])}


def test_conventions_prepare_and_postprocess():
    obs = _fake_obs()
    vla = lp.make_convention("openvla", suite="libero_goal", jpeg=False)
    p = vla.prepare(obs, "open the drawer")
    assert list(p.images) == ["image"] and p.images["image"].shape == (224, 224, 3)
    assert vla.unnorm_key == "libero_goal"
    # The rotation happens before resizing: compare with rotating the resized original.
    direct = lp.resize(lp.rotate_180(obs["agentview_image"]), 224, 224)
    assert np.array_equal(p.images["image"], direct)
    chunk = np.zeros((3, 7), np.float32)
    chunk[:, -1] = 1.0
    assert np.all(vla.postprocess(chunk)[:, -1] == -1.0)
    with pytest.raises(ValueError, match=r"\(T, 7\)"):
        vla.postprocess(np.zeros((3, 4)))

    pi = lp.make_convention("openpi")
    q = pi.prepare(obs, "open the drawer")
    assert list(q.images) == ["observation/image", "observation/wrist_image"]
    assert q.state.shape == (8,) and pi.replan_steps == 5
    assert np.array_equal(pi.postprocess(chunk), chunk)
    with pytest.raises(ValueError, match="convention"):
        lp.make_convention("rt2")


def test_map_to_spec_images():
    obs = _fake_obs(128, 128)
    q = lp.make_convention("openpi").prepare(obs, "x")
    out = lp.map_to_spec_images(q.images, {"agentview": (64, 64), "wrist": (32, 48)})
    assert out["agentview"].shape == (64, 64, 3) and out["wrist"].shape == (32, 48, 3)
    # The wrist view went to the wrist key (its resize is the resize of the wrist image).
    assert np.array_equal(out["wrist"],
                          lp.resize(q.images["observation/wrist_image"], 32, 48, "bilinear"))
    p = lp.make_convention("openvla", jpeg=False).prepare(obs, "x")
    with pytest.raises(ValueError, match="wrist"):
        lp.map_to_spec_images(p.images, {"image": (224, 224), "wrist_image": (224, 224)})
