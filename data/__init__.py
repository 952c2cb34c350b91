"""Data: COCO json, datasets and the view transform, the synthetic datasets, the sampler, the data config."""
