"""Checks run before training: every problem of the registered splits reported at once."""
import logging

from detectron2.data import DatasetCatalog
from PIL import Image
from tqdm import tqdm

from .capetown import DatasetError, read_mask

logger = logging.getLogger(__name__)


def find_problems(dataset_dicts):
    """``"file: problem"`` strings for unreadable masks, bad mask values and size mismatches."""
    problems = []
    for d in tqdm(dataset_dicts, desc="check masks", unit="img", leave=False):
        try:
            mask = read_mask(d["sem_seg_file_name"])
        except DatasetError as e:
            problems.append(str(e))
            continue
        try:
            with Image.open(d["file_name"]) as im:
                width, height = im.size
        except (OSError, ValueError) as e:
            problems.append(f"{d['file_name']}: cannot read image ({e})")
            continue
        if mask.shape != (height, width):
            problems.append(
                f"{d['sem_seg_file_name']}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{d['file_name']} is {width}x{height}"
            )
    return problems


def check_datasets(names):
    """Load each registered split and check its files; raise one DatasetError listing all."""
    problems = []
    for name in names:
        try:
            dicts = DatasetCatalog.get(name)
        except DatasetError as e:
            problems.append(str(e))
            continue
        problems += find_problems(dicts)
        logger.info("Checked %d images of %s", len(dicts), name)
    if problems:
        raise DatasetError(f"{len(problems)} dataset problem(s):\n  " + "\n  ".join(problems))
