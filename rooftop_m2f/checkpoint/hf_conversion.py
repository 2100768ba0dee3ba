"""Hugging Face transformers Mask2Former (Swin backbone) -> our detectron2 model: the work of
``tools/convert_hf_to_d2.py``. :func:`convert_hf_folder` reads a ``save_pretrained`` folder and
returns a detectron2 state dict, the config values it implies and a report of every tensor
(mapped, or skipped with its reason); a tensor no rule knows is an error, listed by name.
"""
import json
import logging
import os
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch

from .safe_io import WeightsError, read_torch

logger = logging.getLogger(__name__)

__all__ = [
    "ConversionError",
    "HFCheckpoint",
    "read_hf_folder",
    "implied_config",
    "convert_state_dict",
    "convert_hf_folder",
    "relative_position_index",
    "format_implied_config",
]

BACKBONE = "model.pixel_level_module.encoder."
PIXEL_DECODER = "model.pixel_level_module.decoder."
TRANSFORMER = "model.transformer_module."

D2_PIXEL_DECODER = "sem_seg_head.pixel_decoder."
D2_PREDICTOR = "sem_seg_head.predictor."


class ConversionError(ValueError):
    """A Hugging Face checkpoint that cannot be converted; the message names the file and why."""


class HFCheckpoint:
    """A Hugging Face checkpoint folder, read: ``config`` (config.json), ``state_dict`` and the
    file(s) it came from."""

    def __init__(self, folder: str, config: dict, state_dict: Dict[str, torch.Tensor],
                 weight_files: List[str]):
        self.folder = folder
        self.config = config
        self.state_dict = state_dict
        self.weight_files = weight_files


# ---- reading ----------------------------------------------------------------------------------
def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc}); is the {what} complete?") from exc


def _load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConversionError(f"{path}: cannot read the safetensors file ({exc}); it is truncated "
                              "or not a safetensors file") from exc


def _load_torch_bin(path: str) -> Dict[str, torch.Tensor]:
    try:
        state = read_torch(path)  # torch.load(..., weights_only=True): tensors and plain data only
    except WeightsError as exc:
        raise ConversionError(str(exc)) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: expected a state dict (name -> tensor), got {type(state)}")
    return state


