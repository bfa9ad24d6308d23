"""The Video ControlNet (an SD1.5 ControlNet with motion blocks after its blocks): the model and its file formats."""
