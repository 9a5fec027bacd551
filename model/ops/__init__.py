"""Custom ops of the model, registered under `torch.ops.maskstream` when this package is imported."""
from maskstream.model.ops.nms import batched_nms, batched_nms_padded, batched_nms_reference
from maskstream.model.ops.roi_align import (
    RoIAlignAttrs,
    assign_levels,
    multiscale_roi_align,
    multiscale_roi_align_per_level_loop,
    roi_align,
    roi_align_reference,
    roi_align_rois,
)

__all__ = [
    "RoIAlignAttrs",
    "assign_levels",
    "batched_nms",
    "batched_nms_padded",
    "batched_nms_reference",
    "multiscale_roi_align",
    "multiscale_roi_align_per_level_loop",
    "roi_align",
    "roi_align_reference",
    "roi_align_rois",
]
