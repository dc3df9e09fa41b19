"""Data for CrOC: two views with the positions of their patches, the pretraining images, the evaluation datasets.

Sections, the paper's part first
  1. Two views with patch positions (Sec. 3.3.2, Fig. 4: the E_1, E_2 of Eq. 17; DINO's augmentations, App. B)
  2. Pretraining images: image folders (e.g. COCO+), or the built-in synthetic scenes of synthetic.py
  3. Evaluation datasets: class lists, COCO / ADE20K label maps, the VOC colour map
  4. Evaluation datasets: PVOC12, COCO-Things, COCO-Stuff, ADE20K, synthetic (Leopart's loaders' label maps)
  5. Evaluation transforms: App. C's 448x448 protocol (eval_linear.py and eval_kmeans.py)
  6. Preparing the datasets from the files the official sites distribute (`python data.py prepare_coco|prepare_voc`)
  7. Writing the synthetic data in the PVOC12 / DAVIS-2017 layouts (`python data.py --write-synthetic DIR`)
  8. Plumbing: seeded, resumable sampling; durable writes and stop signals (train.py, eval_linear.py)
  9. Plumbing: input errors; reading and checking image and mask files
 10. Command line

Positions are (x, y) in ORIGINAL-image pixel units; pixel (i, j) covers [j, j+1) x [i, i+1), so its centre is
(j + 0.5, i + 0.5). A patch's position is the mean of its pixels' positions.
"""
import argparse
import json
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from einops import rearrange
from PIL import Image, ImageFilter
from torch.utils.data import Dataset
from torchvision import transforms, tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F2
from tqdm import tqdm

# the synthetic scenes and videos live in synthetic.py; data.SyntheticScenes etc. are the same objects
from synthetic import (SYNTHETIC_CLASSES, VAL_FIRST_INDEX, SyntheticPretrain, SyntheticScenes,  # noqa: F401
                       SyntheticVideos)


# ----------------------------------------------------------------------------------------------------------------
# 1. Two views with patch positions (Sec. 3.3.2, Fig. 4: the E_1, E_2 of Eq. 17; DINO's augmentations, App. B)
# ----------------------------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # same values as model.py
IMAGENET_STD = (0.229, 0.224, 0.225)


def patch_positions(box, flip: bool, img_size: int, patch_size: int) -> torch.Tensor:
    """(x, y) of each patch of a resized crop in ORIGINAL-image pixels, (N, 2) float32, raster order: the E_1
    or E_2 of Sec. 3.3.2 (Fig. 4), from which Eq. 17's positional cost T^(pos) is computed.

    box = (top, left, height, width) of the crop in the original image, resized to img_size x img_size.
    Output pixel j has its centre at j + 0.5, i.e. at original x = left + (j + 0.5) * width / img_size (the
    pixel-centre convention of PIL and torch resizing); the mean over a patch's pixels is its centre pixel
    coordinate (pj + 0.5) * patch_size. A horizontal flip mirrors x inside the box: x -> 2 left + width - x.
    """
    top, left, height, width = (float(v) for v in box)
    grid = img_size // patch_size
    centre = (torch.arange(grid, dtype=torch.float64) + 0.5) * patch_size / img_size  # (g,) in [0, 1] of the box
    xs = left + width * ((1.0 - centre) if flip else centre)
    ys = top + height * centre
    xy = torch.stack([xs[None, :].expand(grid, grid), ys[:, None].expand(grid, grid)], dim=-1)  # (g_h, g_w, 2)
    return rearrange(xy, "h w c -> (h w) c").float()


class RandomGaussianBlurPIL:
    """DINO's blur: with probability p, PIL Gaussian blur of radius U(0.1, 2.0) x scale (torch RNG, seeded per
    worker). DINO's radii are pixels of a 224-px view; TwoViews passes scale = img_size / 224, so that a smaller
    view is blurred by the same share of its content (scale 1 at 224: DINO's blur exactly)."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0, scale: float = 1.0):
        self.p, self.radius_min, self.radius_max = p, radius_min * scale, radius_max * scale

    def __call__(self, img):
        if torch.rand(()).item() >= self.p:
            return img
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self):
        return f"{type(self).__name__}(p={self.p}, radius=({self.radius_min}, {self.radius_max}))"


class TwoViews:
    """DINO's two global views of one image, each with the positions of its patches (Sec. 3.3.2).

    __call__(img: PIL RGB) -> (views (2, 3, S, S) normalised float32, positions (2, N, 2) float32), N = (S / p)^2.
    Geometry: RandomResizedCrop(S, scale, ratio 3/4-4/3, bicubic) + horizontal flip p 0.5, tracked analytically
    (`patch_positions`). Photometry: colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2; view 1 blur p 1.0;
    view 2 blur p 0.1 (radii scaled by S / 224) and solarisation p 0.2; ImageNet normalisation. Randomness:
    torch's global RNG, which train.py seeds per sample (SeededSamples).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3),
                 interpolation: InterpolationMode = InterpolationMode.BICUBIC):
        if img_size % patch_size != 0:
            raise InputError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.scale, self.ratio, self.interpolation = tuple(scale), tuple(ratio), interpolation
        blur_scale = img_size / 224  # DINO's blur radii are for 224-px views (RandomGaussianBlurPIL)
        colour = [transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                  transforms.RandomGrayscale(p=0.2)]
        normalise = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.photometric = (
            transforms.Compose(colour + [RandomGaussianBlurPIL(p=1.0, scale=blur_scale)] + normalise),
            transforms.Compose(colour + [RandomGaussianBlurPIL(p=0.1, scale=blur_scale),
                                         transforms.RandomSolarize(128, p=0.2)]
                               + normalise),
        )

    def geometric(self, img, flip: bool | None = None):
        """One random resized crop + flip of img (PIL or (C, H, W) tensor) -> (view, positions (N, 2)).

        flip=None flips with probability 0.5; True / False force it (tests).
        """
        top, left, height, width = transforms.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        view = TF.resized_crop(img, top, left, height, width, [self.img_size, self.img_size],
                               interpolation=self.interpolation, antialias=True)
        if flip is None:
            flip = bool(torch.rand(()) < 0.5)
        if flip:
            view = TF.hflip(view)
        return view, patch_positions((top, left, height, width), flip, self.img_size, self.patch_size)

    def __call__(self, img):
        views, positions = [], []
        for photometric in self.photometric:
            view, pos = self.geometric(img)
            views.append(photometric(view))
            positions.append(pos)
        return torch.stack(views), torch.stack(positions)  # (2, 3, S, S), (2, N, 2)

    def __repr__(self):
        return (f"TwoViews(img_size={self.img_size}, patch_size={self.patch_size}, scale={self.scale}, "
                f"ratio={self.ratio}, interpolation={self.interpolation.value})")


