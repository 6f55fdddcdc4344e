"""COCO-format instance data (an instances JSON and an image folder) and COCO evaluation.

Training targets follow mmdetection's COCO rules, each case counted and logged, never a crash
mid-epoch:

- an image file the JSON names but the folder lacks: left out of the dataset (``missing_images``);
- an unreadable image, or one whose size differs from the JSON's ``width``/``height``: skipped
  when loaded (counted in the batch's ``n_skipped``; in training replaced by the next image);
- a crowd annotation (``iscrowd=1``): not a training target; COCO evaluation treats it as
  "ignore" regions, as the official evaluation does;
- a box reaching outside the image: clipped to it; a box narrower or lower than 1 pixel (zero
  width included) or entirely outside: not a training target (``dropped_boxes``); evaluation
  scores the annotations as given, as the official COCO evaluation does;
- an annotation without a segmentation: its box is used as its mask (``box_only_masks``);
- an annotation naming an unknown image or category, or whose ``bbox`` is not four finite
  numbers: dropped from training and scoring, counted (``bad_annotations``) and logged with its id;
- an image without (usable) annotations: skipped in training (``skip_empty=True``, as the
  paper's mmdetection recipe does; ``empty_images``) and kept in evaluation, where it can
  hold false positives;
- an image smaller than the model's stride: kept (the detector resizes every image to its
  ``min_size`` and pads to a multiple of 32).

Category ids need not be contiguous: the sorted ids map to labels ``1..K`` (0 is the
background); :attr:`CocoDetection.label_to_cat_id` maps back for evaluation and output.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ...data.replace import UnusableSample, first_usable

__all__ = ["CocoDetection", "coco_evaluate", "collate_detection", "detections_to_coco", "COCO_METRICS"]

_logger = logging.getLogger(__name__)
_READ_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)

#: The metrics :func:`coco_evaluate` returns per kind (``bbox_*``, ``segm_*``), in COCOeval's
#: ``stats`` order, as percentages.
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _quiet_coco(data: dict[str, Any]):
    """A ``pycocotools.coco.COCO`` index of ``data`` (without its console chatter)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """Images and instance targets of a COCO instances JSON.

    ``__getitem__`` returns ``(image, target, n_skipped)``: ``image`` float ``(3, H, W)`` in
    ``[0, 1]``; ``target`` with ``boxes`` ``(N, 4)`` float ``x1, y1, x2, y2``, ``labels`` ``(N,)``
    int64 in ``1..K``, ``masks`` ``(N, H, W)`` uint8, ``image_id`` (the JSON's id, int). With
    ``replace_bad=False`` an unreadable image gives ``None`` (:func:`collate_detection` drops it).

    Args:
        annotation_file: the instances JSON.
        image_dir: folder the JSON's ``file_name`` entries are relative to.
        train: training mode: random horizontal flip (``hflip`` probability), crowd and empty
            images handled as the module docstring says.
        hflip: flip probability in training.
        skip_empty: leave images without usable annotations out of training.
        replace_bad: replace an unreadable image by the next one (training) instead of ``None``.
        seed: base of the per-sample random flip (a function of ``(seed, epoch, index)``).
        categories: a fixed category list (e.g. the training JSON's) to check the JSON against.
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        *,
        train: bool = False,
        hflip: float = 0.5,
        skip_empty: bool = True,
        replace_bad: bool | None = None,
        seed: int = 0,
        categories: list[dict[str, Any]] | None = None,
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.train, self.hflip, self.seed, self.epoch = train, hflip, seed, 0
        self.replace_bad = train if replace_bad is None else replace_bad
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.annotation_file}")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir} (for {self.annotation_file})")
        try:
            data = json.loads(self.annotation_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.annotation_file} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(
                f"{self.annotation_file}: the top level is a JSON {type(data).__name__}; a COCO instances file is an "
                "object with 'images', 'annotations' and 'categories' lists"
            )
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"{self.annotation_file} has no '{key}' list; expected a COCO instances JSON")
        if not data["categories"]:
            raise ValueError(f"{self.annotation_file} lists no categories")
        if not data["images"]:
            raise ValueError(f"{self.annotation_file} lists no images (its 'images' list is empty)")
        self.categories = sorted(({"id": int(c["id"]), "name": str(c["name"])} for c in data["categories"]), key=lambda c: c["id"])
        if categories is not None and [c["id"] for c in categories] != [c["id"] for c in self.categories]:
            raise ValueError(
                f"{self.annotation_file}: categories {[c['id'] for c in self.categories][:10]} differ from the "
                f"training categories {[c['id'] for c in categories][:10]}"
            )
        self.cat_id_to_label = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.label_to_cat_id = {v: k for k, v in self.cat_id_to_label.items()}
        self.class_names = [c["name"] for c in self.categories]

        self.counts = dict(missing_images=0, bad_annotations=0, dropped_boxes=0, box_only_masks=0, empty_images=0, crowd=0)
        images = {}
        for img in data["images"]:
            if not {"id", "file_name", "width", "height"} <= set(img):
                raise ValueError(f"{self.annotation_file}: image entry {img} lacks id, file_name, width or height")
            images[int(img["id"])] = img
        anns_by_image: dict[int, list[dict[str, Any]]] = {i: [] for i in images}
        bad: list[str] = []
        for n, ann in enumerate(data["annotations"]):
            problem = _annotation_problem(ann, images, self.cat_id_to_label)
            if problem:
                self.counts["bad_annotations"] += 1
                bad.append(f"annotation {ann.get('id', f'#{n}') if isinstance(ann, dict) else f'#{n}'} {problem}")
                continue
            anns_by_image[ann["image_id"]].append(ann)
        if bad:
            _logger.warning(
                "%s: %d annotations dropped (neither trained on nor scored): %s%s", self.annotation_file, len(bad),
                "; ".join(bad[:3]), "; ..." if len(bad) > 3 else "",
            )
        missing = [img["file_name"] for img in images.values() if not (self.image_dir / img["file_name"]).is_file()]
        images = {i: img for i, img in images.items() if img["file_name"] not in missing}
        self.counts["missing_images"] = len(missing)
        if missing:
            _logger.warning(
                "%s: %d images named in the JSON are not in %s (left out), e.g. %s",
                self.annotation_file, len(missing), self.image_dir, missing[0],
            )
        if not images:
            raise ValueError(
                f"none of the {len(missing)} images of {self.annotation_file} is in {self.image_dir}; check --data-dir"
            )
        # The ground truth COCO evaluation uses: every annotation of the images present.
        self.coco_gt_data = dict(
            images=[images[i] for i in sorted(images)],
            annotations=[_gt_annotation(a, n) for n, a in enumerate(a for i in sorted(images) for a in anns_by_image[i])],
            categories=self.categories,
        )
        self.records: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        for image_id in sorted(images):
            img = images[image_id]
            anns = [a for a in (self._clean(a, img) for a in anns_by_image[image_id]) if a is not None]
            if not anns:
                self.counts["empty_images"] += 1
                if train and skip_empty:
                    continue
            self.records.append((img, anns))
        if not self.records:
            raise ValueError(f"{self.annotation_file}: no image with usable annotations to train on ({self.counts})")
        empty = "skipped" if skip_empty else "kept"
        notes = [_NOTES[k][train].format(n=v, empty=empty) for k, v in self.counts.items() if v and k != "bad_annotations"]
        if notes:
            _logger.info("%s: %d images; %s", self.annotation_file, len(self.records), "; ".join(notes))
        self._bad: set[int] = set()
        self._coco_gt = None

    def _clean(self, ann: dict[str, Any], img: Mapping[str, Any]) -> dict[str, Any] | None:
        """The training form of ``ann`` (box clipped to the image), or None (counted)."""
        if ann.get("iscrowd", 0):
            self.counts["crowd"] += 1
            return None
        x, y, w, h = (float(v) for v in ann["bbox"])
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, float(img["width"])), min(y + h, float(img["height"]))
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or w < 1 or h < 1 or x2 - x1 < 1 or y2 - y1 < 1:
            self.counts["dropped_boxes"] += 1
            return None
        if not ann.get("segmentation"):
            self.counts["box_only_masks"] += 1
        return dict(box=(x1, y1, x2, y2), label=self.cat_id_to_label[ann["category_id"]], segmentation=ann.get("segmentation"))

    @property
    def coco_gt(self):
        """The ground truth as a ``pycocotools.coco.COCO`` index (built once)."""
        if self._coco_gt is None:
            self._coco_gt = _quiet_coco(self.coco_gt_data)
        return self._coco_gt

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentation (call before iterating a loader over this set)."""
        self.epoch = epoch

    def _load(self, index: int) -> torch.Tensor | None:
        img, _ = self.records[index]
        path = self.image_dir / img["file_name"]
        try:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))
        except _READ_ERRORS as e:
            reason = f"{type(e).__name__}: {e}"
        else:
            if pixels.shape[:2] == (img["height"], img["width"]):
                return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255)
            reason = f"its size {pixels.shape[1]}x{pixels.shape[0]} differs from the JSON's {img['width']}x{img['height']}"
        if index not in self._bad:
            self._bad.add(index)
            _logger.warning("skipping image %s (%s)", path, reason)
        return None

    def _target(self, index: int, flip: bool) -> dict[str, Any]:
        img, anns = self.records[index]
        h, w = int(img["height"]), int(img["width"])
        boxes = torch.tensor([a["box"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        masks = torch.from_numpy(np.stack([_decode_mask(a, h, w) for a in anns])) if anns else torch.zeros(0, h, w, dtype=torch.uint8)
        if flip:
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
            masks = masks.flip(-1)
        labels = torch.tensor([a["label"] for a in anns], dtype=torch.int64)
        return dict(boxes=boxes, labels=labels, masks=masks, image_id=int(img["id"]))

    def _sample(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(image, target)`` of ``index`` (flipped as its epoch says); raises :class:`UnusableSample`."""
        image = self._load(index)
        if image is None:
            raise UnusableSample(index)
        flip = False
        if self.train and self.hflip > 0:
            key = f"{self.seed}/{self.epoch}/{index}".encode()
            flip = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") / 2**64 < self.hflip
        if flip:
            image = image.flip(-1)
        return image, self._target(index, flip)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any], int] | None:
        sample, failed = first_usable(index, len(self), self._sample, replace=self.replace_bad, give_up=lambda failed: (
            f"{self.image_dir}: {len(failed)} images in a row from {self.records[index][0]['file_name']} are "
            f"unreadable; check the dataset"
        ))
        return None if sample is None else (*sample, int(bool(failed)))


#: How each count of :attr:`CocoDetection.counts` reads in the log, (evaluation, training):
#: what was done about it, for the data's use.
_NOTES = {
    "missing_images": ("images missing: {n} (left out)",) * 2,
    "dropped_boxes": (
        "boxes under 1 pixel or outside the image: {n} (scored as annotated, as the official COCO evaluation does)",
        "dropped boxes (under 1 pixel or outside the image): {n}",
    ),
    "box_only_masks": ("annotations without a segmentation: {n} (their box is their mask)",) * 2,
    "empty_images": ("images without annotations: {n} (kept: detections on them are false positives)",
                     "images without usable annotations: {n} ({empty})"),
    "crowd": ("crowd annotations: {n} (regions ignored in scoring)", "crowd annotations: {n} (not training targets)"),
}


def _annotation_problem(ann: Any, images: Mapping[int, Any], cat_id_to_label: Mapping[int, int]) -> str:
    """Why ``ann`` cannot be used at all ('' if it can): no known image or category, or a
    ``bbox`` that is not four finite numbers."""
    if not isinstance(ann, dict):
        return f"is a {type(ann).__name__}, not an object"
    if ann.get("image_id") not in images:
        return f"names image_id {ann.get('image_id')!r}, which the file does not list"
    if ann.get("category_id") not in cat_id_to_label:
        return f"names category_id {ann.get('category_id')!r}, which the file does not list"
    box = ann.get("bbox")
    if not (isinstance(box, (list, tuple)) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        return f"has bbox {box!r}, not four finite numbers [x, y, width, height]"
    return ""


def _gt_annotation(ann: dict[str, Any], n: int) -> dict[str, Any]:
    """``ann`` as COCO evaluation needs it: an id, an area, ``iscrowd``, a segmentation (its box if none)."""
    x, y, w, h = (float(v) for v in ann["bbox"])
    segmentation = ann.get("segmentation") or [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return dict(ann, id=ann.get("id", n + 1), area=ann.get("area", w * h), iscrowd=ann.get("iscrowd", 0), segmentation=segmentation)


def _decode_mask(ann: Mapping[str, Any], h: int, w: int) -> np.ndarray:
    """``(h, w)`` uint8 mask of a cleaned annotation (polygons or RLE; its box if it has none)."""
    from pycocotools import mask as mask_utils

    segm = ann["segmentation"]
    if not segm:
        x1, y1, x2, y2 = ann["box"]
        out = np.zeros((h, w), np.uint8)
        out[int(y1):int(math.ceil(y2)), int(x1):int(math.ceil(x2))] = 1
        return out
    if isinstance(segm, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
    return mask_utils.decode(rle).astype(np.uint8)


def collate_detection(batch: list[tuple[torch.Tensor, dict[str, Any], int] | None]) -> tuple[list[torch.Tensor], list[dict[str, Any]], int]:
    """``(images, targets, n_skipped)``: lists (images differ in size), ``None`` samples dropped and counted."""
    good = [s for s in batch if s is not None]
    skipped = len(batch) - len(good) + sum(s[2] for s in good)
    return [s[0] for s in good], [s[1] for s in good], skipped


def detections_to_coco(
    detections: Iterable[tuple[int, Mapping[str, torch.Tensor]]],
    label_to_cat_id: Mapping[int, int],
    *,
    mask_threshold: float = 0.5,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """COCO result lists ``(boxes, masks)`` from ``(image_id, detector output)`` pairs.

    Outputs are torchvision's (``boxes`` ``(D, 4)`` x1y1x2y2, ``scores``, ``labels``,
    optionally ``masks`` ``(D, 1, H, W)`` probabilities, binarised at ``mask_threshold``).
    """
    from pycocotools import mask as mask_utils

    boxes_out, masks_out = [], []
    for image_id, det in detections:
        boxes = det["boxes"].detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = det["scores"].detach().float().cpu().tolist()
        cats = [label_to_cat_id[int(label)] for label in det["labels"].tolist()]
        for box, score, cat in zip(xywh, scores, cats):
            boxes_out.append(dict(image_id=int(image_id), category_id=cat, bbox=[round(v, 2) for v in box], score=score))
        if "masks" in det:
            binary = (det["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
            for rle, score, cat in zip(rles, scores, cats):
                rle["counts"] = rle["counts"].decode("ascii")
                masks_out.append(dict(image_id=int(image_id), category_id=cat, segmentation=rle, score=score))
    return boxes_out, masks_out


def coco_evaluate(
    coco_gt: Any,
    results: Mapping[str, list[dict[str, Any]]],
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """COCO AP of result lists against ground truth, with pycocotools' ``COCOeval``.

    Args:
        coco_gt: ``pycocotools.coco.COCO`` ground truth.
        results: ``{"bbox": [...], "segm": [...]}`` COCO result lists (see
            :func:`detections_to_coco`); a kind with an empty list scores 0.
        image_ids: the images evaluated (default: all of ``coco_gt``); images left out (e.g.
            unreadable ones) do not count.

    Returns:
        ``{kind}_{metric}`` for each kind given and each of :data:`COCO_METRICS`: AP over IoU
        0.50:0.95, AP at IoU 0.50 and 0.75, AP of small / medium / large objects (area below
        32^2, up to 96^2, above), in percent (0-100) as in the paper's tables; -1 where the
        ground truth has no object of that kind (e.g. no small objects).
    """
    from pycocotools.cocoeval import COCOeval

    image_ids = sorted(coco_gt.getImgIds() if image_ids is None else image_ids)
    out: dict[str, float] = {}
    for kind, dets in results.items():
        if kind not in ("bbox", "segm"):
            raise ValueError(f"unknown result kind {kind!r}; expected 'bbox' or 'segm'")
        dets = [dict(d) for d in dets]
        if kind == "segm":
            for d in dets:
                d.pop("bbox", None)  # areas of mask results come from the masks
        coco_dt = _load_results(coco_gt, dets)
        evaluator = COCOeval(coco_gt, coco_dt, iouType=kind)
        evaluator.params.imgIds = image_ids
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for name, value in zip(COCO_METRICS, evaluator.stats[:6]):
            out[f"{kind}_{name}"] = float(value) * 100 if value >= 0 else -1.0
    return out


def _load_results(coco_gt: Any, dets: list[dict[str, Any]]):
    """``coco_gt.loadRes(dets)``, also for an empty list (which pycocotools cannot load)."""
    if dets:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(dets)
    return _quiet_coco(dict(images=coco_gt.dataset["images"], categories=coco_gt.dataset["categories"], annotations=[]))
