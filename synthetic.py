"""Procedural scenes and videos: the embedded default data of train.py and the data of every test.

A class is a texture, nothing else: horizontal stripes, vertical stripes, a checkerboard or dots, all with a
period of about one 8-px patch at 64 px (a patch sees one period, so the class is resolvable per patch). Shape,
size, position, the two colours of an instance and the texture's phase are random and shared by every class, so
nothing a random ViT's features mostly see (colour, brightness, position) tells the classes apart: only the
pattern does, which survives DINO's colour jitter, grayscale, blur and flips (every texture is invariant to a
horizontal flip). A scene is one background texture covering the image and 1-3 things (disk, square or
triangle; 2-5 patches across at 64 px) of other textures, in painter's order. Sizes and periods are given for a
64-px image and scale with the image. Every image is deterministic per (seed, index). grey=True (data.py --grey,
train.py --synthetic_grey true) repaints every instance in GREY_PALETTE and changes nothing else, so that only the
texture tells two instances apart.
"""
import math

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

SYNTHETIC_CLASSES = ["hstripes", "vstripes", "checker", "dots"]
SYNTHETIC_PERIOD = (6.0, 10.0)  # texture period range in px at 64 px
SHAPES = ["disk", "square", "triangle"]
GREY_PALETTE = (40.0, 215.0)  # grey=True: every instance in these two greys (dark, light), in its drawn order
REFERENCE_SIZE = 64.0
VAL_FIRST_INDEX = 1_000_000  # validation scenes use indices from here on: never seen in pretraining


def _texture(name, u, v, period):
    """Texture value in {0, 1} at instance-frame coordinates (u, v) (arrays, px)."""
    fu, fv = u / period - np.floor(u / period), v / period - np.floor(v / period)
    if name == "hstripes":
        return (fv < 0.5).astype(np.float64)
    if name == "vstripes":
        return (fu < 0.5).astype(np.float64)
    if name == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float64)
    if name == "dots":
        return (((fu - 0.5) ** 2 + (fv - 0.5) ** 2) < 0.3 ** 2).astype(np.float64)
    raise ValueError(f"unknown texture {name!r}")


def _thing_mask(shape, x, y, cx, cy, r, angle):
    """Boolean mask of a thing of circumradius ~r centred at (cx, cy), rotated by angle (x, y: pixel centres)."""
    c, s = math.cos(angle), math.sin(angle)
    a, b = c * (x - cx) + s * (y - cy), -s * (x - cx) + c * (y - cy)  # object frame
    if shape == "disk":
        return a * a + b * b <= r * r
    if shape == "square":
        return np.maximum(np.abs(a), np.abs(b)) <= 0.8 * r
    if shape == "triangle":  # equilateral, circumradius r: inside the three edges at distance r / 2
        inside = np.ones(np.broadcast(a, b).shape, dtype=bool)
        for k in range(3):
            t = 2 * math.pi * k / 3
            inside &= a * math.cos(t) + b * math.sin(t) <= 0.5 * r
        return inside
    raise ValueError(f"unknown shape {shape!r}")


def _two_tone(rng):
    """Random instance colours (dark, light): same hue family, at least ~127 apart on every channel."""
    base = rng.uniform(0, 255, 3)
    dark = base * rng.uniform(0.1, 0.5)
    light = base + (255 - base) * rng.uniform(0.5, 0.9)
    return (dark, light) if rng.random() < 0.5 else (light, dark)


def _sample_instance(rng, cls, scale, grey=False):
    """Colours, texture period and texture phase of one instance of class index cls. grey: the colours are
    GREY_PALETTE's, dark and light in the order the random colours had (the same random draws, so a grey scene has
    the geometry, periods and phases of the colour scene of the same index)."""
    lo, hi = SYNTHETIC_PERIOD
    period, colours = rng.uniform(lo, hi) * scale, _two_tone(rng)
    if grey:
        dark, light = (np.full(3, g) for g in GREY_PALETTE)
        colours = (dark, light) if colours[0].sum() < colours[1].sum() else (light, dark)
    return dict(cls=cls, texture=SYNTHETIC_CLASSES[cls], period=period, colours=colours, offset=rng.uniform(0, 1000, 2))