# ----------------------------------------------------------------------------------------------------------------
# 2. Pretraining images: image folders (e.g. COCO+), or the built-in synthetic scenes of synthetic.py
# ----------------------------------------------------------------------------------------------------------------

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class PretrainImages(Dataset):
    """All images under one or more roots (e.g. COCO train2017 + unlabeled2017 = COCO+), for pretraining.

    __getitem__(i) -> (*transform(img), skipped): an unreadable or truncated file is replaced by the next readable
    one; `skipped` counts the files skipped for this sample, and each bad file is warned about once per process.
    """

    def __init__(self, roots, transform=None):
        roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
        if not roots:
            raise InputError("PretrainImages needs at least one image folder")
        self.roots = [os.fspath(r) for r in roots]
        self.files = [f for root in self.roots for f in list_images(root)]
        self.transform = transform
        self._warned = set()

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        skipped = 0
        for k in range(len(self.files)):
            path = self.files[(index + k) % len(self.files)]
            try:
                img = load_rgb(path)
            except Exception as e:  # any decoder error (truncated, corrupt, unknown format) must not stop training
                skipped += 1
                if path not in self._warned:
                    self._warned.add(path)
                    reason = e if isinstance(e, InputError) else f"{path}: {type(e).__name__}: {e}"  # names the file
                    warnings.warn(f"skipping an unreadable image: {reason}", RuntimeWarning)
                continue
            out = img if self.transform is None else self.transform(img)
            return (*out, skipped) if isinstance(out, tuple) else (out, skipped)
        raise InputError(f"no readable image in {self.roots}")


def pretraining_dataset(args):
    """The pretraining set of a run (train.py's flags, or a checkpoint's args): its --data_path folders, else the
    built-in synthetic scenes, each image giving TwoViews."""
    transform = TwoViews(args.img_size, args.patch_size, tuple(args.global_crops_scale))
    if args.data_path:
        return PretrainImages(args.data_path, transform)
    grey = getattr(args, "synthetic_grey", False)  # args that lack the flag: colour, its default
    return SyntheticPretrain(args.synthetic_images, args.synthetic_size, args.seed, transform, grey=grey)


# ----------------------------------------------------------------------------------------------------------------
# 3. Evaluation datasets: class lists and label maps
# ----------------------------------------------------------------------------------------------------------------

IGNORE_INDEX = 255

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]

# Leopart's coco_data_module.py: class index = rank of the super-category in the alphabetically sorted list.
# COCO-Things: panoptic category ids (isthing == 1) -> 12 super-categories; 0 and every stuff id -> 255.
COCO_THINGS_IDS = {
    "accessory": [27, 28, 31, 32, 33],
    "animal": [16, 17, 18, 19, 20, 21, 22, 23, 24, 25],
    "appliance": [78, 79, 80, 81, 82],
    "electronic": [72, 73, 74, 75, 76, 77],
    "food": [52, 53, 54, 55, 56, 57, 58, 59, 60, 61],
    "furniture": [62, 63, 64, 65, 67, 70],
    "indoor": [84, 85, 86, 87, 88, 89, 90],
    "kitchen": [44, 46, 47, 48, 49, 50, 51],
    "outdoor": [10, 11, 13, 14, 15],
    "person": [1],
    "sports": [34, 35, 36, 37, 38, 39, 40, 41, 42, 43],
    "vehicle": [2, 3, 4, 5, 6, 7, 8, 9],
}
# COCO-Stuff: stuff pixel-map ids 92..182 -> 15 super-categories; 0 (unlabeled) and 183 ("other" = things) -> 255.
COCO_STUFF_IDS = {
    "building": [95, 96, 128, 151, 158, 166],
    "ceiling": [102, 103],
    "floor": [101, 114, 115, 116, 117, 118],
    "food-stuff": [121, 122, 153, 170],
    "furniture-stuff": [98, 107, 108, 110, 112, 123, 130, 133, 156, 161, 165],
    "ground": [111, 125, 126, 136, 140, 144, 145, 147, 149, 154, 159],
    "plant": [94, 97, 119, 124, 129, 134, 142, 163, 169],
    "raw-material": [100, 132, 139, 143],
    "sky": [106, 157],
    "solid": [127, 135, 150, 160, 162, 182],
    "structural": [99, 113, 138, 146, 164],
    "textile": [92, 93, 104, 105, 109, 131, 137, 141, 152, 167, 168],
    "wall": [171, 172, 173, 174, 175, 176, 177],
    "water": [120, 148, 155, 178, 179],
    "window": [180, 181],
}
COCO_THINGS_CLASSES = sorted(COCO_THINGS_IDS)
COCO_STUFF_CLASSES = sorted(COCO_STUFF_IDS)

ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag"]


