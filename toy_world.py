"""toy_world.py -- the procedural "toy world": an offline stand-in for MVTec-AD, used by tools.py.

Normal images are rendered as scene radiance (material colour x shading) and
then pushed through a small camera model (illumination gradient, vignetting,
optical blur, sensor noise, 8-bit quantisation) so that they look like
inspection photos rather than clip art.

Defects are painted by compositing a physically motivated appearance over the
normal image through an alpha matte that is exactly zero outside the returned
mask, so the mask is pixel-exact by construction.

All lengths are written for a 128 px image and scaled by ``size / 128``.
"""
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
