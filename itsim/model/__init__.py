"""The model stage: network (encoders + head), batched encoding, the model directory.

`from itsim.model import load_model, ItsimModel, ...` is the public path; the submodules hold one job each.
"""
from itsim.model.encode import encode_captions, encode_images, score_all_pairs
from itsim.model.io import MODEL_FILES, Preprocess, load_model, resolve_device, save_model
from itsim.model.network import ItsimModel, ModelConfig, count_parameters, images_to_float

__all__ = ["ItsimModel", "ModelConfig", "Preprocess", "MODEL_FILES", "count_parameters", "encode_captions",
           "encode_images", "images_to_float", "load_model", "resolve_device", "save_model", "score_all_pairs"]