def read_hf_folder(folder: str) -> HFCheckpoint:
    """Read ``config.json`` and the weights of a ``save_pretrained`` folder (e.g. a download of
    ``facebook/mask2former-swin-small-ade-semantic``: ``model.safetensors``, a sharded
    ``model.safetensors.index.json`` or ``pytorch_model.bin``; no transformers import needed).
    Raises :class:`ConversionError` naming the missing or unreadable file."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ConversionError(f"{folder}: not a directory (expected a Hugging Face checkpoint "
                              "folder with config.json and model.safetensors)")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        present = sorted(os.listdir(folder))[:10]
        raise ConversionError(f"{folder}: no config.json (found: {present or 'nothing'}); a "
                              "Hugging Face checkpoint folder has config.json next to its weights")
    config = _read_json(config_path, "config.json")

    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    torch_bin = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(single):
        files = [single]
        state = _load_safetensors(single)
    elif os.path.isfile(index):
        shards = sorted(set(_read_json(index, "weights index").get("weight_map", {}).values()))
        if not shards:
            raise ConversionError(f"{index}: its weight_map is empty")
        files, state = [], {}
        for shard in shards:
            path = os.path.join(folder, shard)
            if not os.path.isfile(path):
                raise ConversionError(f"{index} lists {shard}, which is missing from {folder}")
            files.append(path)
            state.update(_load_safetensors(path))
    elif os.path.isfile(torch_bin):
        files = [torch_bin]
        state = _load_torch_bin(torch_bin)
    else:
        raise ConversionError(f"{folder}: no weights (model.safetensors, "
                              "model.safetensors.index.json or pytorch_model.bin)")
    return HFCheckpoint(folder, config, state, files)


# ---- configuration ----------------------------------------------------------------------------
def _num_labels(config: dict) -> Optional[int]:
    if "id2label" in config and isinstance(config["id2label"], dict):
        return len(config["id2label"])
    if "num_labels" in config:
        return int(config["num_labels"])
    return None


def implied_config(config: dict, source: str = "config.json") -> "OrderedDict[str, object]":
    """detectron2 config values (``KEY -> value``) for the model a HF Mask2Former config describes.

    Raises :class:`ConversionError` for anything our architecture cannot represent (another
    model type or backbone, absolute position embeddings, a feed-forward width of the pixel
    decoder other than detectron2's fixed 1024, ...), naming the field."""
    model_type = config.get("model_type")
    if model_type != "mask2former":
        raise ConversionError(f"{source}: model_type is {model_type!r}, not 'mask2former' "
                              f"(architectures: {config.get('architectures')})")
    if config.get("use_timm_backbone") or config.get("backbone"):
        raise ConversionError(f"{source}: the backbone is a named/timm backbone "
                              f"({config.get('backbone')!r}); only an embedded Swin "
                              "backbone_config converts to D2SwinTransformer")
    backbone = config.get("backbone_config")
    if not isinstance(backbone, dict):
        raise ConversionError(f"{source}: no backbone_config; cannot tell the backbone")
    if backbone.get("model_type") != "swin":
        raise ConversionError(f"{source}: backbone_config.model_type is "
                              f"{backbone.get('model_type')!r}; only 'swin' converts to "
                              "D2SwinTransformer (this model has another backbone architecture)")

    def need(cond, field, value, expected):
        if not cond:
            raise ConversionError(f"{source}: {field} = {value!r} is not supported (our model "
                                  f"needs {expected})")

    depths = list(backbone["depths"])
    heads = list(backbone["num_heads"])
    need(len(depths) == 4 and len(heads) == 4, "backbone_config.depths/num_heads",
         (depths, heads), "4 stages")
    need(not backbone.get("use_absolute_embeddings", False),
         "backbone_config.use_absolute_embeddings", True, "False (MODEL.SWIN.APE False)")
    need(backbone.get("hidden_act", "gelu") == "gelu", "backbone_config.hidden_act",
         backbone.get("hidden_act"), "'gelu'")
    need(backbone.get("num_channels", 3) == 3, "backbone_config.num_channels",
         backbone.get("num_channels"), "3")
    need(abs(float(backbone.get("layer_norm_eps", 1e-5)) - 1e-5) < 1e-12,
         "backbone_config.layer_norm_eps", backbone.get("layer_norm_eps"), "1e-5")
    # Mask2Former needs the four stages; a config that names its outputs must name all four.
    out_features = backbone.get("out_features")
    out_indices = backbone.get("out_indices")
    need(out_features is None or list(out_features) == ["stage1", "stage2", "stage3", "stage4"],
         "backbone_config.out_features", out_features, "all four stages")
    need(out_indices is None or list(out_indices) == [1, 2, 3, 4],
         "backbone_config.out_indices", out_indices, "[1, 2, 3, 4]")
    need(config.get("activation_function", "relu") == "relu", "activation_function",
         config.get("activation_function"), "'relu'")
    need(int(config.get("encoder_feedforward_dim", 1024)) == 1024, "encoder_feedforward_dim",
         config.get("encoder_feedforward_dim"),
         "1024 (detectron2's MSDeformAttnPixelDecoder fixes it)")
    need(list(config.get("feature_strides", [4, 8, 16, 32])) == [4, 8, 16, 32], "feature_strides",
         config.get("feature_strides"), "[4, 8, 16, 32]")
    num_labels = _num_labels(config)
    if num_labels is None:
        raise ConversionError(f"{source}: neither id2label nor num_labels: the class count is "
                              "unknown")

    out = OrderedDict()
    out["MODEL.BACKBONE.NAME"] = "D2SwinTransformer"
    out["MODEL.SWIN.EMBED_DIM"] = int(backbone["embed_dim"])
    out["MODEL.SWIN.DEPTHS"] = depths
    out["MODEL.SWIN.NUM_HEADS"] = heads
    out["MODEL.SWIN.WINDOW_SIZE"] = int(backbone["window_size"])
    out["MODEL.SWIN.PATCH_SIZE"] = int(backbone.get("patch_size", 4))
    out["MODEL.SWIN.MLP_RATIO"] = float(backbone.get("mlp_ratio", 4.0))
    out["MODEL.SWIN.QKV_BIAS"] = bool(backbone.get("qkv_bias", True))
    out["MODEL.SWIN.APE"] = False
    out["MODEL.SEM_SEG_HEAD.NUM_CLASSES"] = num_labels
    out["MODEL.SEM_SEG_HEAD.CONVS_DIM"] = int(config["feature_size"])
    out["MODEL.SEM_SEG_HEAD.MASK_DIM"] = int(config["mask_feature_size"])
    out["MODEL.SEM_SEG_HEAD.NORM"] = "GN"
    out["MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS"] = int(config["encoder_layers"])
    out["MODEL.SEM_SEG_HEAD.COMMON_STRIDE"] = int(config.get("common_stride", 4))
    out["MODEL.MASK_FORMER.HIDDEN_DIM"] = int(config["hidden_dim"])
    out["MODEL.MASK_FORMER.NUM_OBJECT_QUERIES"] = int(config["num_queries"])
    out["MODEL.MASK_FORMER.NHEADS"] = int(config["num_attention_heads"])
    out["MODEL.MASK_FORMER.DIM_FEEDFORWARD"] = int(config["dim_feedforward"])
    # HF builds decoder_layers - 1 decoder layers plus the prediction on the learnable queries,
    # exactly like detectron2's DEC_LAYERS.
    out["MODEL.MASK_FORMER.DEC_LAYERS"] = int(config["decoder_layers"])
    out["MODEL.MASK_FORMER.PRE_NORM"] = bool(config.get("pre_norm", False))
    out["MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ"] = bool(config.get("enforce_input_projection",
                                                                  False))
    return out


def _yaml_value(value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def format_implied_config(values) -> str:
    """``KEY VALUE`` lines, one per key: usable as detectron2 command-line overrides (quote the
    lists) and, nested, as YAML."""
    return "\n".join(f"{key} {_yaml_value(value)}" for key, value in values.items())


# ---- the mapping --------------------------------------------------------------------------------
def relative_position_index(window_size: int) -> torch.Tensor:
    """(W*W, W*W) int64: for each pair of positions (i, j) of a W x W window, the row of the
    (2W-1)^2-entry relative position bias table that holds their (dy, dx) offset, as
    ``(dy + W - 1) * (2W - 1) + (dx + W - 1)`` with (dy, dx) = position_i - position_j."""
    ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window_size - 1
    dx = xs[:, None] - xs[None, :] + window_size - 1
    return dy * (2 * window_size - 1) + dx


# Old (transformers 4 / save_pretrained) Swin names -> current ones, applied in this order.
_SWIN_RENAMES = [
    (r"^(embeddings|encoder)\.", r"swin.\1."),
    (r"\.attention\.self\.query\.", ".attention.q_proj."),
    (r"\.attention\.self\.key\.", ".attention.k_proj."),
    (r"\.attention\.self\.value\.", ".attention.v_proj."),
    (r"\.attention\.self\.relative_position_bias_table$",
     ".attention.relative_position_bias.relative_position_bias_table"),
    (r"\.attention\.self\.relative_position_index$",
     ".attention.relative_position_bias.relative_position_index"),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
]

_BLOCK = r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\."

# (pattern on the canonical name after its prefix, detectron2 name template, fused part or None)
_BACKBONE_RULES = [
    (r"swin\.embeddings\.patch_embeddings\.projection\.(weight|bias)$",
     "backbone.patch_embed.proj.{0}", None),
    (r"swin\.embeddings\.norm\.(weight|bias)$", "backbone.patch_embed.norm.{0}", None),
    (_BLOCK + r"layernorm_before\.(weight|bias)$", "backbone.layers.{0}.blocks.{1}.norm1.{2}", None),
    (_BLOCK + r"layernorm_after\.(weight|bias)$", "backbone.layers.{0}.blocks.{1}.norm2.{2}", None),
    (_BLOCK + r"attention\.q_proj\.(weight|bias)$", "backbone.layers.{0}.blocks.{1}.attn.qkv.{2}",
     0),
    (_BLOCK + r"attention\.k_proj\.(weight|bias)$", "backbone.layers.{0}.blocks.{1}.attn.qkv.{2}",
     1),
    (_BLOCK + r"attention\.v_proj\.(weight|bias)$", "backbone.layers.{0}.blocks.{1}.attn.qkv.{2}",
     2),
    (_BLOCK + r"attention\.o_proj\.(weight|bias)$", "backbone.layers.{0}.blocks.{1}.attn.proj.{2}",
     None),
    (_BLOCK + r"attention\.relative_position_bias\.relative_position_bias_table$",
     "backbone.layers.{0}.blocks.{1}.attn.relative_position_bias_table", None),
    (_BLOCK + r"mlp\.(fc1|fc2)\.(weight|bias)$", "backbone.layers.{0}.blocks.{1}.mlp.{2}.{3}", None),
    (r"swin\.encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)$",
     "backbone.layers.{0}.downsample.{1}.{2}", None),
    (r"hidden_states_norms\.stage([1-4])\.(weight|bias)$", "backbone.norm{stage}.{1}", None),
]

_ENC = r"encoder\.layers\.(\d+)\."
_PIXEL_DECODER_RULES = [
    (r"level_embed$", D2_PIXEL_DECODER + "transformer.level_embed", None),
    (r"input_projections\.(\d+)\.([01])\.(weight|bias)$",
     D2_PIXEL_DECODER + "input_proj.{0}.{1}.{2}", None),
    (_ENC + r"self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)$",
     D2_PIXEL_DECODER + "transformer.encoder.layers.{0}.self_attn.{1}.{2}", None),
    (_ENC + r"self_attn_layer_norm\.(weight|bias)$",
     D2_PIXEL_DECODER + "transformer.encoder.layers.{0}.norm1.{1}", None),
    (_ENC + r"fc1\.(weight|bias)$", D2_PIXEL_DECODER + "transformer.encoder.layers.{0}.linear1.{1}",
     None),
    (_ENC + r"fc2\.(weight|bias)$", D2_PIXEL_DECODER + "transformer.encoder.layers.{0}.linear2.{1}",
     None),
    (_ENC + r"final_layer_norm\.(weight|bias)$",
     D2_PIXEL_DECODER + "transformer.encoder.layers.{0}.norm2.{1}", None),
    (r"mask_projection\.(weight|bias)$", D2_PIXEL_DECODER + "mask_features.{0}", None),
    (r"(adapter_\d+|layer_\d+)\.0\.(weight|bias)$", D2_PIXEL_DECODER + "{0}.{1}", None),
    (r"(adapter_\d+|layer_\d+)\.1\.(weight|bias)$", D2_PIXEL_DECODER + "{0}.norm.{1}", None),
]

_DEC = r"decoder\.layers\.(\d+)\."
_SELF = D2_PREDICTOR + "transformer_self_attention_layers.{0}."
_CROSS = D2_PREDICTOR + "transformer_cross_attention_layers.{0}."
_FFN = D2_PREDICTOR + "transformer_ffn_layers.{0}."
_TRANSFORMER_RULES = [
    (r"queries_embedder\.weight$", D2_PREDICTOR + "query_embed.weight", None),
    (r"queries_features\.weight$", D2_PREDICTOR + "query_feat.weight", None),
    (r"level_embed\.weight$", D2_PREDICTOR + "level_embed.weight", None),
    (r"input_projections\.(\d+)\.(weight|bias)$", D2_PREDICTOR + "input_proj.{0}.{1}", None),
    (_DEC + r"self_attn\.q_proj\.(weight|bias)$", _SELF + "self_attn.in_proj_{1}", 0),
    (_DEC + r"self_attn\.k_proj\.(weight|bias)$", _SELF + "self_attn.in_proj_{1}", 1),
    (_DEC + r"self_attn\.v_proj\.(weight|bias)$", _SELF + "self_attn.in_proj_{1}", 2),
    (_DEC + r"self_attn\.out_proj\.(weight|bias)$", _SELF + "self_attn.out_proj.{1}", None),
    (_DEC + r"self_attn_layer_norm\.(weight|bias)$", _SELF + "norm.{1}", None),
    (_DEC + r"cross_attn\.(in_proj_weight|in_proj_bias)$", _CROSS + "multihead_attn.{1}", None),
    (_DEC + r"cross_attn\.out_proj\.(weight|bias)$", _CROSS + "multihead_attn.out_proj.{1}", None),
    (_DEC + r"cross_attn_layer_norm\.(weight|bias)$", _CROSS + "norm.{1}", None),
    (_DEC + r"fc1\.(weight|bias)$", _FFN + "linear1.{1}", None),
    (_DEC + r"fc2\.(weight|bias)$", _FFN + "linear2.{1}", None),
    (_DEC + r"final_layer_norm\.(weight|bias)$", _FFN + "norm.{1}", None),
    (r"decoder\.layernorm\.(weight|bias)$", D2_PREDICTOR + "decoder_norm.{0}", None),
    (r"decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.(weight|bias)$",
     D2_PREDICTOR + "mask_embed.layers.{0}.{1}", None),
]

_HEAD_RULES = [
    (r"class_predictor\.(weight|bias)$", D2_PREDICTOR + "class_embed.{0}", None),
]

# Tensors of a HF checkpoint that have no counterpart, with the reason they are not needed.
_SKIP_RULES = [
    (r"^criterion\.empty_weight$",
     "loss buffer: ours is built from MODEL.MASK_FORMER.NO_OBJECT_WEIGHT and "
     "ROOFTOP.LOSS.PER_CLASS_WEIGHTS"),
    (r"^" + re.escape(BACKBONE) + r"swin\.layernorm\.(weight|bias)$",
     "SwinModel's final LayerNorm: unused by SwinBackbone (Mask2Former uses the per-stage norms)"),
    (r"^" + re.escape(BACKBONE) + r"swin\.embeddings\.mask_token$",
     "masked-image-modelling token: unused for segmentation"),
]

_RULES_BY_PREFIX = [
    (BACKBONE, _BACKBONE_RULES),
    (PIXEL_DECODER, _PIXEL_DECODER_RULES),
    (TRANSFORMER, _TRANSFORMER_RULES),
    ("", _HEAD_RULES),
]


def _canonical(name: str) -> str:
    """An HF key with the Swin part in current transformers naming (old names accepted)."""
    if name.startswith(BACKBONE):
        rest = name[len(BACKBONE):]
        for pattern, repl in _SWIN_RENAMES:
            rest = re.sub(pattern, repl, rest)
        return BACKBONE + rest
    return name


def _match(canonical: str):
    """``(d2_name, fused_part)`` for a canonical HF key, or ``None``."""
    for prefix, rules in _RULES_BY_PREFIX:
        if not canonical.startswith(prefix):
            continue
        rest = canonical[len(prefix):]
        for pattern, template, part in rules:
            m = re.match(pattern, rest)
            if m:
                groups = m.groups()
                stage = None
                if "{stage}" in template:
                    stage = int(groups[0]) - 1
                return template.format(*groups, stage=stage), part
    return None


def _skip_reason(canonical: str) -> Optional[str]:
    for pattern, reason in _SKIP_RULES:
        if re.match(pattern, canonical):
            return reason
    return None


class ConversionReport:
    """What happened to every tensor: ``mapped`` (HF name -> detectron2 name), ``skipped``
    (HF name -> reason), ``generated`` (detectron2 names computed, not read)."""

    def __init__(self):
        self.mapped: "OrderedDict[str, str]" = OrderedDict()
        self.skipped: "OrderedDict[str, str]" = OrderedDict()
        self.generated: List[str] = []

    def summary(self) -> str:
        lines = [f"{len(self.mapped)} tensors mapped, {len(self.skipped)} skipped, "
                 f"{len(self.generated)} computed"]
        reasons: Dict[str, List[str]] = OrderedDict()
        for name, reason in self.skipped.items():
            reasons.setdefault(reason, []).append(name)
        for reason, names in reasons.items():
            lines.append(f"  skipped {', '.join(names)}: {reason}")
        if self.generated:
            lines.append(f"  computed {len(self.generated)} Swin relative_position_index buffers "
                         "(non-persistent in transformers)")
        return "\n".join(lines)


def convert_state_dict(hf_state: Dict[str, torch.Tensor], hf_config: dict,
                       source: str = "checkpoint") -> Tuple["OrderedDict[str, torch.Tensor]",
                                                           "ConversionReport",
                                                           "OrderedDict[str, object]"]:
    """Convert a HF Mask2Former state dict. Returns ``(d2_state, report, implied_config)``.

    Raises :class:`ConversionError` when a tensor matches no rule (all such tensors listed),
    a fused q/k/v triple is incomplete, the class predictor disagrees with config.json's class
    count, or a tensor the configuration implies is absent.

    The mapping, written from the two architectures (not from any conversion script):

    * Swin: HF keeps query/key/value as three linears; ours is one ``qkv`` linear whose output is
      [q; k; v] (the reshape to (3, heads, C/heads) takes q first), so the three are concatenated
      along the output dimension. The relative-position index is a computed, non-persistent buffer
      in HF and a persistent one in ours: we compute it (and check it against an old checkpoint that
      stored it). Patch merging concatenates the 2x2 sub-grids in the same order in both ((0,0),
      (1,0), (0,1), (1,1), as (row, col) offsets), so ``reduction``/``norm`` map unchanged; the
      parity test checks it numerically. HF's per-stage ``hidden_states_norms.stageN`` are our
      ``normN-1``; the ``SwinModel`` final ``layernorm`` is not used by HF's ``SwinBackbone`` and
      has no counterpart.
    * Pixel decoder: the same Deformable-DETR encoder with other names (``self_attn_layer_norm`` ->
      ``norm1``, ``fc1/fc2`` -> ``linear1/linear2``, ``final_layer_norm`` -> ``norm2``); HF's
      ``nn.Sequential(conv, GroupNorm)`` adapters/output convs are detectron2 ``Conv2d`` modules
      with a ``norm`` child; ``mask_projection`` is ``mask_features``.
    * Transformer decoder: HF's self-attention has separate q/k/v projections (concatenated into
      ``nn.MultiheadAttention``'s ``in_proj``), its cross-attention already is an
      ``nn.MultiheadAttention``; ``queries_embedder`` is the query positional embedding
      (``query_embed``), ``queries_features`` the query features (``query_feat``).
    * ``criterion.empty_weight`` is a loss buffer: ours is built from the config
      (``MODEL.MASK_FORMER.NO_OBJECT_WEIGHT``, ``ROOFTOP.LOSS.PER_CLASS_WEIGHTS``) and never loaded.

    Old (transformers 4) and current names are both accepted: ``save_pretrained`` of transformers 5
    still writes the old Swin names (``attention.self.query``, ``intermediate.dense``, ...).
    """
    values = implied_config(hf_config, source=f"{source}: config.json")
    window = values["MODEL.SWIN.WINDOW_SIZE"]
    report = ConversionReport()
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    fused: Dict[str, Dict[int, Tuple[str, torch.Tensor]]] = OrderedDict()
    unmapped: List[str] = []
    stored_indices: Dict[str, torch.Tensor] = {}

    for name, tensor in hf_state.items():
        canonical = _canonical(name)
        reason = _skip_reason(canonical)
        if reason is not None:
            report.skipped[name] = reason
            continue
        index_match = re.match("^" + re.escape(BACKBONE) + _BLOCK +
                               r"attention\.relative_position_bias\.relative_position_index$",
                               canonical)
        if index_match:
            stored_indices[name] = tensor
            d2_name = "backbone.layers.{0}.blocks.{1}.attn.relative_position_index".format(
                *index_match.groups())
            expected = relative_position_index(window)
            if tuple(tensor.shape) not in {tuple(expected.shape), (expected.numel(),)} or \
                    not torch.equal(tensor.reshape(expected.shape).long(), expected):
                raise ConversionError(f"{source}: {name} differs from the relative position index "
                                      f"of a {window}x{window} window")
            report.mapped[name] = d2_name
            continue
        target = _match(canonical)
        if target is None:
            unmapped.append(name)
            continue
        d2_name, part = target
        if part is None:
            if d2_name in out:
                raise ConversionError(f"{source}: two tensors map to {d2_name} "
                                      f"({report_source(report, d2_name)} and {name})")
            out[d2_name] = tensor
        else:
            fused.setdefault(d2_name, {})[part] = (name, tensor)
        report.mapped[name] = d2_name

    if unmapped:
        shown = "\n  ".join(unmapped[:40])
        more = f"\n  ... and {len(unmapped) - 40} more" if len(unmapped) > 40 else ""
        raise ConversionError(f"{source}: {len(unmapped)} tensor(s) match no conversion rule "
                              f"(not a Mask2Former-Swin checkpoint, or a variant we do not "
                              f"know):\n  {shown}{more}")

    for d2_name, parts in fused.items():
        if sorted(parts) != [0, 1, 2]:
            have = [parts[p][0] for p in sorted(parts)]
            raise ConversionError(f"{source}: {d2_name} needs query, key and value tensors; only "
                                  f"{have} are present")
        out[d2_name] = torch.cat([parts[p][1] for p in (0, 1, 2)], dim=0)

    # The relative position index buffers (computed; transformers 5 does not store them).
    depths = values["MODEL.SWIN.DEPTHS"]
    for stage, depth in enumerate(depths):
        for block in range(depth):
            name = f"backbone.layers.{stage}.blocks.{block}.attn.relative_position_index"
            out[name] = relative_position_index(window)
            if not any(v == name for v in report.mapped.values()):
                report.generated.append(name)

    _check_consistency(out, values, source)
    ordered = OrderedDict(sorted(out.items()))
    return ordered, report, values


def report_source(report: "ConversionReport", d2_name: str) -> str:
    for hf_name, target in report.mapped.items():
        if target == d2_name:
            return hf_name
    return "?"


def _check_consistency(out: Dict[str, torch.Tensor], values, source: str) -> None:
    """Every tensor the implied configuration needs is there, with the class count of
    config.json."""
    num_classes = values["MODEL.SEM_SEG_HEAD.NUM_CLASSES"]
    head = out.get(D2_PREDICTOR + "class_embed.weight")
    if head is None:
        raise ConversionError(f"{source}: no class_predictor.weight (the class head)")
    if head.shape[0] != num_classes + 1:
        raise ConversionError(
            f"{source}: class count mismatch: config.json has {num_classes} labels (id2label), "
            f"so the class head should have {num_classes}+1 outputs, but class_predictor.weight "
            f"has {head.shape[0]} (= {head.shape[0] - 1}+1)")
    needed = ["backbone.patch_embed.proj.weight", "backbone.norm3.weight",
              D2_PIXEL_DECODER + "mask_features.weight", D2_PREDICTOR + "query_feat.weight",
              D2_PREDICTOR + "decoder_norm.weight"]
    depths = values["MODEL.SWIN.DEPTHS"]
    for stage, depth in enumerate(depths):
        for block in range(depth):
            needed.append(f"backbone.layers.{stage}.blocks.{block}.attn.qkv.weight")
    for layer in range(values["MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS"]):
        needed.append(D2_PIXEL_DECODER + f"transformer.encoder.layers.{layer}.linear1.weight")
    for layer in range(values["MODEL.MASK_FORMER.DEC_LAYERS"] - 1):
        needed.append(_CROSS.format(layer) + "multihead_attn.in_proj_weight")
    missing = [n for n in needed if n not in out]
    if missing:
        raise ConversionError(f"{source}: config.json implies tensors the weights do not have "
                              f"(truncated or mismatched checkpoint): {missing[:10]}")
    extra_blocks = []
    for name in out:
        m = re.match(r"backbone\.layers\.(\d+)\.(?:blocks\.(\d+)\.)?", name)
        if m and (int(m.group(1)) >= len(depths) or
                  (m.group(2) is not None and int(m.group(2)) >= depths[int(m.group(1))])):
            extra_blocks.append(name)
    if extra_blocks:
        raise ConversionError(f"{source}: the weights have Swin blocks beyond config.json's depths "
                              f"{depths}: {extra_blocks[:5]}")


def convert_hf_folder(folder: str, num_classes: Optional[int] = None):
    """Read and convert a HF checkpoint folder: ``(d2_state, report, implied_config, files)``.

    ``num_classes``: when given, the checkpoint must have exactly that many classes (a
    :class:`ConversionError` names both counts otherwise)."""
    ckpt = read_hf_folder(folder)
    d2_state, report, values = convert_state_dict(ckpt.state_dict, ckpt.config, source=folder)
    have = values["MODEL.SEM_SEG_HEAD.NUM_CLASSES"]
    if num_classes is not None and have != num_classes:
        raise ConversionError(
            f"{folder}: class count mismatch: the checkpoint has {have} classes (class head "
            f"{have}+1 outputs) but {num_classes} were expected. Leave --num-classes out to "
            "convert it anyway; loading it into a model with another class count re-initialises "
            "the class head")
    return d2_state, report, values, ckpt.weight_files


# ---- checking against our model and writing --------------------------------------------------
ARCHITECTURE_KEYS_EXCLUDED_FROM_CONFIG_CHECK = ("MODEL.SEM_SEG_HEAD.NUM_CLASSES",)


def config_with(values, config_file: Optional[str] = None, opts=()):
    """Our config (``config_file``, default ``configs/Base-CapeTown.yaml``) with the implied
    ``values`` merged in, on the CPU."""
    from ..config import get_rooftop_cfg

    cfg = get_rooftop_cfg()
    if config_file is None:
        config_file = os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                                   "Base-CapeTown.yaml")
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    flat = []
    for key, value in values.items():
        flat += [key, value]
    cfg.merge_from_list(flat)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def config_disagreements(values, cfg) -> List[Tuple[str, object, object]]:
    """``(key, value in cfg, value the checkpoint implies)`` for every implied key that ``cfg``
    sets differently (the class count is not an architecture key: see
    :func:`convert_hf_to_file`)."""
    out = []
    for key, value in values.items():
        if key in ARCHITECTURE_KEYS_EXCLUDED_FROM_CONFIG_CHECK:
            continue
        node = cfg
        for part in key.split("."):
            node = node[part]
        have = list(node) if isinstance(node, (list, tuple)) else node
        want = list(value) if isinstance(value, (list, tuple)) else value
        if have != want:
            out.append((key, have, want))
    return out


def check_against_model(d2_state: Dict[str, torch.Tensor], model, source: str) -> None:
    """Every tensor of ``model`` (but the config-derived ``criterion.*``) is in ``d2_state`` with
    its shape, and nothing else is: else :class:`ConversionError` with the list."""
    model_state = model.state_dict()
    wanted = {k: tuple(v.shape) for k, v in model_state.items() if not k.startswith("criterion.")}
    have = {k: tuple(v.shape) for k, v in d2_state.items()}
    missing = sorted(set(wanted) - set(have))
    extra = sorted(set(have) - set(wanted))
    shapes = sorted(f"{k}: converted {have[k]} vs model {wanted[k]}"
                    for k in set(wanted) & set(have) if wanted[k] != have[k])
    if missing or extra or shapes:
        raise ConversionError(
            f"{source}: the converted weights do not match the model the checkpoint's config "
            f"implies: missing {missing[:10]}, unexpected {extra[:10]}, shapes {shapes[:10]}")


def save_d2_checkpoint(d2_state, path: str, model=None, extra: Optional[dict] = None) -> None:
    """Write ``{"model": d2_state, "__author__": ..., **extra}`` atomically (no partial file on
    any error). With ``model``, the state dict carries the model's version metadata so that any
    detectron2 checkpointer loads it without Mask2Former's legacy-layout renaming."""
    from ..fileio import atomic_path

    state = OrderedDict(d2_state)
    if model is not None:
        state._metadata = getattr(model.state_dict(), "_metadata", OrderedDict())
    payload = {"model": state, "__author__": "rooftop_m2f convert_hf_to_d2"}
    payload.update(extra or {})
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def convert_hf_to_file(hf_dir: str, output: str, num_classes: Optional[int] = None,
                       config_file: Optional[str] = None, opts=()):
    """The whole conversion of ``tools/convert_hf_to_d2.py``: read, convert, build our model
    from the implied config and check the converted weights fit it exactly, check ``config_file``
    (when given) has the same architecture, then write ``output`` atomically.

    Returns ``(report, implied_values, notes)``; ``notes`` are lines for the user (e.g. the class
    head that loading into ``config_file``'s model will re-initialise). Raises
    :class:`ConversionError`; nothing is written then."""
    from detectron2.modeling import build_model

    from .. import modeling  # noqa: F401  registers RooftopMaskFormer (and applies the shims)

    d2_state, report, values, files = convert_hf_folder(hf_dir, num_classes=num_classes)
    notes = []
    if config_file is not None:
        user_cfg = config_with({}, config_file, opts)
        wrong = config_disagreements(values, user_cfg)
        if wrong:
            lines = "; ".join(f"{k} is {have} in the config, the checkpoint needs {want}"
                              for k, have, want in wrong)
            raise ConversionError(f"{hf_dir} does not fit {config_file}: {lines}")
        have_classes = values["MODEL.SEM_SEG_HEAD.NUM_CLASSES"]
        cfg_classes = user_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        if have_classes != cfg_classes:
            notes.append(f"{config_file} has {cfg_classes} classes, the checkpoint {have_classes}: "
                         f"loading it as MODEL.WEIGHTS re-initialises the class head "
                         f"({have_classes}+1 -> {cfg_classes}+1 outputs) and keeps the rest")
    cfg = config_with(values, config_file, opts)
    cfg.ROOFTOP.MSDEFORM_ATTN_IMPL = "pytorch"  # only shapes are needed here
    model = build_model(cfg)
    check_against_model(d2_state, model, hf_dir)
    save_d2_checkpoint(d2_state, output, model=model, extra={
        "rooftop_hf_conversion": {
            "source": os.path.abspath(hf_dir),
            "files": [os.path.basename(f) for f in files],
            "implied_config": {k: (list(v) if isinstance(v, (list, tuple)) else v)
                               for k, v in values.items()},
        }})
    return report, values, notes
