"""RefCOCO, RefCOCO+, RefCOCOg (and RefCLEF) for referring segmentation, read in the "refer" layout.

    <root>/images/train2014/COCO_train2014_*.jpg   (or <root>/COCOtrain2014/, the authors' release name)
    <root>/<dataset>/instances.json                COCO style: images, annotations (segmentations)
    <root>/<dataset>/refs(<split_by>).p            pickled list of refs, each with its sentences

Evaluation serves every sentence of every ref as one sample, the convention behind the published
numbers, whatever the split is called; training serves each ref once per epoch with a random
sentence, or every sentence. See data/README.md for downloads.

Bad input follows `mit_lightning.data.records`. In particular: a sentence without text in the
prompt's field (``sent`` or ``raw``) and a ref left without sentences are excluded and reported;
a ref without its identifiers is an error; an image whose size disagrees with ``instances.json``
is an error (see `check_images`); an image that does not decode is skipped at load time.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, NamedTuple, Sequence, get_args

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from mit_lightning.data.base import MiTDataModule, PromptFormat
from mit_lightning.data.images import UnreadableImage, header_size, read_rgb, resize_mask, to_square_tensor
from mit_lightning.data.records import SetupReport, as_text
from mit_lightning.errors import UserError, check_choice, existing_path
from mit_lightning.safe_pickle import load_data_pickle

log = logging.getLogger(__name__)

#: the paper's segmentation prompt (Figure 3)
DESCRIPTION = "{description}"
PAPER_TEMPLATE = "Segment the {description} according to the text. #Segmentation:"
ReferDataset = Literal["refcoco", "refcoco+", "refcocog", "refclef"]
SplitBy = Literal["unc", "google", "umd", "berkeley"]
SentenceField = Literal["sent", "raw"]
TrainSentences = Literal["one_per_ref", "all"]
SENTENCE_FIELDS: tuple[SentenceField, ...] = get_args(SentenceField)


@dataclass(frozen=True)
class ReferCollection:
    """What differs between the refer datasets: their split schemes and where their images live."""

    split_bys: tuple[str, ...]  # the first one is the default
    image_dirs: tuple[str, ...]  # relative to the root, tried in order
    image_set: str  # how errors name the images


_COCO_IMAGE_DIRS = ("images/train2014", "COCOtrain2014")
COLLECTIONS: dict[str, ReferCollection] = {
    "refcoco": ReferCollection(("unc", "google"), _COCO_IMAGE_DIRS, "COCO train2014"),
    "refcoco+": ReferCollection(("unc",), _COCO_IMAGE_DIRS, "COCO train2014"),
    "refcocog": ReferCollection(("umd", "google"), _COCO_IMAGE_DIRS, "COCO train2014"),
    "refclef": ReferCollection(("unc", "berkeley"), ("images/saiapr_tc-12",), "SAIAPR TC-12"),
}


Record = Mapping[str, Any]  # an entry of instances.json
Ref = Mapping[str, Any]  # an entry of the refs pickle


class Sentence(NamedTuple):
    sent_id: int
    sent: str  # tokenised and re-joined by the dataset authors, lower-cased (again, in case a file's is not)
    raw: str  # as the annotator typed it


@dataclass(frozen=True)
class ReferredObject:
    """One ref. The mask is kept as one compressed RLE: small in memory and cheap to send to workers."""

    ref_id: int
    image_path: str
    mask: dict[str, Any]
    sentences: tuple[Sentence, ...]


@dataclass(frozen=True)
class ReferFiles:
    instances: Path
    refs: Path
    image_dir: Path


# --- masks ------------------------------------------------------------------------------------
def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """A COCO segmentation (polygons, or RLE compressed or not, one or a list) → one RLE of the union of its parts.

    The union is the correct mask: the refer tool sums the parts and the authors' release keeps
    only pixels equal to 1, which turns overlaps between parts into background.
    """
    parts = [segmentation] if isinstance(segmentation, dict) else list(segmentation)
    polygons = [[float(value) for value in part] for part in parts if encloses_area(part)]
    rles = list(mask_utils.frPyObjects(polygons, height, width)) if polygons else []
    rles += [_compressed_rle(part, height, width) for part in parts if isinstance(part, dict)]
    if not rles:
        return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
    return mask_utils.merge(rles)


def encloses_area(part: Any) -> bool:
    """A polygon part of at least 3 points: an even count (≥ 6) of finite coordinates. Fewer points enclose nothing,
    and pycocotools would read 4 numbers as a box."""
    return (isinstance(part, (list, tuple)) and len(part) >= 6 and len(part) % 2 == 0
            and all(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    for value in part))


def check_segmentation(segmentation: Any, height: int, width: int) -> int:
    """How many polygon parts of a segmentation enclose nothing (`encloses_area`; the mask leaves them out).

    Raises `ValueError` for a segmentation in no COCO form, or an RLE that does not cover its image exactly:
    pycocotools decodes run lengths without bounds, so longer runs would write past the mask.
    """
    if not isinstance(segmentation, (dict, list, tuple)):
        raise ValueError(f"a segmentation is a list of polygons or an RLE, not a {type(segmentation).__name__}")
    parts = [segmentation] if isinstance(segmentation, dict) else list(segmentation)
    for rle in (part for part in parts if isinstance(part, dict)):
        size, counts = rle.get("size"), rle.get("counts")
        if list(size or ()) != [height, width]:
            raise ValueError(f"an RLE of size {size} on an image of {height}×{width}")
        runs = _string_runs(counts) if isinstance(counts, (str, bytes)) else counts
        if (not isinstance(runs, list) or not all(isinstance(run, int) and run >= 0 for run in runs)
                or sum(runs) != height * width):
            raise ValueError(f"an RLE whose runs do not cover its {height}×{width} pixels exactly")
    return sum(1 for part in parts if not isinstance(part, dict) and not encloses_area(part))


def _string_runs(counts: str | bytes) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string (pycocotools' rleFrString), None if it is cut short."""
    text = counts.decode("ascii", "replace") if isinstance(counts, bytes) else counts
    runs: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                return None
            code = ord(text[position]) - 48
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        runs.append(value + runs[-2] if len(runs) > 2 else value)
    return runs


