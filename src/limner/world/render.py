"""Deterministic renderer of world scenes with exact ground truth.

A scene is drawn at 2x resolution (128 px) with PIL and box-filtered down to 64 px, which gives
anti-aliased edges for free. Every entity is drawn into its own mask first, so masks, bounding boxes
and keypoints come from the very shapes that were painted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from limner.world import vocab

SIZE = 64
SS = 2  # supersampling factor
CANVAS = SIZE * SS


# --------------------------------------------------------------------------------------------
# Scene description
# --------------------------------------------------------------------------------------------


SPLITS: tuple[str, ...] = ("vertical", "horizontal")


@dataclass(frozen=True)
class Subject:
    """A two-tone object instance with an emblem: a held-out subject of the bench, or an `instance` of
    the base model's training data."""

    name: str
    cls: str
    colour_a: str
    colour_b: str
    split: str  # one of SPLITS: "vertical" (left/right halves) or "horizontal" (top/bottom halves)
    emblem: str  # one of vocab.EMBLEMS
    emblem_colour: str


@dataclass(frozen=True)
class Identity:
    """A character's identity: one index per factor in vocab.IDENTITY_FACTORS."""

    face_shape: int
    skin: int
    hair_style: int
    hair_colour: int
    eye_colour: int
    eye_spacing: int
    nose: int
    mouth: int
    accessory: int

    def key(self) -> str:
        return "id-" + "".join(str(v) for v in self.factors())

    def factors(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in vocab.IDENTITY_FACTORS)


@dataclass
class ObjectSpec:
    cls: str
    colour: str
    pattern: str = "plain"
    x: float = 0.5  # centre, fraction of the image
    y: float = 0.6
    scale: float = 0.4  # half-extent as a fraction of the image
    rotation: float = 0.0  # degrees
    accessory: str | None = None
    subject: Subject | None = None


@dataclass
class CharacterSpec:
    cls: str
    identity: Identity
    shirt_colour: str
    shirt_pattern: str = "plain"
    framing: str = "portrait"  # or "full"
    x: float = 0.5
    y: float = 0.5
    scale: float = 1.0
    head_tilt: float = 0.0  # degrees
    arm_angles: tuple[float, float] = (20.0, 20.0)  # degrees from hanging down, left and right
    identity_name: str | None = None


Entity = ObjectSpec | CharacterSpec


@dataclass
class Scene:
    context: str
    entities: list[Entity]
    variant: int = 0  # seeds the background's small random details
    caption: str = ""


@dataclass
class EntityTruth:
    kind: str  # "object" or "character"
    cls: str
    attributes: dict
    mask: np.ndarray  # bool [64, 64]
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in 64-px coordinates
    face_keypoints: np.ndarray | None = None  # [5, 2]: eyes (l, r), nose, mouth corners (l, r)
    body_keypoints: dict[str, tuple[float, float]] = field(default_factory=dict)
    identity: str | None = None


@dataclass
class Render:
    image: np.ndarray  # uint8 [64, 64, 3]
    context: str
    caption: str
    entities: list[EntityTruth]

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)


# --------------------------------------------------------------------------------------------
# Colour helpers
# --------------------------------------------------------------------------------------------


def rgb(name: str) -> tuple[int, int, int]:
    return vocab.COLOURS[name]


