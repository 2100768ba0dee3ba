"""Rendering the synthetic rooftop-solar scenes (8 cm per pixel): :func:`render_image` gives
the (RGB image, class mask) of one dataset entry.

Masks hold class indices: 0 background, 1 solar panel (PV), 2 solar water heater,
3 solar pool heater (:mod:`rooftop_m2f.classes`; the ignore label 255 is not used). Scenes are
suburban plots seen from above: textured ground (grass, sand, paving), streets, walls, trees,
blue pools, houses with hip, gable or flat roofs of several materials, facet shading and cast
shadows. Solar objects sit on roofs and rotate with them:

* PV arrays: dark blue or black blocks of 21 x 12 px modules with a cell grid and light
  frame lines, often several blocks in a row (40-120 px).
* Solar water heaters: a pale collector of about 25 x 12 px with a cylindrical tank along
  its ridge-side edge.
* Solar pool heaters: black mats with fine parallel tubes and header pipes, on the roof of a
  house with a pool in its garden.

Distractors keep it honest: dark tile roofs, pale skylights, vents, blue pools, asphalt and
shadows are all background. Every image comes from its own seed derived from
``(seed, split, index)``, so an image does not depend on generation order or on the other
counts. Imports only numpy, OpenCV and a light module of the package (no torch, no detectron2).
"""
import cv2
import numpy as np

from rooftop_m2f.classes import CLASS_NAMES

BACKGROUND, PV, SWH, POOL_HEATER = (CLASS_NAMES.index(name) for name in (
    "background", "solar_panel", "solar_water_heater", "solar_pool_heater"))
_SPLIT_SEED_CODE = {"train": 11, "val": 22, "test": 33}  # part of every image's seed
SPLITS = tuple(_SPLIT_SEED_CODE)
_MIN_OBJECT_PIXELS = 40   # a forced class counts as present with at least this many pixels

# Objects are sized for 8 cm/px: a PV module is about 1.7 x 1.0 m, a flat-plate collector
# 2.0 x 1.0 m with a 0.5 m tank, a pool-heater mat 1.2 m wide and 2.5-3.5 m long.
MODULE_LONG, MODULE_SHORT = 21, 12


# --------------------------------------------------------------------------------------------
# scene plan
# --------------------------------------------------------------------------------------------
def _plan(index, rng):
    """Which classes image ``index`` must show (forced) and may show (random).

    Every 8 images of a split: #0 has PV and a water heater, #1 a pool heater, #3 a water
    heater and #5 nothing; the others draw at random. So pool heaters are in every split with
    two or more images, and every class is in every split with four or more.
    """
    slot = index % 8
    if slot == 0:
        return {PV, SWH}, {"pv_p": 0.4, "swh_p": 0.2, "pool_heater": False}
    if slot == 1:
        return {POOL_HEATER}, {"pv_p": 0.35, "swh_p": 0.15, "pool_heater": True}
    if slot == 3:
        return {SWH}, {"pv_p": 0.45, "swh_p": 0.4, "pool_heater": False}
    if slot == 5:
        return set(), {"pv_p": 0.0, "swh_p": 0.0, "pool_heater": False}
    return set(), {"pv_p": 0.7, "swh_p": 0.25, "pool_heater": bool(rng.random() < 0.06)}


