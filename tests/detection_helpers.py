"""Detection test assets: images with boxes drawn with PIL, and a torchvision detector built as the detection contract says, trained a few steps."""
from __future__ import annotations
import numpy as np

CLASSES = ["circle", "square", "triangle"]


def draw_scene(rng, size: int = 64):
    "One image with 1-2 shapes on a plain background; returns (PIL image, [(label index 0-based, [x1, y1, x2, y2])])."
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 80, 3)))
    d, objs = ImageDraw.Draw(img), []
    for _ in range(int(rng.integers(1, 3))):
        k, s = int(rng.integers(0, len(CLASSES))), int(rng.integers(size // 4, size // 2))
        x, y = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
        box, colour = [x, y, x + s, y + s], tuple(int(c) for c in rng.integers(150, 256, 3))
        if k == 0: d.ellipse(box, fill=colour)
        elif k == 1: d.rectangle(box, fill=colour)
        else: d.polygon([(x, y + s), (x + s // 2, y), (x + s, y + s)], fill=colour)
        objs.append((k, box))
    return img, objs


def train_detector(size: int = 64, steps: int = 10, seed: int = 0, name: str = "fasterrcnn_mobilenet_v3_large_320_fpn"):
    "The contract's detector (identity internal transform, label i + 1 = class i), trained `steps` SGD steps on drawn scenes; eval mode."
    import torch, torchvision
    from cvops.preprocess import PreprocessSpec, normalize
    torch.manual_seed(seed); rng = np.random.default_rng(seed)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=len(CLASSES) + 1,
                                         min_size=size, max_size=size, image_mean=[0, 0, 0], image_std=[1, 1, 1],
                                         # fewer sampled proposals and ROIs than the defaults: a few steps cost seconds, not minutes
                                         rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_batch_size_per_image=64,
                                         box_batch_size_per_image=32)
    spec, opt = PreprocessSpec(size=size), torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.train()
    for _ in range(steps):
        scenes = [draw_scene(rng, size) for _ in range(4)]
        xs = [torch.from_numpy(normalize(np.asarray(img), spec)) for img, _ in scenes]
        ts = [{"boxes": torch.tensor([b for _, b in o], dtype=torch.float32), "labels": torch.tensor([k + 1 for k, _ in o])} for _, o in scenes]
        loss = sum(model(xs, ts).values())
        opt.zero_grad(); loss.backward(); opt.step()
    return model.eval(), spec
