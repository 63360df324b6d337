"""Inner facial features of the synthetic faces: eyes, brows, nose, cheeks, mouth, beard, age, glasses.

Coordinates are unscaled offsets from the point between the eyes (x right, y down), turned into
pixels by Face.pt, so each feature is written once for every position and scale jitter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import ImageDraw

RGB = tuple[int, int, int]

EYE_DX = 20.0  # half the distance between the eyes
MOUTH_DY = 41.0
WHITE = (255, 255, 255)


def mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def shade(colour: RGB, k: float) -> RGB:
    return tuple(min(255, int(c * k)) for c in colour)


def jitter(colour: RGB, rng: np.random.Generator, amount: float) -> RGB:
    return tuple(min(255, max(0, int(c + d))) for c, d in zip(colour, rng.uniform(-amount, amount, 3)))


@dataclass
class Face:
    """Where one face lies in the image and the choices made for it."""

    a: dict[str, bool]  # attribute name -> present
    cx: float  # pixel x of the point between the eyes
    ey: float  # pixel y of the eye line
    s: float  # scale: unscaled units -> pixels
    fw: float  # half-width of the face at the cheeks (unscaled)
    fh: float  # half-height of the face ellipse (unscaled)
    fy: float  # face ellipse centre below the eye line (unscaled)
    skin: RGB
    hair: RGB
    hair_depth: float  # how far hair stands off the head (unscaled)
    long_hair: bool

    def pt(self, dx: float, dy: float) -> tuple[float, float]:
        return (self.cx + dx * self.s, self.ey + dy * self.s)

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [*self.pt(x0, y0), *self.pt(x1, y1)]


def draw_eyes(draw: ImageDraw.ImageDraw, f: Face, rng: np.random.Generator) -> None:
    """Whites, iris and lids; Narrow_Eyes halves the opening, Heavy_Makeup adds shadow and liner."""
    h = 1.8 if f.a["Narrow_Eyes"] else 3.6
    if f.a["Smiling"]:
        h *= 0.85  # smiling eyes squint a little
    iris = jitter(((90, 60, 35), (70, 100, 130), (80, 100, 60), (45, 35, 30))[rng.integers(4)], rng, 15)
    shadow = jitter(((110, 70, 120), (90, 60, 45), (50, 45, 55))[rng.integers(3)], rng, 20)
    heavy = f.a["Heavy_Makeup"]
    lid = (25, 20, 20) if heavy else shade(f.skin, 0.45)
    for side in (-1, 1):
        x = side * EYE_DX
        if heavy:
            draw.ellipse(f.box(x - 10, -10, x + 10, 1), fill=shadow)
        draw.ellipse(f.box(x - 8, -h, x + 8, h), fill=(236, 234, 228))
        r = min(3.3, h + 0.3)
        draw.ellipse(f.box(x - 3.3, -r, x + 3.3, r), fill=iris)
        draw.ellipse(f.box(x - 1.4, -min(1.4, h), x + 1.4, min(1.4, h)), fill=(15, 12, 12))
        draw.arc(f.box(x - 8.5, -h - 0.5, x + 8.5, h + 0.5), 180, 360, fill=lid, width=2 if heavy else 1)
        if f.a["Bags_Under_Eyes"]:
            draw.arc(f.box(x - 8, h - 1, x + 8, h + 7), 20, 160, fill=mix(f.skin, (90, 60, 80), 0.45), width=2)


def draw_brows(draw: ImageDraw.ImageDraw, f: Face) -> None:
    """Bushy_Eyebrows are thick and dark; Arched_Eyebrows peak two thirds of the way out."""
    colour = mix(f.hair, (35, 28, 24), 0.35 if sum(f.hair) > 360 else 0.15)
    bushy = f.a["Bushy_Eyebrows"]
    if bushy:
        colour = shade(colour, 0.7)
    width = max(1, round(f.s * (5.0 if bushy else 3.0 if f.a["Male"] else 2.0)))
    peak, mid_x = (-19.0, 22.0) if f.a["Arched_Eyebrows"] else (-14.5, 19.0)
    for side in (-1, 1):
        points = [f.pt(side * 9.0, -11.5), f.pt(side * mid_x, peak), f.pt(side * (31.0 if bushy else 29.0), -11.0)]
        draw.line(points, fill=colour, width=width, joint="curve")


def draw_nose(draw: ImageDraw.ImageDraw, f: Face) -> None:
    """Bridge shading, tip and nostrils; Big_Nose is wider, Pointy_Nose ends in a narrow point."""
    k = 1.45 if f.a["Big_Nose"] else 1.0
    line = shade(f.skin, 0.8)
    for side in (-1, 1):
        draw.line([f.pt(side * 4.0, 3.0), f.pt(side * 5.0 * k, 20.0)], fill=line, width=1)
    if f.a["Pointy_Nose"]:
        draw.polygon([f.pt(-3.5, 10), f.pt(3.5, 10), f.pt(0, 29)], fill=shade(f.skin, 0.9))
        draw.line([f.pt(-6.0 * k, 23), f.pt(0, 29), f.pt(6.0 * k, 23)], fill=line, width=2)
    else:
        draw.arc(f.box(-6.5 * k, 19, 6.5 * k, 28), 20, 160, fill=line, width=2)
    nostril = shade(f.skin, 0.45)
    for side in (-1, 1):
        x = side * 5.5 * k
        draw.ellipse(f.box(x - 2.2 * k, 25, x + 2.2 * k, 28.5), fill=nostril)


def draw_cheeks(draw: ImageDraw.ImageDraw, f: Face) -> None:
    """Rosy_Cheeks blush; High_Cheekbones catch light high on the face with a hollow below."""
    for side in (-1, 1):
        if f.a["Rosy_Cheeks"]:
            draw.ellipse(f.box(side * 25 - 9, 17, side * 25 + 9, 31), fill=mix(f.skin, (228, 100, 115), 0.4))
        if f.a["High_Cheekbones"]:
            draw.ellipse(f.box(side * 28 - 7, 8, side * 28 + 7, 18), fill=mix(f.skin, WHITE, 0.2))
            draw.line([f.pt(side * 37, 21), f.pt(side * 27, 34)], fill=shade(f.skin, 0.82), width=2)


def _lip_colour(f: Face, rng: np.random.Generator) -> RGB:
    if f.a["Wearing_Lipstick"]:
        return jitter((185, 32, 52), rng, 25)
    return mix(f.skin, (180, 95, 95), 0.5 if f.a["Heavy_Makeup"] else 0.35)


def _between(f: Face, x: np.ndarray, upper: np.ndarray, lower: np.ndarray) -> list[tuple[float, float]]:
    """Polygon between two curves y = upper(x) and y = lower(x): along one, back along the other."""
    return [f.pt(*p) for p in zip(x, upper)] + [f.pt(*p) for p in zip(x[::-1], lower[::-1])]


def draw_mouth(draw: ImageDraw.ImageDraw, f: Face, rng: np.random.Generator) -> None:
    """Lips on a line whose corners rise when Smiling; Mouth_Slightly_Open shows a dark gap, teeth if smiling."""
    smiling, open_ = f.a["Smiling"], f.a["Mouth_Slightly_Open"]
    half = 17.5 if smiling else 15.0
    lift = 5.0 if smiling else rng.uniform(-1.0, 1.0)
    upper, lower = (5.0, 7.0) if f.a["Big_Lips"] else (3.0, 4.0)
    gap = (6.0 if smiling else 4.0) if open_ else 0.0
    u = np.linspace(-1.0, 1.0, 15)
    x, base = u * half, MOUTH_DY - lift * u**2
    bulge = np.sqrt(1.0 - u**2)
    lips = _between(f, x, base - (gap / 2 + upper) * bulge, base + (gap / 2 + lower) * bulge)
    draw.polygon(lips, fill=_lip_colour(f, rng))
    if not open_:
        draw.line([f.pt(*p) for p in zip(x, base)], fill=(90, 40, 40), width=1)
        return
    gap_top, gap_bottom = base - gap / 2 * bulge, base + gap / 2 * bulge
    draw.polygon(_between(f, x, gap_top, gap_bottom), fill=(55, 20, 25))
    if smiling:
        inner = slice(2, -2)  # teeth stop short of the corners
        teeth = gap_top + 0.45 * (gap_bottom - gap_top)
        draw.polygon(_between(f, x[inner], gap_top[inner], teeth[inner]), fill=(236, 232, 218))


def _stipple(draw: ImageDraw.ImageDraw, f: Face, rng: np.random.Generator, colour: RGB, count: int) -> None:
    """Stubble dots over the jaw and upper lip, kept inside the face and off the lips."""
    x = rng.uniform(-f.fw + 3, f.fw - 3, count)
    y = rng.uniform(26.0, f.fy + f.fh, count)
    inside = (x / f.fw) ** 2 + ((y - f.fy) / f.fh) ** 2 < 0.95
    off_lips = (np.abs(x) > 19) | (np.abs(y - MOUTH_DY) > 8)
    keep = inside & off_lips
    draw.point([f.pt(px, py) for px, py in zip(x[keep], y[keep])], fill=colour)


def draw_beard(draw: ImageDraw.ImageDraw, f: Face, rng: np.random.Generator) -> None:
    """No_Beard=0 grows a beard on the jaw (a chin-only one with Goatee), plus Mustache and Sideburns."""
    a = f.a
    colour = mix(f.hair, (30, 25, 22), 0.3)
    chin = f.fy + f.fh
    if a["5_o_Clock_Shadow"]:
        _stipple(draw, f, rng, mix(f.skin, (45, 45, 55), 0.55), 450)
    if not a["No_Beard"] and not a["Goatee"]:
        angles = np.radians(np.linspace(8.0, 172.0, 17))
        outer = [f.pt((f.fw + 1) * np.cos(t), f.fy + (f.fh + 2) * np.sin(t)) for t in angles]
        # The outer edge runs right to left under the chin; the inner edge returns left to right.
        inner = ((-f.fw + 9, 18), (-19, MOUTH_DY), (0, MOUTH_DY + 9), (19, MOUTH_DY), (f.fw - 9, 18))
        draw.polygon(outer + [f.pt(*p) for p in inner], fill=colour)
    if a["Goatee"]:
        goatee = (
            (-11, MOUTH_DY + 5),
            (11, MOUTH_DY + 5),
            (12, chin - 14),
            (6, chin + 1),
            (-6, chin + 1),
            (-12, chin - 14),
        )
        draw.polygon([f.pt(*p) for p in goatee], fill=colour)
    if a["Mustache"]:
        top = MOUTH_DY - 9
        stache = ((-18, MOUTH_DY - 1), (-8, top), (0, top + 1.5), (8, top), (18, MOUTH_DY - 1), (0, MOUTH_DY - 3.5))
        draw.polygon([f.pt(*p) for p in stache], fill=colour)
    if a["Sideburns"]:
        for side in (-1, 1):
            burn = ((side * f.fw, -10), (side * (f.fw - 6), -10), (side * (f.fw - 7), 32), (side * (f.fw - 1), 34))
            draw.polygon([f.pt(*p) for p in burn], fill=colour)


def draw_wrinkles(draw: ImageDraw.ImageDraw, f: Face) -> None:
    """Not Young: forehead lines, nasolabial folds and crow's feet."""
    if f.a["Young"]:
        return
    line = shade(f.skin, 0.76)
    if not f.a["Bangs"]:
        for y in (-38.0, -32.0):
            draw.arc(f.box(-18, y, 18, y + 10), 200, 340, fill=line, width=1)
    for side in (-1, 1):
        draw.line([f.pt(side * 9, 24), f.pt(side * 15, 31), f.pt(side * 19, 41)], fill=line, width=1, joint="curve")
        for dy in (-2.5, 0.5, 3.5):
            draw.line([f.pt(side * 29, dy * 0.3), f.pt(side * 34, dy)], fill=line, width=1)


def draw_eyeglasses(draw: ImageDraw.ImageDraw, f: Face, rng: np.random.Generator) -> None:
    """Frames (round or square) with bridge and temples; a quarter are sunglasses with dark lenses."""
    frame = jitter((30, 28, 30), rng, 25) if rng.random() < 0.85 else jitter((190, 160, 70), rng, 20)
    width = max(1, round(f.s * rng.uniform(1.5, 3.0)))
    lens = jitter((35, 35, 42), rng, 15) if rng.random() < 0.25 else None
    round_frames = rng.random() < 0.4
    for side in (-1, 1):
        box = f.box(side * EYE_DX - 12, -8, side * EYE_DX + 12, 9)
        if round_frames:
            draw.ellipse(box, fill=lens, outline=frame, width=width)
        else:
            draw.rounded_rectangle(box, radius=4 * f.s, fill=lens, outline=frame, width=width)
        draw.line([f.pt(side * (EYE_DX + 12), -3), f.pt(side * f.fw, -1)], fill=frame, width=width)
    draw.line([f.pt(-EYE_DX + 12, -3), f.pt(EYE_DX - 12, -3)], fill=frame, width=width)
