"""Data preparation for training: dance videos cut into transition-free clips, captioned, with pose and depth hints,
and a face image set; described by the manifests of :mod:`dreamoving_core.data.manifest`."""
