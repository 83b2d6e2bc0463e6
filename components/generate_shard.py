"""generate_shard: one worker's part of a synthetic dataset (the chunks k ≡ shard mod shards) written into `out`."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def generate_shard(model: str, n: int, out: str, seed: int, batch: int, condition: str, shards: int,
                   shard: int) -> str:
    import json

    from sonogen.generate import generate_dataset

    result = generate_dataset(model, n, out, seed=seed, batch=batch, condition=json.loads(condition), shards=shards,
                              shard=shard)
    print(f"shard {shard} of {shards}: {result['images']} images, {result['skipped_chunks']} of "
          f"{result['chunks']} chunks already there", flush=True)
    return json.dumps({k: result[k] for k in ("shard", "images", "chunks", "skipped_chunks")})
