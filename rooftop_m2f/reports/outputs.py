"""Where the reports write: an output folder is checked before anything is read or written
(an earlier report of the same kind is refused, never overwritten), and each file is written
atomically (:mod:`rooftop_m2f.fileio`), the report's JSON last: its presence means the report is
complete."""
import csv
import os

from ..cli import UsageError
from ..fileio import atomic_path, check_output_folder


def check_output_dir(output_dir, names):
    """Refuse a folder that holds any of ``names`` (an earlier report), or that cannot be created
    or written: one line naming it."""
    found = [n for n in names if os.path.exists(os.path.join(output_dir, n))]
    if found:
        raise UsageError(f"--output-dir {output_dir}: holds an earlier report ({', '.join(found)}); "
                         "choose another --output-dir or move those files away (nothing is "
                         "overwritten)")
    check_output_folder(output_dir)  # writable, before any work


def write_csv(path, rows, columns):
    """``rows`` (dicts) under the header ``columns``; None is an empty cell."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