def _groups_lut(groups: dict) -> np.ndarray:
    """256-entry uint8 table: every id of group number k (sorted names) -> k, anything else -> 255."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for k, name in enumerate(sorted(groups)):
        lut[groups[name]] = k
    return lut


def _range_lut(num_classes: int, shift: int = 0) -> np.ndarray:
    """256-entry uint8 table: v -> v - shift when 0 <= v - shift < num_classes, else 255."""
    values = np.arange(256) - shift
    return np.where((values >= 0) & (values < num_classes), values, IGNORE_INDEX).astype(np.uint8)


COCO_THINGS_LUT = _groups_lut(COCO_THINGS_IDS)  # 0 -> 255 (Leopart: 0 -> 200, a stuff id), stuff ids -> 255
COCO_STUFF_LUT = _groups_lut(COCO_STUFF_IDS)    # 0 -> 255 (Leopart: 0 -> 183), 183 -> 255, thing ids -> 255
ADE20K_LUT = _range_lut(150, shift=1)           # 0 "other" -> 255, 1..150 -> 0..149
VOC_LUT = _range_lut(21)                        # identity on 0..20; 255 (boundary) stays 255


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (n, 3) uint8, also used by DAVIS: bits of the index spread over R, G, B."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


VOC_PALETTE = voc_colormap().flatten().tolist()


# ----------------------------------------------------------------------------------------------------------------
# 4. Evaluation datasets (layouts of Leopart's loaders and of the official releases)
# ----------------------------------------------------------------------------------------------------------------


class SegmentationDataset(Dataset):
    """(image, mask) files -> (PIL RGB image, np.uint8 (H, W) mask of class ids 0..C-1, 255 = ignore).

    Raw mask values go through `lut` (256 entries). A mask may hold the raw values 0..raw_max (default C-1: the
    classes, and the ids the label map ignores on purpose, e.g. COCO-Things' stuff ids) and 255. Files are
    validated in __init__ (check_samples), and every mask is read once there (check_labels): any other value
    is refused unless ignore_unknown_labels, which scores it as ignore.
    """
    ignore_index = IGNORE_INDEX

    def __init__(self, samples, num_classes: int, class_names, lut=None, name: str = "", source: str = "",
                 validate: bool = True, progress: bool = True, raw_max: int | None = None,
                 ignore_unknown_labels: bool = False):
        if len(class_names) != num_classes:
            raise ValueError(f"{name}: {len(class_names)} class names for {num_classes} classes")
        self.samples = [(str(i), str(m)) for i, m in samples]
        self.num_classes, self.class_names, self.name = num_classes, list(class_names), name
        self.raw_max = num_classes - 1 if raw_max is None else raw_max
        values = np.arange(256)
        self.known = (values <= self.raw_max) | (values == IGNORE_INDEX)  # (256,) raw values a mask may hold
        lut = _range_lut(num_classes) if lut is None else np.asarray(lut, dtype=np.uint8)
        self.lut = np.where(self.known, lut, IGNORE_INDEX).astype(np.uint8)  # an unknown value is never a class
        if not self.samples:
            raise InputError(f"{name}: no samples found{f' in {source}' if source else ''}")
        if validate:
            check_samples(self.samples, source, progress, name or "dataset")
            self.check_labels(ignore_unknown_labels, progress)

    def check_labels(self, ignore_unknown_labels: bool = False, progress: bool = True) -> int:
        """Count the mask pixels whose raw value is neither 0..raw_max nor 255, over every mask: InputError naming
        the values, their pixel counts and the first masks holding them, unless ignore_unknown_labels (then a
        warning, and the pixels are 'ignore'). Returns the count."""
        counts, files = unknown_label_counts([m for _, m in self.samples], self.known, progress)
        if not files:
            return 0
        values = np.flatnonzero(counts)
        found = ", ".join(f"{v} ({counts[v]} pixels)" for v in values[:10]) + (", ..." if len(values) > 10 else "")
        message = (f"{self.name}: {counts.sum()} mask pixels in {len(files)} of {len(self.samples)} masks hold "
                   f"values other than this dataset's 0..{self.raw_max} and {IGNORE_INDEX} (ignore): {found}; "
                   f"first in {name_few(files)}")
        if not ignore_unknown_labels:
            raise InputError(f"{message}. Check --dataset and the masks, or pass --ignore_unknown_labels to score "
                             f"these pixels as ignore")
        warnings.warn(f"{message}; scored as ignore (--ignore_unknown_labels)", RuntimeWarning, stacklevel=2)
        return int(counts.sum())

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image, mask = self.samples[index]
        return load_rgb(image), self.lut[read_mask(mask)]

    def __repr__(self):
        return f"SegmentationDataset({self.name}, {len(self)} images, {self.num_classes} classes)"


class SyntheticSegmentation(SegmentationDataset):
    """The synthetic scenes generated in memory, as a SegmentationDataset (no files)."""

    def __init__(self, scenes: SyntheticScenes, name: str = "synthetic"):
        self.scenes, self.samples = scenes, []
        self.num_classes, self.class_names, self.name = scenes.num_classes, list(scenes.class_names), name
        self.lut = _range_lut(scenes.num_classes)

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, index):
        return self.scenes[index]

    def __repr__(self):
        return f"SyntheticSegmentation({len(self)} scenes, size {self.scenes.size}, seed {self.scenes.seed})"


def _first_dir(what, candidates) -> Path:
    candidates = list(dict.fromkeys(Path(c) for c in candidates))
    for c in candidates:
        if c.is_dir():
            return c
    raise MissingInput(f"{what} not found; looked in: " + ", ".join(str(c) for c in candidates))


def _find_voc(root) -> tuple[Path, dict]:
    """The VOC folder under root and its layout: standard VOC2012 or Leopart's VOCSegmentation."""
    root = Path(root)
    standard = dict(images="JPEGImages", sets="ImageSets/Segmentation")
    leopart = dict(images="images", sets="sets")
    candidates = [(root, standard), (root / "VOC2012", standard), (root / "VOCdevkit" / "VOC2012", standard),
                  (root, leopart), (root / "VOCSegmentation", leopart),
                  (root / "VOCdevkit" / "VOCSegmentation", leopart)]
    for folder, layout in candidates:
        if (folder / layout["images"]).is_dir() and (folder / layout["sets"]).is_dir():
            return folder, layout
    looked = ", ".join(f"{f / layout['images']} + {f / layout['sets']}" for f, layout in candidates)
    raise MissingInput(f"no PASCAL VOC layout found under {root}; looked for: {looked}")


def _voc_samples(root, split):
    """(image, mask) pairs of a VOC split; train/trainaug masks from SegmentationClassAug when present (Leopart)."""
    folder, layout = _find_voc(root)
    split_file = folder / layout["sets"] / f"{split}.txt"
    if not split_file.is_file():
        raise MissingInput(f"split file {split_file} does not exist")
    aug = folder / "SegmentationClassAug"
    if split == "trainaug" and not aug.is_dir():
        raise MissingInput(f"mask folder {aug} does not exist (the trainaug split needs the SBD-augmented masks)")
    mask_dir = aug if split != "val" and aug.is_dir() else folder / "SegmentationClass"
    if not mask_dir.is_dir():
        raise MissingInput(f"mask folder {mask_dir} does not exist (needed for split {split!r})")
    ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    images = folder / layout["images"]
    return [(images / f"{i}.jpg", mask_dir / f"{i}.png") for i in ids], split_file


_COCO_MASK_DIRS = {
    "coco_things": ["annotations/panoptic_annotations/semantic_segmentation_{s}2017",
                    "annotations/semantic_segmentation_{s}2017",
                    "panoptic_annotations/semantic_segmentation_{s}2017"],
    "coco_stuff": ["annotations/annotations/stuff_annotations/stuff_{s}2017_pixelmaps",
                   "annotations/stuff_annotations/stuff_{s}2017_pixelmaps",
                   "annotations/stuff_{s}2017_pixelmaps",
                   "stuff_annotations/stuff_{s}2017_pixelmaps"],
}


def _coco_samples(name, root, split):
    """Leopart layout (root/coco/images/<s>2017 + root/annotations/...) or plain COCO (root/<s>2017 + ...).

    The image list is the sorted listing of the image folder; every image needs its mask (paired_files).
    """
    s = {"train": "train", "val": "val", "train2017": "train", "val2017": "val"}.get(split)
    if s is None:
        raise InputError(f"{name}: unknown split {split!r} (use 'train' or 'val')")
    root = Path(root)
    bases = [root, root / "coco", root.parent]
    image_dir = _first_dir(f"COCO {s}2017 image folder",
                           [b / rel for b in bases[:2] for rel in (f"images/{s}2017", f"{s}2017")])
    mask_dir = _first_dir(f"{name} {s}2017 mask folder",
                          [b / rel.format(s=s) for b in bases for rel in _COCO_MASK_DIRS[name]])
    return paired_files(f"{name}/{split}", image_dir, mask_dir), str(image_dir)


def _ade20k_samples(root, split):
    sub = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}.get(split)
    if sub is None:
        raise InputError(f"ade20k: unknown split {split!r} (use 'train' or 'val')")
    root = Path(root)
    base = _first_dir("ADE20K (ADEChallengeData2016)", [root / "ADEChallengeData2016", root])
    image_dir = base / "images" / sub
    mask_dir = base / "annotations" / sub
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise MissingInput(f"ade20k: folder {d} does not exist")
    return paired_files(f"ade20k/{split}", image_dir, mask_dir), str(image_dir)


SEGMENTATION_DATASETS = ("pvoc", "coco_things", "coco_stuff", "ade20k", "synthetic")
SYNTHETIC_SPLIT_SIZES = {"train": 64, "val": 32}  # defaults of the in-memory synthetic dataset (= write_synthetic)


