"""Procedural CelebA-like faces: 178x218 RGB, aligned like img_align_celeba, drawn from 40 attributes.

The geometry follows the CelebA alignment (the mean of real aligned images): eyes on a line near
y=111, about 40 px apart, nose tip near y=136, mouth near y=152, chin near y=187, top of the hair near
y=35. Position, scale and colours are jittered per image and sensor-like noise is added, so that a
classifier has to find the features rather than read labels off fixed pixels. Everything is drawn at
the target size with ImageDraw (head, hair and body here; inner features in synthetic_features).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from deeprecognition.celeba.attributes import CELEBA_ATTRIBUTES
from deeprecognition.celeba.synthetic_features import (
    Face,
    draw_beard,
    draw_brows,
    draw_cheeks,
    draw_eyeglasses,
    draw_eyes,
    draw_mouth,
    draw_nose,
    draw_wrinkles,
    jitter,
    mix,
    shade,
)

WIDTH, HEIGHT = 178, 218
EYE_LINE_Y = 111.0
FACE_DY = 7.0  # the face ellipse is centred this far (unscaled) below the eye line

HAIR_COLOURS = {
    "Black_Hair": (28, 24, 22),
    "Brown_Hair": (98, 64, 40),
    "Blond_Hair": (214, 182, 118),
    "Gray_Hair": (172, 170, 166),
}
# Hair that CelebA labels with no colour: mostly dark brown, auburn, light brown.
UNLABELLED_HAIR = ((62, 42, 30), (128, 66, 36), (142, 104, 66), (48, 36, 30))
JEWELRY = ((212, 175, 55), (205, 205, 215))


def _skin(a: dict[str, bool], rng: np.random.Generator) -> tuple[int, int, int]:
    if a["Pale_Skin"]:
        return jitter((244, 224, 212), rng, 8)
    skin = mix((112, 72, 52), (232, 194, 168), rng.beta(2.4, 1.3))
    if not a["Young"]:
        skin = mix(skin, (168, 150, 142), 0.15)  # older skin is greyer
    return jitter(skin, rng, 8)


def _hair_colour(a: dict[str, bool], rng: np.random.Generator) -> tuple[int, int, int]:
    labelled = [colour for name, colour in HAIR_COLOURS.items() if a[name]]
    if labelled:
        hair = tuple(int(np.mean(channel)) for channel in zip(*labelled))
    else:
        hair = UNLABELLED_HAIR[rng.integers(len(UNLABELLED_HAIR))]
        if not a["Young"]:
            hair = mix(hair, HAIR_COLOURS["Gray_Hair"], 0.25)
    return jitter(hair, rng, 12)


def _layout(a: dict[str, bool], rng: np.random.Generator) -> Face:
    half_width = rng.uniform(39.0, 42.0) + (2.0 if a["Male"] else 0.0)
    half_height = 69.0
    if a["Chubby"]:
        half_width *= 1.13
    if a["Oval_Face"]:
        half_width *= 0.94
        half_height += 3.0
    long_hair = not a["Bald"] and rng.random() < (0.06 if a["Male"] else 0.88)
    return Face(
        a=a,
        cx=WIDTH / 2 + rng.uniform(-3.0, 3.0),
        ey=EYE_LINE_Y + rng.uniform(-3.0, 3.0),
        s=rng.uniform(0.95, 1.06),
        fw=half_width,
        fh=half_height,
        fy=FACE_DY,
        skin=_skin(a, rng),
        hair=_hair_colour(a, rng),
        hair_depth=rng.uniform(7.0, 11.0) if a["Male"] else rng.uniform(11.0, 17.0),
        long_hair=long_hair,
    )


def _background(draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    base = mix(tuple(int(v) for v in rng.integers(0, 256, 3)), (128, 128, 128), rng.uniform(0.2, 0.7))
    draw.rectangle([0, 0, WIDTH, HEIGHT], fill=base)
    for _ in range(3):  # out-of-focus clutter behind the person
        x, y = rng.uniform(-40, WIDTH), rng.uniform(-40, HEIGHT)
        w, h = rng.uniform(30, 120, 2)
        draw.rectangle([x, y, x + w, y + h], fill=jitter(base, rng, 60))


def _wavy(values: np.ndarray, f: Face, phase: float) -> np.ndarray:
    """Wavy_Hair ripples an outline; straight hair keeps it smooth."""
    return 2.5 * np.sin(values / 4.0 + phase) if f.a["Wavy_Hair"] else np.zeros_like(values)


def _hair_back(draw: ImageDraw.ImageDraw, f: Face, rng: np.random.Generator) -> None:
    """Crown and, for long hair, the hair falling behind the face to the shoulders."""
    if f.a["Bald"]:
        return
    t = f.hair_depth
    bottom = f.fy + (0.4 if f.long_hair else 0.05) * f.fh  # short hair stops above the ears
    draw.ellipse(f.box(-f.fw - t, f.fy - f.fh - t, f.fw + t, bottom), fill=f.hair)
    if not f.long_hair:
        return
    ys = np.arange(f.fy - 10.0, 125.0, 5.0)
    flare = (ys - ys[0]) * 0.12
    phase = rng.uniform(0, 6.3)
    left = [f.pt(-f.fw - t - w - r, y) for y, w, r in zip(ys, flare, _wavy(ys, f, phase))]
    right = [f.pt(f.fw + t + w + r, y) for y, w, r in zip(ys, flare, _wavy(ys, f, phase + 1.0))]
    draw.polygon(left + right[::-1], fill=f.hair)


def _body(draw: ImageDraw.ImageDraw, f: Face, rng: np.random.Generator) -> None:
    """Neck, shoulders and what is worn on them: necktie with a shirt collar, necklace."""
    neck = shade(f.skin, 0.86)
    draw.rectangle(f.box(-19, 40, 19, 130), fill=neck)
    clothes = jitter((40, 40, 48), rng, 25) if f.a["Wearing_Necktie"] else jitter((128, 128, 128), rng, 110)
    draw.ellipse(f.box(-100, 86, 100, 220), fill=clothes)
    if f.a["Wearing_Necktie"]:
        draw.polygon([f.pt(-21, 85), f.pt(0, 100), f.pt(21, 85), f.pt(15, 140), f.pt(-15, 140)], fill=(236, 236, 232))
        tie = jitter((140, 30, 40), rng, 90)
        draw.polygon([f.pt(-5, 96), f.pt(5, 96), f.pt(3.5, 104), f.pt(-3.5, 104)], fill=tie)
        draw.polygon([f.pt(-3.5, 104), f.pt(3.5, 104), f.pt(8, 128), f.pt(0, 136), f.pt(-8, 128)], fill=tie)
    else:
        draw.polygon([f.pt(-24, 86), f.pt(24, 86), f.pt(0, 106 + rng.uniform(0, 12))], fill=neck)
    if f.a["Wearing_Necklace"]:
        metal = jitter(JEWELRY[rng.integers(2)], rng, 15)
        draw.arc(f.box(-21, 60, 21, 96), 20, 160, fill=metal, width=2)
        draw.ellipse(f.box(-2.5, 93, 2.5, 99), fill=metal)


def _head(draw: ImageDraw.ImageDraw, f: Face) -> None:
    """Ears, the face itself (squarer jaw unless Oval_Face) and a Double_Chin fold."""
    for side in (-1, 1):
        draw.ellipse(f.box(side * f.fw - 6, -3, side * f.fw + 6, 27), fill=shade(f.skin, 0.93))
    draw.ellipse(f.box(-f.fw, f.fy - f.fh, f.fw, f.fy + f.fh), fill=f.skin)
    chin = f.fy + f.fh
    if not f.a["Oval_Face"]:
        jaw = [(-1.0, 5), (-0.93, 42), (-0.55, chin - 6), (0.0, chin), (0.55, chin - 6), (0.93, 42), (1.0, 5)]
        draw.polygon([f.pt(x * f.fw, y) for x, y in jaw], fill=f.skin)
    if f.a["Double_Chin"]:
        draw.chord(f.box(-17, chin - 12, 17, chin + 8), 0, 180, fill=shade(f.skin, 0.9))
        draw.arc(f.box(-15, chin - 9, 15, chin + 6), 25, 155, fill=shade(f.skin, 0.72), width=2)


def _hairline(f: Face, u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lower edge of the front hair (unscaled y) at |x| = u * half-width, from centre to temple."""
    temple = -6.0
    if f.a["Bangs"]:
        line = -22.0 + (temple + 22.0) * u**6 + rng.uniform(-2.0, 2.0, len(u))
    elif f.a["Receding_Hairline"]:
        line = -56.0 - 14.0 * np.sin(np.pi * u) ** 2 + (temple + 56.0) * u**6
    else:
        line = -46.0 + (temple + 46.0) * u**3
    # The hair must lie on the head: never above the top edge of the face ellipse.
    edge = f.fy - f.fh * np.sqrt(np.clip(1.0 - u**2, 0.0, 1.0)) + 3.0
    return np.maximum(line, edge)