# --------------------------------------------------------------------------------------------
# small drawing helpers (float32 RGB canvases, 0..255)
# --------------------------------------------------------------------------------------------
def _lowfreq(rng, h, w, cells):
    """Smooth random field in [0, 1] of shape (h, w) with about ``cells`` blobs per side."""
    ch, cw = max(2, int(round(cells * h / max(h, w)))), max(2, int(round(cells * w / max(h, w))))
    small = rng.random((ch + 2, cw + 2)).astype(np.float32)
    big = cv2.resize(small, (w + 2 * (w // cw + 1), h + 2 * (h // ch + 1)), interpolation=cv2.INTER_CUBIC)
    oy, ox = h // ch + 1, w // cw + 1
    return np.clip(big[oy:oy + h, ox:ox + w], 0.0, 1.0)


def _noise(rng, h, w, sigma, channels=1):
    n = rng.standard_normal(size=(h, w, channels) if channels > 1 else (h, w), dtype=np.float32)
    return n * np.float32(sigma)


def _jitter(rng, color, amount):
    """``color`` with a random brightness change of +-amount and a third of that per channel."""
    shift = rng.uniform(-amount, amount) + rng.uniform(-amount / 3, amount / 3, 3)
    return np.clip(np.asarray(color, np.float32) + shift.astype(np.float32), 0, 255)


def _blend(img, region, color, alpha=1.0):
    """img[region] = (1 - alpha) * img + alpha * color, region a bool or float (H, W) map."""
    a = region.astype(np.float32) * alpha
    img *= (1.0 - a)[..., None]
    img += a[..., None] * np.asarray(color, np.float32)


def _rotated_rect(cx, cy, w, h, angle_deg):
    pts = cv2.boxPoints(((float(cx), float(cy)), (float(w), float(h)), float(angle_deg)))
    return np.round(pts * 16).astype(np.int32)  # 4 fractional bits for cv2 shift=4


def _fill_poly(shape, pts16):
    m = np.zeros(shape, np.uint8)
    cv2.fillPoly(m, [pts16], 1, lineType=cv2.LINE_AA, shift=4)
    return m


# --------------------------------------------------------------------------------------------
# ground
# --------------------------------------------------------------------------------------------
_GROUND = {
    "grass": ((88, 112, 62), (120, 128, 78)),
    "dry": ((150, 140, 102), (128, 122, 84)),
    "sand": ((196, 180, 146), (170, 158, 124)),
    "paved": ((146, 144, 138), (122, 120, 114)),
}


def _draw_ground(rng, size):
    kind = rng.choice(list(_GROUND), p=[0.45, 0.25, 0.18, 0.12])
    c1, c2 = (_jitter(rng, c, 12) for c in _GROUND[kind])
    mix = _lowfreq(rng, size, size, rng.integers(3, 7))
    img = c1 * (1 - mix[..., None]) + c2 * mix[..., None]
    detail = _lowfreq(rng, size, size, size // 6) - 0.5
    img += detail[..., None] * rng.uniform(10, 22)
    img += _noise(rng, size, size, rng.uniform(3, 7))[..., None]
    # vegetation / bare-soil patches
    for _ in range(rng.integers(0, 5)):
        cx, cy = (int(v) for v in rng.integers(0, size, 2))
        ax, ay = (int(v) for v in rng.integers(8, 40, 2))
        half = max(ax, ay) + 12
        x0, y0 = max(cx - half, 0), max(cy - half, 0)
        x1, y1 = min(cx + half, size), min(cy + half, size)
        patch = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.ellipse(patch, (cx - x0, cy - y0), (ax, ay), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        blotch = _lowfreq(rng, y1 - y0, x1 - x0, max(2, (2 * half) // 21))
        soft = cv2.GaussianBlur(patch.astype(np.float32), (0, 0), 4) * blotch
        color = _jitter(rng, [(70, 98, 48), (140, 120, 90), (104, 120, 70)][rng.integers(0, 3)], 12)
        _blend(img[y0:y1, x0:x1], np.clip(soft * 1.6, 0, 1), color, 0.8)
    return img.astype(np.float32)


def _draw_street(rng, img, occupied, size):
    """An asphalt street band with a kerb, pavement and a dashed centre line near one edge."""
    width = int(rng.integers(45, 80))      # 3.6-6.4 m
    pave = int(rng.integers(10, 28))
    low_side = rng.random() < 0.5
    if low_side:   # street, then pavement towards the plots
        s0 = int(rng.integers(-width // 2, 10))
        p0, kerb_at = s0 + width, s0 + width
    else:          # pavement, then street
        s0 = size - width + int(rng.integers(-10, width // 2))
        p0, kerb_at = s0 - pave, s0 - 1
    axis = 0 if rng.random() < 0.5 else 1  # 0: horizontal street (a band of rows)
    coord = np.arange(size)
    street = (coord >= s0) & (coord < s0 + width)
    pavement = (coord >= p0) & (coord < p0 + pave)
    band = np.broadcast_to(street[:, None] if axis == 0 else street[None, :], (size, size))
    pav = np.broadcast_to(pavement[:, None] if axis == 0 else pavement[None, :], (size, size))
    asphalt = _jitter(rng, (74, 76, 80), 10)
    tex = asphalt + (_noise(rng, size, size, 5) + (_lowfreq(rng, size, size, 10) - 0.5) * 14)[..., None]
    img[band] = tex[band]
    pave_c = _jitter(rng, (170, 164, 152), 15)
    img[pav] = (pave_c + _noise(rng, size, size, 4)[..., None])[pav]
    lines = np.zeros((size, size), bool)
    if 0 <= kerb_at < size:
        lines[kerb_at if axis == 0 else slice(None), slice(None) if axis == 0 else kerb_at] = True
    img[lines] = _jitter(rng, (200, 198, 190), 10)
    dash = (coord // 12) % 2 == 0
    centre = np.zeros((size, size), bool)
    for k in (s0 + width // 2, s0 + width // 2 + 1):
        if 0 <= k < size:
            if axis == 0:
                centre[k, dash] = True
            else:
                centre[dash, k] = True
    img[centre] = _jitter(rng, (225, 225, 215), 8)
    occupied |= band | pav


def _draw_walls(rng, img, occupied, size, shadow):
    """Thin boundary walls with their shadow on the ground (before houses are drawn)."""
    for _ in range(rng.integers(0, 3)):
        horizontal = rng.random() < 0.5
        pos = int(rng.integers(10, size - 10))
        lo, hi = sorted(rng.integers(0, size, 2))
        if hi - lo < 30:
            lo, hi = 0, size
        color = _jitter(rng, (205, 200, 188), 15)
        line = np.zeros((size, size), np.uint8)
        if horizontal:
            cv2.line(line, (int(lo), pos), (int(hi), pos), 1, 2)
        else:
            cv2.line(line, (pos, int(lo)), (pos, int(hi)), 1, 2)
        sh = np.roll(np.roll(line, int(np.sign(shadow[1]) * 2), 0), int(np.sign(shadow[0]) * 2), 1)
        free = ~occupied
        _blend(img, (sh.astype(bool) & free), (0, 0, 0), 0.35)
        img[line.astype(bool) & free] = color


def _draw_driveway(rng, img, occupied, size):
    w, h = int(rng.integers(25, 45)), int(rng.integers(40, 90))
    cx, cy = rng.integers(0, size, 2)
    pts = _rotated_rect(cx, cy, w, h, rng.uniform(0, 180))
    area = _fill_poly((size, size), pts).astype(bool) & ~occupied
    color = _jitter(rng, [(150, 148, 144), (156, 110, 96), (182, 172, 150)][rng.integers(0, 3)], 10)
    yy, xx = np.mgrid[0:size, 0:size]
    pavers = ((xx // 3 + yy // 6) % 2).astype(np.float32) * rng.uniform(0, 10)
    tex = color + (pavers + _noise(rng, size, size, 4))[..., None]
    img[area] = tex[area]


# --------------------------------------------------------------------------------------------
# roofs
# --------------------------------------------------------------------------------------------
_ROOF_MATERIALS = {
    # name: (base colour, jitter, probability)
    "terracotta": ((168, 84, 58), 18, 0.30),
    "corrugated": ((148, 152, 152), 12, 0.22),
    "corrugated_colour": ((122, 70, 58), 16, 0.08),
    "dark_tiles": ((66, 67, 70), 10, 0.18),
    "white_flat": ((218, 218, 212), 10, 0.14),
    "concrete_flat": ((168, 166, 160), 12, 0.08),
}


def _facets(kind, w, h):
    """[(polygon, outward normal (nx, ny))] of a roof of ``kind`` in a w x h local frame."""
    if kind == "flat":
        return [(np.array([[0, 0], [w, 0], [w, h], [0, h]]), (0.0, 0.0))]
    if kind == "gable":
        m = h / 2
        return [
            (np.array([[0, 0], [w, 0], [w, m], [0, m]]), (0.0, -1.0)),
            (np.array([[0, m], [w, m], [w, h], [0, h]]), (0.0, 1.0)),
        ]
    m = h / 2  # hip: ridge from (m, m) to (w - m, m)
    return [
        (np.array([[0, 0], [w, 0], [w - m, m], [m, m]]), (0.0, -1.0)),
        (np.array([[0, h], [w, h], [w - m, m], [m, m]]), (0.0, 1.0)),
        (np.array([[0, 0], [m, m], [0, h]]), (-1.0, 0.0)),
        (np.array([[w, 0], [w - m, m], [w, h]]), (1.0, 0.0)),
    ]


class _Roof:
    """A roof drawn in its own axis-aligned frame (x along the ridge), warped into the image."""

    def __init__(self, rng, w, h, kind, material, sun_local, shadow_local):
        self.rng, self.w, self.h, self.kind, self.material = rng, w, h, kind, material
        self.sun, self.shadow = sun_local, shadow_local
        self.img = np.zeros((h, w, 3), np.float32)
        self.mask = np.zeros((h, w), np.uint8)
        self.facet_id = np.zeros((h, w), np.int16)
        self.facets = _facets(kind, w, h)
        self.free = np.ones((h, w), np.uint8)  # where objects may still go
        for i, (poly, _) in enumerate(self.facets):
            cv2.fillPoly(self.facet_id, [np.round(poly * 16).astype(np.int32)], i, shift=4)
        self._paint()

    def _paint(self):
        rng, w, h = self.rng, self.w, self.h
        base, jit, _ = _ROOF_MATERIALS[self.material]
        color = _jitter(rng, base, jit)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        normals = np.array([n for _, n in self.facets], np.float32)
        along_y = np.abs(normals[self.facet_id, 1]) > 0.5      # facet slopes along y
        across = np.where(along_y, xx, yy)                      # coordinate along the eave
        down = np.where(along_y, yy, xx)                        # coordinate down the slope
        tex = np.zeros((h, w), np.float32)
        if self.material == "terracotta":
            tex += 9 * np.sin(2 * np.pi * down / rng.uniform(3.5, 4.5))  # tile courses
            tex += 4 * np.sin(2 * np.pi * across / rng.uniform(5.0, 6.5))
        elif self.material.startswith("corrugated"):
            tex += rng.uniform(8, 14) * np.sin(2 * np.pi * across / rng.uniform(3.0, 4.2))
        elif self.material == "dark_tiles":
            tex += 6 * np.sin(2 * np.pi * down / rng.uniform(4.5, 5.5))
            tex += 3 * ((across.astype(np.int32) // 4 + down.astype(np.int32) // 5) % 2)
        tex += _noise(rng, h, w, rng.uniform(2, 5))
        tex += (_lowfreq(rng, h, w, 6) - 0.5) * rng.uniform(8, 22)  # weathering
        # facet shading from the sun direction
        k = rng.uniform(0.16, 0.28)
        shade = 1.0 + k * (normals[:, 0] * self.sun[0] + normals[:, 1] * self.sun[1])
        if self.kind == "flat":
            shade = shade * 1.02
        img = color * shade[self.facet_id][..., None] + tex[..., None]
        self.img[:] = img
        line = _jitter(rng, color * 0.8 if rng.random() < 0.5 else np.minimum(color * 1.25, 255), 6)
        if self.kind == "gable":
            cv2.line(self.img, (0, h // 2), (w - 1, h // 2), line.tolist(), 1)
        elif self.kind == "hip":
            m = h // 2
            for p, q in (((0, 0), (m, m)), ((0, h - 1), (m, m)), ((w - 1, 0), (w - m, m)),
                         ((w - 1, h - 1), (w - m, m)), ((m, m), (w - m, m))):
                cv2.line(self.img, p, q, line.tolist(), 1, cv2.LINE_AA)
        else:  # parapet around flat roofs
            edge = _jitter(rng, color * rng.choice([0.8, 1.1]), 5)
            cv2.rectangle(self.img, (0, 0), (w - 1, h - 1), edge.tolist(), 2)
            self.free[:3, :] = 0
            self.free[-3:, :] = 0
            self.free[:, :3] = 0
            self.free[:, -3:] = 0
        # keep objects off ridges and hips
        edges = np.zeros((h, w), np.uint8)
        for poly, _ in self.facets:
            cv2.polylines(edges, [np.round(poly * 16).astype(np.int32)], True, 1, 3, shift=4)
        self.free[edges.astype(bool)] = 0

    # -- placement ---------------------------------------------------------------------------
    def place(self, obj_w_eave, obj_h_slope, margin=2):
        """Find room for an object (size along the eave, size down the slope) on one facet.

        Returns (x0, y0, w, h, normal, swapped) in the roof frame (swapped: the eave direction
        is the frame's y axis), or None; marks the area used.
        """
        rng = self.rng
        order = rng.permutation(len(self.facets))
        for fi in order:
            n = self.facets[fi][1]
            swapped = abs(n[0]) > 0.5 or (self.kind == "flat" and rng.random() < 0.5)
            ow, oh = (obj_h_slope, obj_w_eave) if swapped else (obj_w_eave, obj_h_slope)
            ok = ((self.facet_id == fi) & (self.free > 0)).astype(np.uint8)
            kw, kh = ow + 2 * margin, oh + 2 * margin
            if kw >= self.w or kh >= self.h:
                continue
            # anchor = top-left corner; erode with a kernel anchored at the top-left
            fit = cv2.erode(ok, np.ones((kh, kw), np.uint8), anchor=(0, 0), borderType=cv2.BORDER_CONSTANT, borderValue=0)
            ys, xs = np.nonzero(fit)
            if len(ys) == 0:
                continue
            j = int(rng.integers(0, len(ys)))
            x0, y0 = int(xs[j]) + margin, int(ys[j]) + margin
            self.free[max(y0 - 3, 0):y0 + oh + 3, max(x0 - 3, 0):x0 + ow + 3] = 0
            return x0, y0, ow, oh, n, swapped
        return None

    # -- objects -----------------------------------------------------------------------------
    def _cast(self, x0, y0, w, h, strength, dist):
        sx, sy = self.shadow
        dx, dy = int(round(sx * dist)), int(round(sy * dist))
        ys, xs = slice(max(y0 + dy, 0), max(min(y0 + dy + h, self.h), 0)), slice(max(x0 + dx, 0), max(min(x0 + dx + w, self.w), 0))
        self.img[ys, xs] *= 1.0 - strength

    def add_pv(self):
        """A PV installation: 1-3 blocks of modules in a row on one facet. True if placed."""
        rng = self.rng
        portrait = rng.random() < 0.7
        mw, mh = (MODULE_SHORT, MODULE_LONG) if portrait else (MODULE_LONG, MODULE_SHORT)
        rows = int(rng.integers(1, 3 if portrait else 4))
        nblocks = int(rng.choice([1, 1, 2, 3]))
        cols = [int(rng.integers(2, 7 if portrait else 5)) for _ in range(nblocks)]
        gap = int(rng.integers(3, 9))
        total = sum(c * mw for c in cols) + gap * (nblocks - 1)
        while total > 120 and len(cols) > 1:
            cols.pop()
            total = sum(c * mw for c in cols) + gap * (len(cols) - 1)
        spot = None
        for shrink in range(6):
            spot = self.place(total, rows * mh)
            if spot is not None:
                break
            if rows > 1:
                rows -= 1
            elif len(cols) > 1:
                cols.pop()
            elif cols[0] > 2:
                cols[0] -= 1
            total = sum(c * mw for c in cols) + gap * (len(cols) - 1)
        if spot is None:
            return False
        x0, y0, ow, oh, _, transposed = spot
        mono = rng.random() < 0.2
        base = _jitter(rng, (32, 36, 50) if mono else (30, 44, 92), 7)
        frame = _jitter(rng, (176, 180, 186), 14)
        frame_a = rng.uniform(0.45, 0.85)
        cell = rng.choice([3, 4])
        glare = rng.uniform(0, 14)
        pos = 0
        for c in cols:
            bw_e, bh_s = c * mw, rows * mh  # along eave, down slope
            if transposed:
                bx, by, bw, bh = x0, y0 + pos, bh_s, bw_e
                mw_l, mh_l = mh, mw
            else:
                bx, by, bw, bh = x0 + pos, y0, bw_e, bh_s
                mw_l, mh_l = mw, mh
            self._cast(bx, by, bw, bh, 0.45, 2.0)
            yy, xx = np.mgrid[0:bh, 0:bw]
            u, v = xx % mw_l, yy % mh_l
            block = np.empty((bh, bw, 3), np.float32)
            block[:] = base
            block += (glare * (xx + yy) / float(bw + bh))[..., None]
            cells = ((u % cell) == 0) | ((v % cell) == 0)
            block[cells] += rng.uniform(6, 14) if not mono else rng.uniform(2, 6)
            frames = (u == 0) | (v == 0) | (xx == bw - 1) | (yy == bh - 1)
            block[frames] = block[frames] * (1 - frame_a) + frame * frame_a
            block += _noise(rng, bh, bw, 2.0)[..., None]
            self.img[by:by + bh, bx:bx + bw] = block
            self.mask[by:by + bh, bx:bx + bw] = PV
            pos += bw_e + gap
        return True

    def add_water_heater(self):
        """A flat-plate collector (or two) with its tank along the ridge-side edge."""
        rng = self.rng
        n_coll = 1 if rng.random() < 0.75 else 2
        coll_e, coll_s = int(rng.integers(23, 27)) * n_coll, int(rng.integers(11, 14))
        tank_d = int(rng.integers(5, 7))
        spot = self.place(coll_e, coll_s + tank_d)
        if spot is None:
            return False
        x0, y0, ow, oh, n, swapped = spot
        along_x = not swapped
        self._cast(x0, y0, ow, oh, 0.4, 3.0)
        pale = _jitter(rng, (178, 190, 204), 14)
        tank_c = _jitter(rng, (232, 232, 228), 10)
        frame = _jitter(rng, (120, 124, 128), 15)
        # ridge side = against the outward normal; flat roofs: random side
        if along_x:
            tank_first = (n[1] > 0) if n[1] != 0 else rng.random() < 0.5
        else:
            tank_first = (n[0] > 0) if n[0] != 0 else rng.random() < 0.5
        yy, xx = np.mgrid[0:oh, 0:ow].astype(np.float32)
        e = xx if along_x else yy        # along the eave (tank axis)
        s = yy if along_x else xx        # down the slope
        s_len = oh if along_x else ow
        in_tank = (s < tank_d) if tank_first else (s >= s_len - tank_d)
        patch = np.empty((oh, ow, 3), np.float32)
        patch[:] = pale
        tubes = (e.astype(np.int32) % 3) == 0
        patch[tubes & ~in_tank] -= rng.uniform(10, 22)
        s_coll = s - (tank_d if tank_first else 0)
        frame_px = (~in_tank) & ((e < 1) | (e >= e.max()) | (s_coll < 1) | (s_coll >= coll_s - 1))
        if n_coll == 2:
            frame_px |= (~in_tank) & (np.abs(e - coll_e / 2) < 0.6)
        patch[frame_px] = frame
        t = (s if tank_first else s - (s_len - tank_d)) + 0.5
        prof = 0.6 + 0.45 * np.sin(np.pi * np.clip(t / tank_d, 0, 1))
        tank = tank_c * prof[..., None]
        caps = (e < 1) | (e >= e.max())
        tank[caps] *= 0.75
        patch[in_tank] = tank[in_tank]
        patch += _noise(rng, oh, ow, 2.0)[..., None]
        self.img[y0:y0 + oh, x0:x0 + ow] = patch
        self.mask[y0:y0 + oh, x0:x0 + ow] = SWH
        return True

    def add_pool_heater(self):
        """Black pool-heater mats with fine tubes, side by side, with header pipes."""
        rng = self.rng
        mat_w = int(rng.integers(14, 17))
        mat_l = int(rng.integers(30, 44))
        n = int(rng.integers(3, 7))
        spot = None
        while n >= 2:
            spot = self.place(n * mat_w, mat_l + 4)
            if spot is not None:
                break
            n -= 1
            if n < 3 and mat_l > 30:
                mat_l -= 6
        if spot is None:
            return False
        x0, y0, ow, oh, _, swapped = spot
        along_x = not swapped
        self._cast(x0, y0, ow, oh, 0.3, 1.5)
        base = rng.uniform(12, 26)
        tint = rng.uniform(-3, 3, 3)
        yy, xx = np.mgrid[0:oh, 0:ow]
        e = xx if along_x else yy
        s = yy if along_x else xx
        s_len = oh if along_x else ow
        patch = np.empty((oh, ow, 3), np.float32)
        patch[:] = base + tint
        patch[(e % 3) == 0] += rng.uniform(16, 26)              # tubes
        header = (s < 2) | (s >= s_len - 2)
        patch[header] = rng.uniform(40, 70)
        gaps = ((e % mat_w) == mat_w - 1) & ~header             # thin gap between mats
        patch[gaps] = patch[gaps] * 0.4 + self.img[y0:y0 + oh, x0:x0 + ow][gaps] * 0.6
        patch += _noise(rng, oh, ow, 1.5)[..., None]
        self.img[y0:y0 + oh, x0:x0 + ow] = patch
        self.mask[y0:y0 + oh, x0:x0 + ow] = POOL_HEATER
        return True

    def add_distractors(self):
        """Skylights, vents and AC units (all background)."""
        rng = self.rng
        for _ in range(rng.integers(0, 3)):
            r = rng.random()
            if r < 0.4:  # skylight: pale glass, no tank
                w, h = int(rng.integers(8, 14)), int(rng.integers(10, 18))
                spot = self.place(w, h)
                if spot is None:
                    continue
                x0, y0, ow, oh, _, _ = spot
                glass = _jitter(rng, (176, 196, 206), 15)
                self.img[y0:y0 + oh, x0:x0 + ow] = glass
                self.img[y0:y0 + oh, x0] = self.img[y0:y0 + oh, x0 + ow - 1] = glass * 0.7
            else:  # vent / AC box / chimney
                s = int(rng.integers(4, 10))
                spot = self.place(s, s)
                if spot is None:
                    continue
                x0, y0, ow, oh, _, _ = spot
                self._cast(x0, y0, ow, oh, 0.45, 3.0)
                self.img[y0:y0 + oh, x0:x0 + ow] = _jitter(rng, (150, 150, 146), 40)


# --------------------------------------------------------------------------------------------
# scene
# --------------------------------------------------------------------------------------------
def _warp(src, M, size, interp, border=0):
    return cv2.warpAffine(src, M, (size, size), flags=interp, borderMode=cv2.BORDER_CONSTANT, borderValue=border)


def _draw_pool(rng, img, occupied, size, house_footprint=None):
    """A blue pool with coping on free ground, near ``house_footprint`` when given. Bool map or None."""
    pw, ph = int(rng.integers(26, 42)), int(rng.integers(44, 80))
    angle = float(rng.uniform(0, 180))
    r = int(np.hypot(pw, ph) / 2) + 4
    free = (~occupied).astype(np.uint8)
    fit = cv2.erode(free, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)),
                    borderType=cv2.BORDER_CONSTANT, borderValue=1)
    inner = np.zeros_like(fit)
    m = min(r // 2, size // 4)
    inner[m:size - m, m:size - m] = 1
    fit &= inner
    if house_footprint is not None:
        dist = cv2.distanceTransform((~house_footprint).astype(np.uint8), cv2.DIST_L2, 3)
        fit &= ((dist > r) & (dist < r + 30)).astype(np.uint8)
    ys, xs = np.nonzero(fit)
    if len(ys) == 0:
        return None
    j = int(rng.integers(0, len(ys)))
    cx, cy = int(xs[j]), int(ys[j])
    shape = np.zeros((size, size), np.uint8)
    if rng.random() < 0.3:
        cv2.ellipse(shape, ((cx, cy), (pw, ph), angle), 1, -1)
    else:
        cv2.fillPoly(shape, [_rotated_rect(cx, cy, pw, ph, angle)], 1, shift=4)
        shape = (cv2.GaussianBlur(shape.astype(np.float32), (0, 0), 3) > 0.5).astype(np.uint8)
    coping = cv2.dilate(shape, np.ones((5, 5), np.uint8)).astype(bool)
    water = shape.astype(bool)
    img[coping] = _jitter(rng, (214, 208, 192), 12)
    depth = cv2.distanceTransform(shape, cv2.DIST_L2, 3)
    depth = np.clip(depth / 8.0, 0, 1)
    wc = _jitter(rng, (52, 150, 196), 18)
    caustic = (_lowfreq(rng, size, size, size // 5) - 0.5) * 18
    tone = wc * (1.08 - 0.22 * depth)[..., None] + caustic[..., None]
    tone[..., 2] += 10 * (1 - depth)
    img[water] = tone[water]
    occupied |= coping
    return coping


def _draw_trees(rng, img, mask, occupied, size, shadow, n):
    """Trees on free ground (their canopy may overhang roofs and hide objects there)."""
    for _ in range(n):
        ys, xs = np.nonzero(~occupied)
        if len(ys) == 0:
            return
        j = int(rng.integers(0, len(ys)))
        cx, cy = int(xs[j]), int(ys[j])
        r = int(rng.integers(6, 22))
        half = 2 * r + 6
        x0, y0 = max(cx - half, 0), max(cy - half, 0)
        x1, y1 = min(cx + half + 1, size), min(cy + half + 1, size)
        h, w = y1 - y0, x1 - x0
        canopy = np.zeros((h, w), np.uint8)
        for _k in range(int(rng.integers(2, 5))):
            ox, oy = rng.integers(-r // 2, r // 2 + 1, 2)
            cv2.circle(canopy, (cx - x0 + int(ox), cy - y0 + int(oy)), int(r * rng.uniform(0.6, 1.0)), 1, -1, cv2.LINE_AA)
        soft = cv2.GaussianBlur(canopy.astype(np.float32), (0, 0), 1.2)

        def shifted(k):
            M = np.float32([[1, 0, shadow[0] * k], [0, 1, shadow[1] * k]])
            return cv2.warpAffine(soft, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)

        win = img[y0:y1, x0:x1]
        _blend(win, shifted(r * 0.6) * (1 - soft), (0, 0, 0), 0.5)
        leaf = _jitter(rng, (52, 78, 40), 14)
        tex = leaf + ((_lowfreq(rng, h, w, max(2, max(h, w) // 4)) - 0.5) * 40)[..., None]
        tex = tex * (1.0 - 0.3 * np.clip(soft - shifted(-r * 0.5), 0, 1))[..., None]  # shaded side
        a = soft[..., None]
        win[:] = win * (1 - a) + tex * a
        mask[y0:y1, x0:x1][soft > 0.5] = BACKGROUND
        occupied[y0:y1, x0:x1] |= soft > 0.5


def _render(rng, size, forced, opts):
    img = _draw_ground(rng, size)
    mask = np.zeros((size, size), np.uint8)
    occupied = np.zeros((size, size), bool)
    sun_angle = rng.uniform(0, 2 * np.pi)
    shadow_dir = np.array([np.cos(sun_angle), np.sin(sun_angle)], np.float32)  # shadows fall this way
    sun = -shadow_dir
    if rng.random() < 0.45:
        _draw_street(rng, img, occupied, size)

    want_ph = POOL_HEATER in forced or opts["pool_heater"]
    base_angle = rng.choice([0.0, 90.0]) + rng.normal(0, 4) if rng.random() < 0.6 else rng.uniform(0, 180)
    n_houses = int(rng.integers(1, 4)) * max(1, int(round((size / 256.0) ** 2)))
    houses = []  # (roof, roof-to-image affine, footprint, shadow length)
    footprint_all = np.zeros((size, size), bool)
    for _attempt in range(n_houses * 4):
        if len(houses) >= n_houses:
            break
        w = int(rng.integers(70, 150))
        h = int(rng.integers(56, min(112, w) + 1))
        kind = rng.choice(["hip", "gable", "flat"], p=[0.45, 0.3, 0.25])
        names = list(_ROOF_MATERIALS)
        probs = np.array([_ROOF_MATERIALS[m][2] for m in names])
        if kind == "flat":
            material = rng.choice(["white_flat", "concrete_flat", "dark_tiles", "corrugated"], p=[0.45, 0.3, 0.1, 0.15])
        else:
            keep = [i for i, m in enumerate(names) if not m.endswith("_flat")]
            material = names[rng.choice(keep, p=probs[keep] / probs[keep].sum())]
        angle = float(base_angle + rng.choice([0.0, 90.0]) + rng.normal(0, 2)) if rng.random() < 0.75 else float(rng.uniform(0, 180))
        lo, hi = (0.3, 0.7) if not houses else (0.0, 1.0)
        cx, cy = rng.uniform(lo * size, hi * size, 2)
        th = np.deg2rad(angle)
        R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]], np.float32)
        M = np.zeros((2, 3), np.float32)
        M[:, :2] = R
        M[:, 2] = np.array([cx, cy], np.float32) - R @ np.array([w / 2, h / 2], np.float32)
        foot = _warp(np.ones((h, w), np.float32), M, size, cv2.INTER_LINEAR) > 0.5
        if not foot.any():
            continue
        if (foot & (occupied | cv2.dilate(footprint_all.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool))).sum() > 0.02 * foot.sum():
            continue
        sh_len = rng.uniform(5, 14)
        sun_local = R.T @ sun
        shadow_local = R.T @ shadow_dir
        roof = _Roof(rng, w, h, kind, material, sun_local, shadow_local)
        houses.append((roof, M, foot, sh_len))
        footprint_all |= foot
    occupied_ground = occupied | footprint_all
    _draw_walls(rng, img, occupied_ground, size, shadow_dir)
    for _ in range(rng.integers(0, 2)):
        _draw_driveway(rng, img, occupied_ground, size)

    # objects on roofs
    placed = set()
    order = list(range(len(houses)))
    if want_ph and houses:
        ph_house = order[0]
        coping = _draw_pool(rng, img, occupied_ground, size, houses[ph_house][2])
        if coping is not None and houses[ph_house][0].add_pool_heater():
            placed.add(POOL_HEATER)
    elif rng.random() < 0.3:
        _draw_pool(rng, img, occupied_ground, size)  # pool without a heater: a distractor
    for i, (roof, _, _, _) in enumerate(houses):
        if (PV in forced and PV not in placed) or rng.random() < opts["pv_p"]:
            if roof.add_pv():
                placed.add(PV)
                if rng.random() < 0.25:
                    roof.add_pv()
        if (SWH in forced and SWH not in placed) or rng.random() < opts["swh_p"]:
            if roof.add_water_heater():
                placed.add(SWH)
        roof.add_distractors()

    # composite houses: shadow first, then the roof
    for roof, M, foot, sh_len in houses:
        Ms = M.copy()
        Ms[:, 2] += shadow_dir * sh_len
        sh = _warp(np.ones((roof.h, roof.w), np.float32), Ms, size, cv2.INTER_LINEAR)
        sh = cv2.GaussianBlur(sh, (0, 0), 0.8)
        img *= (1.0 - 0.5 * sh)[..., None]
        a = _warp(np.ones((roof.h, roof.w), np.float32), M, size, cv2.INTER_LINEAR)
        rimg = _warp(roof.img, M, size, cv2.INTER_LINEAR)
        img[:] = img * (1 - a[..., None]) + rimg * a[..., None]
        rmask = _warp(roof.mask, M, size, cv2.INTER_NEAREST)
        inside = a > 0.5
        mask[inside] = rmask[inside]

    _draw_trees(rng, img, mask, occupied_ground, size, shadow_dir, int(rng.integers(0, 4)))

    # camera: colour cast, brightness, blur, noise
    gain = rng.normal(1.0, 0.03, 3) * rng.uniform(0.88, 1.1)
    img = img * gain.astype(np.float32)
    img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.35, 0.7)))
    img += _noise(rng, size, size, float(rng.uniform(1.5, 3.5)), 3)
    img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return img, mask


_CANVAS = 256  # smaller images are crops of a scene of this size, so objects keep their scale


def _crop_origin(rng, mask, size, forced):
    """Top-left corner of a ``size`` crop of ``mask``, around an object of a forced class."""
    canvas = mask.shape[0]
    if not forced:
        return rng.integers(0, canvas - size + 1, 2)
    rarest = max(forced)  # pool heater, then water heater, then PV
    ys, xs = np.nonzero(mask == rarest)
    if len(ys) == 0:
        return rng.integers(0, canvas - size + 1, 2)
    j = int(rng.integers(0, len(ys)))
    y, x = int(ys[j]), int(xs[j])
    lo_y, hi_y = max(0, y - size + 16), min(canvas - size, y - 16)
    lo_x, hi_x = max(0, x - size + 16), min(canvas - size, x - 16)
    oy = int(rng.integers(lo_y, hi_y + 1)) if hi_y >= lo_y else min(max(y - size // 2, 0), canvas - size)
    ox = int(rng.integers(lo_x, hi_x + 1)) if hi_x >= lo_x else min(max(x - size // 2, 0), canvas - size)
    return oy, ox


def render_image(seed, split, index, size=256):
    """The (image RGB uint8 (size, size, 3), mask uint8 (size, size)) pair of one dataset entry.

    Deterministic in (seed, split, index, size). Images smaller than 256 px are crops of a
    256 px scene (objects keep their 8 cm/px size). A scene that lost a forced class (cropped
    by the border, hidden by a tree) is redrawn with the next derived seed.
    """
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")
    code = _SPLIT_SEED_CODE[split]
    plan_rng = np.random.default_rng(np.random.SeedSequence([int(seed), code, int(index), 0]))
    forced, opts = _plan(index, plan_rng)
    canvas = max(size, _CANVAS)
    for attempt in range(1, 41):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), code, int(index), attempt]))
        img, mask = _render(rng, canvas, forced, opts)
        if size < canvas:
            oy, ox = _crop_origin(rng, mask, size, forced)
            img = np.ascontiguousarray(img[oy:oy + size, ox:ox + size])
            mask = np.ascontiguousarray(mask[oy:oy + size, ox:ox + size])
        counts = np.bincount(mask.ravel(), minlength=len(CLASS_NAMES))
        if all(counts[c] >= _MIN_OBJECT_PIXELS for c in forced):
            return img, mask
    return img, mask  # pragma: no cover - forced classes fit at any size >= 64 in practice
