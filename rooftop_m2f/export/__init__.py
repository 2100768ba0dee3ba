"""The trained model exported for deployment: ONNX.

:mod:`.onnx_export` (torch, detectron2) writes the semantic-segmentation path as an ONNX graph
with a JSON description beside it; :mod:`.onnx_runtime` (numpy and onnxruntime only) scores
image windows with it, with the same preprocessing and the same outputs as the PyTorch
predictor. Importing this package imports neither.
"""
