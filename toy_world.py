"""toy_world.py -- the offline world: a procedural stand-in for MVTec-AD and for the five tools' models.

Two halves, deliberately independent of each other:

  Part 1. The toy dataset (render_normal, render_anomaly): eight categories of inspection-like photos
          and their defects with pixel-exact masks. tools.py writes them to disk in MVTec-AD layout.
  Part 2. The offline tool backends: a prompt writer (PG), a procedural painter (IG), a measured judge
          (QE) and a difference segmenter (MG), with the defect vocabulary and image measurements they
          share. tools.py puts them behind its tool interfaces as the default backends.

Part 1 never calls Part 2: the dataset's defects are drawn by their own renderers, so a policy trained
on them learns defects, not the painter. This module imports nothing from the project (tools.py
imports it, never the reverse), so it can be read, tested and replaced on its own.

Part 1: normal images are rendered as scene radiance (material colour x shading) and then pushed
through a small camera model (illumination gradient, vignetting, optical blur, sensor noise, 8-bit
quantisation) so that they look like inspection photos rather than clip art. Defects are painted by
compositing a physically motivated appearance over the normal image through an alpha matte that is
exactly zero outside the returned mask, so the mask is pixel-exact by construction. All lengths are
written for a 128 px image and scaled by ``size / 128``.

Part 2: the backends are *measured* rather than learned. The painter reads defect words from the
prompt, the judge measures the change it sees, so every decision the agent makes has a visible,
checkable consequence, and a laptop CPU runs an episode in a fraction of a second.
"""
import re
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import numpy as np
from scipy import ndimage

TOY_CATEGORIES = {
    "fabric": {"kind": "texture", "group": "train", "types": ["hole", "stain", "cut", "color"]},
    "tile": {"kind": "texture", "group": "train", "types": ["crack", "stain", "contamination", "missing"]},
    "nut": {"kind": "object", "group": "train", "types": ["scratch", "crack", "missing", "contamination"]},
    "pill": {"kind": "object", "group": "train", "types": ["crack", "contamination", "color"]},
    "wood": {"kind": "texture", "group": "eval", "types": ["scratch", "hole", "stain", "color"]},
    "leather": {"kind": "texture", "group": "eval", "types": ["cut", "color", "scratch"]},
    "bottle": {"kind": "object", "group": "eval", "types": ["crack", "contamination", "missing"]},
    "washer": {"kind": "object", "group": "eval", "types": ["scratch", "missing", "crack"]},
}

# ==============================================================================================
# Part 1. The toy dataset
# ==============================================================================================

# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def _grid(size):
    """Pixel-centre coordinates (y, x), in pixels."""
    y, x = np.indices((size, size), dtype=np.float64)
    return y + 0.5, x + 0.5