def _sample_thing(rng, background, size):
    """Class (any but the background's), shape, centre, radius and angle of one thing in a size x size image."""
    cls = int(rng.choice([c for c in range(len(SYNTHETIC_CLASSES)) if c != background]))
    return dict(cls=cls, shape=SHAPES[int(rng.integers(len(SHAPES)))], centre=rng.uniform(0.15, 0.85, 2) * size,
                r=rng.uniform(0.16, 0.3) * size, angle=rng.uniform(0, 2 * np.pi))


def _paint(img, mask, inst, u, v):
    """Paint one instance where mask holds: colour = mix of its two colours by its texture."""
    t = _texture(inst["texture"], u[mask] + inst["offset"][0], v[mask] + inst["offset"][1], inst["period"])
    c0, c1 = inst["colours"]
    img[mask] = c0 + t[:, None] * (c1 - c0)


def _noise(rng, img, sigma=3.0):
    return np.clip(img + rng.normal(0.0, sigma, img.shape), 0, 255).astype(np.uint8)


class SyntheticScenes(Dataset):
    """Procedural scene-centric images with per-pixel class labels, generated on the fly.

    __getitem__(i) -> (PIL RGB size x size, np.uint8 (size, size) labels in 0..num_classes-1, no ignore pixels).
    Deterministic per (seed, first_index + i). One background texture, then 1-3 things in painter's order (later
    ones occlude earlier ones).
    """
    num_classes = len(SYNTHETIC_CLASSES)
    class_names = SYNTHETIC_CLASSES

    def __init__(self, n_images: int = 1000, size: int = 64, seed: int = 0, first_index: int = 0, grey: bool = False):
        self.n_images, self.size, self.seed, self.first_index, self.grey = n_images, size, seed, first_index, grey

    def __len__(self):
        return self.n_images

    def generate(self, index: int):
        """(uint8 image (S, S, 3), uint8 labels (S, S)) of scene `index` (any int, no range check)."""
        rng = np.random.default_rng([self.seed, self.first_index + index])
        S, scale = self.size, self.size / REFERENCE_SIZE
        y, x = np.mgrid[0:S, 0:S] + 0.5  # pixel centres, (S, S) each
        img = np.zeros((S, S, 3), dtype=np.float64)
        background = int(rng.integers(self.num_classes))
        labels = np.full((S, S), background, dtype=np.uint8)
        _paint(img, np.ones((S, S), dtype=bool), _sample_instance(rng, background, scale, self.grey), x, y)
        for _ in range(int(rng.integers(1, 4))):
            thing = _sample_thing(rng, background, S)
            (cx, cy) = thing["centre"]
            mask = _thing_mask(thing["shape"], x, y, cx, cy, thing["r"], thing["angle"])
            _paint(img, mask, _sample_instance(rng, thing["cls"], scale, self.grey), x - cx, y - cy)
            labels[mask] = thing["cls"]
        return _noise(rng, img), labels

    def __getitem__(self, index):
        if not 0 <= index < self.n_images:
            raise IndexError(f"scene index {index} out of range (n_images={self.n_images})")
        img, labels = self.generate(index)
        return Image.fromarray(img), labels


class SyntheticPretrain(Dataset):
    """Synthetic scenes for pretraining: __getitem__(i) -> (*transform(img), 0) (0 files skipped).

    Each scene is generated once per process (DataLoader worker) and kept, as uint8 (3 x size^2 bytes each: 7.9 MB
    for 640 scenes of 64 px), since every epoch reads all of them again."""

    def __init__(self, n_images: int = 1000, size: int = 64, seed: int = 0, transform=None, grey: bool = False):
        self.scenes = SyntheticScenes(n_images, size, seed, grey=grey)
        self.transform = transform
        self._pixels = {}  # index -> uint8 (size, size, 3)

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, index):
        if index not in self._pixels:
            self._pixels[index] = np.asarray(self.scenes[index][0])  # the range check and generation, once
        img = Image.fromarray(self._pixels[index])
        out = img if self.transform is None else self.transform(img)
        return (*out, 0) if isinstance(out, tuple) else (out, 0)


