"""Wire formats at the edge: the HTTP/JSON codec the TorchServe handlers use."""