def _smoothstep(edge0, edge1, t):
    t = np.clip((t - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _blur_fft(white, sigma, angle=0.0):
    """Gaussian low-pass via FFT: constant cost for any sigma (periodic, which noise does not mind).

    sigma is in pixels, a scalar or (across, along) for streaks running at angle (radians,
    0 = along x)."""
    s_across, s_along = np.broadcast_to(sigma, 2)
    fy = np.fft.fftfreq(white.shape[0])[:, None]
    fx = np.fft.rfftfreq(white.shape[1])[None, :]
    f_along = fx * np.cos(angle) + fy * np.sin(angle)
    f_across = fy * np.cos(angle) - fx * np.sin(angle)
    gain = np.exp(-2.0 * np.pi**2 * ((s_across * f_across) ** 2 + (s_along * f_along) ** 2))
    return np.fft.irfft2(np.fft.rfft2(white) * gain, s=white.shape)


def _smooth_noise(rng, size, sigma, angle=0.0):
    """Zero-mean, unit-variance Gaussian-correlated noise field (see _blur_fft for sigma)."""
    field = _blur_fft(rng.standard_normal((size, size)), sigma, angle)
    return field / (field.std() + 1e-12)


def _luma(rgb):
    return rgb @ np.array([0.299, 0.587, 0.114])


def _coverage(sdf_px):
    """Anti-aliased area coverage of a shape from its signed distance in pixels."""
    return np.clip(0.5 - sdf_px, 0.0, 1.0)


def _camera(radiance, rng, coverage=None):
    """Photograph a radiance image: uneven illumination, lens falloff, optics blur, sensor noise.

    Returns the uint8 image and the object's foreground (all True for textures)."""
    size = radiance.shape[0]
    s = size / 128
    y, x = _grid(size)
    y, x = 2 * y / size - 1, 2 * x / size - 1
    tilt = rng.uniform(0, 2 * np.pi)
    illumination = 1 + rng.uniform(0.04, 0.15) * (x * np.cos(tilt) + y * np.sin(tilt))
    vignette = 1 - rng.uniform(0.08, 0.18) * (x**2 + y**2) / 2
    exposure = rng.uniform(0.93, 1.07) * (1 + rng.normal(0, 0.01, 3))  # gain and white balance
    img = radiance * (illumination * vignette)[..., None] * exposure
    blur = rng.uniform(0.5, 0.8) * s
    img = ndimage.gaussian_filter(img, (blur, blur, 0))
    img += rng.normal(0, rng.uniform(2.0, 4.0), img.shape)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if coverage is None:
        return image, np.ones((size, size), bool)
    # The blurred outline spreads the object over a rim of mixed pixels; counting every pixel
    # that carries a tenth or more of the object lets a "missing" defect remove the object
    # without leaving a ghost of its old outline.
    return image, ndimage.gaussian_filter(coverage, blur) >= 0.1


# ---------------------------------------------------------------------------
# Textures: each returns a float radiance image (H, W, 3) on a 0..255 scale
# ---------------------------------------------------------------------------


def _texture_frame(rng, size, max_deg):
    """Coordinates in 128-px units, rotated by a few degrees and offset by a random phase."""
    y, x = _grid(size)
    y, x = y * 128 / size, x * 128 / size
    a = np.deg2rad(rng.uniform(-max_deg, max_deg))
    u = x * np.cos(a) + y * np.sin(a) + rng.uniform(0, 100)
    v = -x * np.sin(a) + y * np.cos(a) + rng.uniform(0, 100)
    return u, v


def _fabric(rng, size):
    period = 5.6 * rng.uniform(0.97, 1.03)
    u, v = _texture_frame(rng, size, 3)
    u, v = u / period, v / period
    i, j = np.floor(u), np.floor(v)
    fu, fv = u - i, v - j
    # Plain weave: a warp yarn floats over a weft yarn in every other cell, and bulges there.
    warp_up = (i + j) % 2 == 0
    h_warp = np.sin(np.pi * fu) ** 0.7 * np.where(warp_up, 0.75 + 0.25 * np.sin(np.pi * fv), 0.5)
    h_weft = np.sin(np.pi * fv) ** 0.7 * np.where(warp_up, 0.5, 0.75 + 0.25 * np.sin(np.pi * fu))
    # Each yarn was spun from a slightly different batch, so it has its own shade.
    warp_tone = 1 + 0.05 * rng.standard_normal(64)
    weft_tone = 1 + 0.05 * rng.standard_normal(64)
    warp_rgb = np.array([182.0, 166.0, 134.0]) * warp_tone[i.astype(int) % 64][..., None]
    weft_rgb = np.array([166.0, 152.0, 124.0]) * weft_tone[j.astype(int) % 64][..., None]
    rgb = np.where((h_warp >= h_weft)[..., None], warp_rgb, weft_rgb)
    # Higher yarn surfaces catch more light; gaps between yarns fall into shadow.
    shade = 0.35 + 0.65 * np.maximum(h_warp, h_weft)
    fuzz = 1 + 0.05 * rng.standard_normal((size, size))  # loose fibres
    fuzz += 0.03 * _smooth_noise(rng, size, 10 * size / 128)  # uneven dyeing
    return rgb * (shade * fuzz)[..., None]


def _tile(rng, size):
    s = size / 128
    mottling = 1 + 0.035 * _smooth_noise(rng, size, 12 * s) + 0.02 * _smooth_noise(rng, size, 4 * s)
    # Glaze speckles: sparse dark mineral grains (1-2 px) and a few larger, fainter blotches.
    # Grains have a fixed size in the scene, so their count and ink per pixel go with 1/s^2.
    seeds = (rng.random((size, size)) < 0.012 / s**2) * rng.uniform(1.0, 4.0, (size, size))
    grains = ndimage.gaussian_filter(seeds * s**2, 0.6 * s)
    blotches = np.clip(_smooth_noise(rng, size, 1.5 * s) - 2.2, 0, 1)
    glints = ndimage.gaussian_filter((rng.random((size, size)) < 0.004 / s**2) * 2.0 * s**2, 0.5 * s)
    value = mottling * (1 - 0.45 * np.clip(grains, 0, 1) - 0.3 * blotches + 0.1 * np.clip(glints, 0, 1))
    return np.array([184.0, 182.0, 176.0]) * value[..., None]


def _wood(rng, size):
    s = size / 128
    u, v = _texture_frame(rng, size, 4)
    # Growth rings meet the sawn board as grain lines, wavy because the trunk was not straight.
    across = u + 5 * _smooth_noise(rng, size, 18 * s) + 1.2 * _smooth_noise(rng, size, 6 * s)
    across += rng.uniform(-12, 12) * ((v - v.mean()) / 128) ** 2  # slightly bowed rings
    ring = (across / (6.0 * rng.uniform(0.9, 1.1))) % 1.0
    latewood = ring**2.2  # light earlywood darkens gradually into a dense latewood band
    # Streaks (mineral/knot staining) and pores are elongated along the grain (image y).
    streaks = _smooth_noise(rng, size, (2.5 * s, 30 * s), np.pi / 2)
    pores = np.clip(_smooth_noise(rng, size, (0.5 * s, 2.5 * s), np.pi / 2) - 1.6, 0, 1)
    mix = np.clip(0.55 * latewood + 0.15 * streaks + 0.25 + 0.4 * pores, 0, 1)[..., None]
    light, dark = np.array([208.0, 164.0, 114.0]), np.array([140.0, 94.0, 58.0])
    return light * (1 - mix) + dark * mix


def _leather(rng, size):
    s = size / 128
    white = rng.standard_normal((size, size))
    band = _blur_fft(white, 1.2 * s) - _blur_fft(white, 2.6 * s)
    band /= band.std()
    # Pebbled grain: creases run along the zero crossings of band-passed noise, which form a
    # network of closed cells; each pebble is a little dome between creases.
    crease = np.exp(-((band / 0.35) ** 2))
    height = ndimage.gaussian_filter(np.clip(band, -1.5, 1.5) - 1.2 * crease, 0.7 * s)
    gy, gx = np.gradient(height)
    a = rng.uniform(0, 2 * np.pi)
    emboss = 1 + 0.9 * (gx * np.cos(a) + gy * np.sin(a)) * s  # slope per 128-px unit
    value = (1 - 0.3 * crease) * emboss * (1 + 0.05 * _smooth_noise(rng, size, 14 * s))
    return np.array([128.0, 84.0, 52.0]) * value[..., None]


# ---------------------------------------------------------------------------
# Objects: each returns (radiance, coverage); coverage is the anti-aliased object area
# ---------------------------------------------------------------------------


def _object_frame(rng, size):
    """Object-centred coordinates in 128-px units for a slightly jittered pose.

    Returns (u, v, px): px converts object units to pixels for anti-aliasing."""
    y, x = _grid(size)
    px = size / 128 * rng.uniform(0.97, 1.03)
    cy, cx = size / 2 + np.clip(rng.normal(0, 2.0, 2), -5, 5) * size / 128
    a = np.deg2rad(rng.uniform(-12, 12))
    dx, dy = (x - cx) / px, (y - cy) / px
    return dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a), px


def _turned_metal(rng, size, r):
    """Machined metal reflectance: concentric turning marks plus fine brushing streaks."""
    marks = rng.standard_normal(int(r.max()) + 2)
    turning = np.interp(r, np.arange(marks.size), marks)
    brushing = _smooth_noise(rng, size, (0.5 * size / 128, 5 * size / 128), rng.uniform(0, np.pi))
    return 1 + 0.04 * turning + 0.03 * brushing


def _compose(background, surface, coverage):
    """Object surface radiance over a plain background, blended by anti-aliased coverage."""
    return background * (1 - coverage[..., None]) + surface * coverage[..., None]


def _nut(rng, size):
    u, v, px = _object_frame(rng, size)
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    facing = np.cos(phi - rng.uniform(0, 2 * np.pi))  # +1 where a tilted facet faces the lamp
    apothem, bore = 40.0, 17.0
    flats = np.deg2rad([0.0, 60.0, 120.0])
    hex_sdf = np.max([np.abs(u * np.cos(t) + v * np.sin(t)) for t in flats], axis=0) - apothem
    hole = _coverage((r - bore) * px)
    coverage = _coverage(hex_sdf * px) * (1 - hole)
    # Chamfered corners and the countersunk, threaded bore are cones, lit from one side.
    corner = _smoothstep(0.93 * apothem, 0.97 * apothem, r)
    countersink = _smoothstep(1.33 * bore, 1.27 * bore, r)
    threads = 0.08 * np.sin(2 * np.pi * r / 1.7)
    shade = (_turned_metal(rng, size, r) * (1 - corner - countersink)
             + (0.8 + 0.3 * facing) * corner + (0.75 - 0.2 * facing + threads) * countersink)
    metal = np.array([160.0, 160.0, 165.0]) * shade[..., None]
    radiance = _compose(np.array([40.0, 42.0, 48.0]), metal, coverage)
    # The background seen through the bore is partly shadowed by the nut itself.
    return radiance * (1 - 0.35 * hole)[..., None], coverage


def _pill(rng, size):
    u, v, px = _object_frame(rng, size)
    a, b, c = 48.0 * rng.uniform(0.98, 1.02), 29.0 * rng.uniform(0.98, 1.02), 14.0
    k = np.hypot(u / a, v / b)
    # First-order signed distance to the ellipse: level-set value over its gradient.
    sdf = (k - 1) * k / (np.hypot(u / a**2, v / b**2) + 1e-9)
    coverage = _coverage(sdf * px)
    # The pill is a flattened ellipsoid: Lambert shading from its surface normal, plus a glint.
    n = np.stack([u / a**2, v / b**2, np.sqrt(np.clip(1 - k**2, 0.0, 1.0)) / c])
    n /= np.linalg.norm(n, axis=0) + 1e-12
    az, el = rng.uniform(0, 2 * np.pi), np.deg2rad(rng.uniform(25, 40))
    lamp = np.array([np.cos(az) * np.sin(el), np.sin(az) * np.sin(el), np.cos(el)])
    halfway = (lamp + [0, 0, 1]) / np.linalg.norm(lamp + [0, 0, 1])  # camera looks straight down
    lambert = np.clip(np.tensordot(lamp, n, 1), 0, 1)
    glint = np.clip(np.tensordot(halfway, n, 1), 0, 1) ** 40
    shade = 0.5 + 0.5 * lambert + 0.12 * glint
    shade *= 1 + 0.015 * rng.standard_normal(u.shape) + 0.02 * _smooth_noise(rng, size, 4 * size / 128)
    radiance = _compose(np.array([38.0, 40.0, 44.0]), np.array([232.0, 229.0, 220.0]) * shade[..., None],
                        coverage)
    # A few tiny red specks pressed into the surface (as on MVTec pills).
    sites = np.flatnonzero(k.ravel() < 0.8)
    count = rng.integers(5, 13)
    dots = np.zeros(k.size)
    dots[rng.choice(sites, count, replace=False)] = rng.uniform(0.8, 1.2, count)
    sigma = 0.8 * size / 128
    specks = np.clip(ndimage.gaussian_filter(dots.reshape(k.shape), sigma) * 2 * np.pi * sigma**2, 0, 1)
    red = np.array([175.0, 62.0, 52.0]) * shade[..., None]
    radiance = radiance * (1 - specks[..., None]) + red * specks[..., None]
    return radiance, coverage


def _bottle(rng, size):
    u, v, px = _object_frame(rng, size)
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    rho = r / 54.0
    coverage = _coverage((r - 54.0) * px)
    # The lip is a glass torus: its cross-section normal sweeps from inward to outward, and
    # the side facing the lamp shows a bright specular band.
    q = np.clip((rho - 0.81) / 0.19, -1, 1)
    nz = np.sqrt(1 - q**2)
    glint = np.clip(0.6 * q * np.cos(phi - rng.uniform(0, 2 * np.pi)) + 0.8 * nz, 0, 1) ** 12
    lip = 0.75 + 0.15 * nz + 0.25 * glint
    # Looking down the neck: dark glass, a little brighter where the bottom reflects the lamp.
    well = 0.07 + 0.17 * np.clip(1 - rho / 0.62, 0, 1) ** 1.5 + 0.015 * np.sin(2 * np.pi * rho / 0.2)
    inner = _smoothstep(0.63, 0.61, rho)[..., None]
    surface = (np.array([212.0, 220.0, 205.0]) * lip[..., None] * (1 - inner)
               + np.array([180.0, 212.0, 190.0]) * well[..., None] * inner)  # greenish bottle glass
    # The bottle spans near-black to near-white, so only a tinted (slate-blue) backdrop stays
    # clearly distinct in colour from every part of it.
    return _compose(np.array([62.0, 80.0, 118.0]), surface, coverage), coverage


def _washer(rng, size):
    u, v, px = _object_frame(rng, size)
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    outer, inner = 50.0, 23.0
    coverage = _coverage(np.maximum(r - outer, inner - r) * px)
    facing = np.cos(phi - rng.uniform(0, 2 * np.pi))
    # Both edges are rounded off by stamping: the outer bevel faces away from the centre,
    # the inner one towards it, so they light up on opposite sides.
    bevel_out = _smoothstep(outer - 2.5, outer, r)
    bevel_in = _smoothstep(inner + 2.5, inner, r)
    shade = (_turned_metal(rng, size, r) * (1 - bevel_out - bevel_in)
             + (0.8 + 0.3 * facing) * bevel_out + (0.8 - 0.3 * facing) * bevel_in)
    metal = np.array([176.0, 176.0, 180.0]) * shade[..., None]
    return _compose(np.array([52.0, 62.0, 58.0]), metal, coverage), coverage


_TEXTURES = {"fabric": _fabric, "tile": _tile, "wood": _wood, "leather": _leather}
_OBJECTS = {"nut": _nut, "pill": _pill, "bottle": _bottle, "washer": _washer}


def render_normal(category: str, rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """-> (image HxWx3 uint8, foreground HxW bool; all True for textures)"""
    if category in _TEXTURES:
        return _camera(_TEXTURES[category](rng, size), rng)
    radiance, coverage = _OBJECTS[category](rng, size)
    return _camera(radiance, rng, coverage)


# ---------------------------------------------------------------------------
# Defects: a shape gives the alpha matte, a painter gives the defect's appearance
# ---------------------------------------------------------------------------


def _fit_smooth(values, where):
    """Least-squares quadratic surface through values[where] (values may carry channels).

    Illumination gradient times vignetting is well described by a quadratic, so fitting one
    material (the background, or a whole texture) recovers the lighting of the photo."""
    size = values.shape[0]
    y, x = _grid(size)
    y, x = y / size - 0.5, x / size - 0.5
    basis = np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=-1)
    sample = where & ((np.indices(where.shape).sum(0) % 3) == 0)  # a third of the pixels is plenty
    coef, *_ = np.linalg.lstsq(basis[sample], values[sample], rcond=None)
    return basis @ coef


class _Scene:
    """What the defect shapes and painters need to know about a normal image."""

    def __init__(self, category, image, foreground):
        self.size = image.shape[0]
        self.s = self.size / 128
        self.img = image.astype(np.float64)
        self.lum = _luma(self.img)
        self.fg = foreground
        self.y, self.x = _grid(self.size)
        if TOY_CATEGORIES[category]["kind"] == "object":
            self.depth = ndimage.distance_transform_edt(foreground)  # px to the nearest outline
            solid = ndimage.binary_fill_holes(foreground)
            self.outline = solid & ~ndimage.binary_erosion(solid)  # outer outline, not the hole's
            self.reference = ~ndimage.binary_dilation(solid, iterations=3)  # clean background
            cy, cx = self.y[solid].mean(), self.x[solid].mean()
            self.centre = np.array([cy, cx])
            radius = np.hypot(self.y - cy, self.x - cx)
            self.radial = radius / radius[solid].max()  # 0 at the centre, 1 at the outline
        else:
            # A texture's only "outline" is the frame; keeping clear of it keeps defects whole.
            self.depth = np.minimum.reduce([self.y, self.x, self.size - self.y, self.size - self.x])
            self.reference = np.ones_like(foreground)
        self.inside = self.depth >= 3 * self.s  # at least 2 px (at 128) clear of the outline
        light = _fit_smooth(self.lum, self.reference)
        self.light = (light / light[self.reference].mean())[..., None]


def _extent(mask):
    """Longest side of the mask's bounding box, as a fraction of the image side."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return 0.0
    return max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) / mask.shape[0]


def _pick(rng, region):
    """A random point (y, x) in pixels within region."""
    candidates = np.flatnonzero(region)
    y, x = divmod(candidates[rng.integers(candidates.size)], region.shape[1])
    return np.array([y, x]) + rng.uniform(0, 1, 2)


def _clear_path(scene, points):
    """Cheap pre-check before rasterising: every path point is well inside the allowed area."""
    iy, ix = np.floor(points).astype(int).T
    if iy.min() < 0 or ix.min() < 0 or max(iy.max(), ix.max()) >= scene.size:
        return False
    return bool((scene.depth[iy, ix] >= 5 * scene.s).all())


def _crisp(coverage, allowed):
    """Sharp-edged matte: clearly covered pixels only; None (retry) if it strays off allowed."""
    alpha = np.where(coverage >= 0.25, coverage, 0.0)
    return None if (alpha > 0)[~allowed].any() else alpha


def _stroke(points, radii, size):
    """Anti-aliased coverage of a polyline (points as (y, x) px) whose radius varies along it."""
    pad = radii.max() + 2
    y0, x0 = np.clip(np.floor(points.min(0) - pad).astype(int), 0, size)
    y1, x1 = np.clip(np.ceil(points.max(0) + pad).astype(int), 0, size)
    yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
    edge = np.full(yy.shape, np.inf)  # signed distance to the union of tapered capsules
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
        d = b - a
        t = np.clip(((yy - a[0]) * d[0] + (xx - a[1]) * d[1]) / (d @ d + 1e-12), 0, 1)
        dist = np.hypot(yy - a[0] - t * d[0], xx - a[1] - t * d[1])
        edge = np.minimum(edge, dist - (ra + t * (rb - ra)))
    coverage = np.zeros((size, size))
    coverage[y0:y1, x0:x1] = _coverage(edge)
    return coverage


def _straight_length(extent, heading):
    """Length of a line at this heading whose bounding box has the given longest side."""
    return extent / max(abs(np.cos(heading)), abs(np.sin(heading)))


def _blob_coverage(rng, scene, centre, extent, angular=False):
    """Compact blob of the given diameter: a wobbly ellipse, or an angular fragment for chips."""
    a, aspect = rng.uniform(0, np.pi), rng.uniform(0.6, 1.0)
    dy, dx = scene.y - centre[0], scene.x - centre[1]
    p = dx * np.cos(a) + dy * np.sin(a)
    q = (-dx * np.sin(a) + dy * np.cos(a)) / aspect
    theta = np.arctan2(q, p)
    if angular:  # brittle fracture: straight-ish facets between random corners
        corners = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(5, 9)))
        profile = np.interp(theta, corners, rng.uniform(0.45, 1.0, corners.size), period=2 * np.pi)
    else:  # a soft lump: low-order wobble of the radius
        k = np.arange(2, 6)[:, None, None]
        amplitude, phase = rng.uniform(0, 0.3, (4, 1, 1)) / k, rng.uniform(0, 2 * np.pi, (4, 1, 1))
        profile = 1 + (amplitude * np.cos(k * theta + phase)).sum(0)
    return _coverage(np.hypot(p, q) - extent / 2 * profile / profile.max())


def _blob_shape(rng, scene, extent, zone=1.0, angular=False):
    """Compact crisp blob (particles, holes, chips); zone limits it to radial < zone of an object."""
    allowed = scene.inside if zone >= 1 else scene.inside & (scene.radial < zone)
    return _crisp(_blob_coverage(rng, scene, _pick(rng, allowed), extent, angular), allowed)


def _frayed_hole_shape(rng, scene, extent):
    """Hole in cloth: severed yarn ends still poke into it from the rim.

    Within 2 px of the rim, pixels on a yarn crest (brighter than their surroundings) keep
    their cloth, so the ragged border follows the actual weave."""
    alpha = _blob_shape(rng, scene, extent)
    if alpha is None:
        return None
    hole = alpha > 0
    rim = hole & (ndimage.distance_transform_edt(hole) <= 2 * scene.s)
    crest = scene.lum > ndimage.uniform_filter(scene.lum, 2 * round(2 * scene.s) + 1)
    return np.where(rim & crest, 0.0, alpha)


def _patch_shape(rng, scene, extent):
    """Irregular soft patch (stains, discolouration): a noisy ellipse with a feathered matte."""
    cy, cx = _pick(rng, scene.depth >= max(3 * scene.s, extent / 2))  # room for the whole fade
    a, half = rng.uniform(0, np.pi), extent / 2
    dy, dx = scene.y - cy, scene.x - cx
    p = (dx * np.cos(a) + dy * np.sin(a)) / half
    q = (-dx * np.sin(a) + dy * np.cos(a)) / (half * rng.uniform(0.5, 1.0))
    field = 1 - np.hypot(p, q) + 0.3 * _smooth_noise(rng, scene.size, extent / 6)
    # Liquid spreads and thins toward its edge: full strength in the middle, fading over the
    # outer half. The fade also ends 2 px clear of any outline.
    alpha = _smoothstep(0.0, 0.5, field) * _smoothstep(3 * scene.s, 6 * scene.s, scene.depth)
    labels, count = ndimage.label(alpha >= 0.1)
    if count == 0:
        return None
    largest = 1 + np.argmax(ndimage.sum_labels(alpha, labels, np.arange(1, count + 1)))
    return np.where(labels == largest, alpha, 0.0)


def _scratch_shape(rng, scene, extent):
    """Scratch: a smooth, gently curved furrow 1-2 px wide whose width wavers a little."""
    heading, bend = rng.uniform(0, 2 * np.pi), rng.uniform(-0.6, 0.6)
    t = np.linspace(0, 1, 25)
    angles = heading + bend * (t - 0.5)
    steps = _straight_length(extent, heading) / 24 * np.stack([np.sin(angles), np.cos(angles)], 1)
    path = np.cumsum(steps, 0)
    points = _pick(rng, scene.inside) + path - path.mean(0)
    width = 1 + 0.2 * np.sin(2 * np.pi * (rng.uniform(1, 3) * t + rng.uniform()))
    taper = np.clip(6 * np.minimum(t, 1 - t), 0.4, 1)  # the tool digs in, then lifts off
    radii = scene.s * rng.uniform(0.5, 0.8) * width * taper
    if not _clear_path(scene, points):
        return None
    return _crisp(_stroke(points, radii, scene.size), scene.inside)


def _walk(rng, start, heading, length, step):
    """Crack path: a random walk whose heading jitters but reverts to the propagation direction."""
    points, h = [start], heading
    for turn in rng.normal(0, 0.5, max(int(length / step), 2)):
        h += turn - 0.4 * (h - heading)
        points.append(points[-1] + step * np.array([np.sin(h), np.cos(h)]))
    return np.array(points)


def _crack_shape(rng, scene, extent, start_zone=None, inward=False, spread=0.9):
    """Crack: a jagged main fracture with a few shorter side branches.

    With start_zone (a radial band of an object) the crack starts there and runs outward (or
    inward), i.e. across a rim or ring, as a fracture from a stress point at an edge does."""
    if start_zone is None:
        start, heading = _pick(rng, scene.inside), rng.uniform(0, 2 * np.pi)
    else:
        band = scene.inside & (scene.radial >= start_zone[0]) & (scene.radial <= start_zone[1])
        start = _pick(rng, band)
        outward = start - scene.centre
        heading = np.arctan2(outward[0], outward[1]) + np.pi * inward + rng.uniform(-spread, spread)
    step = 1.5 * scene.s
    length = 1.1 * _straight_length(extent, heading)  # jaggedness shortens the bounding box
    main = _walk(rng, start, heading, length, step)
    if not _clear_path(scene, main):
        return None
    taper = np.clip(4 * np.minimum(np.linspace(0, 1, len(main)), np.linspace(1, 0, len(main))), 0.5, 1)
    coverage = _stroke(main, scene.s * rng.uniform(0.55, 0.8) * taper, scene.size)
    for _ in range(rng.integers(1, 4)):
        i = rng.integers(len(main) // 5, 4 * len(main) // 5)
        d = main[i + 1] - main[i - 1]
        side = np.arctan2(d[0], d[1]) + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0)
        branch = _walk(rng, main[i], side, length * rng.uniform(0.15, 0.4), step)
        if not _clear_path(scene, branch):
            continue  # a branch that would run off the part is simply not grown
        radii = scene.s * 0.5 * np.linspace(1, 0.7, len(branch))
        coverage = np.maximum(coverage, _stroke(branch, radii, scene.size))
    return _crisp(coverage, scene.inside)


def _slit_shape(rng, scene, extent, width):
    """Cut: a straight slit, pulled open in the middle (lens-shaped), width in px at 128."""
    heading = rng.uniform(0, 2 * np.pi)
    t = np.linspace(0, 1, 13)[:, None]
    direction = np.array([np.sin(heading), np.cos(heading)])
    points = _pick(rng, scene.inside) + (t - 0.5) * _straight_length(extent, heading) * direction
    radii = scene.s * rng.uniform(*width) / 2 * (0.3 + 0.7 * np.sin(np.pi * t[:, 0]) ** 0.5)
    if not _clear_path(scene, points):
        return None
    return _crisp(_stroke(points, radii, scene.size), scene.inside)


def _notch_shape(rng, scene, extent):
    """Missing piece: an angular fragment broken out of the object's outer outline.

    The fragment is centred a little outside the outline, so the bite is wider than deep."""
    edge = _pick(rng, scene.outline)
    outward = (edge - scene.centre) / np.linalg.norm(edge - scene.centre)
    coverage = _blob_coverage(rng, scene, edge + 0.15 * extent * outward, extent, angular=True)
    return np.where((coverage >= 0.25) & scene.fg, coverage, 0.0)


def _paint_darken(rng, scene, alpha):
    """Crack: a deep, narrow gap that the light barely reaches."""
    return scene.img * rng.uniform(0.2, 0.35)


def _paint_gap(rng, scene, alpha, rgb):
    """Cut: the dark backing / inner material seen through the opened slit."""
    return np.array(rgb) * scene.light


def _paint_hole(rng, scene, alpha, rgb):
    """Hole: the surface bends away into a shadowed rim, then drops into a black core."""
    depth = ndimage.distance_transform_edt(alpha > 0)
    core = _smoothstep(0.25, 0.6, depth / depth.max())[..., None]
    return scene.img * 0.35 * (1 - core) + np.array(rgb) * scene.light * core


def _paint_stain(rng, scene, alpha, tint):
    """Stain: semi-transparent brown liquid filters the light, so the texture still shows.

    It soaked in unevenly, and solute carried to the drying edge leaves a darker ring."""
    ring = np.exp(-(((alpha - 0.35) / 0.15) ** 2))
    density = 0.85 + 0.15 * _smooth_noise(rng, scene.size, 2 * scene.s) + 0.5 * ring
    return scene.img * np.array(tint) ** density[..., None]


def _paint_dye(rng, scene, alpha, gains):
    """Discolouration: the material is re-dyed; its brightness (texture, shading) is kept,
    and the dye took unevenly."""
    uptake = np.clip(0.9 + 0.15 * _smooth_noise(rng, scene.size, 2 * scene.s), 0, 1)[..., None]
    return scene.img + (scene.lum[..., None] * np.array(gains) - scene.img) * uptake


def _paint_particles(rng, scene, alpha, rgb):
    """Contamination: a lump of foreign matter, grainy, rounded, darker granules in it."""
    depth = ndimage.distance_transform_edt(alpha > 0)
    dome = 0.8 + 0.3 * np.sqrt(depth / depth.max())
    grain = 1 + 0.15 * _smooth_noise(rng, scene.size, 0.7 * scene.s)
    granules = 0.35 * (_smooth_noise(rng, scene.size, 0.6 * scene.s) > 1.2)
    return np.array(rgb) * scene.light * (dome * (grain - granules))[..., None]


def _paint_scratch(rng, scene, alpha, rgb):
    """Scratch: the furrow's fresh walls glint (metal) or expose lighter material below.

    The glint comes and goes along the scratch as its direction wavers against the lamp."""
    glint = np.clip(0.8 + 0.3 * _smooth_noise(rng, scene.size, 3 * scene.s), 0.35, 1)[..., None]
    bright = np.array(rgb) * scene.light
    return scene.img + (bright - scene.img) * rng.uniform(0.7, 0.9) * glint


def _paint_substrate(rng, scene, alpha, rgb):
    """Chipped glaze: the rough, matt body below, ringed by the broken glaze wall.

    The wall lies in shadow on the lamp's side of the chip and catches light opposite it."""
    depth = ndimage.distance_transform_edt(alpha > 0)
    gy, gx = np.gradient(ndimage.gaussian_filter(depth, scene.s))
    toward_lamp = rng.uniform(0, 2 * np.pi)
    facing = (gx * np.cos(toward_lamp) + gy * np.sin(toward_lamp)) / (np.hypot(gx, gy) + 1e-6)
    wall = 1 + (0.5 * facing - 0.1) * np.exp(-depth / (1.5 * scene.s))
    rough = 1 + 0.1 * _smooth_noise(rng, scene.size, 0.8 * scene.s)
    return np.array(rgb) * scene.light * (rough * wall)[..., None]


def _paint_background(rng, scene, alpha):
    """Missing material: the plain background shows through, lit like the rest of it."""
    return _fit_smooth(scene.img, scene.reference)


class _Defect(NamedTuple):
    extent: tuple  # (min, max) longest side of the defect, as a fraction of the image side
    shape: Callable  # (rng, scene, extent_px) -> alpha matte, zero outside the mask; None = retry
    paint: Callable  # (rng, scene, alpha) -> the defect's appearance, (H, W, 3) float


_MIN_CONTRAST = 26.0  # mean absolute change inside the mask, in grey levels
_GLINT = partial(_paint_scratch, rgb=(250, 250, 250))  # bare metal reflects the lamp
_DEFECTS = {
    ("fabric", "hole"): _Defect((0.05, 0.14), _frayed_hole_shape, partial(_paint_hole, rgb=(14, 12, 12))),
    ("fabric", "stain"): _Defect((0.10, 0.25), _patch_shape, partial(_paint_stain, tint=(0.62, 0.46, 0.30))),
    ("fabric", "cut"): _Defect((0.20, 0.45), partial(_slit_shape, width=(2, 4)),
                               partial(_paint_gap, rgb=(22, 19, 17))),
    ("fabric", "color"): _Defect((0.10, 0.25), _patch_shape, partial(_paint_dye, gains=(1.25, 0.45, 0.4))),

    ("tile", "crack"): _Defect((0.25, 0.60), _crack_shape, _paint_darken),
    ("tile", "stain"): _Defect((0.10, 0.25), _patch_shape, partial(_paint_stain, tint=(0.7, 0.52, 0.35))),
    ("tile", "contamination"): _Defect((0.04, 0.12), _blob_shape,
                                       partial(_paint_particles, rgb=(75, 135, 65))),
    ("tile", "missing"): _Defect((0.08, 0.20), partial(_blob_shape, angular=True),
                                 partial(_paint_substrate, rgb=(120, 116, 110))),

    ("nut", "scratch"): _Defect((0.20, 0.45), _scratch_shape, _GLINT),
    ("nut", "crack"): _Defect((0.15, 0.35), _crack_shape, _paint_darken),
    ("nut", "missing"): _Defect((0.10, 0.25), _notch_shape, _paint_background),
    ("nut", "contamination"): _Defect((0.04, 0.12), _blob_shape,
                                      partial(_paint_particles, rgb=(195, 100, 40))),

    ("pill", "crack"): _Defect((0.15, 0.40), _crack_shape, _paint_darken),
    ("pill", "contamination"): _Defect((0.04, 0.10), _blob_shape,
                                       partial(_paint_particles, rgb=(125, 80, 45))),
    ("pill", "color"): _Defect((0.10, 0.30), _patch_shape, partial(_paint_dye, gains=(1.08, 0.9, 0.22))),

    ("wood", "scratch"): _Defect((0.25, 0.60), _scratch_shape, partial(_paint_scratch, rgb=(236, 212, 172))),
    ("wood", "hole"): _Defect((0.04, 0.12), _blob_shape, partial(_paint_hole, rgb=(20, 14, 10))),
    ("wood", "stain"): _Defect((0.10, 0.25), _patch_shape, partial(_paint_stain, tint=(0.6, 0.45, 0.32))),
    ("wood", "color"): _Defect((0.10, 0.25), _patch_shape, partial(_paint_dye, gains=(0.58, 1.15, 0.5))),

    ("leather", "cut"): _Defect((0.20, 0.45), partial(_slit_shape, width=(1.5, 3)),
                                partial(_paint_gap, rgb=(30, 20, 14))),
    ("leather", "color"): _Defect((0.10, 0.25), _patch_shape, partial(_paint_dye, gains=(0.45, 0.72, 1.75))),
    ("leather", "scratch"): _Defect((0.25, 0.55), _scratch_shape,
                                    partial(_paint_scratch, rgb=(190, 160, 128))),

    # The bottle's crack starts on the lip and runs inward across it; the washer's crosses the ring.
    ("bottle", "crack"): _Defect((0.15, 0.35), partial(_crack_shape, start_zone=(0.75, 0.92), inward=True),
                                 _paint_darken),
    ("bottle", "contamination"): _Defect((0.05, 0.14), partial(_blob_shape, zone=0.55),
                                         partial(_paint_particles, rgb=(140, 92, 50))),
    ("bottle", "missing"): _Defect((0.10, 0.25), _notch_shape, _paint_background),

    ("washer", "scratch"): _Defect((0.20, 0.40), _scratch_shape, _GLINT),
    ("washer", "missing"): _Defect((0.10, 0.25), _notch_shape, _paint_background),
    ("washer", "crack"): _Defect((0.10, 0.30), partial(_crack_shape, start_zone=(0.5, 0.62), spread=0.4),
                                 _paint_darken),
}


# one source of truth: every listed type has a renderer, and every renderer is listed
assert set(_DEFECTS) == {(c, t) for c, spec in TOY_CATEGORIES.items() for t in spec["types"]}


def render_anomaly(category: str, anomaly_type: str, image: np.ndarray, foreground: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """-> (anomalous image HxWx3 uint8, mask HxW bool)"""
    if anomaly_type not in TOY_CATEGORIES[category]["types"]:
        raise ValueError(f"{category!r} has no anomaly type {anomaly_type!r}")
    defect = _DEFECTS[category, anomaly_type]
    scene = _Scene(category, image, foreground)
    lo, hi = defect.extent
    for _ in range(200):
        # Aim inside the range, then verify the drawn shape's actual bounding box.
        extent = rng.uniform(lo + 0.15 * (hi - lo), hi - 0.15 * (hi - lo))
        alpha = defect.shape(rng, scene, extent * scene.size)
        if alpha is None or not lo <= _extent(alpha > 0) <= hi:
            continue
        mask = alpha > 0
        # Fresh sensor noise: painted material must not look cleaner than the photo around it.
        target = defect.paint(rng, scene, alpha) + rng.normal(0, 3.0, image.shape)
        a = alpha[mask][:, None]
        changed = np.clip(np.rint(scene.img[mask] * (1 - a) + target[mask] * a), 0, 255)
        # A defect an inspector could not see (e.g. a crack lost in a dark region) is redrawn.
        if np.abs(changed - scene.img[mask]).mean() >= _MIN_CONTRAST:
            result = image.copy()
            result[mask] = changed.astype(np.uint8)
            return result, mask
    raise RuntimeError(f"could not place a visible {category}/{anomaly_type} defect")


# ==============================================================================================
# Part 2. The offline tool backends
# ==============================================================================================
# Nothing above this line calls anything below it.

class ToolError(Exception):
    """A request a tool backend cannot serve (a prompt that names no defect, a region with no room):
    the episode runner turns it into an error observation. tools.py re-exports it."""


# ---------------------------------------------------------------------------
# The defect vocabulary: families, colours, and the one local-edit prompt form
# ---------------------------------------------------------------------------

FAMILY_WORDS = [
    ("notch", r"missing|broken|chip|notch"),
    ("crack", r"crack|fracture"),
    ("slit", r"cut|slit|tear|gash|split"),
    ("line", r"scratch|scrape|thread|stroke|streak|line"),
    ("spot", r"hole|puncture|pit|poke|dent"),
    ("blob", r"stain|contamina|particle|debris|residue|glue|oil|liquid|smear|blob|dirt|speck|spot"),
    ("patch", r"discolou?r|colou?r|tint|patch|rough|print|fold|squeez"),
]
FAMILY_DEFAULTS = {  # extent, tone, edge
    "notch": ([0.10, 0.25], "background", "crisp"), "crack": ([0.15, 0.45], "darker", "crisp"),
    "slit": ([0.20, 0.45], "darker", "crisp"), "line": ([0.20, 0.55], "brighter", "crisp"),
    "spot": ([0.04, 0.14], "darker", "crisp"), "blob": ([0.06, 0.25], "darker", "soft"),
    "patch": ([0.10, 0.30], "colour", "soft"),
}


def guess_family(text, default=None):
    for family, pattern in FAMILY_WORDS:
        if re.search(rf"\b({pattern})", text.lower().replace("_", " ")):
            return family
    return default


def guess_attributes(anomaly_type) -> dict:
    """Attributes for a type that is not in the knowledge base, from its name alone."""
    family = guess_family(anomaly_type, "blob")
    extent, tone, edge = FAMILY_DEFAULTS[family]
    return {"shape": family, "extent": extent, "tone": tone, "colour": None, "where": "anywhere",
            "edge": edge, "part": "the surface"}


COLOURS = {"black": (25, 25, 25), "white": (240, 240, 240), "grey": (128, 128, 128),
           "gray": (128, 128, 128), "brown": (115, 70, 35), "red": (190, 40, 35),
           "orange": (215, 120, 35), "yellow": (215, 195, 45), "green": (60, 150, 60),
           "blue": (50, 85, 195), "purple": (125, 60, 155), "pink": (220, 130, 160)}


HUES = ["brown", "red", "orange", "yellow", "green", "blue", "purple"]


def size_word(fraction) -> str:
    return ("tiny" if fraction < 0.06 else "small" if fraction < 0.12 else
            "medium-sized" if fraction < 0.25 else "large")


SHAPE_PHRASES = {"line": "thin scratch line", "crack": "jagged crack", "slit": "narrow cut slit",
                 "spot": "round hole", "blob": "irregular blob", "patch": "discoloured patch",
                 "notch": "missing chunk broken off"}


def local_edit_prompt(anomaly_type, part, shape=None, size_label=None, tone=None, colour=None,
                      size_px=None, length="across", visibility=None, edges=None, place=None) -> str:
    """The local-edit prompt every offline writer uses (the prompt writer, the expert policy, the
    trajectory builder, the fixed-prompt baseline), from attributes:

        Using the provided image, change only <part> to introduce a <type>[: a <size word> <tone>
        <colour> <shape phrase>[ about <size_px> pixels <length>][, <visibility>][, with <edges>]
        [, <place>]]. Keep the rest of the image unchanged.

    tone is "dark", "bright" or None; shape a family of SHAPE_PHRASES (None: the type alone, no look);
    edges "crisp edges", "soft, blended edges" or "sharp edges"; place free text ("at the edge of the
    rim", "in the top-left", "away from the outline"). The painter reads these words back."""
    text = f"Using the provided image, change only {part} to introduce a {anomaly_type.replace('_', ' ')}"
    if shape is not None:
        looks = " ".join(w for w in [size_label, tone, colour, SHAPE_PHRASES[shape]] if w)
        text += f": {'an' if looks[0] in 'aeiou' else 'a'} {looks}"
        if size_px is not None:
            text += f" about {size_px} pixels {length}"
        text += "".join(f", {w}" for w in [visibility, f"with {edges}" if edges else None, place] if w)
    return text + ". Keep the rest of the image unchanged."


# ---------------------------------------------------------------------------
# Image measurements the backends share
# ---------------------------------------------------------------------------

def luminance(image) -> np.ndarray:
    return image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def change_map(a, b) -> np.ndarray:
    """Mean absolute difference over the colour channels, in grey levels (0-255)."""
    return np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(axis=2)


def background_colour(image) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(border.astype(np.float32), axis=0)


def foreground_mask(image, kind) -> np.ndarray:
    """Object pixels: those far from the plain background's colour (the whole image for textures).
    Enclosed regions are object too (a bottle's dark inside), unless they look like the background
    seen through a hole (a washer's or a nut's centre)."""
    if kind == "texture":
        return np.ones(image.shape[:2], bool)
    smooth = ndimage.uniform_filter(image.astype(np.float32), size=(3, 3, 1))
    dist = np.linalg.norm(smooth - background_colour(image), axis=2)
    threshold = 30.0   # grey levels: well above sensor noise, well below any object's contrast
    fg = ndimage.binary_opening(dist > threshold, iterations=1)
    labels, n = ndimage.label(fg)
    if n == 0:
        return np.ones(image.shape[:2], bool)
    sizes = ndimage.sum(fg, labels, range(1, n + 1))
    fg = np.isin(labels, 1 + np.flatnonzero(sizes >= 0.2 * sizes.max()))
    holes, n_holes = ndimage.label(ndimage.binary_fill_holes(fg) & ~fg)
    if n_holes:
        unlike_background = ndimage.mean(dist, holes, range(1, n_holes + 1)) > 2 * threshold
        fg |= np.isin(holes, 1 + np.flatnonzero(unlike_background))
    return ndimage.binary_dilation(fg)   # the blurred outline belongs to the object


def remove_small(mask, min_size) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return np.isin(labels, 1 + np.flatnonzero(sizes >= min_size))


def elongation(mask) -> float:
    """sqrt of the ratio of the principal axes of a region's pixel cloud (1 = round)."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 3:
        return 1.0
    ev = np.linalg.eigvalsh(np.cov(np.stack([ys, xs])) + 0.1 * np.eye(2))
    return float(np.sqrt(ev[1] / ev[0]))


def extent_px(mask) -> int:
    """The longest side of a region's bounding box, in pixels."""
    ys, xs = np.nonzero(mask)
    return int(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1) if len(ys) else 0


# ---------------------------------------------------------------------------
# PG: the offline prompt writer
# ---------------------------------------------------------------------------

class OfflinePromptWriter:
    """PG backend: a local-edit prompt from general knowledge of the defect type.

    Like a language model writing without retrieval, it knows what the defect is called, which part
    it belongs on and its general family (a hole is a dark round spot), but not this dataset's
    specifics (which colour, how large, where exactly, how it blends): those are what knowledge
    retrieval adds when the agent refines a failed attempt."""

    def write(self, normal, entry, rng) -> str:
        shape = entry["attributes"]["shape"]
        extent, tone, _ = FAMILY_DEFAULTS[shape]
        return local_edit_prompt(entry["type"], entry["attributes"]["part"], shape,
                                 size_label=size_word(float(np.mean(extent)) * rng.uniform(0.7, 1.3)),
                                 tone={"darker": "dark", "brighter": "bright"}.get(tone))


# ---------------------------------------------------------------------------
# IG: the procedural painter
# ---------------------------------------------------------------------------

@dataclass
class PaintSpec:
    """What the painter read from a prompt."""
    family: str
    tone: str
    colour: tuple | None
    strength: float
    extent: float        # longest dimension, pixels
    width: float         # stroke width of line-like defects, pixels
    soft: bool
    place: str | None    # edge | rim | inside | interior | center | top-left | ... | None (anywhere)


def _has(text, pattern):
    return re.search(rf"\b({pattern})\b", text) is not None


class ProceduralPainter:
    """IG backend: paints the defect a prompt describes, as a local edit of the original image.

    It reads shape, darkness/colour, contrast, size, stroke width, edge softness and place words.
    Whatever the prompt leaves open is sampled at random, as a real image generator would, so
    vague prompts give variable results and precise prompts give consistent ones. Where the dataset
    has references of the type (expected: their measured size range, as a share of the side, and
    their place on the object), an open size is drawn from the references' range and an open place
    follows theirs: the painter's chance then looks like the dataset's defects, not like any defect."""

    def read(self, prompt, side, rng, expected=None) -> PaintSpec:
        whole = prompt.lower()
        # "change only <part> to introduce a <type>: <description>": the look is read from the
        # description, so a type or part name ("missing_wire", "thread") does not override it
        text = whole.split(":", 1)[1] if ":" in whole else whole
        family = next((f for f, phrase in SHAPE_PHRASES.items() if phrase in text), None) \
            or guess_family(text) or guess_family(whole)
        if family is None:
            raise ToolError("the prompt names no defect; describe its shape, e.g. 'a thin scratch', "
                            "'a jagged crack', 'a dark round hole', 'a brown stain'")
        colour_word = next((c for c in COLOURS if _has(text, c)), None)
        if family == "notch" or _has(text, "background shows|material removed"):
            tone = "background"
        elif _has(text, "dark|darker|black|shadowed|deep"):
            tone = "darker"
        elif _has(text, "bright|brighter|white|shiny|specular|pale|light"):
            tone = "brighter"
        elif colour_word or family == "patch":
            tone = "colour"
        else:
            tone = rng.choice(["darker", "brighter"])
        if _has(text, "faint|subtle|slight|barely visible"):
            strength = rng.uniform(0.15, 0.3)
        elif _has(text, "clearly visible|strong|high-contrast|high contrast|pronounced|distinct|vivid"):
            strength = rng.uniform(0.8, 0.95)
        else:
            strength = rng.uniform(0.15, 0.95)
        px = re.search(r"(\d+(?:\.\d+)?)\s*(?:px|pixels?)\b", text)
        words = {"tiny": (0.03, 0.06), "small": (0.06, 0.12), "medium": (0.12, 0.25),
                 "large": (0.25, 0.45), "long": (0.3, 0.55)}
        if px:   # clamped: a policy asking for a 10^9-pixel crack gets the largest sensible one
            extent = min(float(px.group(1)), 2.0 * side) * rng.uniform(0.92, 1.08)
        else:
            lo, hi = next((r for w, r in words.items() if _has(text, w)),
                          expected["extent"] if expected else (0.04, 0.5))
            extent = rng.uniform(lo, hi) * side
        scale = side / 128
        if _has(text, "hairline|thin|fine|narrow"):
            width = rng.uniform(1.0, 1.6) * scale
        elif _has(text, "wide|thick|broad"):
            width = rng.uniform(3.0, 5.0) * scale
        else:
            width = rng.uniform(1.0, 4.0) * scale
        if family == "notch":   # broken-off material always leaves a clean outline
            soft = False
        elif _has(text, "soft|blended|feathered|diffuse|gradual|fading"):
            soft = True
        elif _has(text, "sharp|crisp|hard|clean"):
            soft = False
        else:
            soft = bool(rng.random() < 0.5)
        # the place may be named anywhere, the part included ("the bottle rim", "the inside of")
        if family == "notch" or _has(whole, "at the edge|on the edge|along the edge|at the outline|touching the outline"):
            place = "edge"
        elif _has(whole, "rim|border|band"):
            place = "rim"
        elif _has(whole, "inside|interior"):
            place = "inside"
        elif _has(whole, "away from the outline|away from the edges?"):
            place = "interior"
        else:
            place = next((p for p in ("top-left", "top-right", "bottom-left", "bottom-right",
                                      "center", "centre", "middle", "top", "bottom", "left", "right")
                          if _has(whole, p)), None)
            if place is None and expected and expected["where"] in ("edge", "interior"):
                place = expected["where"]   # as the references lie: on the outline, or inside the object
        colour = COLOURS[colour_word] if colour_word else None
        return PaintSpec(family, tone, colour, float(strength), float(max(extent, 2.0)),
                         float(min(width, side / 4)), soft, place)

    def edit(self, image, prompt, kind, rng, region=None, expected=None) -> np.ndarray:
        spec, alpha = self.footprint(image, prompt, kind, rng, region, expected)
        return self._apply(image, spec, alpha, rng)

    def footprint(self, image, prompt, kind, rng, region=None, expected=None):
        """What the prompt asks for and where it goes: the spec and the defect's coverage (HxW,
        0-1), kept on the object and inside the region. A mask-based editor paints into it too."""
        side = image.shape[0]
        spec = self.read(prompt, side, rng, expected)
        fg = foreground_mask(image, kind)
        support = fg.copy()
        if spec.place in ("interior", "rim", "inside") and kind == "object":
            support = ndimage.binary_erosion(fg, iterations=max(2, round(3 * side / 128)))
        if region is not None:
            support &= region_mask(region, image.shape[:2])
        if not support.any():
            raise ToolError("there is no room for the defect where the prompt and region put it")
        anchor = self._anchor(spec, fg, support, rng)
        alpha = self._shape(spec, anchor, image.shape[:2], rng)
        if spec.soft:   # a soft line is only slightly blurred; a soft stain fades over its radius
            line_like = spec.family in ("line", "crack", "slit")
            alpha = ndimage.gaussian_filter(alpha, side / 128 if line_like else max(1.0, 0.12 * spec.extent))
            alpha = np.clip(alpha / max(alpha.max(), 1e-6), 0, 1)
        else:
            alpha = ndimage.gaussian_filter(alpha, 0.5)
        alpha[alpha < 0.03] = 0
        return spec, alpha * support

    def _anchor(self, spec, fg, support, rng):
        h, w = fg.shape
        if spec.place == "edge":
            solid = ndimage.binary_fill_holes(fg)   # the outer outline, not a nut's central hole
            candidates = solid & ~ndimage.binary_erosion(solid) & support
            if not candidates.any():
                candidates = support
        elif spec.place in ("rim", "inside"):   # near the outer outline, or far from it
            depth = ndimage.distance_transform_edt(ndimage.binary_fill_holes(fg))
            near = depth < 0.08 * h + 3
            candidates = support & (near if spec.place == "rim" else depth > 0.5 * depth.max())
            if not candidates.any():
                candidates = support
        elif spec.place in ("center", "centre", "middle", "top-left", "top-right", "bottom-left",
                            "bottom-right", "top", "bottom", "left", "right"):
            fy = 0.25 if "top" in spec.place else 0.75 if "bottom" in spec.place else 0.5
            fx = 0.25 if "left" in spec.place else 0.75 if "right" in spec.place else 0.5
            yy, xx = np.mgrid[:h, :w]
            near = (np.abs(yy / h - fy) < 0.15) & (np.abs(xx / w - fx) < 0.15) & support
            candidates = near if near.any() else support
        else:
            # keep the defect's centre far enough from the image border that it stays whole
            margin = int(min(spec.extent / 2, h / 4))
            inner = np.zeros_like(support)
            inner[margin:h - margin, margin:w - margin] = True
            candidates = support & inner if (support & inner).any() else support
        ys, xs = np.nonzero(candidates)
        i = rng.integers(len(ys))
        return float(ys[i]), float(xs[i])

    def _shape(self, spec, anchor, shape, rng) -> np.ndarray:
        """Coverage (0-1) of the defect's footprint, before blending."""
        cy, cx = anchor
        L, h, w = spec.extent, *shape
        yy, xx = np.mgrid[:h, :w].astype(np.float32)
        angle = rng.uniform(0, np.pi)
        d = np.array([np.sin(angle), np.cos(angle)])
        if spec.family in ("line", "slit", "crack"):
            if spec.family == "crack":
                points = _random_walk(anchor, angle, L, rng)
                width = min(spec.width, 1.6 * h / 128)
            else:
                t = np.linspace(-0.5, 0.5, int(4 * L) + 2)[:, None]
                bend = rng.uniform(-0.2, 0.2) * L if spec.family == "line" else 0.0
                normal = np.array([-d[1], d[0]])
                points = np.array(anchor) + t * L * d + (1 - 4 * t ** 2) * bend * normal
                width = spec.width if spec.family == "line" else max(spec.width, 2.0 * h / 128)
            canvas = np.ones(shape, bool)
            iy = np.clip(np.round(points[:, 0]).astype(int), 0, h - 1)
            ix = np.clip(np.round(points[:, 1]).astype(int), 0, w - 1)
            canvas[iy, ix] = False
            dist = ndimage.distance_transform_edt(canvas)
            return np.clip(width / 2 + 0.5 - dist, 0, 1).astype(np.float32)
        # compact families: a noisy ellipse (spot, notch) or a thresholded noise field (blob, patch)
        a = L / 2
        b = a * (rng.uniform(0.75, 1.0) if spec.family in ("spot", "notch") else rng.uniform(0.55, 0.9))
        u = ((yy - cy) * d[0] + (xx - cx) * d[1]) / a
        v = (-(yy - cy) * d[1] + (xx - cx) * d[0]) / b
        r = np.sqrt(u ** 2 + v ** 2)
        roughness = 0.08 if spec.family in ("spot", "notch") else 0.45
        noise = ndimage.gaussian_filter(rng.standard_normal(shape), max(1.0, L / 8))
        noise /= noise.std() + 1e-6
        return ((1 - r + roughness * noise) > 0).astype(np.float32)

    def _apply(self, image, spec, alpha, rng) -> np.ndarray:
        img = image.astype(np.float32)
        lum = luminance(image)[..., None]
        if spec.tone == "background":
            target = np.broadcast_to(background_colour(image), img.shape) + rng.normal(0, 2, img.shape)
            strength = 1.0
        else:
            strength = spec.strength
            if spec.tone == "darker":
                target = img * (0.1 if spec.family == "spot" else 0.2)
                if spec.colour is not None:
                    target = 0.5 * target + 0.5 * np.array(spec.colour) * (0.3 + 0.7 * lum / 255)
            elif spec.tone == "brighter":
                target = img + (255 - img) * 0.85
            elif spec.family in ("blob", "spot"):   # foreign matter: its own colour, lit like the surface
                c = np.array(spec.colour if spec.colour is not None else COLOURS[rng.choice(HUES)], np.float32)
                target = c * (0.75 + 0.25 * lum / max(float(lum.mean()), 1.0))
            else:  # a discolouration: a hue change that keeps the surface's shading and texture
                c = np.array(spec.colour if spec.colour is not None else COLOURS[rng.choice(HUES)], np.float32)
                target = c * lum / max(luminance(c[None, None].astype(np.uint8)).item(), 1.0)
            target = target + rng.normal(0, 4, img.shape)   # grain, so the defect is not flat
        a = (alpha * strength)[..., None]
        out = np.where(a > 0, img + (target - img) * a, img)
        return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _random_walk(anchor, angle, length, rng):
    """A jagged crack: a wandering path through the anchor plus a side branch."""
    def walk(start, heading, n):
        pts, p = [], np.array(start, float)
        for _ in range(int(n)):
            heading += rng.normal(0, 0.35)
            p = p + np.array([np.sin(heading), np.cos(heading)])
            pts.append(p.copy())
        return pts
    half = length / 2
    a = walk(anchor, angle, half)
    b = walk(anchor, angle + np.pi, half)
    trunk = a[::-1] + [np.array(anchor)] + b
    fork = trunk[rng.integers(len(trunk))]
    branch = walk(fork, angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), 0.35 * half)
    return np.array(trunk + branch)


def region_mask(region, shape):
    """An agent's [x0, y0, x1, y1] box (pixels) as an HxW bool mask; a bad box is a ToolError."""
    try:
        x0, y0, x1, y1 = (int(round(float(v))) for v in region)
    except (TypeError, ValueError, OverflowError):
        raise ToolError("region must be [x0, y0, x1, y1] in pixels") from None
    m = np.zeros(shape, bool)
    m[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
    if not m.any():
        raise ToolError(f"region {region} is empty or outside the {shape[1]}x{shape[0]} image")
    return m


# ---------------------------------------------------------------------------
# QE: the measured judge
# ---------------------------------------------------------------------------

# How the measured judge scores an edit. Each check gives a factor in [0, 1] (1: no fault), and each
# score is a product of "floor + share x factor" terms, so one fault alone costs at most its share,
# and several faults compound (a faint, spilled, pasted-looking defect is not rescued by the rest):
#
#   location (0-5) = 5 * on_object * (0.1 + 0.9 * place) * (0.3 + 0.7 * size)   (0.1 + 0.9 * size with references)
#   quality  (0-5) = 5 * visible * (0.4 + 0.6 * confined) * (0.15 + 0.85 * tone)
#                      * (0.4 + 0.6 * shape) * (0.45 + 0.55 * blended)
#   score = location + quality, both rounded to 0.1 first (the paper's rubric: 0-5 + 0-5).
#
# The thresholds below were set by hand on the toy world, so that its own rendered defects (Part 1)
# score well against their normal images and the painter's typical faults score badly.
CHANGED_GREY = 10.0            # a pixel counts as changed above this (blurred) grey-level difference
SIZE_TOLERANCE = (0.8, 1.25)   # the knowledge's extent range, widened: below 0.8 x min or above
                               # 1.25 x max the size factor falls, reaching 0 at half / twice those
VISIBLE_GREY = (10.0, 30.0)    # mean change inside the defect: invisible at 10, fully visible at 30
SPILL = (0.05, 0.25)           # share of all change outside the defect's zone: 5% is free, 30% is 0
SPREAD_MAX = 0.35              # a change over more than 35% of the image is not a local edit
STEEPNESS = (0.27, 0.08)       # soft types: contour gradient / peak change; blended below 0.19,
                               # pasted-looking at 0.27 and above (hard edges are steep)

# With references (entry["reference"]: the dataset's few-shot real anomalies of the type, measured
# against their clean counterparts; tools.reference_stats), their statistics replace the hand-set
# expectations above where a real dataset's defects differ from the toy world's: the size range,
# the place, the tone, the contrast and the elongation come from what the references show.
REF_VISIBLE = (0.4, 0.8)       # invisible below 0.4 x the faintest reference's contrast, fully
                               # visible from 0.8 x the median reference's
REF_TONE = 0.3                 # the tone counts in full from 0.3 x the weakest reference's change
                               # (a colour type keeps the knowledge's hue check: luminance is not hue)
REF_STEEPNESS = 1.1            # a soft type's edges blend in full up to the steepest reference's, +10%
REF_ON_OBJECT = 0.9            # the share of the change on the object counts in full from 0.9 x the
                               # references' (the object's outline is estimated, on real photos roughly)
REF_SIZE_FLOOR = 0.1           # the size term's floor (0.3 without references): the references' size is
                               # the dataset's own, not a guess, so missing it far costs the pass
REF_ELONGATION = 1.5           # elongation within the references' range widened by this factor is
                               # right; the factor falls to 0 at twice that distance


def contour_steepness(change, region) -> float | None:
    """How abruptly a change ends: the mean gradient of the (lightly blurred) change map along the
    contour at half its peak, over the peak. A pasted patch is steep; a blended stain is not. None
    when the change has no body to have a contour."""
    smooth = ndimage.gaussian_filter(change, 0.7)
    peak = np.percentile(change[region], 90)
    core = smooth > 0.5 * peak
    contour = core & ~ndimage.binary_erosion(core)
    if not contour.any():
        return None
    return float(np.hypot(*np.gradient(smooth))[contour].mean() / max(peak, 1e-6))


class MeasuredJudge:
    """QE backend: scores an edit by measuring the change between the normal and the edited image.

    location_score (0-5): the change is on the object, at a plausible place, at a plausible size.
    quality_score (0-5): it is visible, local, looks like its type (darker / brighter / hue, line or
    compact), and blends in (soft types have no hard pasted edges). score = location + quality.
    The review says in plain sentences what to change; "advice" says the same as data, one key per
    fault: size_px, place ("edge" | "interior"), part, tone ("darker" | "brighter" | "background" |
    "colour"), colour, edge ("soft"), contrast ("high"), shape (the family), confine (True)."""

    def evaluate(self, normal, edited, kind, entry) -> dict:
        attrs, name = entry["attributes"], entry["type"].replace("_", " ")
        reference = entry.get("reference")
        if reference:   # what the dataset's own references show overrides the knowledge's guesses
            attrs = {**attrs, "where": reference["where"], "extent": reference["extent"]}
            if reference["tone"] and attrs["tone"] != "colour":
                attrs["tone"] = reference["tone"]
        side = normal.shape[0]
        scale = side / 128
        d = change_map(normal, edited)
        changed = remove_small(ndimage.gaussian_filter(d, 0.7) > CHANGED_GREY, max(3, 4 * scale ** 2))
        if not changed.any():
            return {"location_score": 0.0, "quality_score": 0.0, "score": 0.0,
                    "review": f"No visible change was found; the {name} is missing. "
                              "Make it clearly visible with high contrast.",
                    "advice": {"contrast": "high"}}
        # the defect: the largest group of changed pixels, pieces a few pixels apart (a line broken
        # up by the texture) counted as one
        groups, n = ndimage.label(ndimage.binary_dilation(changed, iterations=max(2, round(2 * scale))))
        main = changed & (groups == 1 + int(np.argmax(ndimage.sum(changed, groups, range(1, n + 1)))))
        fg = foreground_mask(normal, kind)
        # faults as (weight, sentence, advice): the weight orders the review and drops negligible
        # faults; it approximates how much the fault matters, not the exact points the product loses
        faults = []

        # location: on the object, at a plausible place, at a plausible size
        on_object = (changed & fg).sum() / changed.sum()
        if reference:
            on_object = min(1.0, on_object / max(REF_ON_OBJECT * reference["on_object"], 0.05))
        faults.append((2.0 * (1 - on_object), f"Part of the change lies on the background; "
                                              f"move it onto {attrs['part']}.", {"part": attrs["part"]}))
        place = 1.0
        if kind == "object" and attrs["where"] == "edge":
            solid = ndimage.binary_fill_holes(fg)
            outline = ndimage.binary_dilation(solid & ~ndimage.binary_erosion(solid),
                                              iterations=max(1, round(2 * scale)))
            place = float((main & outline).any())
            faults.append((1.5 * (1 - place), f"The {name} should touch the outline of the object; "
                                              f"place it at the edge of {attrs['part']}.", {"place": "edge"}))
        elif kind == "object" and attrs["where"] == "interior":
            depth = ndimage.distance_transform_edt(fg)
            place = float(np.clip((np.mean(depth[changed] >= 2 * scale) - 0.8) / 0.2, 0, 1))
            faults.append((1.5 * (1 - place), f"The {name} touches the outline of the object; keep it "
                                              f"away from the outline, on {attrs['part']}.", {"place": "interior"}))
        lo, hi = attrs["extent"]
        lo, hi = SIZE_TOLERANCE[0] * lo, SIZE_TOLERANCE[1] * hi
        extent = extent_px(main) / side
        good = round(float(np.mean(attrs["extent"])) * side)
        size_ok = 1.0
        if extent < lo:
            size_ok = max(0.0, 2 * extent / lo - 1)
            faults.append((1.5 * (1 - size_ok), f"The {name} is too small (about {extent_px(main)} px); "
                                                 f"make it about {good} px.", {"size_px": good}))
        elif extent > hi:
            size_ok = max(0.0, 2 - extent / hi)
            faults.append((1.5 * (1 - size_ok), f"The {name} is too large (about {extent_px(main)} px); "
                                                 f"make it about {good} px.", {"size_px": good}))
        size_floor = REF_SIZE_FLOOR if reference else 0.3
        location = 5 * on_object * (0.1 + 0.9 * place) * (size_floor + (1 - size_floor) * size_ok)

        # quality: visible, local, the right appearance, blended
        contrast = float(d[main].mean())
        faint, full = VISIBLE_GREY
        if reference:
            faint, full = REF_VISIBLE[0] * reference["contrast"][0], REF_VISIBLE[1] * reference["contrast"][1]
            faint, full = min(faint, VISIBLE_GREY[0]), max(min(full, VISIBLE_GREY[1]), faint + 1)
        visible = float(np.clip((contrast - faint) / (full - faint), 0, 1))
        if visible < 1:   # the extra 1.0 puts a faint defect first in the review, whatever else is wrong
            faults.append((1.5 * (1 - visible) + 1.0, f"The {name} is too faint to see; make it clearly "
                                                      "visible with high contrast.", {"contrast": "high"}))
        zone = ndimage.binary_dilation(main, iterations=max(2, round(3 * scale)))
        spill = d[~zone].sum() / max(d.sum(), 1e-6)
        confined = float(np.clip(1 - (spill - SPILL[0]) / SPILL[1], 0, 1)) * (changed.mean() < SPREAD_MAX)
        faults.append((1.25 * (1 - confined), "Pixels outside the defect changed as well; keep the "
                                              "rest of the image unchanged.", {"confine": True}))
        tone_ok = self._tone(normal, edited, main, attrs, reference)
        faults.append((0.6 * (1 - tone_ok), self._tone_advice(name, attrs),
                       {"tone": attrs["tone"], **({"colour": attrs["colour"]} if attrs["tone"] == "colour" and attrs["colour"] else {})}))
        shape_ok = self._shape(main, attrs["shape"], scale, reference)
        faults.append((0.6 * (1 - shape_ok), self._shape_advice(name, attrs["shape"]), {"shape": attrs["shape"]}))
        blended = 1.0
        if attrs["edge"] == "soft":
            steepness = contour_steepness(d, main)
            # the references' own edges, where they are steeper than the hand-set limit, are plausible
            steep_limit = (max(STEEPNESS[0], REF_STEEPNESS * reference["steepness"] + STEEPNESS[1]) if reference
                           else STEEPNESS[0])
            # no body to blend (a hairline, steepness None): it cannot read as a soft stain
            blended = 0.0 if steepness is None else float(np.clip((steep_limit - steepness) / STEEPNESS[1], 0, 1))
            faults.append((1.5 * (1 - blended), f"The {name} has hard pasted-on edges; blend its "
                                                 "border softly into the surface.", {"edge": "soft"}))
        quality = (5 * visible * (0.4 + 0.6 * confined) * (0.15 + 0.85 * tone_ok)
                   * (0.4 + 0.6 * shape_ok) * (0.45 + 0.55 * blended))
        location_score, quality_score = round(location, 1), round(quality, 1)
        score = round(location_score + quality_score, 1)
        kept = [(s, fix) for weight, s, fix in sorted(faults, key=lambda f: -f[0]) if weight > 0.05]
        verdict = (f"A plausible {name} on {attrs['part']}." if not kept else
                   f"The {name} is not convincing yet." if score < 6 else
                   f"A plausible {name}, with room to improve.")
        return {"location_score": location_score, "quality_score": quality_score, "score": score,
                "review": " ".join([verdict] + [s for s, _ in kept]),
                "advice": {k: v for _, fix in kept for k, v in fix.items()}}

    @staticmethod
    def _tone(normal, edited, region, attrs, reference=None) -> float:
        before = normal[region].astype(np.float32)
        after = edited[region].astype(np.float32)
        dl = float((luminance(after[None]) - luminance(before[None])).mean())
        if reference and reference["tone"] and attrs["tone"] != "colour":   # every reference is darker (or brighter) by at least tone_grey
            need = max(REF_TONE * reference["tone_grey"], 3.0)
            return float(np.clip((dl if reference["tone"] == "brighter" else -dl) / need, 0, 1))
        if reference and attrs["tone"] != "colour":   # the references show either tone
            return 1.0
        if attrs["tone"] == "darker":
            return float(np.clip(-dl / 15, 0, 1))
        if attrs["tone"] == "brighter":
            return float(np.clip(dl / 15, 0, 1))
        if attrs["tone"] == "background":
            bg = background_colour(normal)
            gone = np.linalg.norm(after - bg, axis=1).mean() / max(np.linalg.norm(before - bg, axis=1).mean(), 1e-6)
            return float(np.clip((0.8 - gone) / 0.3, 0, 1))
        # colour: the hue must change, and the new chroma (colour minus its grey level) must point
        # towards the named colour; comparing the shift alone would let any desaturation of a brown
        # surface pass for blue
        chroma = lambda x: x - x.mean(axis=-1, keepdims=True)
        new_chroma = chroma(after).mean(0)
        moved = float(np.clip(np.linalg.norm(new_chroma - chroma(before).mean(0)) / 20, 0, 1))
        want = chroma(np.array(COLOURS[attrs["colour"]], np.float32)) if attrs["colour"] in COLOURS else None
        if reference:   # the references' own hue where they agree on one, else any new hue
            want = np.array(reference["chroma"], np.float32) if reference["chroma"] else None
        if want is not None:
            cos = new_chroma @ want / (np.linalg.norm(new_chroma) * np.linalg.norm(want) + 1e-6)
            return float(np.clip((cos - 0.5) / 0.3, 0, 1)) * moved
        return moved

    @staticmethod
    def _tone_advice(name, attrs):
        return {"darker": f"The {name} should be darker than the surrounding surface; make it dark.",
                "brighter": f"The {name} should be brighter than the surrounding surface; make it bright.",
                "background": "The removed part should show the background; remove the material cleanly.",
                "colour": f"The colour change does not read as {attrs['colour'] or 'a new hue'}; "
                          f"tint it clearly {attrs['colour'] or 'in another colour'}."}[attrs["tone"]]

    @staticmethod
    def _shape(region, family, scale, reference=None) -> float:
        el = elongation(region)
        if reference:
            lo, hi = reference["elongation"]
            lo, hi = lo / REF_ELONGATION, hi * REF_ELONGATION
            off = max(lo / el, el / hi)   # 1 or less inside the range
            return float(np.clip(2 - off, 0, 1))
        if family in ("line", "crack", "slit"):
            rim = region & ~ndimage.binary_erosion(region)
            width = 2 * region.sum() / max(rim.sum(), 1)     # area / half the perimeter
            max_width = (7 if family == "slit" else 5) * scale
            return float(np.clip((el - 1.5) / 1.5, 0, 1) * np.clip((1.5 * max_width - width) / (0.5 * max_width), 0, 1))
        if family == "spot":
            return float(np.clip((3.0 - el) / 0.8, 0, 1))
        if family in ("blob", "patch"):
            return float(np.clip((5.0 - el) / 1.5, 0, 1))
        return 1.0

    @staticmethod
    def _shape_advice(name, family):
        if family in ("line", "crack", "slit"):
            return f"The {name} is too wide or compact; make it a thin, long line."
        if family == "spot":
            return f"The {name} is too elongated; make it a compact round spot."
        return f"The {name} is too stretched; make it a compact irregular blob."


# ---------------------------------------------------------------------------
# MG: the difference segmenter
# ---------------------------------------------------------------------------

class DifferenceSegmenter:
    """MG backend: the mask of what changed between the normal image and the edited one
    (smoothing, a threshold, small-component removal, holes filled)."""

    def __init__(self, threshold=8.0):
        self.threshold = threshold   # grey levels of mean absolute change

    def segment(self, normal, edited) -> np.ndarray:
        side = normal.shape[0]
        d = ndimage.gaussian_filter(change_map(normal, edited), 1.0)
        mask = ndimage.binary_closing(d > self.threshold, iterations=1)
        mask = remove_small(mask, max(4, int(0.0005 * side * side)))
        return ndimage.binary_fill_holes(mask)
