"""Driver loops: they start the role actors and move object references between them."""
