"""Image data for every stage: the bundled emoji, drawn shapes, image folders, captioned folders, WebDataset
tars, transforms, epoch samplers and pack-data (docs/DATA.md)."""
