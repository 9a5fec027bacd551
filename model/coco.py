"""COCO's 91-slot category list as torchvision's detection models index it (0 = background,
"N/A" = ids COCO skipped)."""

COCO_CATEGORY_NAMES = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet",
    "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "N/A", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
assert len(COCO_CATEGORY_NAMES) == 91


def class_names(num_classes: int, configured: tuple[str, ...] = ()) -> tuple[str, ...]:
    """One name per label: the configured ones, else COCO's for a 91-class model, else class_<i>."""
    if configured:
        return configured
    if num_classes == len(COCO_CATEGORY_NAMES):
        return COCO_CATEGORY_NAMES
    return tuple(f"class_{i}" for i in range(num_classes))
