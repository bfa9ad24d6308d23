"""The Content Guider (Eq. 1, decoupled face/cloth cross-attention): the model, its file formats, its fused kernel,
and the image encoders that feed it (OpenCLIP ViT-H/14, InsightFace ArcFace)."""
