"""A synthetic code cache written through the format's own writer (shared by the cache and generator tests)."""
import numpy as np

from stage2_generator.cache_format import manifest_header, num_shards, shard_image_range
from stage2_generator.cache_writer import CacheWriter, ShardContent, caption_table

FINGERPRINT = "0123456789abcdef"
CLASSES = ["cat", "dog", "owl"]
EMBED_DIM = 4
MAX_TOKENS = 5  # text="tokens": token features of 1..5 tokens per caption


def text_record(text) -> dict | None:
    """text=False: no text; True: pooled embeddings; "tokens": token features."""
    if text == "tokens":
        return {"name": "test-tokens", "features": "tokens", "dim": EMBED_DIM, "max_tokens": MAX_TOKENS,
                "weights_sha256": "feedfacefeedface"}
    return {"name": "test", "dim": EMBED_DIM} if text else None


def header_for(num_images, images_per_shard, codebook_size=1000, grid=(2, 3), aug="none", text=False):
    return manifest_header(
        tokenizer_fingerprint=FINGERPRINT, tokenizer_path="/nowhere", downsample_factor=8,
        codebook_size=codebook_size, grid=grid, resolution=24, augmentation=aug, base_resolution=24,
        dataset={"source": "synthetic", "split": "train", "max_images": 0, "num_images": num_images,
                 "class_names": CLASSES, "caption_source": "test"},
        text_encoder=text_record(text), images_per_shard=images_per_shard,
        batch_size=2)


def make_cache(path, num_images=10, images_per_shard=4, skipped=(), seed=0, **kwargs) -> dict:
    """A complete cache of random codes written through the format's own writer; returns what went in."""
    header = header_for(num_images, images_per_shard, **kwargs)
    views, k, grid = header["augmentation"]["views"], header["codebook_size"], tuple(header["grid"])
    rng = np.random.default_rng(seed)
    writer = CacheWriter(path, header, overwrite=False)
    writer.prepare()
    tokens = (header["text_encoder"] or {}).get("features") == "tokens"
    truth = {"codes": [], "labels": [], "image_index": [], "view": [], "captions": [], "embeddings": [], "masks": []}
    for s in range(num_shards(num_images, images_per_shard)):
        begin, end = shard_image_range(s, num_images, images_per_shard)
        images = np.repeat([i for i in range(begin, end) if i not in skipped], views).astype(np.int64)
        captions = [f"image {i} of class {CLASSES[i % 3]}" for i in images]
        ids, table = caption_table(captions)
        embeddings = rng.standard_normal((len(table), EMBED_DIM)).astype(np.float32)
        mask = None
        if tokens:  # left-padded features, float16 values (what the cache keeps)
            lengths = rng.integers(1, MAX_TOKENS + 1, len(table))
            mask = np.arange(MAX_TOKENS)[None, :] >= MAX_TOKENS - lengths[:, None]
            features = rng.standard_normal((len(table), MAX_TOKENS, EMBED_DIM)).astype(np.float16)
            embeddings = features.astype(np.float32) * mask[..., None]
        content = ShardContent(
            codes=rng.integers(0, k, (len(images), *grid)), labels=images % 3, image_index=images,
            view=np.tile(np.arange(views), len(images) // views), caption_ids=ids, captions=table,
            text_embeddings=embeddings if header["text_encoder"] else None, image_range=(begin, end),
            skipped=[i for i in skipped if begin <= i < end], text_mask=mask)
        writer.write_shard(s, content)
        for name, values in (("codes", content.codes.reshape(len(images), grid[0] * grid[1])),
                             ("labels", content.labels), ("image_index", images), ("view", content.view),
                             ("captions", captions),
                             ("embeddings", embeddings[ids]), ("masks", mask[ids] if tokens else [])):
            truth[name].extend(values)
    writer.finish()
    return {name: np.array(values) for name, values in truth.items()}
