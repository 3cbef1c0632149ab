"""Evaluation: FID and its Inception sources, reference statistics, sFID / KID / precision-recall, image
metrics (PSNR, SSIM), class agreement and its classifier, memorisation (docs/FID.md, docs/IMAGE_METRICS.md)."""
