"""The HTTP edge: the BentoML service (``api``), the boundary middleware that checks every
request before BentoML sees it (``boundary``), the hand-off to BentoML's batcher
(``dispatch``, ``batching``), the OpenAPI document (``openapi``), and every use of BentoML's
private internals (``bentoml_glue``)."""
