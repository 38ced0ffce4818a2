"""Pre- and post-processing declared in a model's config, run by the server.

A model whose ``config.json`` has a ``pipeline`` takes what clients have (an encoded
image) instead of the tensor its network takes, and answers with class names besides the
scores. :mod:`edge.pipelines.config` declares the stages (one table from ``kind`` to the
stage's settings), :mod:`edge.pipelines.image` and :mod:`edge.pipelines.labels` run them,
and :class:`edge.pipelines.runtime.PipelineRuntime` wraps the model's runtime with them,
so the edge, the cloud worker and every transport get the same behaviour.
"""