class SyntheticVideos:
    """Videos of 1-3 textured things moving and scaling smoothly over a static textured background.

    video(i) -> (frames: list of PIL RGB (H, W), masks: list of np.uint8 (H, W) instance ids, 0 = background,
    1..n in painter's order). Objects may occlude each other, but every object is visible in frame 0.
    """

    def __init__(self, n_videos: int = 4, n_frames: int = 12, size=(96, 128), seed: int = 0, grey: bool = False):
        self.n_videos, self.n_frames, self.size, self.seed, self.grey = n_videos, n_frames, tuple(size), seed, grey

    def __len__(self):
        return self.n_videos

    def _objects(self, rng, background, x, y):
        """Sample the objects' trajectories until each one shows >= 25% of its area (and >= 16 px) in frame 0."""
        H, W = self.size
        m = min(H, W)
        for _ in range(100):
            objects = []
            for _ in range(int(rng.integers(1, 4))):
                thing = _sample_thing(rng, background, m)
                start = rng.uniform(0.2, 0.8, 2) * (W, H)
                direction = rng.uniform(0, 2 * np.pi)
                end = np.clip(start + rng.uniform(0.1, 0.35) * m * np.array([np.cos(direction), np.sin(direction)]),
                              (0.1 * W, 0.1 * H), (0.9 * W, 0.9 * H))
                objects.append(dict(thing, start=start, end=end, growth=rng.uniform(0.7, 1.4),
                                    spin=rng.uniform(-0.5, 0.5),
                                    inst=_sample_instance(rng, thing["cls"], m / REFERENCE_SIZE, self.grey)))
            ids = np.zeros((H, W), dtype=np.uint8)
            areas = []
            for k, obj in enumerate(objects):
                mask = self._mask(obj, 0.0, x, y)
                areas.append(mask.sum())
                ids[mask] = k + 1
            if all((ids == k + 1).sum() >= max(16, 0.25 * a) for k, a in enumerate(areas)):
                return objects
        raise RuntimeError(f"could not place visible objects in video {self.size}")  # not reached in practice

    @staticmethod
    def _pose(obj, t):
        """Centre, radius and angle at time t in [0, 1]: smooth (eased) motion, geometric scaling."""
        s = t * t * (3 - 2 * t)
        centre = obj["start"] + s * (obj["end"] - obj["start"])
        return centre, obj["r"] * obj["growth"] ** t, obj["angle"] + obj["spin"] * t

    def _mask(self, obj, t, x, y):
        (cx, cy), r, angle = self._pose(obj, t)
        return _thing_mask(obj["shape"], x, y, cx, cy, r, angle)

    def video(self, index: int):
        rng = np.random.default_rng([self.seed, index])
        H, W = self.size
        y, x = np.mgrid[0:H, 0:W] + 0.5
        background = int(rng.integers(len(SYNTHETIC_CLASSES)))
        canvas = np.zeros((H, W, 3), dtype=np.float64)
        _paint(canvas, np.ones((H, W), dtype=bool), _sample_instance(rng, background, min(H, W) / REFERENCE_SIZE,
                                                                 self.grey), x, y)
        objects = self._objects(rng, background, x, y)
        frames, masks = [], []
        for f in range(self.n_frames):
            t = f / max(self.n_frames - 1, 1)
            img, ids = canvas.copy(), np.zeros((H, W), dtype=np.uint8)
            for k, obj in enumerate(objects):
                (cx, cy), _, _ = self._pose(obj, t)
                mask = self._mask(obj, t, x, y)
                _paint(img, mask, obj["inst"], x - cx, y - cy)
                ids[mask] = k + 1
            frames.append(Image.fromarray(_noise(rng, img)))
            masks.append(ids)
        return frames, masks
