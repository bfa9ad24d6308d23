"""Hints from a driving video: DWPose whole-body keypoints (and their rendering, smoothing, retargeting), ZoeDepth."""