def _compressed_rle(rle: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """Encode uncompressed RLE (counts as a list); compressed counts read from JSON are str, pycocotools wants bytes."""
    counts = rle["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects(rle, height, width)
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode_mask(rle: dict[str, Any]) -> np.ndarray:
    """RLE → uint8 (H, W) array of 0/1."""
    return np.ascontiguousarray(mask_utils.decode(rle))


# --- loading ----------------------------------------------------------------------------------
#: what every ref must carry; ``sentences`` is checked sentence by sentence
REF_IDENTIFIERS = ("ref_id", "ann_id", "image_id", "split")
REF_TYPES = {"ref_id": int, "ann_id": int, "image_id": int, "split": str}


def load_refs(path: Path) -> list[dict[str, Any]]:
    """The refs pickle, through the restricted unpickler: a downloaded data file must never run code."""
    refs = load_data_pickle(path)
    if not isinstance(refs, list) or not all(isinstance(ref, dict) for ref in refs):
        raise UserError(f"'{path}' should hold a list of refs (dicts), not a {type(refs).__name__}. Re-download it.")
    for position, ref in enumerate(refs):
        missing = [key for key in REF_IDENTIFIERS if key not in ref]
        if missing:
            raise UserError(f"Ref #{position} (ref_id {ref.get('ref_id', '?')}) in '{path}' lacks {', '.join(missing)}; "
                            f"every ref carries {', '.join(REF_IDENTIFIERS)} and sentences. Re-download the file.")
        odd = [key for key, kind in REF_TYPES.items() if not isinstance(ref[key], kind) or isinstance(ref[key], bool)]
        if odd:
            raise UserError(f"Ref #{position} in '{path}' has a {odd[0]} of type {type(ref[odd[0]]).__name__} "
                            f"({ref[odd[0]]!r:.40}); ids are integers and the split a name. Re-download the file.")
    return refs


def load_instances(path: Path) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """images and annotations of instances.json by id (categories are not needed for segmentation)."""
    try:
        with open(path, encoding="utf-8") as file:
            instances = json.load(file)
        images = {image["id"]: image for image in instances["images"]}
        annotations = {annotation["id"]: annotation for annotation in instances["annotations"]}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as error:
        raise UserError(f"'{path}' is not a COCO-style instances file ({error!r}). Re-download it.") from error
    for kind, listed, by_id in (("image", instances["images"], images), ("annotation", instances["annotations"],
                                                                         annotations)):
        if len(by_id) != len(listed):  # the later entry would silently replace the earlier one
            ids = [entry["id"] for entry in listed]
            repeated = next(entry_id for entry_id in ids if ids.count(entry_id) > 1)
            raise UserError(f"'{path}' lists {len(listed) - len(by_id)} {kind} ids more than once (e.g. {repeated}): "
                            "which entry a ref means is ambiguous. Re-download it.")
    return images, annotations


def refs_by_split(refs: Iterable[Ref], splits: Sequence[str], source: Path) -> dict[str, list[Ref]]:
    """Group the refs of the wanted splits; an unknown split name is an error listing the available ones."""
    grouped: dict[str, list[Ref]] = {}
    first_split: dict[Any, str] = {}
    report = SetupReport(str(source))
    for ref in refs:
        earlier = first_split.get(ref["ref_id"])
        if earlier is not None and earlier != ref["split"]:
            raise UserError(f"Ref {ref['ref_id']} in '{source}' is in split '{earlier}' and again in '{ref['split']}': "
                            "evaluating on one would test on what was trained on. Re-download the file.")
        if earlier is not None:
            report.exclude(f"ref {ref['ref_id']}", "refs listed again (a repeat would count twice), the first kept")
            continue
        first_split[ref["ref_id"]] = ref["split"]
        grouped.setdefault(ref["split"], []).append(ref)
    report.log()
    unknown = [split for split in splits if split not in grouped]
    if unknown:
        raise UserError(
            f"Split(s) {', '.join(unknown)} not found in '{source}'; its splits are: {', '.join(grouped)}. "
            "Set data.train_split / data.val_splits / data.test_splits to some of these."
        )
    return {split: grouped[split] for split in splits}


def referred_objects(refs: Iterable[Ref], images: Mapping[int, Record], annotations: Mapping[int, Record],
                     image_dir: Path, source: Path, sentence_field: str, report: SetupReport) -> list[ReferredObject]:
    """Join refs with instances.json: the image file comes from `images[image_id]` (the ref's own
    `file_name` carries an extra `_<n>` suffix and names no file). Refs left without a sentence
    are excluded and noted in `report`."""
    objects = []
    for ref in refs:
        annotation, image = annotations.get(ref["ann_id"]), images.get(ref["image_id"])
        if annotation is None or image is None:
            raise UserError(
                f"Ref {ref['ref_id']} in '{source}' points at annotation {ref['ann_id']} / image {ref['image_id']}, "
                "which instances.json lacks: the two files come from different downloads. Re-download the dataset."
            )
        sentences = ref_sentences(ref, sentence_field, source, report)
        if not sentences:
            report.exclude(f"ref {ref['ref_id']}", "refs without any sentence to read")
            continue
        where = (f"Image {ref['image_id']} / annotation {ref['ann_id']} of ref {ref['ref_id']} in the instances.json "
                 f"beside '{source}'")
        if annotation.get("image_id", ref["image_id"]) != ref["image_id"]:
            raise UserError(f"{where}: the annotation belongs to image {annotation['image_id']}, so the mask would be "
                            "another image's. The two files come from different downloads; re-download the dataset.")
        try:
            file_name, height, width = image["file_name"], int(image["height"]), int(image["width"])
            segmentation = annotation["segmentation"]
            broken_parts = check_segmentation(segmentation, height, width)
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{where} lack a valid file_name, height, width or segmentation ({error}). Re-download the "
                            "dataset.") from error
        if broken_parts:
            report.repair(f"annotation {ref['ann_id']}", "annotations with polygon parts of fewer than 3 points (or an "
                                                         "odd or non-finite coordinate list), each part left out")
        mask = segmentation_to_rle(segmentation, height, width)
        if not mask_utils.area(mask):
            report.exclude(f"ref {ref['ref_id']}", "refs whose segmentation is empty (no polygon of 3 points or more, "
                                                   "or no pixel)")
            continue
        objects.append(ReferredObject(int(ref["ref_id"]), str(image_dir / file_name), mask, sentences))
    return objects


def ref_sentences(ref: Ref, field: str, source: Path, report: SetupReport) -> tuple[Sentence, ...]:
    """The ref's sentences that have text in `field` (the one the prompt reads); the others are noted in `report`.

    `sent` is lower-cased (the dataset authors' normalised form, whatever a file holds); when the
    other field is absent it takes this one's text.
    """
    sentences = ref.get("sentences") or []
    if not isinstance(sentences, (list, tuple)) or not all(isinstance(s, Mapping) and isinstance(s.get("sent_id"), int) for s in sentences):
        raise UserError(f"Ref {ref['ref_id']} in '{source}' has sentences that are not dicts with a sent_id "
                        "(expected sentences=[{sent_id, sent, raw, tokens}]). Re-download the file.")
    kept, seen = [], set()
    for sentence in sentences:
        record = f"ref {ref['ref_id']} sentence {sentence['sent_id']}"
        if sentence["sent_id"] in seen:
            report.exclude(record, "sentences listed again in their ref (a repeat would count twice), the first kept")
            continue
        seen.add(sentence["sent_id"])
        texts = {name: as_text(sentence.get(name), record, report) for name in SENTENCE_FIELDS}
        if texts[field] is None:
            report.exclude(record, f"sentences without '{field}' text (null, empty, missing or not a string)")
            continue
        texts = {name: text if text is not None else texts[field] for name, text in texts.items()}
        kept.append(Sentence(int(sentence["sent_id"]), texts["sent"].lower(), texts["raw"]))
    return tuple(kept)


def check_images(objects: Sequence[ReferredObject], split: str, image_dir: Path) -> None:
    """Stat every image of a split and read its header (not its pixels), once per image.

    A missing image fails now instead of mid-epoch. An image whose size disagrees with
    instances.json fails too, rather than being skipped: masks are drawn at the annotated size,
    so they would be misaligned with the pixels and every metric silently wrong; and the cause
    (annotations and images from different releases, or images resized or rotated) concerns the
    whole folder, not one sample. A header that cannot be read is left to load time, where the
    image is skipped and reported like any image that does not decode.
    """
    annotated = {obj.image_path: tuple(obj.mask["size"]) for obj in objects}  # RLE size: (height, width)
    missing = [path for path in sorted(annotated) if not os.path.isfile(path)]
    if missing:
        shown = ", ".join(f"'{path}'" for path in missing[:3])
        raise UserError(
            f"{len(missing)} of the {len(annotated)} images of split '{split}' are missing from '{image_dir}' "
            f"(e.g. {shown}). Complete the image download (see data/README.md) or point data.image_dir at them."
        )
    disagreeing, turned = [], []
    for path, (height, width) in sorted(annotated.items()):
        header = header_size(path)
        if header is not None and header[:2] != (width, height):
            disagreeing.append(f"'{path}' is {header[0]}×{header[1]}, instances.json says {width}×{height}")
        if header is not None and header[2] != 1:
            turned.append(path)
    if turned:
        log.warning("%s: %d of the %d images carry an EXIF orientation (first: %s); they are read as stored, the "
                    "frame instances.json annotates, not turned as a photo viewer shows them.", split, len(turned),
                    len(annotated), ", ".join(turned[:3]))
    if disagreeing:
        raise UserError(
            f"{len(disagreeing)} of the {len(annotated)} images of split '{split}' do not have the width×height "
            f"that instances.json gives them, so their masks would not line up: {'; '.join(disagreeing[:3])}. "
            "The annotations and the images come from different releases (or the images were resized or rotated): "
            "use the original images and annotations, or point data.image_dir at the right images."
        )


# --- dataset ----------------------------------------------------------------------------------
class ReferringSegmentationDataset(Dataset):
    """The samples of one split: (object, sentence) pairs, or objects whose sentence is drawn at each access."""

    def __init__(self, objects: Sequence[ReferredObject], *, prompt: PromptFormat, image_size: int,
                 mask_size: int | None, random_sentence: bool, sentence_field: str = "sent") -> None:
        """`mask_size=None` keeps masks at the original image size."""
        self.objects = list(objects)
        self.samples: list[tuple[int, int | None]] = (
            [(i, None) for i in range(len(self.objects))] if random_sentence
            else [(i, j) for i, obj in enumerate(self.objects) for j in range(len(obj.sentences))]
        )
        self.prompt = prompt
        self.image_size = image_size
        self.mask_size = mask_size
        self.sentence_field = sentence_field

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def takes_draws(self) -> bool:
        """A random sentence per ref: the training order supplies the draw (`data/sampling.py`)."""
        return self.samples[0][1] is None if self.samples else False

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | UnreadableImage:
        index, draw = key if isinstance(key, tuple) else (key, 0)
        object_index, sentence_index = self.samples[index]
        obj = self.objects[object_index]
        if sentence_index is None:
            sentence_index = draw % len(obj.sentences)
        sentence = obj.sentences[sentence_index]
        image = read_rgb(obj.image_path, upright=False)  # the frame its mask is annotated in
        if isinstance(image, UnreadableImage):
            return image
        mask = decode_mask(obj.mask)
        return {
            "prompt": self.prompt.fill(getattr(sentence, self.sentence_field)),
            "index": index,
            "image": to_square_tensor(image, self.image_size),
            "mask": torch.from_numpy(mask) if self.mask_size is None else resize_mask(mask, self.mask_size),
            "ref_id": obj.ref_id,
            "sent_id": sentence.sent_id,
            "image_path": obj.image_path,
            "sentence": sentence.raw,
        }


def dataset_split_by(dataset: ReferDataset, split_by: SplitBy | None, prefix: str = "") -> SplitBy:
    """The split scheme read for `dataset`, its usual one when None.

    Which schemes exist depends on the dataset: a choice the types alone cannot check.
    """
    check_choice(f"{prefix}dataset", dataset, ReferDataset)
    schemes = COLLECTIONS[dataset].split_bys
    split_by = split_by or schemes[0]
    if split_by not in schemes:
        raise UserError(f"{prefix}split_by for {dataset} must be one of {', '.join(schemes)}; got '{split_by}'.")
    return split_by


# --- data module ------------------------------------------------------------------------------
class RefCOCODataModule(MiTDataModule):
    """Referring segmentation on RefCOCO / RefCOCO+ / RefCOCOg (or RefCLEF) in the refer layout.

    Items: ``prompt``, ``index``, ``image`` uint8 (3, S, S), ``mask`` uint8 (mask_size, mask_size) —
    or (H, W) for evaluation with ``eval_at_original_size`` —, ``ref_id``, ``sent_id``,
    ``image_path`` (the original image, for overlays) and ``sentence`` (the raw sentence).

    Args:
        root: Folder holding ``images/`` and one folder per dataset; ``${VAR:-default}`` is expanded.
        dataset: refcoco, refcoco+, refcocog or refclef.
        split_by: Split scheme, i.e. which ``refs(<split_by>).p`` is read; None takes the dataset's
            usual one (unc for refcoco/refcoco+/refclef, umd for refcocog). google is also available
            for refcoco and refcocog, berkeley for refclef.
        image_dir: Image folder; None finds ``<root>/images/train2014`` or ``<root>/COCOtrain2014``
            (``<root>/images/saiapr_tc-12`` for refclef).
        train_split: Split trained on.
        val_splits: Splits validated on, one dataloader (and one set of metrics) each.
        test_splits: Splits tested on.
        predict_splits: Splits predicted on; None takes the test splits.
        image_size: Side of the square image given to the vision tower; None asks the model.
        mask_size: Side of the square target masks (nearest-neighbour resized, as in the authors'
            release), for training and, by default, for evaluation.
        eval_at_original_size: Evaluate on masks at each image's original size (the stricter option;
            the model upsamples its logits to each mask) instead of ``mask_size``.
        train_sentences: ``one_per_ref``: a training epoch visits each ref once, with a random one of
            its sentences; ``all``: every sentence is a training sample. Evaluation always uses every
            sentence.
        sentence_field: Which text fills the prompt: ``sent`` (lower-cased and tokenised by the dataset
            authors, as models in the literature read it) or ``raw`` (as typed by the annotator).
        prompt_template: The LLM prompt; ``{description}`` is replaced by the sentence.
        batch_size: Training batch size per device.
        eval_batch_size: Evaluation batch size per device; None takes ``batch_size``.
        num_workers: Dataloader worker processes.
        pin_memory: Pin host memory when a GPU is used.
    """

    layout_hint = "See data/README.md (RefCOCO section) for the expected layout."
    #: False where the data is generated by `prepare_data`, so it cannot be checked at construction
    files_exist_at_init: bool = True

    def __init__(
        self,
        root: str = "${MIT_DATA_ROOT:-data}",
        dataset: ReferDataset = "refcoco",
        split_by: SplitBy | None = None,
        image_dir: str | None = None,
        train_split: str = "train",
        val_splits: Sequence[str] = ("val",),
        test_splits: Sequence[str] = ("val", "testA", "testB"),
        predict_splits: Sequence[str] | None = None,
        image_size: int | None = None,
        mask_size: int = 480,
        eval_at_original_size: bool = False,
        train_sentences: TrainSentences = "one_per_ref",
        sentence_field: SentenceField = "sent",
        prompt_template: str = PAPER_TEMPLATE,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
    ) -> None:
        split_by = dataset_split_by(dataset, split_by, "data.")
        check_choice("data.train_sentences", train_sentences, TrainSentences)
        check_choice("data.sentence_field", sentence_field, SentenceField)
        prompt_format = PromptFormat(prompt_template, DESCRIPTION, lowercase=sentence_field == "sent")
        for name, size in (("image_size", image_size), ("mask_size", mask_size)):
            if size is not None and size < 1:
                raise UserError(f"data.{name} must be a positive number of pixels, got {size}.")
        super().__init__(
            root, train_split=train_split, val_splits=val_splits, test_splits=test_splits,
            predict_splits=predict_splits, batch_size=batch_size, eval_batch_size=eval_batch_size,
            num_workers=num_workers, pin_memory=pin_memory, check_root=self.files_exist_at_init,
        )
        self.dataset = dataset
        self.split_by = split_by
        self.image_dir = image_dir
        self.image_size = image_size
        self.mask_size = mask_size
        self.eval_at_original_size = eval_at_original_size
        self.train_sentences = train_sentences
        self.sentence_field = sentence_field
        self.prompt_format = prompt_format
        self.files: ReferFiles | None = self._locate_files() if self.files_exist_at_init else None

    def _locate_files(self) -> ReferFiles:
        """Check the layout before anything heavy loads, naming exactly which file is missing where."""
        root = existing_path(self.root_setting, "Data root", self.layout_hint, is_dir=True)
        folder = root / self.dataset
        hint = f"Put the {self.dataset} annotations (instances.json, refs(...).p) in '{folder}'. {self.layout_hint}"
        instances = existing_path(folder / "instances.json", f"{self.dataset} annotations", hint, is_dir=False)
        refs = folder / f"refs({self.split_by}).p"
        refs = existing_path(refs, f"{self.dataset} refs for split_by={self.split_by}", hint, is_dir=False)
        return ReferFiles(instances=instances, refs=refs, image_dir=self._find_image_dir(root))

    def _find_image_dir(self, root: Path) -> Path:
        collection = COLLECTIONS[self.dataset]
        if self.image_dir is not None:
            what = f"{collection.image_set} image folder (data.image_dir)"
            hint = "Point data.image_dir at the folder holding the files named in instances.json."
            return existing_path(self.image_dir, what, hint, is_dir=True)
        candidates = [root / name for name in collection.image_dirs]
        for candidate in candidates:
            if candidate.is_dir():
                return candidate
        expected = " or ".join(f"'{candidate}'" for candidate in candidates)
        raise UserError(f"{collection.image_set} image folder not found: expected {expected}. "
                        f"Download the images there, or set data.image_dir. {self.layout_hint}")

    @property
    def dataset_name(self) -> str:
        return f"{self.dataset} {self.split_by}"

    def _read_splits(self, splits: list[str]) -> dict[str, list[ReferredObject]]:
        self.files = self.files or self._locate_files()
        images, annotations = load_instances(self.files.instances)
        grouped = refs_by_split(load_refs(self.files.refs), splits, self.files.refs)
        objects = {}
        for split in splits:
            report = SetupReport(f"{self.dataset_name}/{split}")
            objects[split] = referred_objects(grouped[split], images, annotations, self.files.image_dir,
                                              self.files.refs, self.sentence_field, report)
            report.log()
            check_images(objects[split], split, self.files.image_dir)
        return objects

    def one_sentence_per_ref(self, split: str) -> ReferringSegmentationDataset:
        """The refs of `split` for evaluation (masks as evaluation has them), each sample's sentence chosen by the
        draw it is indexed with, (index, draw): the authors' release evaluates so during training."""
        if split not in self._records:
            self._records.update(self._read_splits([split]))
        return ReferringSegmentationDataset(
            self._records[split], prompt=self.prompt_format, image_size=self.image_size or self.model_image_size(),
            mask_size=None if self.eval_at_original_size else self.mask_size, random_sentence=True,
            sentence_field=self.sentence_field,
        )

    def _make_dataset(self, split: str, objects: list[ReferredObject], *, training: bool) -> Dataset:
        dataset = ReferringSegmentationDataset(
            objects,
            prompt=self.prompt_format,
            image_size=self.image_size or self.model_image_size(),
            mask_size=None if self.eval_at_original_size and not training else self.mask_size,
            random_sentence=training and self.train_sentences == "one_per_ref",
            sentence_field=self.sentence_field,
        )
        log.info("%s/%s (%s): %d refs, %d samples", self.dataset_name, split, "training" if training else "evaluation",
                 len(objects), len(dataset))
        return dataset
