"""Score one image-caption pair with an `itsim export --format onnx` folder: onnxruntime, PIL and numpy only."""
import json, re, sys
import numpy as np, onnxruntime as ort
from PIL import Image

folder, image_path, caption = sys.argv[1:4]
pre = json.load(open(f"{folder}/export.json"))["preprocess"]  # the resize below is pre["resize"] == "stretch"
index = {w: i for i, w in enumerate(json.load(open(f"{folder}/vocab.json"))["words"])}
image, size = Image.open(image_path), pre["image_size"]
image.draft("RGB", (size, size))  # JPEGs decode at reduced size as in itsim: the same pixels
pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC, reducing_gap=3.0))[None]
ids = [index.get(t, 1) for t in re.sub("[^a-z0-9]+", " ", caption.lower()).split()][: pre["max_len"]] or [1]
run = lambda name, **inputs: ort.InferenceSession(f"{folder}/{name}.onnx").run(None, inputs)[0]
text_vec = run("text_encoder", ids=np.array([ids], dtype=np.int64), lengths=np.array([len(ids)], dtype=np.int64))
logit = run("head", image_vec=run("image_encoder", images=pixels), text_vec=text_vec)[0]
print(1 / (1 + np.exp(-float(logit))))  # probability that the caption matches the image
