"""Pre- and post-processing declared in a model's config, run by the server.

A model whose ``config.json`` has a ``pipeline`` takes what clients have (an encoded
image, a text) instead of the tensors its network takes, and answers with class names
besides the scores. :mod:`serving.pipelines.config` declares the stages (one table from
``kind`` to the stage's settings), :mod:`serving.pipelines.image`,
:mod:`serving.pipelines.text` and :mod:`serving.pipelines.labels` run them, and
:class:`serving.pipelines.runtime.PipelineRuntime` wraps the model's runtime with them, so
the edge, the cloud worker and every transport get the same behaviour.
"""