def shade(c: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    """Mix towards black (amount < 0) or white (amount > 0)."""
    target = 255 if amount > 0 else 0
    a = abs(amount)
    return tuple(int(round(v * (1 - a) + target * a)) for v in c)  # type: ignore[return-value]


def contrast_shade(c: tuple[int, int, int]) -> tuple[int, int, int]:
    """A second tone of the same colour for patterns: darker for light colours, lighter for dark."""
    return shade(c, -0.45) if sum(c) > 330 else shade(c, 0.5)


# --------------------------------------------------------------------------------------------
# Backgrounds
# --------------------------------------------------------------------------------------------


def _vgradient(top, bottom, h0: int, h1: int, arr: np.ndarray) -> None:
    t = np.linspace(0, 1, max(h1 - h0, 1))[:, None, None]
    arr[h0:h1] = (np.array(top) * (1 - t) + np.array(bottom) * t)[:, :, :]


def draw_background(context: str, rng: np.random.Generator) -> Image.Image:
    C = CANVAS
    arr = np.zeros((C, C, 3), dtype=np.float32)
    horizon = int(C * rng.uniform(0.38, 0.5))
    if context == "beach":
        _vgradient((110, 185, 240), (170, 215, 245), 0, horizon, arr)
        sea = horizon + int(C * 0.1)
        arr[horizon:sea] = (30, 110, 190)
        _vgradient((240, 218, 160), (225, 195, 130), sea, C, arr)
    elif context == "snow":
        _vgradient((175, 190, 215), (215, 222, 235), 0, horizon, arr)
        _vgradient((236, 240, 250), (252, 252, 255), horizon, C, arr)
    elif context == "grass":
        _vgradient((120, 180, 245), (190, 220, 250), 0, horizon, arr)
        _vgradient((90, 175, 70), (55, 130, 40), horizon, C, arr)
    elif context == "night":
        _vgradient((8, 10, 35), (30, 35, 80), 0, C, arr)
    elif context == "city":
        _vgradient((235, 150, 100), (245, 200, 150), 0, C, arr)
    elif context == "room":
        _vgradient((232, 212, 178), (220, 198, 160), 0, int(C * 0.68), arr)
        _vgradient((150, 98, 58), (120, 75, 40), int(C * 0.68), C, arr)
    elif context == "underwater":
        _vgradient((40, 160, 190), (10, 55, 105), 0, C, arr)
    elif context == "desert":
        _vgradient((250, 235, 185), (250, 215, 150), 0, horizon, arr)
        _vgradient((225, 165, 85), (200, 135, 60), horizon, C, arr)
    else:
        raise ValueError(f"unknown context {context!r}; known: {', '.join(vocab.CONTEXTS)}")
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    if context == "snow":
        for _ in range(40):
            x, y = rng.uniform(0, C, 2)
            d.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=(255, 255, 255))
    elif context == "grass":
        for _ in range(70):
            x, y = rng.uniform(0, C), rng.uniform(horizon, C)
            d.line([x, y, x + rng.uniform(-2, 2), y - 6], fill=(40, 110, 30), width=2)
    elif context == "night":
        for _ in range(30):
            x, y = rng.uniform(0, C), rng.uniform(0, C * 0.7)
            d.ellipse([x - 1, y - 1, x + 1, y + 1], fill=(255, 255, 230))
        mx, my = rng.uniform(C * 0.1, C * 0.9), rng.uniform(C * 0.08, C * 0.25)
        d.ellipse([mx - 10, my - 10, mx + 10, my + 10], fill=(245, 240, 200))
    elif context == "city":
        x = -rng.uniform(0, 12)
        while x < C:
            w, h = rng.uniform(16, 30), rng.uniform(C * 0.35, C * 0.8)
            grey = int(rng.uniform(70, 120))
            d.rectangle([x, C - h, x + w, C], fill=(grey, grey, grey + 8))
            for wy in np.arange(C - h + 5, C - 8, 9):
                for wx in np.arange(x + 3, x + w - 4, 7):
                    if rng.random() < 0.6:
                        d.rectangle([wx, wy, wx + 3, wy + 4], fill=(250, 225, 120))
            x += w + rng.uniform(1, 4)
    elif context == "room":
        wx = rng.uniform(C * 0.1, C * 0.6)
        d.rectangle([wx, C * 0.12, wx + 34, C * 0.45], fill=(170, 215, 245), outline=(250, 250, 250), width=4)
        d.line([wx + 17, C * 0.12, wx + 17, C * 0.45], fill=(250, 250, 250), width=3)
    elif context == "underwater":
        for _ in range(12):
            x, y, r = rng.uniform(0, C), rng.uniform(0, C), rng.uniform(2, 5)
            d.ellipse([x - r, y - r, x + r, y + r], outline=(200, 240, 255), width=1)
        for _ in range(5):
            x = rng.uniform(0, C)
            pts = [(x + 4 * math.sin(i / 2.0), C - i * 5) for i in range(int(rng.uniform(5, 10)))]
            d.line(pts, fill=(30, 140, 60), width=3)
    elif context == "desert":
        for _ in range(2):
            x = rng.uniform(0, C)
            d.rectangle([x, horizon - 18, x + 5, horizon + 6], fill=(60, 130, 60))
            d.rectangle([x - 6, horizon - 10, x, horizon - 7], fill=(60, 130, 60))
            d.rectangle([x - 6, horizon - 16, x - 3, horizon - 7], fill=(60, 130, 60))
    return img