def build_segmentation_dataset(name: str, root, split: str, *, n_images: int | None = None, size: int = 64,
                               seed: int = 0, validate: bool = True, progress: bool = True,
                               ignore_unknown_labels: bool = False) -> SegmentationDataset:
    """A SegmentationDataset by name: 'pvoc' (21 classes), 'coco_things' (12), 'coco_stuff' (15), 'ade20k' (150),
    'synthetic' (4; root=None generates the scenes in memory: n_images/size/seed apply; a root reads the
    PVOC-layout folder written by write_synthetic). Validates the files and the mask values before returning
    (InputError naming them); ignore_unknown_labels scores mask values outside the dataset's range as ignore.
    """
    if name not in SEGMENTATION_DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose from {SEGMENTATION_DATASETS}")
    if root is None and name != "synthetic":
        raise InputError(f"{name}: a data root is needed (only 'synthetic' can be generated without one)")
    if root is not None and not os.path.isdir(root):
        raise MissingInput(f"{name}: data root {root} does not exist or is not a folder")
    kw = dict(name=f"{name}/{split}", validate=validate, progress=progress,
              ignore_unknown_labels=ignore_unknown_labels)
    if name == "synthetic":
        if root is None:
            if split not in SYNTHETIC_SPLIT_SIZES:
                raise InputError(f"synthetic: unknown split {split!r} (use 'train' or 'val')")
            n = SYNTHETIC_SPLIT_SIZES[split] if n_images is None else n_images
            first = 0 if split == "train" else VAL_FIRST_INDEX
            return SyntheticSegmentation(SyntheticScenes(n, size, seed, first), name=kw["name"])
        samples, source = _voc_samples(root, split)
        return SegmentationDataset(samples, SyntheticScenes.num_classes, SyntheticScenes.class_names,
                                   source=str(source), **kw)
    if name == "pvoc":
        samples, source = _voc_samples(root, split)
        return SegmentationDataset(samples, 21, VOC_CLASSES, VOC_LUT, source=str(source), **kw)
    if name == "coco_things":  # raw: panoptic category ids 1..200 (stuff ids ignored), 0 unlabeled
        samples, source = _coco_samples(name, root, split)
        return SegmentationDataset(samples, 12, COCO_THINGS_CLASSES, COCO_THINGS_LUT, source=source, raw_max=200,
                                   **kw)
    if name == "coco_stuff":  # raw: stuff pixel-map ids 92..182, 183 "other" (things), 0 unlabeled
        samples, source = _coco_samples(name, root, split)
        return SegmentationDataset(samples, 15, COCO_STUFF_CLASSES, COCO_STUFF_LUT, source=source, raw_max=183,
                                   **kw)
    samples, source = _ade20k_samples(root, split)  # raw: 1..150, 0 "other"
    return SegmentationDataset(samples, 150, ADE20K_CLASSES, ADE20K_LUT, source=source, raw_max=150, **kw)


def raw_mask_values(dataset, max_files: int = 20) -> str:
    """What the first masks of a dataset hold before the label map: a sentence for error messages."""
    samples = getattr(dataset, "samples", [])[:max_files]
    if not samples:
        return "no mask file to inspect"
    values = np.unique(np.concatenate([np.unique(read_mask(m)) for _, m in samples]))
    shown = ", ".join(str(v) for v in values[:30]) + (", ..." if len(values) > 30 else "")
    return f"raw mask values in the first {len(samples)} files (e.g. {samples[0][1]}): {shown}"


# ----------------------------------------------------------------------------------------------------------------
# 5. Evaluation transforms: App. C's 448x448 protocol (eval_linear.py and eval_kmeans.py)
# ----------------------------------------------------------------------------------------------------------------
# Images are resized with bilinear, masks with nearest only (any other interpolation invents labels and lets 255
# bleed into class ids).

def to_input(img) -> torch.Tensor:
    """PIL RGB or (H, W, 3) uint8 -> (3, H, W) float32 ImageNet-normalised."""
    img = F2.to_dtype(F2.to_image(img), torch.float32, scale=True)
    return F2.normalize(img, IMAGENET_MEAN, IMAGENET_STD).as_subclass(torch.Tensor)


def resize_mask(mask, size) -> torch.Tensor:
    """(1, H, W) uint8 -> (h, w) uint8 by nearest; size is an int (square) or (h, w)."""
    size = [size, size] if isinstance(size, int) else list(size)
    return F2.resize(tv_tensors.Mask(mask), size, interpolation=v2.InterpolationMode.NEAREST,
                     antialias=False).as_subclass(torch.Tensor)[0]


class ValTransform:
    """App. C val: image resized to img_size x img_size (aspect ratio not kept, as Leopart), mask nearest to
    img_size and then nearest to mask_size (Leopart's two steps, e.g. 448 -> 100 for k-means)."""

    def __init__(self, img_size=448, mask_size=None):
        self.img_size, self.mask_size = img_size, mask_size or img_size

    def __call__(self, img, mask):
        img = F2.resize(img, [self.img_size, self.img_size], interpolation=v2.InterpolationMode.BILINEAR,
                        antialias=True)
        mask = resize_mask(torch.from_numpy(np.asarray(mask))[None], self.img_size)
        if self.mask_size != self.img_size:
            mask = resize_mask(mask[None], self.mask_size)
        return to_input(img), mask


