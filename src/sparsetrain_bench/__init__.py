"""The benchmark suite, step timing and the link probe. It imports the library; the library never imports it (the
`sparsetrain bench` and `sparsetrain report` commands dispatch here)."""