# --------------------------------------------------------------------------------------------
# Shapes (unit coordinates: centre 0, half-extent 1) and painting
# --------------------------------------------------------------------------------------------


def _circle(cx: float, cy: float, r: float, n: int = 28) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(2 * math.pi * i / n), cy + r * math.sin(2 * math.pi * i / n)) for i in range(n)]


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 28) -> list[tuple[float, float]]:
    return [(cx + rx * math.cos(2 * math.pi * i / n), cy + ry * math.sin(2 * math.pi * i / n)) for i in range(n)]


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def object_parts(cls: str) -> list[list[tuple[float, float]]]:
    """Polygons (unit coordinates) whose union is the object's body."""
    if cls == "ball":
        return [_circle(0, 0, 1.0)]
    if cls == "box":
        return [
            _rect(-0.8, -0.45, 0.6, 0.95),
            [(-0.8, -0.45), (-0.45, -0.85), (0.95, -0.85), (0.6, -0.45)],
            [(0.6, -0.45), (0.95, -0.85), (0.95, 0.55), (0.6, 0.95)],
        ]
    if cls == "cup":
        # a C-shaped handle: outer arc out, inner arc back
        arc = np.linspace(-math.pi / 2, math.pi / 2, 12)
        outer = [(0.5 + 0.42 * math.cos(t), 0.38 * math.sin(t)) for t in arc]
        inner = [(0.5 + 0.24 * math.cos(t), 0.2 * math.sin(t)) for t in arc[::-1]]
        handle = outer + inner
        return [[(-0.75, -0.7), (0.6, -0.7), (0.45, 0.9), (-0.6, 0.9)], handle]
    if cls == "vase":
        prof = [(-1.0, 0.18), (-0.85, 0.16), (-0.55, 0.2), (-0.25, 0.6), (0.2, 0.7), (0.6, 0.5), (0.95, 0.3)]
        right = [(w, y) for y, w in prof]
        left = [(-w, y) for y, w in reversed(prof)]
        return [right + left]
    if cls == "kite":
        return [[(0, -1.0), (0.62, -0.25), (0, 0.6), (-0.62, -0.25)]]
    if cls == "star":
        pts = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        return [pts]
    if cls == "teddy":
        return [
            _ellipse(0, 0.38, 0.55, 0.58),
            _circle(0, -0.42, 0.42),
            _circle(-0.36, -0.78, 0.17),
            _circle(0.36, -0.78, 0.17),
            _ellipse(-0.6, 0.25, 0.17, 0.3),
            _ellipse(0.6, 0.25, 0.17, 0.3),
        ]
    if cls == "dog":
        return [
            _ellipse(-0.1, 0.1, 0.68, 0.34),
            _circle(0.62, -0.32, 0.32),
            _ellipse(0.48, -0.3, 0.12, 0.26),
            _rect(-0.65, 0.2, -0.48, 0.85),
            _rect(-0.3, 0.2, -0.13, 0.85),
            _rect(0.15, 0.2, 0.32, 0.85),
            _rect(0.38, 0.2, 0.55, 0.85),
            [(-0.72, -0.05), (-0.98, -0.5), (-0.9, -0.55), (-0.66, -0.15)],
            _ellipse(0.92, -0.25, 0.16, 0.12),
        ]
    raise ValueError(f"unknown object class {cls!r}; known: {', '.join(vocab.OBJECT_CLASSES)}")


def _transform(points, cx: float, cy: float, size: float, rotation: float):
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    return [(cx + size * (x * c - y * s), cy + size * (x * s + y * c)) for x, y in points]


