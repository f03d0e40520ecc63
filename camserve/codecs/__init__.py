"""Wire formats at the edge: :mod:`camserve.codecs.http` is the JSON/HTTP codec of the handlers."""
