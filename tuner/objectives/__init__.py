"""Training objectives: what noisy input the denoiser sees, what it should predict, and how each
sample's loss is weighted (ddpm: epsilon / v-prediction; flow: rectified flow)."""