class Transformed(Dataset):
    """(PIL image, np.uint8 mask) dataset -> whatever the joint transform returns for each pair."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.transform(*self.dataset[i])


# ----------------------------------------------------------------------------------------------------------------
# 6. Preparing the datasets (`python data.py prepare_coco ...`, `python data.py prepare_voc ...`)
# ----------------------------------------------------------------------------------------------------------------

OFFICIAL_COUNTS = {("coco", "train"): 118287, ("coco", "val"): 5000, ("pvoc", "trainaug"): 10582,
                   ("pvoc", "val"): 1449}


def class_histogram(dataset, progress: bool = True) -> np.ndarray:
    """(num_classes + 1,) int64 pixel counts of every class after the label map; the last entry counts 255."""
    hist = np.zeros(dataset.num_classes + 1, dtype=np.int64)
    for _, mask in tqdm(dataset.samples, desc="class histogram", disable=not progress, leave=False):
        labels = dataset.lut[read_mask(mask)]
        hist += np.bincount(np.minimum(labels, dataset.num_classes).ravel(), minlength=dataset.num_classes + 1)
    return hist


def dataset_report(dataset, expected_count: int | None = None) -> str:
    """Image and mask counts (every pair exists and has matching sizes: checked when the dataset is built) and
    the class histogram; a count other than the official one is flagged."""
    hist = class_histogram(dataset)
    total = max(int(hist.sum()), 1)
    lines = [f"{dataset.name}: {len(dataset)} images, {len(dataset)} masks, every mask the size of its image"]
    if expected_count is not None and len(dataset) != expected_count:
        lines.append(f"WARNING: the official split has {expected_count} images")
    lines += [f"  {name:<24} {100 * n / total:6.2f}% of pixels" for name, n in zip(dataset.class_names, hist)]
    lines.append(f"  {'ignore (255)':<24} {100 * hist[-1] / total:6.2f}% of pixels")
    absent = [n for n, c in zip(dataset.class_names, hist) if c == 0]
    if absent:
        lines.append(f"WARNING: classes without any pixel: {', '.join(absent)}")
    return "\n".join(lines)


def panoptic_to_semantic(panoptic_rgb: np.ndarray, segments_info) -> np.ndarray:
    """(H, W) uint8 category ids of one COCO panoptic PNG (panopticapi's panoptic2semantic_segmentation
    conversion): segment id = R + 256 G + 256^2 B, each segment painted with its category_id, 0 = unlabeled."""
    rgb = np.asarray(panoptic_rgb, dtype=np.uint32)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    lut = {int(s["id"]): int(s["category_id"]) for s in segments_info}
    if any(c > 255 for c in lut.values()):
        raise InputError("a panoptic category id does not fit a uint8 PNG")
    seg_ids = np.fromiter(lut, dtype=np.uint32, count=len(lut))
    out = np.zeros(ids.shape, dtype=np.uint8)
    if len(seg_ids):
        order = np.argsort(seg_ids)
        pos = np.clip(np.searchsorted(seg_ids[order], ids), 0, len(seg_ids) - 1)
        hit = seg_ids[order][pos] == ids
        cats = np.fromiter(lut.values(), dtype=np.uint8, count=len(lut))[order]
        out[hit] = cats[pos[hit]]
    return out


def prepare_coco(root, split: str, panoptic_json=None, panoptic_dir=None, stuff_pixelmaps=None,
                 progress: bool = True) -> str:
    """COCO-Things masks from the panoptic release (panoptic_<s>2017.json + its PNG folder) and COCO-Stuff masks
    from the stuff pixel maps, written into root's layout (next to root/images/<s>2017 or root/<s>2017):
    root/annotations/panoptic_annotations/semantic_segmentation_<s>2017 and
    root/annotations/stuff_annotations/stuff_<s>2017_pixelmaps. Returns the report of every dataset written."""
    root, reports = Path(root), []
    if not root.is_dir():
        raise MissingInput(f"--root {root} does not exist or is not a folder")
    if panoptic_json is not None and panoptic_dir is None:
        raise InputError("--panoptic_json needs --panoptic_dir, the unzipped panoptic_<split>2017/ PNG folder")
    if panoptic_dir is not None and panoptic_json is None:
        raise InputError("--panoptic_dir needs --panoptic_json, annotations/panoptic_<split>2017.json")
    for flag, folder in (("--panoptic_dir", panoptic_dir), ("--stuff_pixelmaps", stuff_pixelmaps)):
        if folder is not None and not os.path.isdir(folder):
            raise MissingInput(f"{flag} {folder} does not exist or is not a folder")
    if panoptic_json is not None:
        meta = read_panoptic_json(panoptic_json)
        sizes = {im["file_name"].rsplit(".", 1)[0]: (im["width"], im["height"]) for im in meta["images"]}
        out = root / "annotations" / "panoptic_annotations" / f"semantic_segmentation_{split}2017"
        out.mkdir(parents=True, exist_ok=True)
        for ann in tqdm(meta["annotations"], desc="panoptic -> semantic", disable=not progress):
            with open_image(Path(panoptic_dir) / ann["file_name"], "panoptic PNG") as im:
                semantic = panoptic_to_semantic(np.asarray(im.convert("RGB")), ann["segments_info"])
            stem = ann["file_name"].rsplit(".", 1)[0]
            if stem in sizes and semantic.shape[::-1] != tuple(sizes[stem]):
                raise InputError(f"{ann['file_name']}: {semantic.shape[::-1]} but {panoptic_json} says "
                                 f"{sizes[stem]}")
            Image.fromarray(semantic, "L").save(out / f"{stem}.png")
        dataset = build_segmentation_dataset("coco_things", root, split, progress=progress)
        if len(dataset) != len(meta["annotations"]):
            raise InputError(f"{len(meta['annotations'])} panoptic annotations but {len(dataset)} images of "
                             f"{root} have a mask")
        reports.append(dataset_report(dataset, OFFICIAL_COUNTS.get(("coco", split))))
    if stuff_pixelmaps is not None:
        out = root / "annotations" / "stuff_annotations" / f"stuff_{split}2017_pixelmaps"
        out.mkdir(parents=True, exist_ok=True)
        files = sorted(Path(stuff_pixelmaps).glob("*.png"))
        if not files:
            raise InputError(f"no .png stuff pixel map in {stuff_pixelmaps}")
        for f in tqdm(files, desc="stuff pixel maps", disable=not progress):
            if f.resolve() != (out / f.name).resolve():
                Image.fromarray(read_mask(f), "L").save(out / f.name)  # read_mask: rejects colour PNGs
        dataset = build_segmentation_dataset("coco_stuff", root, split, progress=progress)
        if len(dataset) != len(files):
            raise InputError(f"{len(files)} stuff pixel maps but {len(dataset)} images of {root} have a mask")
        reports.append(dataset_report(dataset, OFFICIAL_COUNTS.get(("coco", split))))
    if not reports:
        raise InputError("prepare_coco: give --panoptic_json with --panoptic_dir, and/or --stuff_pixelmaps")
    return "\n".join(reports)


def read_panoptic_json(path) -> dict:
    """The panoptic release's JSON ({'images': [...], 'annotations': [...]}); MissingInput / InputError naming it."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError as e:
        raise MissingInput(f"--panoptic_json {path} does not exist") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--panoptic_json {path} is not readable JSON (truncated?): {type(e).__name__}: {e}") from e
    if not isinstance(meta, dict) or not {"images", "annotations"} <= meta.keys():
        raise InputError(f"--panoptic_json {path} holds no 'images' and 'annotations' lists: not a COCO panoptic "
                         f"annotation file")
    return meta


def sbd_segmentation(mat_path) -> np.ndarray:
    """(H, W) uint8 class ids of an SBD cls/<id>.mat (field GTcls.Segmentation; 0..20, no boundary label)."""
    from scipy.io import loadmat  # only the VOC preparation needs scipy.io
    try:
        gt = loadmat(mat_path, squeeze_me=True, struct_as_record=False)["GTcls"]
        return np.asarray(gt.Segmentation, dtype=np.uint8)
    except Exception as e:  # truncated or foreign .mat files: scipy's and numpy's errors do not name the file
        raise InputError(f"cannot read SBD mask {mat_path}: {type(e).__name__}: {e}") from e