def pattern_layer(pattern: str, base: tuple[int, int, int], second: tuple[int, int, int], phase: float) -> Image.Image:
    layer = Image.new("RGB", (CANVAS, CANVAS), base)
    if pattern == "plain":
        return layer
    d = ImageDraw.Draw(layer)
    period = 12
    off = int(phase * period)
    if pattern == "striped":
        for y in range(-period + off, CANVAS, period):
            d.rectangle([0, y, CANVAS, y + period // 2 - 1], fill=second)
    elif pattern == "dotted":
        for y in range(off, CANVAS, period):
            for x in range(off + (y // period % 2) * period // 2, CANVAS, period):
                d.ellipse([x - 2.6, y - 2.6, x + 2.6, y + 2.6], fill=second)
    elif pattern == "checkered":
        h = period // 2
        for y in range(-period + off, CANVAS, period):
            for x in range(-period + off, CANVAS, period):
                d.rectangle([x, y, x + h - 1, y + h - 1], fill=second)
                d.rectangle([x + h, y + h, x + period - 1, y + period - 1], fill=second)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(vocab.PATTERNS)}")
    return layer


def _emblem(d: ImageDraw.ImageDraw, emblem: str, cx: float, cy: float, r: float, colour, body_colour) -> None:
    if emblem == "heart":
        d.ellipse([cx - r, cy - r * 0.9, cx, cy + r * 0.1], fill=colour)
        d.ellipse([cx, cy - r * 0.9, cx + r, cy + r * 0.1], fill=colour)
        d.polygon([(cx - r * 0.95, cy - 0.2 * r), (cx + r * 0.95, cy - 0.2 * r), (cx, cy + r)], fill=colour)
    elif emblem == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r * 0.45)))
    elif emblem == "cross":
        w = r * 0.38
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
    elif emblem == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=colour)
    elif emblem == "crescent":
        # a disc with an offset disc of the body colour over it
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        d.ellipse([cx - r * 0.25, cy - r * 1.0, cx + r * 1.35, cy + r * 0.6], fill=body_colour)
    elif emblem == "diamond":
        d.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=colour)
    else:
        raise ValueError(f"unknown emblem {emblem!r}")


def _mask_of(polys) -> Image.Image:
    m = Image.new("L", (CANVAS, CANVAS), 0)
    d = ImageDraw.Draw(m)
    for p in polys:
        d.polygon(p, fill=255)
    return m