def _hair_front(draw: ImageDraw.ImageDraw, f: Face, rng: np.random.Generator) -> None:
    """Hair over the forehead and temples, with strands showing Straight vs Wavy texture."""
    if f.a["Bald"]:
        if f.a["Gray_Hair"] or rng.random() < 0.5:  # the fringe left above the ears
            for side in (-1, 1):
                draw.ellipse(f.box(side * f.fw - 5, -22, side * f.fw + 5, 4), fill=f.hair)
        draw.ellipse(f.box(-14, -60, 4, -50), fill=mix(f.skin, (255, 255, 255), 0.3))  # scalp shine
        return
    t = f.hair_depth
    angles = np.radians(np.linspace(188.0, 352.0, 24))
    outer = [f.pt((f.fw + t) * np.cos(a), f.fy + (f.fh + t) * np.sin(a)) for a in angles]
    u = np.linspace(1.0, -1.0, 21)
    line = _hairline(f, np.abs(u), rng)
    draw.polygon(outer + [f.pt(x * (f.fw - 3.0), y) for x, y in zip(u, line)], fill=f.hair)
    strand = shade(f.hair, 0.7) if sum(f.hair) > 200 else mix(f.hair, (255, 255, 255), 0.15)
    phase = rng.uniform(0, 6.3)
    for x, low in zip(u[2:-2:2] * f.fw, line[2:-2:2]):
        high = f.fy - (f.fh + t) * np.sqrt(1.0 - (x / (f.fw + t)) ** 2) + 4.0  # below the hair's outer edge
        ys = np.linspace(high, low - 3.0, 8)
        draw.line([f.pt(x + w, y) for y, w in zip(ys, _wavy(ys, f, phase))], fill=strand, width=1)