def prepare_voc(voc_root, sbd_cls_dir, trainaug_list, progress: bool = True) -> str:
    """PVOC12 trainaug: VOC2012/SegmentationClassAug/<id>.png for every id of trainaug.txt, from VOC's own
    SegmentationClass PNG when the image has one (it carries the 255 boundaries) and otherwise from SBD's
    cls/<id>.mat; the list is copied to ImageSets/Segmentation/trainaug.txt. Returns the report of both splits."""
    folder, layout = _find_voc(voc_root)
    if not os.path.isfile(trainaug_list):
        raise MissingInput(f"--trainaug_list {trainaug_list} does not exist")
    if not os.path.isdir(sbd_cls_dir):
        raise MissingInput(f"--sbd_cls {sbd_cls_dir} does not exist or is not a folder")
    ids = [line.strip() for line in Path(trainaug_list).read_text().splitlines() if line.strip()]
    aug = folder / "SegmentationClassAug"
    aug.mkdir(exist_ok=True)
    for i in tqdm(ids, desc="trainaug masks", disable=not progress):
        voc_png, mat = folder / "SegmentationClass" / f"{i}.png", Path(sbd_cls_dir) / f"{i}.mat"
        if voc_png.is_file():
            labels = read_mask(voc_png)
        elif mat.is_file():
            labels = sbd_segmentation(mat)
        else:
            raise MissingInput(f"{i} (listed in {trainaug_list}): neither {voc_png} nor {mat} exists")
        if labels[(labels > 20) & (labels != IGNORE_INDEX)].size:
            raise InputError(f"{i}: labels outside 0..20 and 255")
        Image.fromarray(labels, "L").save(aug / f"{i}.png")
    (folder / layout["sets"] / "trainaug.txt").write_text("\n".join(ids) + "\n")
    reports = [dataset_report(build_segmentation_dataset("pvoc", folder, "trainaug", progress=progress),
                              OFFICIAL_COUNTS[("pvoc", "trainaug")])]
    if (folder / layout["sets"] / "val.txt").is_file():
        reports.append(dataset_report(build_segmentation_dataset("pvoc", folder, "val", progress=progress),
                                      OFFICIAL_COUNTS[("pvoc", "val")]))
    return "\n".join(reports)


# ----------------------------------------------------------------------------------------------------------------
# 7. Writing the synthetic data in the PVOC12 and DAVIS-2017 layouts
# ----------------------------------------------------------------------------------------------------------------


