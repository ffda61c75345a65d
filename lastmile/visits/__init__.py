"""Family doctors' field visits: the visit book, its signed hash chain, households."""
