"""Process groups and the tensor/pipeline-parallel DiT transformer (issue 3 onward)."""