def paint_object(canvas: Image.Image, spec: ObjectSpec, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Paints one object onto canvas; returns its 2x mask and body keypoints (none for objects)."""
    cx, cy, size = spec.x * CANVAS, spec.y * CANVAS, spec.scale * CANVAS
    polys = [_transform(p, cx, cy, size, spec.rotation) for p in object_parts(spec.cls)]
    mask = _mask_of(polys)
    if spec.subject is not None:
        s = spec.subject
        layer = Image.new("RGB", (CANVAS, CANVAS), rgb(s.colour_a))
        ld = ImageDraw.Draw(layer)
        half = _transform(
            _rect(0, -2, 2, 2) if s.split == "vertical" else _rect(-2, 0, 2, 2), cx, cy, size, spec.rotation
        )
        ld.polygon(half, fill=rgb(s.colour_b))
        er = size * 0.32
        # the emblem sits across the split; a crescent's cut takes the colour of the half under it
        under = s.colour_b if s.split == "vertical" else s.colour_a
        _emblem(ld, s.emblem, cx, cy, er, rgb(s.emblem_colour), rgb(under))
    else:
        base = rgb(spec.colour)
        layer = pattern_layer(spec.pattern, base, contrast_shade(base), rng.uniform(0, 1))
    canvas.paste(layer, (0, 0), mask)
    d = ImageDraw.Draw(canvas)
    outline = (20, 20, 20) if spec.colour != "black" or spec.subject else (120, 120, 120)
    for p in polys:
        d.line(p + [p[0]], fill=outline, width=2)
    if spec.cls in ("teddy", "dog"):
        eye = _transform(
            [(0.62, -0.4)] if spec.cls == "dog" else [(-0.14, -0.48), (0.14, -0.48)], cx, cy, size, spec.rotation
        )
        for ex, ey in eye:
            d.ellipse([ex - 2, ey - 2, ex + 2, ey + 2], fill=(10, 10, 10))
    if spec.cls == "kite":
        tail = _transform([(0, 0.6), (0.15, 0.8), (-0.1, 1.0), (0.1, 1.2)], cx, cy, size, spec.rotation)
        d.line(tail, fill=outline, width=2)
    if spec.accessory == "hat":
        top = min(y for p in polys for _, y in p)
        hx = cx
        hat = [(hx - size * 0.35, top + 2), (hx + size * 0.35, top + 2), (hx, top - size * 0.55)]
        d.polygon(hat, fill=(230, 30, 140), outline=(20, 20, 20))
        d.ellipse([hx - 3, top - size * 0.55 - 3, hx + 3, top - size * 0.55 + 3], fill=(255, 240, 60))
        mask_d = ImageDraw.Draw(mask)
        mask_d.polygon(hat, fill=255)
    elif spec.accessory == "bow":
        top = min(y for p in polys for _, y in p)
        bx, by, r = cx, top + size * 0.15, size * 0.22
        bow = [
            [(bx, by), (bx - 2 * r, by - r), (bx - 2 * r, by + r)],
            [(bx, by), (bx + 2 * r, by - r), (bx + 2 * r, by + r)],
        ]
        for b in bow:
            d.polygon(b, fill=(40, 200, 220), outline=(20, 20, 20))
            ImageDraw.Draw(mask).polygon(b, fill=255)
    return mask, {}


# --------------------------------------------------------------------------------------------
# Characters
# --------------------------------------------------------------------------------------------


def _body_geometry(spec: CharacterSpec) -> dict:
    """Head centre and radius, and body keypoints, in 2x canvas pixels."""
    child = spec.cls in ("boy", "girl")
    if spec.framing == "portrait":
        hr = CANVAS * 0.2 * spec.scale * (1.08 if child else 1.0)
        hx, hy = spec.x * CANVAS, spec.y * CANVAS - CANVAS * 0.06
        neck = (hx, hy + hr * 1.05)
        sh_w = hr * (1.25 if child else 1.7)
        kp = {
            "neck": neck,
            "left_shoulder": (hx - sh_w, neck[1] + hr * 0.25),
            "right_shoulder": (hx + sh_w, neck[1] + hr * 0.25),
        }
        return {"hx": hx, "hy": hy, "hr": hr, "kp": kp}
    height = CANVAS * 0.78 * spec.scale * (0.68 if child else 1.0)
    hr = height * (0.12 if child else 0.095)
    feet_y = spec.y * CANVAS + CANVAS * 0.4
    top = feet_y - height
    hx, hy = spec.x * CANVAS, top + hr
    neck = (hx, hy + hr)
    sh_w = hr * (1.3 if child else 1.8)
    hip_y = neck[1] + height * 0.38
    arm = height * 0.34
    kp = {
        "neck": neck,
        "left_shoulder": (hx - sh_w, neck[1] + hr * 0.3),
        "right_shoulder": (hx + sh_w, neck[1] + hr * 0.3),
        "left_hip": (hx - sh_w * 0.55, hip_y),
        "right_hip": (hx + sh_w * 0.55, hip_y),
        "left_foot": (hx - sh_w * 0.6, feet_y),
        "right_foot": (hx + sh_w * 0.6, feet_y),
    }
    kp["left_knee"] = ((kp["left_hip"][0] + kp["left_foot"][0]) / 2, (hip_y + feet_y) / 2)
    kp["right_knee"] = ((kp["right_hip"][0] + kp["right_foot"][0]) / 2, (hip_y + feet_y) / 2)
    for side, sign in (("left", -1), ("right", 1)):
        a = math.radians(spec.arm_angles[0 if side == "left" else 1])
        sx, sy = kp[f"{side}_shoulder"]
        kp[f"{side}_elbow"] = (sx + sign * math.sin(a) * arm * 0.5, sy + math.cos(a) * arm * 0.5)
        kp[f"{side}_hand"] = (sx + sign * math.sin(a) * arm, sy + math.cos(a) * arm)
    return {"hx": hx, "hy": hy, "hr": hr, "kp": kp}


def paint_character(canvas: Image.Image, spec: CharacterSpec, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    g = _body_geometry(spec)
    hx, hy, hr, kp = g["hx"], g["hy"], g["hr"], g["kp"]
    ident = spec.identity
    skin = vocab.SKIN_TONES[ident.skin]
    hair = vocab.HAIR_COLOURS[ident.hair_colour]
    shirt = rgb(spec.shirt_colour)
    female = spec.cls in ("woman", "girl")
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    md = ImageDraw.Draw(mask)
    d = ImageDraw.Draw(canvas)
    outline = (25, 20, 20)

    # --- body: a dress-like trapezoid for woman/girl, a straight torso for man/boy
    ls, rs = kp["left_shoulder"], kp["right_shoulder"]
    if spec.framing == "portrait":
        bottom = CANVAS + 2
        flare = hr * (0.5 if female else 0.15)
        torso = [(ls[0], ls[1]), (rs[0], rs[1]), (rs[0] + flare, bottom), (ls[0] - flare, bottom)]
    else:
        lh, rh = kp["left_hip"], kp["right_hip"]
        flare = hr * (1.1 if female else 0.0)
        hem_y = lh[1] + (hr * 1.4 if female else 0)
        torso = [ls, rs, (rh[0] + flare, hem_y), (lh[0] - flare, hem_y)]
        for side in ("left", "right"):
            leg = [kp[f"{side}_hip"], kp[f"{side}_knee"], kp[f"{side}_foot"]]
            d.line(leg, fill=(40, 50, 90) if not female else skin, width=max(3, int(hr * 0.45)))
            md.line(leg, fill=255, width=max(3, int(hr * 0.45)))
        for side in ("left", "right"):
            arm = [kp[f"{side}_shoulder"], kp[f"{side}_elbow"], kp[f"{side}_hand"]]
            d.line(arm, fill=shirt, width=max(3, int(hr * 0.4)))
            md.line(arm, fill=255, width=max(3, int(hr * 0.4)))
            hxx, hyy = kp[f"{side}_hand"]
            d.ellipse([hxx - hr * 0.22, hyy - hr * 0.22, hxx + hr * 0.22, hyy + hr * 0.22], fill=skin)
            md.ellipse([hxx - hr * 0.22, hyy - hr * 0.22, hxx + hr * 0.22, hyy + hr * 0.22], fill=255)
    tmask = _mask_of([torso])
    layer = pattern_layer(spec.shirt_pattern, shirt, contrast_shade(shirt), rng.uniform(0, 1))
    canvas.paste(layer, (0, 0), tmask)
    d.line(torso + [torso[0]], fill=outline, width=2)
    mask.paste(255, (0, 0), tmask)
    # neck
    nw = hr * 0.28
    d.rectangle([hx - nw, hy + hr * 0.7, hx + nw, kp["neck"][1] + 2], fill=skin)
    md.rectangle([hx - nw, hy + hr * 0.7, hx + nw, kp["neck"][1] + 2], fill=255)

    # --- head, drawn in head coordinates (unit = hr) and rotated by the tilt
    rot = spec.head_tilt
    aspect = vocab.FACE_SHAPES[ident.face_shape]

    def T(pts):
        return _transform(pts, hx, hy, hr, rot)

    style = vocab.HAIR_STYLES[ident.hair_style]
    long_back = style == "long"
    if long_back:
        back = T([(-aspect * 1.12, -0.3), (aspect * 1.12, -0.3), (aspect * 1.2, 1.25), (-aspect * 1.2, 1.25)])
        d.polygon(back, fill=hair)
        md.polygon(back, fill=255)
    if style == "bun":
        bun = T(_circle(0, -1.2, 0.38))
        d.polygon(bun, fill=hair)
        md.polygon(bun, fill=255)
    head = T(_ellipse(0, 0, aspect, 1.0))
    d.polygon(head, fill=skin, outline=outline)
    md.polygon(head, fill=255)
    if style in ("short", "long", "bun"):
        cap = T(
            [(aspect * math.cos(t), -abs(math.sin(t)) * 1.06) for t in np.linspace(0, math.pi, 16)]
            + [(-aspect * 0.9, -0.45), (aspect * 0.9, -0.45)][::-1]
        )
        d.polygon(cap, fill=hair)
        md.polygon(cap, fill=255)
    elif style == "spiky":
        spikes = []
        for i in range(7):
            t = math.pi * (i + 0.5) / 7
            spikes += [
                (aspect * math.cos(t - 0.2) * 0.95, -math.sin(t - 0.2) * 0.95),
                (aspect * math.cos(t) * 1.35, -math.sin(t) * 1.35),
            ]
        spikes = T([(aspect, -0.2)] + spikes + [(-aspect, -0.2)])
        d.polygon(spikes, fill=hair)
        md.polygon(spikes, fill=255)

    sp = vocab.EYE_SPACINGS[ident.eye_spacing]
    eyes = T([(-sp, -0.05), (sp, -0.05)])
    er = max(hr * 0.13, 1.6)
    for ex, ey in eyes:
        d.ellipse([ex - er, ey - er, ex + er, ey + er], fill=(250, 250, 250))
        d.ellipse(
            [ex - er * 0.65, ey - er * 0.65, ex + er * 0.65, ey + er * 0.65], fill=vocab.EYE_COLOURS[ident.eye_colour]
        )
    ns = vocab.NOSE_SIZES[ident.nose]
    nose_tip = T([(0, 0.28)])[0]
    d.polygon(T([(0, 0.28 - ns * 2), (ns, 0.3), (-ns, 0.3)]), fill=shade(skin, -0.25))
    mw = vocab.MOUTH_WIDTHS[ident.mouth] / 2
    mouth = T([(-mw, 0.58), (mw, 0.58)])
    d.line(T([(-mw, 0.56), (0, 0.64), (mw, 0.56)]), fill=(150, 40, 50), width=max(2, int(hr * 0.08)))
    acc = vocab.FACE_ACCESSORIES[ident.accessory]
    if acc == "glasses":
        for ex, ey in eyes:
            d.ellipse([ex - er * 1.9, ey - er * 1.9, ex + er * 1.9, ey + er * 1.9], outline=(15, 15, 15), width=2)
        d.line([eyes[0], eyes[1]], fill=(15, 15, 15), width=1)
    elif acc == "earrings":
        for ex, ey in T([(-aspect, 0.35), (aspect, 0.35)]):
            d.ellipse([ex - 3, ey - 3, ex + 3, ey + 3], fill=(250, 210, 30))
    elif acc == "headband":
        band = T([(-aspect * 1.02, -0.55), (aspect * 1.02, -0.55), (aspect * 0.98, -0.38), (-aspect * 0.98, -0.38)])
        d.polygon(band, fill=(230, 30, 60))
    face = np.array([eyes[0], eyes[1], nose_tip, mouth[0], mouth[1]], dtype=np.float32) / SS
    kp_out = {k: (v[0] / SS, v[1] / SS) for k, v in kp.items()}
    kp_out["nose"] = (nose_tip[0] / SS, nose_tip[1] / SS)
    return mask, {"face": face, "body": kp_out}


# --------------------------------------------------------------------------------------------
# Whole scene
# --------------------------------------------------------------------------------------------


def _downsample_mask(m: Image.Image) -> np.ndarray:
    return np.asarray(m.resize((SIZE, SIZE), Image.BOX)) >= 128


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0, 0, 0, 0)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def render(scene: Scene) -> Render:
    """Draws a scene and returns the 64 px image with exact ground truth for each entity."""
    rng = np.random.default_rng(scene.variant)
    canvas = draw_background(scene.context, rng).convert("RGB")
    masks_2x: list[Image.Image] = []
    extras: list[dict] = []
    for e in scene.entities:
        if isinstance(e, ObjectSpec):
            m, x = paint_object(canvas, e, rng)
        else:
            m, x = paint_character(canvas, e, rng)
        masks_2x.append(m)
        extras.append(x)
    # later entities occlude earlier ones: visible mask = own mask minus everything drawn after it
    visible = []
    for i, m in enumerate(masks_2x):
        mm = _downsample_mask(m)
        for later in masks_2x[i + 1 :]:
            mm &= ~_downsample_mask(later)
        visible.append(mm)
    truths = []
    for e, mm, x in zip(scene.entities, visible, extras):
        if isinstance(e, ObjectSpec):
            attrs = {
                "colour": e.colour,
                "pattern": e.pattern,
                "accessory": e.accessory,
                "subject": e.subject.name if e.subject else None,
            }
            truths.append(EntityTruth("object", e.cls, attrs, mm, _bbox(mm)))
        else:
            attrs = {
                "shirt_colour": e.shirt_colour,
                "shirt_pattern": e.shirt_pattern,
                "framing": e.framing,
                "identity_factors": e.identity.factors(),
            }
            truths.append(
                EntityTruth(
                    "character",
                    e.cls,
                    attrs,
                    mm,
                    _bbox(mm),
                    face_keypoints=x["face"],
                    body_keypoints=x["body"],
                    identity=e.identity_name or e.identity.key(),
                )
            )
    image = np.asarray(canvas.resize((SIZE, SIZE), Image.BOX))
    return Render(image=image, context=scene.context, caption=scene.caption, entities=truths)
