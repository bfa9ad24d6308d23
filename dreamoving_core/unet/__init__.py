"""SD1.5 U-Net pieces shared by the motion blocks and the Video ControlNet: the blocks in LDM naming and the
topology rules that place motion blocks."""
