"""Media I/O: video sources (files, RTSP, HLS, devices) and their decoding, pixel formats and
conversion, still images, drawing detections, and the output writers (JSONL, COCO, video)."""