def save_palette_png(labels: np.ndarray, path, palette=None) -> None:
    """np.uint8 (H, W) indices -> palette ('P') PNG, with the VOC colour map unless another palette is given
    (DAVIS results keep the first annotation's own palette; any palette works, evaluators read the indices)."""
    labels = np.asarray(labels)
    im = Image.frombytes("P", labels.shape[::-1], np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    im.putpalette(VOC_PALETTE if palette is None else palette)
    im.save(path)


def write_synthetic(out_dir, n_train: int = 64, n_val: int = 32, n_videos: int = 3, n_frames: int = 10,
                    size: int = 64, video_size=(96, 128), seed: int = 0, progress: bool = True,
                    grey: bool = False) -> dict:
    """Write the synthetic scenes as PVOC12 (VOCdevkit/VOC2012) and the synthetic videos as DAVIS-2017 (DAVIS).

    Train scenes are indices 0.. of SyntheticScenes(seed), val scenes indices VAL_FIRST_INDEX.. (disjoint, and
    identical to build_segmentation_dataset('synthetic', None, split)). grey: every instance in synthetic.py's
    GREY_PALETTE, with the geometry of the colour data of the same seed. Returns {'root', 'pvoc', 'davis'} paths.
    """
    out_dir = Path(out_dir)
    voc = out_dir / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    splits = {"train": SyntheticScenes(n_train, size, seed, grey=grey),
              "val": SyntheticScenes(n_val, size, seed, VAL_FIRST_INDEX, grey=grey)}
    for split, scenes in splits.items():
        ids = []
        for i in tqdm(range(len(scenes)), desc=f"synthetic {split}", disable=not progress, leave=False):
            name = f"{split}_{i:06d}"
            img, labels = scenes[i]
            img.save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
            save_palette_png(labels, voc / "SegmentationClass" / f"{name}.png")
            ids.append(name)
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (voc / "synthetic.json").write_text(json.dumps(dict(
        class_names=SYNTHETIC_CLASSES, n_train=n_train, n_val=n_val, size=size, seed=seed, grey=grey), indent=2))

    davis = out_dir / "DAVIS"
    videos = SyntheticVideos(n_videos, n_frames, video_size, seed, grey)
    sequences = []
    for v in tqdm(range(len(videos)), desc="synthetic videos", disable=not progress, leave=False):
        seq = f"synth-{v:03d}"
        frames, masks = videos.video(v)
        (davis / "JPEGImages" / "480p" / seq).mkdir(parents=True, exist_ok=True)
        (davis / "Annotations" / "480p" / seq).mkdir(parents=True, exist_ok=True)
        for t, (frame, mask) in enumerate(zip(frames, masks)):
            frame.save(davis / "JPEGImages" / "480p" / seq / f"{t:05d}.jpg", quality=95)
            save_palette_png(mask, davis / "Annotations" / "480p" / seq / f"{t:05d}.png")
        sequences.append(seq)
    (davis / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (davis / "ImageSets" / "2017" / "val.txt").write_text("\n".join(sequences) + "\n")
    return {"root": str(out_dir), "pvoc": str(voc), "davis": str(davis)}


# ----------------------------------------------------------------------------------------------------------------
# 8. Plumbing: seeded, resumable sampling; durable writes and stop signals (train.py, eval_linear.py)
# ----------------------------------------------------------------------------------------------------------------


class SeededSamples(Dataset):
    """dataset[index] for the key (epoch, index), with torch's global RNG seeded from (seed, epoch, index) for the
    call and restored after it. A sample's augmentation then depends on nothing else: not on the worker that loads
    it, nor on how many samples that worker drew before. This is what lets a run resumed mid-epoch draw the same
    views as an uninterrupted one, with any --num_workers."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        sample_seed = np.random.SeedSequence([self.seed % 2 ** 64, epoch, index]).generate_state(2, np.uint32)
        with torch.random.fork_rng(devices=[]):  # CPU RNG only: the transforms never touch a device
            # the CPU generator only: torch.manual_seed would also queue a lazy seeding of every CUDA device, and
            # that bookkeeping (a stack trace per call while CUDA is not initialised) was ~1 ms of a 5-ms sample
            torch.default_generator.manual_seed(int(sample_seed[0]) << 32 | int(sample_seed[1]))
            return self.dataset[index]


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler's order (a permutation drawn from seed + epoch, split across ranks) yielding
    (epoch, index) keys for SeededSamples, and able to start an epoch after its first `skip` samples: a resumed
    run continues at the next batch of the same order without loading the batches it has already seen."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        order = list(super().__iter__())  # this rank's share of the epoch's permutation
        return iter([(self.epoch, i) for i in order[self.skip:]])

    def __len__(self):
        return self.num_samples - self.skip


def save_atomic(obj, path):
    """Write to a temporary file in the same folder, flush it to the disk, rename it over path, flush the folder.
    A kill at any point leaves the old file or the new one, never half of one; only the temporary file can
    remain, and the next start removes it (train.py's remove_temporary_files)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        if isinstance(obj, bytes):
            f.write(obj)
        else:
            torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(path):
    """Make a rename in folder path durable (POSIX: the folder entry is flushed separately from the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StopFlag:
    """Set by SIGTERM, SIGINT or SIGHUP (a scheduler's stop, Ctrl-C, a closed terminal). The handler only sets the
    flag: the step in progress finishes, and the loop saves and exits once all ranks have agreed on the flag
    through a CPU (gloo) all-reduce, which never waits on the GPU. Repeated signals change nothing (a scheduler
    may signal a process directly and through torchrun): SIGKILL stops without saving.

    Under torchrun, a signal to the job's process group ends in exit status 1 after a clean save. torchrun starts
    each rank in a session of its own, so the signal reaches torchrun, whose handler raises SignalException; its
    agent forwards the signal to every rank's process group, waits --shutdown_timeout seconds (default 30) for the
    ranks, SIGKILLs any left, and raises that exception again whatever the ranks' exit codes
    (torch/distributed/elastic: SignalException, LocalElasticAgent._shutdown, SubprocessHandler.close). So the
    ranks save and exit 0, rank 0 prints "signal received: saved ...", and torchrun ends with its SignalException
    traceback and exit status 1, which a scheduler records as a failed step. Nothing a rank does changes that
    exit status. torchrun --signals_to_handle without the signal is worse: torchrun dies of it at once and the
    ranks, never signalled, train on. Signalled alone (torchrun's children: `pkill -TERM -P <torchrun's pid>`),
    the ranks save and exit 0, and so does torchrun. A save that outlasts --shutdown_timeout is cut by the
    SIGKILL, which leaves the previous checkpoint whole (save_atomic): raise it for large checkpoints."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, group=None):
        self.requested = False
        self.group = group
        self.previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        self.requested = True

    def should_stop(self):
        if self.group is None:
            return self.requested
        flag = torch.tensor([float(self.requested)])
        dist.all_reduce(flag, group=self.group)
        return flag.item() > 0  # a CPU tensor: no device synchronisation


def ignore_stop_signals(worker_id):
    """DataLoader workers share the process group of their rank, so a scheduler's or torchrun's signal (os.killpg)
    reaches them too, and a worker killed by it fails the step. They ignore it: the main process decides when to
    stop, then shuts them down; a worker whose main process is gone exits by itself (PyTorch's watchdog)."""
    for sig in StopFlag.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, StopFlag.SIGNALS)  # one held back by start_workers is dropped


def start_workers(loader):
    """iter(loader), with the stop signals held back while it forks its workers. PyTorch's worker start makes
    SIGTERM fatal (a C handler) before worker_init_fn (ignore_stop_signals) runs, so a signal in that window would
    kill a worker and fail the step. Held back, it waits: in a worker until ignore_stop_signals drops it, in this
    process until the mask is restored here, when StopFlag's handler takes it."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, StopFlag.SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# ----------------------------------------------------------------------------------------------------------------
# 9. Plumbing: input errors; reading and checking image and mask files
# ----------------------------------------------------------------------------------------------------------------


class InputError(ValueError):
    """A user's mistake: a bad path, flag, checkpoint or dataset. Each script's entry point (`cli`) prints it as
    one line that names its cause and exits 2, as argparse does for a bad flag; any other exception is a bug and
    keeps its traceback. A ValueError, so that code calling the library can catch it as one."""


class MissingInput(InputError, FileNotFoundError):
    """An input file or folder that is not there (also a FileNotFoundError)."""


def need(ok, args, flag, why):
    """InputError '--flag value: why' for a flag whose value is out of its range (the scripts' parse-time checks)."""
    if not ok:
        raise InputError(f"--{flag} {getattr(args, flag)}: {why}")


def cli(main, parser, check=None, cleanup=None):
    """A script's entry point: parse the command line, run check(args) and main(args), and turn the project's
    own InputError into `prog: error: message`, exit 2. cleanup(), if given, runs first on any exception."""
    args = parser.parse_args()
    try:
        if check is not None:
            check(args)
        return main(args)
    except BaseException as e:
        if cleanup is not None:
            cleanup()
        if isinstance(e, InputError):
            parser.exit(2, f"{parser.prog}: error: {one_line(str(e))}\n")
        raise


def one_line(message: str) -> str:
    """A user's mistake on one line. One raised in a DataLoader worker arrives wrapped in the worker's traceback
    (torch's ExceptionWrapper: 'Caught InputError in DataLoader worker ...'), whose last line is the original."""
    lines = [line.strip() for line in message.strip().splitlines()]
    if len(lines) > 2 and lines[0].startswith("Caught ") and lines[1].startswith("Original Traceback"):
        return lines[-1].split(": ", 1)[-1]  # 'data.InputError: cannot read ...' -> 'cannot read ...'
    return " ".join(lines)


def name_few(paths, n: int = 3) -> str:
    """'a, b, c and 7 more': the first n of a list of files, for a message that must stay one line."""
    paths = [str(p) for p in paths]
    return ", ".join(paths[:n]) + (f" and {len(paths) - n} more" if len(paths) > n else "")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16/32-bit grey is rescaled (not clipped) and transparency is composited on white."""
    if im.mode == "RGB":
        return im.copy()
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16"):
            a = a / 257.0                      # 65535 -> 255
        elif im.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0                      # float images in [0, 1]
        elif im.mode == "I" and a.max(initial=0) > 255:
            a = a * (255.0 / max(65535.0, a.max()))  # a 16-bit image stored as 32-bit ints
        grey = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
        return grey.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGBX, ...


def open_image(path, what: str = "image") -> Image.Image:
    """Image.open + load (a truncated file raises here, not later); MissingInput or InputError naming the file."""
    im = None
    try:
        im = Image.open(path)
        im.load()
        return im
    except FileNotFoundError as e:
        raise MissingInput(f"{what} {path} does not exist") from e
    except Exception as e:  # any decoder error: truncated, corrupt, not an image, too large
        if im is not None:
            im.close()
        raise InputError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e


def load_rgb(path) -> Image.Image:
    """Read an image fully and return it as RGB (InputError naming the file if it cannot be decoded)."""
    with open_image(path) as im:
        return to_rgb(im)


def read_mask(path) -> np.ndarray:
    """A single-channel PNG of class indices (palette or grayscale) -> np.uint8 (H, W)."""
    with open_image(path, "mask") as im:
        if im.mode in ("P", "L"):
            return np.array(im, dtype=np.uint8)
        if im.mode == "1" or im.mode.startswith("I"):
            a = np.array(im)
            if a.max(initial=0) > 255 or a.min(initial=0) < 0:
                raise InputError(f"mask {path} holds values outside 0..255 (mode {im.mode})")
            return a.astype(np.uint8)
        raise InputError(f"mask {path} is a {im.mode} image: expected a single-channel PNG of class indices "
                         f"(palette 'P' or grayscale 'L'); convert colour-coded masks to indices first")


def list_images(root) -> list[str]:
    """Every image file under root, recursively, sorted; hidden files and folders skipped; symlinks followed, each
    real folder read once. InputError if none."""
    root = os.fspath(root)
    if not os.path.exists(root):
        raise MissingInput(f"image folder {root!r} does not exist")
    if not os.path.isdir(root):
        raise InputError(f"image folder {root!r} is not a directory")
    files, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)  # a symlinked folder is followed once: a loop (`ln -s . loop`) or a second link to a
        if (st.st_dev, st.st_ino) in seen:  # folder already read adds nothing and is not descended into
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMG_EXTENSIONS]
    if not files:
        raise InputError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {root!r}")
    return sorted(files)


def image_header(path, what: str = "image"):
    """(W, H) and mode from the file header only; InputError naming the file if it cannot be opened."""
    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except FileNotFoundError as e:
        raise MissingInput(f"{what} {path} does not exist") from e
    except Exception as e:
        raise InputError(f"cannot open {what} {path}: {type(e).__name__}: {e}") from e


def refuse_unmatched(name: str, groups, where: str = "") -> None:
    """MissingInput naming the first few files of each (what, files) group, e.g. images without a mask: a partly
    copied or unpacked folder must not be scored as a silent subset."""
    parts = [f"{what}: {len(files)} ({name_few(files)})" for what, files in groups if files]
    if parts:
        raise MissingInput(f"{name}: {'; '.join(parts)}{where}")


def check_samples(samples, source: str = "", progress: bool = True, name: str = "dataset") -> None:
    """Every (image, mask) pair exists, the mask is single-channel and has its image's size; else InputError."""
    origin = f" (listed in {source})" if source else ""
    refuse_unmatched(name, [("images that do not exist", [i for i, _ in samples if not os.path.isfile(i)]),
                            ("masks that do not exist", [m for _, m in samples if not os.path.isfile(m)])], origin)
    for image, mask in tqdm(samples, desc="checking dataset files", leave=False,
                            disable=not progress or len(samples) < 2000):
        image_size, _ = image_header(image, "image")
        mask_size, mask_mode = image_header(mask, "mask")
        if mask_mode not in ("P", "L", "1") and not mask_mode.startswith("I"):
            raise InputError(f"mask {mask} is a {mask_mode} image: expected a single-channel PNG of class indices")
        if image_size != mask_size:
            raise InputError(f"mask {mask} is {mask_size[0]}x{mask_size[1]} (WxH) but its image {image} is "
                             f"{image_size[0]}x{image_size[1]}")


def paired_files(name: str, image_dir, mask_dir) -> list:
    """(image, mask) pairs of two folders matched by file stem, sorted (COCO, ADE20K). Every image needs its
    <stem>.png mask and every mask its image; else MissingInput naming the first few of each."""
    def listing(folder, extensions):
        return {os.path.splitext(f)[0]: Path(folder) / f for f in os.listdir(folder)
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions}
    images, masks = listing(image_dir, IMG_EXTENSIONS), listing(mask_dir, (".png",))
    refuse_unmatched(name, [(f"images of {image_dir} without a mask in {mask_dir}",
                             [images[k].name for k in sorted(images.keys() - masks.keys())]),
                            (f"masks of {mask_dir} without an image in {image_dir}",
                             [masks[k].name for k in sorted(masks.keys() - images.keys())])])
    return [(images[k], masks[k]) for k in sorted(images)]


def unknown_label_counts(masks, known: np.ndarray, progress: bool = True):
    """Every mask read once: (256,) int64 pixel counts of the raw values that `known` (256 bools) does not allow,
    and the masks holding any, in order. Vectorised per mask (one bincount)."""
    counts, files = np.zeros(256, dtype=np.int64), []
    for mask in tqdm(masks, desc="checking mask values", leave=False, disable=not progress or len(masks) < 2000):
        unknown = np.bincount(read_mask(mask).ravel(), minlength=256) * ~known  # (256,) pixels of unknown values
        if unknown.any():
            counts += unknown
            files.append(mask)
    return counts, files


# ----------------------------------------------------------------------------------------------------------------
# 10. Command line
# ----------------------------------------------------------------------------------------------------------------


def get_args_parser():
    p = argparse.ArgumentParser(description="CrOC data utilities")
    p.add_argument("--write-synthetic", metavar="DIR", default=None,
                   help="write the synthetic scenes as DIR/VOCdevkit/VOC2012 (PVOC12 layout) and the synthetic "
                        "videos as DIR/DAVIS (DAVIS-2017 layout), for the evaluation scripts")
    p.add_argument("--n-train", type=int, default=64, help="synthetic train scenes")
    p.add_argument("--n-val", type=int, default=32, help="synthetic val scenes (indices disjoint from train)")
    p.add_argument("--n-videos", type=int, default=3, help="synthetic videos")
    p.add_argument("--n-frames", type=int, default=10, help="frames per synthetic video")
    p.add_argument("--size", type=int, default=64, help="side of the square synthetic scenes in pixels")
    p.add_argument("--video-size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"),
                   help="height and width of the synthetic video frames")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument("--grey", action="store_true",
                   help="paint every instance in one grey palette (the same scenes and videos otherwise): only the "
                        "texture tells two instances apart")
    sub = p.add_subparsers(dest="command")
    coco = sub.add_parser("prepare_coco", help="COCO-Things masks from the panoptic release and COCO-Stuff masks "
                                               "from the stuff pixel maps, written into --root's layout and checked")
    coco.add_argument("--root", required=True, help="COCO folder holding images/<split>2017 or <split>2017")
    coco.add_argument("--split", default="val", choices=("train", "val"))
    coco.add_argument("--panoptic_json", default=None, help="annotations/panoptic_<split>2017.json")
    coco.add_argument("--panoptic_dir", default=None, help="the unzipped panoptic_<split>2017/ PNG folder")
    coco.add_argument("--stuff_pixelmaps", default=None, help="the unzipped stuff_<split>2017_pixelmaps/ folder")
    voc = sub.add_parser("prepare_voc", help="PVOC12 trainaug masks from SBD's .mat files + trainaug.txt, checked")
    voc.add_argument("--voc_root", required=True, help="VOCdevkit/VOC2012 (or a folder above it)")
    voc.add_argument("--sbd_cls", required=True, help="SBD's benchmark_RELEASE/dataset/cls folder of <id>.mat")
    voc.add_argument("--trainaug_list", required=True, help="trainaug.txt: the 10,582 image ids, one a line")
    return p


def check_args(args):
    """InputError naming the flag for a synthetic-data size that would write nothing or fail deep in the writer."""
    for flag in ("n_train", "n_val", "n_videos", "size"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.n_frames < 3:  # DAVIS scores neither the first nor the last frame
        raise InputError(f"--n-frames {args.n_frames}: must be at least 3 (J and F skip the first and last frame)")
    if min(args.video_size) < 1:
        raise InputError(f"--video-size {args.video_size}: both sides must be at least 1")


def main(args):
    if args.command == "prepare_coco":
        print(prepare_coco(args.root, args.split, args.panoptic_json, args.panoptic_dir, args.stuff_pixelmaps))
    elif args.command == "prepare_voc":
        print(prepare_voc(args.voc_root, args.sbd_cls, args.trainaug_list))
    elif args.write_synthetic is None:
        get_args_parser().print_help()
    else:
        print(json.dumps(vars(args)))
        paths = write_synthetic(args.write_synthetic, args.n_train, args.n_val, args.n_videos, args.n_frames,
                                args.size, tuple(args.video_size), args.seed, grey=args.grey)
        print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    cli(main, get_args_parser(), check=check_args)