def _earrings(draw: ImageDraw.ImageDraw, f: Face, rng: np.random.Generator) -> None:
    metal = jitter(JEWELRY[rng.integers(2)], rng, 15)
    style = rng.integers(3)
    for side in (-1, 1):
        x, y = side * (f.fw + 1.0), 29.0
        if style == 0:  # stud
            draw.ellipse(f.box(x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=metal)
        elif style == 1:  # hoop
            draw.ellipse(f.box(x - 5, y - 1, x + 5, y + 10), outline=metal, width=2)
        else:  # drop
            draw.line([f.pt(x, y), f.pt(x, y + 7)], fill=metal, width=1)
            draw.ellipse(f.box(x - 3, y + 6, x + 3, y + 12), fill=metal)


def _hat(draw: ImageDraw.ImageDraw, f: Face, rng: np.random.Generator) -> None:
    colour = jitter((100, 90, 80), rng, 100)
    top = f.fy - f.fh - f.hair_depth - 16
    draw.ellipse(f.box(-f.fw - 9, top, f.fw + 9, -20), fill=colour)
    draw.rectangle(f.box(-f.fw - 9, -52, f.fw + 9, -36), fill=colour)
    if rng.random() < 0.6:  # a brim; otherwise a cap or beanie
        draw.ellipse(f.box(-f.fw - 24, -44, f.fw + 24, -32), fill=shade(colour, 0.8))
    draw.rectangle(f.box(-f.fw - 9, -50, f.fw + 9, -45), fill=jitter(colour, rng, 70))


@functools.lru_cache(maxsize=1)
def _noise_tile() -> np.ndarray:
    """Unit Gaussian noise, cut at a random offset per image (cheaper than fresh noise each time)."""
    return np.random.default_rng(0).standard_normal((HEIGHT * 2, WIDTH * 2, 3)).astype(np.float32)


def _finish(img: Image.Image, f: Face, rng: np.random.Generator) -> Image.Image:
    """Lens softness or Blurry, exposure jitter and sensor noise."""
    # A [1 2 1] box blur softens ImageDraw's aliased edges as a lens would, at a third of the cost
    # of a Gaussian; Blurry images get a real Gaussian defocus.
    lens = ImageFilter.GaussianBlur(rng.uniform(1.6, 2.6)) if f.a["Blurry"] else ImageFilter.BoxBlur(0.5)
    pixels = np.asarray(img.filter(lens), dtype=np.float32)
    y, x = rng.integers(0, HEIGHT), rng.integers(0, WIDTH)
    noise = _noise_tile()[y : y + HEIGHT, x : x + WIDTH]
    pixels = pixels * rng.uniform(0.85, 1.12) + rng.uniform(-12, 12) + noise * rng.uniform(2.0, 6.0)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def draw_face(attrs_row: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A 178x218 RGB face whose visible features follow one row of 40 attributes (CelebA order)."""
    a = {name: bool(v) for name, v in zip(CELEBA_ATTRIBUTES, attrs_row)}
    # Exposure and noise get their own stream, so two faces that differ in one attribute were
    # photographed alike however many draws that attribute's feature took.
    photo_rng = rng.spawn(1)[0]
    f = _layout(a, rng)
    img = Image.new("RGB", (WIDTH, HEIGHT))
    draw = ImageDraw.Draw(img)
    _background(draw, rng)
    _hair_back(draw, f, rng)
    _body(draw, f, rng)
    _head(draw, f)
    _hair_front(draw, f, rng)
    draw_cheeks(draw, f)
    draw_eyes(draw, f, rng)
    draw_brows(draw, f)
    draw_nose(draw, f)
    draw_mouth(draw, f, rng)
    draw_wrinkles(draw, f)
    draw_beard(draw, f, rng)
    if a["Eyeglasses"]:
        draw_eyeglasses(draw, f, rng)
    if a["Wearing_Earrings"]:
        _earrings(draw, f, rng)
    if a["Wearing_Hat"]:
        _hat(draw, f, rng)
    return _finish(img, f, photo_rng)
