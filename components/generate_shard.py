"""generate_shard: one worker's part of a synthetic dataset (the chunks k ≡ shard mod shards) written into `out`;
`condition_folder` KEY=FOLDER (a folder the task can read, or an s3:// prefix) gives each image its own file."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def generate_shard(model: str, n: int, out: str, seed: int, batch: int, condition: str, shards: int,
                   shard: int, condition_folder: str = "", precision: str = "") -> str:
    import json

    from sonogen.generate import condition_folder_of, generate_dataset

    result = generate_dataset(model, n, out, seed=seed, batch=batch, condition=json.loads(condition), shards=shards,
                              shard=shard, per_image=condition_folder_of(condition_folder),
                              precision=precision or None)  # "": the model's own
    print(f"shard {shard} of {shards}: {result['images']} images, {result['skipped_chunks']} of "
          f"{result['chunks']} chunks already there", flush=True)
    return json.dumps({k: result[k] for k in ("shard", "images", "chunks", "skipped_chunks")})
