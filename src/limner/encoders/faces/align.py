"""Face alignment: the similarity transform that carries a face's 5 keypoints onto a template, and the
crop it cuts.

ArcFace reads faces aligned onto a fixed 112 x 112 template of the two eyes, the nose tip and the two
mouth corners. The transform (scale, rotation, translation) is the least-squares fit of Umeyama (1991),
as insightface estimates it (`estimate_norm`), and the crop is sampled bilinearly with black outside the
picture, as OpenCV's `warpAffine` does: the numpy here needs neither.
"""

from __future__ import annotations

import numpy as np

# where ArcFace's training crops put the eyes, nose tip and mouth corners, in a 112 x 112 picture
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def arcface_template(size: int) -> np.ndarray:
    """The template for a `size` px crop: scaled from 112 px, or for the 128-family sizes scaled from 128 px
    and shifted right by 8 px of that scale (insightface's convention for non-multiples of 112)."""
    if size % 112 == 0:
        return ARCFACE_TEMPLATE * (size / 112)
    if size % 128 == 0:
        ratio = size / 128
        return ARCFACE_TEMPLATE * ratio + np.array([8.0 * ratio, 0.0])
    raise ValueError(f"an ArcFace crop is a multiple of 112 or 128 px, not {size}")


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2 x 3 matrix M = [s R | t] minimising sum |dst_i - (s R src_i + t)|^2 over scale s, rotation R
    and translation t (Umeyama's closed form; a reflection is never chosen)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_src, mu_dst = src.mean(0), dst.mean(0)
    src_c, dst_c = src - mu_src, dst - mu_dst
    cov = dst_c.T @ src_c / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    d = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ np.diag(d) @ vt
    variance = (src_c**2).sum() / len(src)
    scale = (sigma * d).sum() / variance if variance > 0 else 1.0
    translation = mu_dst - scale * rotation @ mu_src
    return np.hstack([scale * rotation, translation[:, None]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points [N, 2] through a 2 x 3 affine matrix."""
    return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """The `size` x `size` picture whose pixel (x, y) is `image` at matrix^-1 (x, y), bilinear, black outside
    (OpenCV's warpAffine with INTER_LINEAR and a zero border). image: uint8 [H, W, C]."""
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    ys, xs = np.mgrid[:size, :size].astype(np.float64)
    src = apply(inverse, np.stack([xs.ravel(), ys.ravel()], -1))
    return sample_bilinear(image, src[:, 0], src[:, 1]).reshape(size, size, -1).astype(np.uint8)


def sample_bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """image at the points (x, y), bilinear, each of the four neighbours black where it lies outside."""
    h, w = image.shape[:2]
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    out = np.zeros((len(x), image.shape[2]), np.float64)
    for dx, dy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        out[inside] += weight[inside] * image[yi[inside], xi[inside]]
    return np.clip(np.rint(out), 0, 255)


def align(image: np.ndarray, keypoints: np.ndarray, template: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The face whose 5 keypoints are `keypoints` cut out onto `template` in a `size` px square: (crop uint8
    [size, size, 3], the 2 x 3 matrix from picture to crop coordinates)."""
    matrix = similarity_transform(keypoints, template)
    return warp_affine(image, matrix, size), matrix
