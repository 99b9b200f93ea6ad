from compeffdist_ray.cli import entrypoint

entrypoint()
