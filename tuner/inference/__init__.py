"""Inference: rendering cells, labelled grids, base pipelines with adapters loaded through
diffusers, and CLIP/DINO scoring."""
