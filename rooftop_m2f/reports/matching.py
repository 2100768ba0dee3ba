"""Matching two sets of installations by spatial index (shapely's STRtree): the candidate pairs
are the same-class pairs whose polygons overlap; no loop over all pairs.

:func:`one_to_one` pairs them one-to-one at an IoU threshold: within each connected group of
candidates, scipy's ``linear_sum_assignment`` finds the most matches and, among those, the
highest total IoU. At a threshold of at least 0.5 between two layers whose polygons do not
overlap each other (a segmentation), a polygon has at most one candidate above the threshold,
so every group is one pair and the assignment is only needed for overlapping hand labels or
lower thresholds, where matching greedily by IoU can lose matches.
"""
import numpy as np


def candidate_pairs(a_geoms, a_class, b_geoms, b_class):
    """(i, j, intersection area) of the pairs a[i], b[j] of one class whose overlap has an area."""
    import shapely

    a_geoms, b_geoms = np.asarray(a_geoms, dtype=object), np.asarray(b_geoms, dtype=object)
    if len(a_geoms) == 0 or len(b_geoms) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    i, j = shapely.STRtree(b_geoms).query(a_geoms, predicate="intersects")  # into a, into b
    keep = np.asarray(a_class)[i] == np.asarray(b_class)[j]
    i, j = i[keep], j[keep]
    inter = shapely.area(shapely.intersection(a_geoms[i], b_geoms[j])) if len(i) else np.zeros(0)
    keep = inter > 0
    return i[keep], j[keep], inter[keep]


def iou(inter, a_area, b_area):
    union = a_area + b_area - inter
    return np.divide(inter, union, out=np.zeros_like(inter, dtype=float), where=union > 0)


def groups(i, j, n_a, n_b):
    """Connected groups of the pairs (i, j): a group label per a (first ``n_a``) and per b."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = n_a + n_b
    graph = coo_matrix((np.ones(len(i)), (np.asarray(i), n_a + np.asarray(j))), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def one_to_one(i, j, score, n_a, n_b, threshold):
    """Indices (ia, jb) of one-to-one matches among the pairs with ``score >= threshold``:
    most matches first, then the highest total score (see the module docstring)."""
    from scipy.optimize import linear_sum_assignment

    keep = np.asarray(score) >= threshold
    i, j, score = np.asarray(i)[keep], np.asarray(j)[keep], np.asarray(score)[keep]
    if len(i) == 0:
        return i, j
    label = groups(i, j, n_a, n_b)[i]  # a pair's group is its a's group
    sizes = np.bincount(label)
    single = sizes[label] == 1
    out_i, out_j = [i[single]], [j[single]]
    rest = np.flatnonzero(~single)
    rest = rest[np.argsort(label[rest], kind="stable")]
    for sel in np.split(rest, np.flatnonzero(np.diff(label[rest])) + 1) if len(rest) else []:
        rows, ri = np.unique(i[sel], return_inverse=True)
        cols, ci = np.unique(j[sel], return_inverse=True)
        weight = np.zeros((len(rows), len(cols)))
        # each match is worth more than any difference in total score: most matches first
        weight[ri, ci] = 1.0 + score[sel] / (len(sel) + 1.0)
        r, c = linear_sum_assignment(weight, maximize=True)
        ok = weight[r, c] > 0
        out_i.append(rows[r[ok]])
        out_j.append(cols[c[ok]])
    ia, jb = np.concatenate(out_i), np.concatenate(out_j)
    order = np.argsort(ia, kind="stable")
    return ia[order], jb[order]
